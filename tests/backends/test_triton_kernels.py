"""The Triton backend's kernels, called directly, against the float64 reference.

Runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported) on tiny shapes that still span several blocks, so the interior/boundary block split,
the tails and the padded head dims are all exercised. On a machine with a GPU and without the
interpreter, the same cases run on CUDA. Skips when torch or triton is missing.

Tolerance (SPEC): max abs error <= 2 x (error of plain attention in the same low precision,
float32 softmax) + 1e-5, for out, lse, dq, dk, dv.
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from flashmux.reference import allowed_mask, reference_backward, reference_forward  # noqa: E402
from flashmux.spec import Params  # noqa: E402
from flashmux_triton import backend  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
# for the Triton test files that import this one as `tk` (the case runner below)
INTERP = DEVICE == "cpu"
gpu_only = pytest.mark.skipif(INTERP, reason="GPU sizes: needs CUDA without the interpreter")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _params(d, causal=False, window=None, softcap=None, dropout_p=0.0, seed=0, varlen=False, mq=0, mk=0):
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    return Params(
        scale=1.0 / math.sqrt(d), causal=causal, window_left=left, window_right=right,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=seed, varlen=varlen,
        max_seqlen_q=mq, max_seqlen_k=mk,
    )


def _plain(q, k, v, do, dlse, *, causal, window, softcap, scale, cu_q, cu_k, dropout_p, keep):
    """Plain attention in the inputs' precision (materialized scores, float32 softmax), with
    autograd: the error yardstick of the SPEC's judging rule."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    hq = q.shape[-2]
    outs, lses = [], []
    seqs = (
        [(b, (b,), (b,)) for b in range(q.shape[0])]
        if cu_q is None
        else [(b, (slice(int(cu_q[b]), int(cu_q[b + 1])),), (slice(int(cu_k[b]), int(cu_k[b + 1])),))
              for b in range(len(cu_q) - 1)]
    )
    for b, qi, ki in seqs:
        qs, ks, vs = q[qi], k[ki], v[ki]
        g = hq // ks.shape[-2]
        ks, vs = ks.repeat_interleave(g, dim=-2), vs.repeat_interleave(g, dim=-2)
        s = torch.einsum("qhd,khd->hqk", qs, ks).float() * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        ok = torch.from_numpy(allowed_mask(qs.shape[0], ks.shape[0], causal, window))
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0))
        p = p.masked_fill(~ok, 0.0)
        if dropout_p:
            km = torch.from_numpy(keep[b, :, : qs.shape[0], : ks.shape[0]])
            p = p * km / (1 - dropout_p)
        outs.append(torch.einsum("hqk,khd->qhd", p.to(q.dtype), vs))
        lses.append(lse)
    if cu_q is None:
        out, lse = torch.stack(outs), torch.stack(lses)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, -1)
    loss = (out.float() * do.float()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * dlse).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def _err(x, ref):
    x = np.asarray(x.detach().double().cpu().numpy())
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(x), fin), "non-finite values where the reference has none (or the reverse)"
    assert np.array_equal(x[~fin], ref[~fin])  # -inf lse rows
    return float(np.abs(x[fin] - ref[fin]).max()) if fin.any() else 0.0


CASES = [
    # name, B, Sq, Sk, Hq, Hkv, D, Dv, dtype, kwargs
    ("plain", 2, 40, 40, 2, 2, 32, 32, "float16", {}),
    ("causal-sq<sk-gqa", 1, 37, 53, 4, 2, 40, 40, "bfloat16", {"causal": True}),
    ("causal-sq>sk-empty-rows", 1, 50, 21, 2, 1, 24, 24, "float16", {"causal": True}),
    ("window-softcap", 2, 45, 45, 2, 2, 64, 64, "bfloat16", {"window": (9, 4), "softcap": 4.0}),
    ("window-left-only-causal", 1, 33, 70, 2, 2, 16, 16, "float16", {"causal": True, "window": (12, None)}),
    ("window-right-only-mqa", 1, 29, 29, 3, 1, 72, 72, "float16", {"window": (None, 5)}),
    ("dv-differs", 1, 30, 41, 2, 2, 48, 20, "bfloat16", {}),
    ("hdim-160", 1, 20, 33, 1, 1, 160, 160, "float16", {"causal": True}),
    ("float32", 1, 26, 35, 2, 1, 32, 32, "float32", {"softcap": 3.0}),
]


