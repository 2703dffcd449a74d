"""ALiBi slopes and block masks, judged by the conformance rule (flashmux.testing.judge):

    error(backend) <= 2 * error(plain attention, same framework and precision) + 1e-5

for out, lse, dq, dk, dv against the float64 reference (which takes alibi_slopes= and the mask
function itself, so the BlockMask's tiles and bitmasks are checked too). Plain attention here
adds the same bias and mask to the materialized scores. Small shapes, lengths that are not
multiples of the mask block (32), per-batch document masks, rows that see nothing, causal and
softcap on top, (Hq,) and (B, Hq) slopes, Sq != Sk. Runs on FLASHMUX_TEST_BACKEND (default the
reference); a backend that declines (no alibi / block_mask feature) is skipped with its reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from harness import ATOL, Framework, default_device, format_report, max_err, redraw

import flashmux
from flashmux import masks as M
from flashmux.reference import allowed_mask, reference_backward, reference_forward
from flashmux.testing.judge import masked_softmax, plain_pv, plain_scores


@dataclass(frozen=True)
class MCase:
    name: str
    batch: int = 2
    seqlen_q: int = 50
    seqlen_k: int = 50
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 16
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    mask: str | None = None  # key of _mask_fn
    mask_heads: bool = False  # the mask has a head axis
    slopes: str | None = None  # None, "h" (Hq,), "bh" (B, Hq)
    lse_grad: bool = False
    block_size: int = 32
    dtype: str = "float16"
    transform: str = "eager"  # JAX: "jit" passes the BlockMask through jax.jit
    jax: bool = False  # JAX runs a subset (each case compiles several programs: seconds on a CPU)
    gpu: bool = False  # GPU-sized (multi-tile for the GPU kernels' 64-128 row tiles): GPU only


def _segments(rng, b, s):
    """Sorted segment ids per batch row, 2-4 documents of random lengths."""
    out = np.zeros((b, s), np.int64)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), size=rng.integers(1, 4), replace=False))
        out[i] = np.searchsorted(cuts, np.arange(s), side="right")
    return out


def _mask_fn(case: MCase, rng):
    s = max(case.seqlen_q, case.seqlen_k)
    if case.mask is None:
        return None
    if case.mask == "doc_causal":
        return M.and_(M.causal(case.seqlen_k - case.seqlen_q), M.document(_segments(rng, case.batch, s)))
    if case.mask == "sliding":
        return M.sliding_window(12, 3)
    if case.mask == "prefix":
        return M.prefix_lm(9)
    if case.mask == "chunked":
        return M.chunked(20)
    if case.mask == "dilated":
        return M.dilated(4, 7)
    if case.mask == "or":
        return M.or_(M.sliding_window(2, 2), M.prefix_lm(5))
    if case.mask == "empty_rows":  # a custom lambda: rows < 10 see nothing
        return lambda b, h, q, kv: ((q * 7 + kv * 3) % 4 != 0) & (q >= 10)
    if case.mask == "prefix_dilated_doc":  # per-batch documents, each a prefix-LM or dilated
        return M.and_(M.document(_segments(rng, case.batch, s)),
                      M.or_(M.prefix_lm(40), M.dilated(16, 64)))
    if case.mask == "per_head":
        return lambda b, h, q, kv: ((q + kv + h) % 3 != 0) | (kv == q)
    raise KeyError(case.mask)


CASES = [
    MCase("doc_causal", mask="doc_causal"),
    MCase("doc_causal_sq_ne_sk", seqlen_q=37, seqlen_k=61, mask="doc_causal", heads_q=4, heads_kv=2),
    MCase("sliding_causal_softcap", mask="sliding", causal=True, softcap=3.0, heads_q=4, heads_kv=1),
    MCase("prefix_window_alibi_bh", seqlen_q=40, seqlen_k=56, mask="prefix", window=(20, None),
          slopes="bh"),
    MCase("chunked_lse_grad", mask="chunked", lse_grad=True),
    MCase("dilated_block64", seqlen_q=70, seqlen_k=70, mask="dilated", block_size=64),
    MCase("or_masks", mask="or", causal=True),
    MCase("empty_rows_lse_grad", mask="empty_rows", lse_grad=True, slopes="h", jax=True),
    MCase("per_head_mask", mask="per_head", mask_heads=True, heads_q=4, heads_kv=2),
    MCase("alibi_h_causal_sq_ne_sk", seqlen_q=33, seqlen_k=57, causal=True, slopes="h", jax=True),
    MCase("alibi_bh_window_softcap", seqlen_q=45, seqlen_k=30, window=(10, 4), softcap=4.0,
          slopes="bh", heads_q=4, heads_kv=2, jax=True),
    MCase("doc_causal_jit", mask="doc_causal", slopes="h", transform="jit", jax=True),
    # GPU-sized: several kernel tiles per row and column, head_dim 64/128 (skipped on a CPU)
    MCase("gpu_alibi_causal_d64", seqlen_q=300, seqlen_k=300, heads_q=4, heads_kv=2,
          head_dim=64, causal=True, slopes="bh", jax=True, gpu=True),
    MCase("gpu_alibi_window_softcap_d128", batch=1, seqlen_q=257, seqlen_k=700, heads_q=2,
          heads_kv=1, head_dim=128, window=(100, 50), softcap=20.0, slopes="h", lse_grad=True,
          jax=True, gpu=True),
    MCase("gpu_doc_causal_alibi_d128", seqlen_q=600, seqlen_k=600, heads_q=4, heads_kv=2,
          head_dim=128, mask="doc_causal", slopes="h", block_size=128, dtype="bfloat16",
          jax=True, gpu=True),
    MCase("gpu_per_head_causal_d64", batch=1, seqlen_q=333, seqlen_k=333, heads_q=4, heads_kv=2,
          head_dim=64, mask="per_head", mask_heads=True, causal=True, block_size=64, jax=True,
          gpu=True),
    # GPU-sized with 128 blocks, which the CUDA backend takes (it declines 32/64 blocks): each
    # ready-made mask and a custom lambda, lengths off the block, MQA, Sq != Sk
    MCase("gpu_sliding_causal_softcap_mqa_b128", seqlen_q=300, seqlen_k=300, heads_q=4, heads_kv=1,
          head_dim=64, mask="sliding", causal=True, softcap=3.0, block_size=128, gpu=True),
    MCase("gpu_chunked_lse_grad_b128", batch=2, seqlen_q=390, seqlen_k=390, head_dim=128,
          mask="chunked", lse_grad=True, block_size=128, dtype="bfloat16", gpu=True),
    MCase("gpu_empty_rows_alibi_b128", seqlen_q=270, seqlen_k=270, head_dim=64,
          mask="empty_rows", lse_grad=True, slopes="h", block_size=128, jax=True, gpu=True),
    MCase("gpu_or_causal_sq_ne_sk_b128", seqlen_q=200, seqlen_k=450, heads_q=4, heads_kv=2,
          head_dim=64, mask="or", causal=True, block_size=128, gpu=True),
    MCase("gpu_prefix_dilated_doc_b128", seqlen_q=500, seqlen_k=500, head_dim=128,
          mask="prefix_dilated_doc", slopes="bh", block_size=128, jax=True, gpu=True),
]


def _plain(fw: Framework, q, k, v, case, allowed, slopes64, do, dlse):
    """Plain attention with the bias and element mask: scores in the input precision, float32
    softmax; -> [out, lse, dq, dk, dv] (numpy float64)."""
    scale = 1.0 / np.sqrt(case.head_dim)
    i = np.arange(case.seqlen_q)[:, None]
    j = np.arange(case.seqlen_k)[None, :]
    dist = np.abs(i + case.seqlen_k - case.seqlen_q - j).astype(np.float32)
    bias = None
    if slopes64 is not None:
        sl = slopes64.astype(np.float32)
        sl = sl.reshape(1, -1, 1, 1) if sl.ndim == 1 else sl.reshape(case.batch, -1, 1, 1)
        bias = -sl * dist[None, None]
    allowed = np.broadcast_to(allowed, (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k))

    def attend(xp, q, k, v, to_xp):
        lo = q.dtype
        s, v = plain_scores(xp, q, k, v, scale, "bqhd,bkhd->bhqk", 2, case.softcap)
        if bias is not None:
            s = s + to_xp(bias)
        lse, p = masked_softmax(xp, s, to_xp(allowed))
        return plain_pv(xp, "bhqk,bkhd->bqhd", p, v, lo), lse

    if fw.kind == "torch":
        t = fw.t
        qa, ka, va = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out, lse = attend(t, qa, ka, va, lambda x: t.from_numpy(np.ascontiguousarray(x)).to(qa.device))
        loss = (out.float() * do.float()).sum()
        if dlse is not None:
            loss = loss + (t.where(t.isfinite(lse), lse, 0.0) * dlse).sum()
        grads = t.autograd.grad(loss, (qa, ka, va))
        return [fw.numpy(x) for x in (out, lse, *grads)]
    if fw.kind == "jax":
        jax, jnp = fw.jax, fw.jnp
        (out, lse), vjp = jax.vjp(lambda q, k, v: attend(jnp, q, k, v, jnp.asarray), q, k, v)
        cl = jnp.zeros_like(lse) if dlse is None else jnp.where(jnp.isfinite(lse), dlse, 0.0)
        return [fw.numpy(x) for x in (out, lse, *vjp((do.astype(out.dtype), cl)))]
    out, lse = attend(np, q, k, v, np.asarray)
    return [out.astype(np.float64), lse.astype(np.float64)]


def measure(case: MCase, backend: str, kind: str, seed: int):
    device = default_device(kind)
    fw = Framework(kind, device)
    rng = np.random.default_rng(seed)
    b, sq, sk, hq, hkv, d = (case.batch, case.seqlen_q, case.seqlen_k, case.heads_q,
                             case.heads_kv, case.head_dim)
    q, k, v = (fw.array(rng.standard_normal(s), case.dtype)
               for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    q64, k64, v64 = (fw.numpy(x) for x in (q, k, v))
    fn = _mask_fn(case, rng)
    slopes64 = None
    if case.slopes is not None:
        slopes64 = rng.uniform(0.02, 0.6, (hq,) if case.slopes == "h" else (b, hq)).astype(np.float32)
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap)
    if slopes64 is not None:
        kw["alibi_slopes"] = fw.array(slopes64)
    if fn is not None:
        kw["block_mask"] = flashmux.create_block_mask(
            fn, b, hq if case.mask_heads else None, sq, sk, block_size=case.block_size, like=q)
    grad = kind != "numpy"
    ex_in = tuple(x.detach().requires_grad_(True) for x in (q, k, v)) if kind == "torch" else (q, k, v)
    ex = flashmux.explain(*ex_in, return_lse=True, backend=backend, **kw)
    if ex.chosen != backend:
        return f"{backend} declines: " + "; ".join(ex.reasons(backend))

    do64 = fw.numpy(fw.array(rng.standard_normal((b, sq, hq, d)), case.dtype))
    dlse64 = rng.standard_normal((b, hq, sq)) if case.lse_grad and grad else None
    res = {}
    if kind == "torch":
        t = fw.t
        qa, ka, va = (x.detach().requires_grad_(True) for x in (q, k, v))
        out, lse = flashmux.attention(qa, ka, va, return_lse=True, backend=backend, **kw)
        loss = (out.float() * fw.array(do64, case.dtype).float()).sum()
        if dlse64 is not None:
            loss = loss + (t.where(t.isfinite(lse), lse, 0.0) * fw.array(dlse64, "float32")).sum()
        grads = t.autograd.grad(loss, (qa, ka, va))
        res = dict(zip(("out", "lse", "dq", "dk", "dv"), (fw.numpy(x) for x in (out, lse, *grads))))
    elif kind == "jax":
        jax, jnp = fw.jax, fw.jnp
        bm = kw.pop("block_mask", None)

        def fwd_bwd(q, k, v, bm, do, dl):
            (out, lse), vjp = jax.vjp(
                lambda q, k, v: flashmux.attention(q, k, v, return_lse=True, backend=backend,
                                                   block_mask=bm, **kw), q, k, v)
            return (out, lse, *vjp((do, dl)))

        dl = jnp.zeros((b, hq, sq), jnp.float32) if dlse64 is None else jnp.asarray(dlse64, jnp.float32)
        run = jax.jit(fwd_bwd) if case.transform == "jit" else fwd_bwd
        outs = run(q, k, v, bm, fw.array(do64, case.dtype), dl)
        res = dict(zip(("out", "lse", "dq", "dk", "dv"), (fw.numpy(x) for x in outs)))
    else:
        out, lse = flashmux.attention(q, k, v, return_lse=True, backend=backend, **kw)
        res = {"out": fw.numpy(out), "lse": fw.numpy(lse)}
    if dlse64 is not None:  # rows that see nothing: lse is -inf, its cotangent is dropped
        dlse64 = np.where(np.isfinite(res["lse"]), dlse64, 0.0)

    rkw = dict(causal=case.causal, window=case.window, softcap=case.softcap,
               alibi_slopes=slopes64, block_mask=fn)
    ref = dict(zip(("out", "lse"), reference_forward(q64, k64, v64, **rkw)))
    if grad:
        ref.update(zip(("dq", "dk", "dv"), reference_backward(do64, q64, k64, v64, dlse=dlse64, **rkw)))

    # the element mask the plain attention applies: mask_fn and causal/window, from scratch
    allowed = allowed_mask(sq, sk, case.causal, case.window)[None, None]
    if fn is not None:
        bi = np.arange(b).reshape(-1, 1, 1, 1)
        hi = np.arange(hq).reshape(1, -1, 1, 1)
        allowed = allowed & np.asarray(fn(bi, hi, np.arange(sq).reshape(1, 1, -1, 1),
                                          np.arange(sk).reshape(1, 1, 1, -1)), bool)
    do_fw = fw.array(do64, case.dtype) if grad else None
    dlse_fw = None
    if dlse64 is not None:
        dlse_fw = fw.array(dlse64, "float32") if kind == "torch" else fw.jnp.asarray(dlse64, fw.jnp.float32)
    plain = _plain(fw, q, k, v, case, allowed, slopes64, do_fw, dlse_fw)
    report = {}
    for name, p in zip(("out", "lse", "dq", "dk", "dv"), plain):
        report[name] = (max_err(res[name], ref[name]), 2 * max_err(p, ref[name]) + ATOL)
    return report


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_mask_case(case: MCase, backend: str, kind: str):
    if case.transform != "eager" and kind != "jax":
        pytest.skip("jit case: JAX only")
    if kind == "jax" and not case.jax:
        pytest.skip("JAX runs the cases marked jax=True (compiles take seconds per case on a CPU)")
    if case.gpu and default_device(kind) != "cuda":
        pytest.skip("GPU-sized case: runs where the arrays live on a GPU")
    seed = int(np.random.default_rng().integers(0, 2**31))
    first = measure(case, backend, kind, seed)
    if isinstance(first, str):
        pytest.skip(first)
    pending = [first]
    ok, draws = redraw(lambda s: pending.pop() if pending else measure(case, backend, kind, s), seed)
    assert ok, "\n".join(f"{backend}/{kind} {case.name} seed {s}:\n  {format_report(r)}"
                         for s, r in draws)


def test_dropout_with_block_mask(backend: str, kind: str):
    """Dropout on top of a block mask: float32 inputs against the float64 reference given the
    backend's own keep mask (out and gradients within 2e-5: a misplaced keep mask or a tile
    skipped or visited twice shows as errors of order 1)."""
    if kind != "torch":
        pytest.skip("torch only (one framework is enough for the keep-mask alignment)")
    import torch

    from flashmux import dispatch

    rng = np.random.default_rng()
    dev = default_device(kind)  # the GPU where there is one (the GPU backends decline CPU inputs)
    b, s, hq, hkv, d, p = 2, 45, 4, 2, 16, 0.3
    q, k, v = (torch.tensor(rng.standard_normal(sh), dtype=torch.float32, device=dev,
                            requires_grad=True)
               for sh in ((b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
    fn = M.and_(M.causal(), M.document(np.sort(rng.integers(0, 3, (b, s)), axis=1)))
    bm = flashmux.create_block_mask(fn, b, None, s, s, block_size=32, like=q)
    kw = dict(block_mask=bm, dropout_p=p, dropout_seed=int(rng.integers(0, 2**31)), softcap=5.0)
    ex = flashmux.explain(q, k, v, backend=backend, **kw)
    if ex.chosen != backend:
        pytest.skip(f"{backend} declines: " + "; ".join(ex.reasons(backend)))
    out = flashmux.attention(q, k, v, backend=backend, **kw)
    do = torch.tensor(rng.standard_normal(out.shape), dtype=torch.float32, device=dev)
    grads = torch.autograd.grad(out, (q, k, v), do)
    keep = dispatch.get_backend(backend).dropout_keep_mask(kw["dropout_seed"], p, b, hq, s, s, q)
    keep = np.asarray(keep.cpu().numpy() if hasattr(keep, "cpu") else keep, bool)
    x64 = [x.detach().double().cpu().numpy() for x in (q, k, v)]
    rkw = dict(block_mask=fn, dropout_p=p, keep_mask=keep, softcap=5.0)
    ro, _ = reference_forward(*x64, **rkw)
    rg = reference_backward(do.double().cpu().numpy(), *x64, **rkw)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ro, *rg)):
        err = float(np.abs(got.detach().double().cpu().numpy() - ref).max())
        assert err < 2e-5, f"{name}: {err:.3g}"
