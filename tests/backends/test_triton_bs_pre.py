"""The block-sparse kernels' preloaded walks (FLASHMUX_TRITON_BS_PRE=1: list counts and first
entries loaded before Q, each walk carrying its next entry, partial tiles' bitmask ids from the
per-slot array `_launch_bs._ptid`) on the CPU interpreter, judged against the float64 reference
by the conformance rule. The mask has full and partial tiles (several per row, each with its own
bits, the partial list not contiguous), a per-batch axis, and a length off the mask block; fp16 with TMA forced (the
H200's path) and float32 with pointer loads (the full tier only: FLASHMUX_TEST_SIZE=full).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashmux  # noqa: E402
from flashmux import masks as M  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test; tests/backends/test_triton_bs_variants_gpu.py runs it on a GPU",
)


@pytest.mark.parametrize("case", ["fp16_tma", "fp32_tail"])
def test_preloaded_walk_vs_float64(case, monkeypatch):
    from flashmux_triton import _launch_bs as LB

    if case == "fp32_tail" and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_PRE", "1")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_FWD", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_BWD_DQ", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_BWD_DKDV", "32,32,4,1")
    if case == "fp16_tma":
        monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1")
    calls = []
    orig = LB._ptid
    monkeypatch.setattr(LB, "_ptid", lambda a: (calls.append(1), orig(a))[1])
    orig_kv = LB._ptid_kv
    monkeypatch.setattr(LB, "_ptid_kv", lambda a: (calls.append(2), orig_kv(a))[1])
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d = 2, 1, 16
    s = 96 if case == "fp16_tma" else 90
    seg = np.stack([np.repeat(np.arange(3), 32)[:s], np.repeat(np.arange(2), 48)[:s]])
    # key block 1 full for every row (a global block), so each row's partial list (every 7th
    # key elsewhere, each tile with its own bits, plus its document's causal part) skips a
    # slot: a walk that took slot t's tile id instead of its listed tile's would fail
    fn = M.or_(M.and_(M.document(seg), M.causal()),
               lambda b_, h_, qi, ki: ((ki >= 32) & (ki < 64)) | (ki % 7 == 0))
    dt = torch.float16 if case == "fp16_tma" else torch.float32
    q64, k64, v64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(4))
    q, k, v, do = (torch.tensor(x, dtype=dt) for x in (q64, k64, v64, do64))
    bm = flashmux.create_block_mask(fn, b, None, s, s, block_size=32, like=q)
    sl = torch.tensor(np.array([0.2], np.float32))

    def run():
        qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
        o = flashmux.attention(qa, ka, va, block_mask=bm, alibi_slopes=sl, backend="triton")
        return (o, *torch.autograd.grad((o.float() * do.float()).sum(), (qa, ka, va)))

    res = run()
    assert sorted(calls) == [1, 1, 2], "forward, dQ and dK/dV must all take the preloaded walk"
    ref = (reference_forward(q64, k64, v64, block_mask=fn, alibi_slopes=sl.numpy())[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, alibi_slopes=sl.numpy()))
    # the same call without PRE: the yardstick (same precision, same tiles)
    monkeypatch.setenv("FLASHMUX_TRITON_BS_PRE", "0")
    plain = run()
    for name, got, p, r in zip(("out", "dq", "dk", "dv"), res, plain, ref):
        err = float(np.abs(got.detach().double().numpy() - r).max())
        bound = 2 * float(np.abs(p.detach().double().numpy() - r).max()) + 1e-5
        assert err <= bound, f"{case} {name}: error {err:.3g} > bound {bound:.3g}"


def test_pre_env_names_kernels(monkeypatch):
    from flashmux_triton import _launch_bs as LB

    for env, want in (("1", (True, True, True)), ("0", (False, False, False)),
                      ("dq,dkdv", (False, True, True)), ("fwd", (True, False, False))):
        monkeypatch.setenv("FLASHMUX_TRITON_BS_PRE", env)
        assert tuple(LB._pre(w) for w in ("fwd", "dq", "dkdv")) == want, env


def test_defaults_only_for_the_measured_class(monkeypatch):
    """The H200-measured block-sparse defaults (forward 128x64x8 at two programs per SM, dQ
    preloaded, dK/dV 64x64x4x2 on the plain walk for plain calls and preloaded otherwise) apply
    to sm90+, 16-bit, head_dim 128 only; elsewhere tuning.py's tiles and no preloading (nothing
    else was measured)."""
    import types

    from flashmux_triton import _launch_bs as LB

    monkeypatch.delenv("FLASHMUX_TRITON_BS_PRE", raising=False)

    def pb(**kw):
        base = dict(interpret=False, ieee=False, capability=(9, 0), d=128, dv=128)
        return types.SimpleNamespace(**{**base, **kw})

    h200 = pb()
    assert [LB._pre(w, h200) for w in ("fwd", "dq", "dkdv")] == [False, True, True]
    assert LB._pre("dkdv", h200, plain=True) is False  # the plain calls' 2/SM dK/dV (session 10)
    cfg = LB._bs_default(h200, "fwd")
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.maxnreg) == (
        128, 64, 8, 2, 128)
    assert LB._bs_default(h200, "bwd_dq") is None
    cfg = LB._bs_default(h200, "bwd_dkdv")  # two programs per SM (session 10)
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (64, 64, 4, 2)
    for which in ("fwd", "bwd_dkdv"):  # ALiBi/softcap/dropout/window: not measured
        assert LB._bs_default(h200, which, plain=False) is None
    for other in (pb(capability=(8, 0)), pb(d=64, dv=64), pb(ieee=True), pb(interpret=True)):
        assert not any(LB._pre(w, other) for w in ("fwd", "dq", "dkdv"))
        assert LB._bs_default(other, "fwd") is None
        assert LB._bs_default(other, "bwd_dkdv") is None