def _run_case(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, kw, varlen_lens=None, dropout_p=0.0, with_dlse=True):
    # seeded per case (stable across processes); FLASHMUX_TEST_SEED draws other inputs
    salt = os.environ.get("FLASHMUX_TEST_SEED", "0")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, Sq, Sk, Hq, D, Dv, dtype, varlen_lens, salt)).encode()))
    dt = DTYPES[dtype]
    if varlen_lens is None:
        cu_q = cu_k = None
        qs, ks = (B, Sq, Hq, D), (B, Sk, Hkv, D)
        vs = (B, Sk, Hkv, Dv)
        mq, mk = Sq, Sk
    else:
        lq, lk = varlen_lens
        cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lq)]), dtype=torch.int32)
        cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lk)]), dtype=torch.int32)
        qs, ks, vs = (sum(lq), Hq, D), (sum(lk), Hkv, D), (sum(lk), Hkv, Dv)
        mq, mk = max(lq), max(lk)
        B = len(lq)
    q = torch.randn(qs, generator=gen).to(dt)
    k = torch.randn(ks, generator=gen).to(dt)
    v = torch.randn(vs, generator=gen).to(dt)
    seed = 1234 + Sq
    p = _params(D, dropout_p=dropout_p, seed=seed, varlen=cu_q is not None, mq=mq, mk=mk, **kw)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    keep = None
    if dropout_p:
        keep = backend.dropout_keep_mask(seed, dropout_p, B, Hq, mq, mk, dev(q)).cpu().numpy()
    # as the core calls it when a gradient is needed: with the output's rounding residual
    out, lse, res = backend.forward(dev(q), dev(k), dev(v), dev(cu_q), dev(cu_k), p, residual=True)
    do = torch.randn(out.shape, generator=gen).to(dt)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    dq, dk, dv = backend.backward(dev(do), dev(dlse), dev(q), dev(k), dev(v), out, lse, dev(cu_q), dev(cu_k), p,
                                  out_residual=res)

    window = kw.get("window")
    common = dict(causal=kw.get("causal", False), scale=p.scale, window=window, softcap=kw.get("softcap"),
                  cu_seqlens_q=None if cu_q is None else cu_q.numpy(),
                  cu_seqlens_k=None if cu_k is None else cu_k.numpy(), dropout_p=dropout_p, keep_mask=keep)
    n = lambda x: x.double().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(n(q), n(k), n(v), **common)
    r_dq, r_dk, r_dv = reference_backward(n(do), n(q), n(k), n(v), dlse=None if dlse is None else n(dlse), **common)
    pl = _plain(q, k, v, do, dlse, causal=common["causal"], window=window, softcap=common["softcap"],
                scale=p.scale, cu_q=cu_q, cu_k=cu_k, dropout_p=dropout_p, keep=keep)
    for name, got, ref, base in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), (r_out, r_lse, r_dq, r_dk, r_dv), pl
    ):
        assert got.dtype == (torch.float32 if name == "lse" else dt), name
        e, eb = _err(got, ref), _err(base, ref)
        assert e <= 2 * eb + 1e-5, f"{name}: error {e:.3g} > 2 x plain {eb:.3g} + 1e-5"
    return out, lse, dq, dk, dv, keep


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward(case):
    _, B, Sq, Sk, Hq, Hkv, D, Dv, dtype, kw = case
    _run_case(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, kw)


def test_varlen_gqa_causal_with_empty_sequence():
    _run_case(0, 0, 0, 4, 2, 32, 32, "float16", {"causal": True},
              varlen_lens=([17, 0, 40, 9], [23, 5, 33, 9]))


def test_varlen_window():
    _run_case(0, 0, 0, 2, 2, 24, 24, "bfloat16", {"window": (6, 2)}, varlen_lens=([31, 12], [31, 20]))


def test_dropout_matches_reference_and_rate():
    out, *_, keep = _run_case(2, 33, 47, 2, 1, 32, 32, "float16", {"causal": True}, dropout_p=0.3)
    rate, n = keep.mean(), keep.size
    assert abs(rate - 0.7) <= 4 * math.sqrt(0.3 * 0.7 / n)


def test_dropout_varlen():
    _run_case(0, 0, 0, 2, 2, 16, 16, "bfloat16", {}, varlen_lens=([20, 35], [30, 18]), dropout_p=0.2)


def test_dropout_mask_is_a_pure_function_of_seed():
    like = torch.empty(0, device=DEVICE)
    a = backend.dropout_keep_mask(7, 0.5, 2, 3, 20, 30, like)
    b = backend.dropout_keep_mask(7, 0.5, 2, 3, 20, 30, like)
    c = backend.dropout_keep_mask(8, 0.5, 2, 3, 20, 30, like)
    assert a.dtype == torch.bool and a.shape == (2, 3, 20, 30)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the mask of a smaller problem is the corner of a larger one: keyed by position, not layout
    d = backend.dropout_keep_mask(7, 0.5, 2, 3, 40, 50, like)
    assert torch.equal(a, d[:, :, :20, :30])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_residual_is_the_rounding_error(dtype):
    """out + residual is the float32 output before rounding: each residual is within half an
    ulp of its output element, not all zero, and out + residual is closer to the float64
    reference than out (the float32 output still carries the low-precision P @ V error)."""
    gen = torch.Generator().manual_seed(zlib.crc32(dtype.encode()) + np.random.randint(1 << 20))
    q, k, v = (torch.randn(1, 37, 2, 24, generator=gen).to(DTYPES[dtype]) for _ in range(3))
    p = _params(24, causal=True)
    out, lse, res = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, p,
                                    residual=True)
    assert res.shape == out.shape and res.dtype == out.dtype
    r_out, _ = reference_forward(*(x.double().numpy() for x in (q, k, v)), causal=True,
                                 scale=p.scale)
    err_low = np.abs(out.cpu().double().numpy() - r_out).max()
    err_hi = np.abs((out.cpu().double() + res.cpu().double()).numpy() - r_out).max()
    assert err_hi < err_low, (err_hi, err_low)
    o, r = out.cpu().double(), res.cpu().double()
    ulp = torch.finfo(out.dtype).eps * torch.clamp(o.abs(), min=torch.finfo(out.dtype).tiny)
    assert (r.abs() <= 0.5 * ulp * (1 + 1e-3)).all() and (r != 0).any()
    out2, lse2 = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, p)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_deterministic_backward_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 4, 32, generator=gen).half().to(DEVICE)
    k = torch.randn(1, 40, 1, 32, generator=gen).half().to(DEVICE)
    v = torch.randn(1, 40, 1, 32, generator=gen).half().to(DEVICE)
    p = Params(scale=0.2, causal=True, window_right=0, deterministic=True)
    out, lse = backend.forward(q, k, v, None, None, p)
    do = torch.randn(out.shape, generator=gen).half().to(DEVICE)
    g1 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    g2 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_import_is_lazy_and_capabilities():
    import subprocess
    import sys

    code = (
        "import sys, flashmux_triton as f; "
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules; "
        "c = f.backend.capabilities; assert c.array_kinds == {'torch'} and 'jax' in c.crosses_from"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    caps = backend.capabilities
    assert caps.max_head_dim == 256 and {"float16", "bfloat16"} <= caps.dtypes
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "cpu" in caps.devices and backend.availability() == []


def test_negative_scale_takes_the_unfolded_path():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 2, 16, generator=gen).half()
    k = torch.randn(1, 27, 2, 16, generator=gen).half()
    v = torch.randn(1, 27, 2, 16, generator=gen).half()
    p = Params(scale=-0.3, causal=True, window_right=0)
    out, lse = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, p)
    r_out, r_lse = reference_forward(q.double().numpy(), k.double().numpy(), v.double().numpy(), causal=True, scale=-0.3)
    assert _err(out, r_out) < 2e-3 and _err(lse, r_lse) < 1e-4


def test_tune_cache_roundtrip(tmp_path, monkeypatch):
    from flashmux_triton import tuning as T

    monkeypatch.setenv("FLASHMUX_TRITON_TUNE_CACHE", str(tmp_path / "tune.json"))
    c = T.TuneCache()
    assert c.get("k", "fwd") is None
    c.put("k", "fwd", T.KernelConfig(64, 32, 4, 2))
    assert T.TuneCache().get("k", "fwd") == T.KernelConfig(64, 32, 4, 2)  # a fresh process reads it
    t = T.default_tuning(T.ShapeClass(128, 128, "16bit", True), (9, 0), False)
    assert t == T.TABLE_SM90[(128, True)]
    assert T.smaller(t, "fwd").fwd.block_m == t.fwd.block_m // 2


def test_strided_inputs_and_tma_path(monkeypatch):
    """BHSD-permuted views (head stride > seq stride) and, opt-in, the tensor-descriptor path."""
    from flashmux_triton import _launch

    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 40, 32, generator=gen).half().transpose(1, 2)  # (B, S, H, D) view
    k = torch.randn(2, 2, 50, 32, generator=gen).half().transpose(1, 2)
    v = torch.randn(2, 2, 50, 32, generator=gen).half().transpose(1, 2)
    p = _params(32, causal=True)
    ref, ref_lse = reference_forward(q.double().numpy(), k.double().numpy(), v.double().numpy(), causal=True)
    out, lse = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, p)
    assert _err(out, ref) < 2e-3 and _err(lse, ref_lse) < 1e-4
    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1")
    qc, kc, vc = (x.contiguous().to(DEVICE) for x in (q, k, v))
    out2, lse2 = backend.forward(qc, kc, vc, None, None, p)
    assert _err(out2, ref) < 2e-3 and _err(lse2, ref_lse) < 1e-4
    if DEVICE == "cpu" or torch.cuda.get_device_capability() >= (9, 0):
        assert _launch._tma_views(_launch._Problem(qc, kc, vc, None, None, p), kc, vc) is not None
        assert not _launch._TMA_BROKEN


def test_fused_backward_with_atomic_dq(monkeypatch):
    monkeypatch.setenv("FLASHMUX_TRITON_BWD", "fused")
    _run_case(1, 37, 53, 4, 2, 40, 40, "float16", {"causal": True, "softcap": 6.0})
    _run_case(0, 0, 0, 2, 1, 32, 32, "bfloat16", {"window": (5, 3)}, varlen_lens=([20, 0, 33], [25, 4, 30]),
              dropout_p=0.25)


def test_autotune_picks_fastest_and_caches(tmp_path, monkeypatch):
    import triton

    from flashmux_triton import _launch
    from flashmux_triton import tuning as T

    monkeypatch.setenv("FLASHMUX_TRITON_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(T, "CACHE", T.TuneCache())
    q = torch.zeros(1, 8, 2, 32, dtype=torch.float16)
    pb = _launch._Problem(q, q, q, None, None, _params(32))
    ran = []
    fake_ms = {c: 1.0 + i for i, c in enumerate(T.FWD_CANDIDATES)}
    fake_ms[T.FWD_CANDIDATES[2]] = 0.5
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), fake_ms[ran[-1]])[1])
    best = _launch._autotuned(pb, "fwd", ran.append, T.FWD_CANDIDATES[0])
    assert best == T.FWD_CANDIDATES[2]
    ran.clear()
    assert _launch._autotuned(pb, "fwd", ran.append, T.FWD_CANDIDATES[0]) == best and not ran  # cached
