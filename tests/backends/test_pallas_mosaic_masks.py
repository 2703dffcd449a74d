"""Block masks (and dense ALiBi) on the Pallas Mosaic GPU kernels (flashmux_pallas/mosaic_masks.py,
mosaic_masks_bwd.py; issue 15; FLASHMUX_PALLAS_MASKS / _ALIBI / _MASKS_BWD = auto|mosaic|triton).

- CPU, in CI (milliseconds to seconds): the walk lists rebuild exactly the element mask
  (causal on top, ragged ends, per-head masks); the routing and its reasons; the kernel lowers
  to a Mosaic GPU custom call for CUDA from the CPU (layouts, wgmma shapes, barriers: not a run).
- FLASHMUX_TEST_MOSAIC_INTERPRET=1: Mosaic GPU's interpreter on the CPU against float64, the
  forward and the backward kernels (wgmma replaced by dots; 20-60 s a case, so not in CI).
- A Hopper GPU under JAX: flashmux.attention with the Mosaic forward forced, its backward on
  mosaic_masks_bwd.py (two cases on the Triton lowering), judged against the float64 reference by the conformance rule
  (flashmux.testing.judge) for out, lse, dq, dk, dv: every ready-made mask, a custom lambda,
  ragged lengths, rows that see nothing, causal on top, GQA, per-head masks, ALiBi (H,) and
  (B, H), the lse gradient, jit / grad / vmap.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")

import jax.numpy as jnp  # noqa: E402

import flashmux  # noqa: E402
from flashmux import masks as M  # noqa: E402
from flashmux.reference import allowed_mask, reference_backward, reference_forward  # noqa: E402
from flashmux.testing.judge import (  # noqa: E402
    ATOL,
    format_report,
    masked_softmax,
    max_err,
    plain_pv,
    plain_scores,
    redraw,
)


def _gpu_sm90() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 9.0
    except Exception:
        return False


def _params(causal=False, d=64, **kw):
    return types.SimpleNamespace(causal=causal, scale=d**-0.5, has_window=False, softcap=None,
                                 dropout_p=0.0, varlen=False, **kw)


# ----------------------------------------------------------------------------- CPU: walk lists


def _walk_picture(bm, sq, sk, causal, from_kind=False):
    """(Bm, Hm, Sq, Sk) bool: the elements the kernel's walk computes (full tiles whole,
    partial tiles through their bitmask and causal), as the kernel does."""
    from flashmux_pallas import mosaic_masks as mm

    ops = jax.jit(lambda: mm.walk_operands(bm, sq, sk, causal, from_kind))()  # one compile
    walk, cnt, ptid, bits = (np.asarray(x) for x in ops)
    bits = bits.transpose(0, 1, 3, 2).reshape(bits.shape[0], 128, 4)  # back to (tile, row, word)
    nq, nk = bm.num_q_blocks, bm.num_kv_blocks
    pic = np.zeros(walk.shape[:2] + (nq * 128, nk * 128), bool)
    col = np.arange(128)
    for b_ in range(walk.shape[0]):
        for h in range(walk.shape[1]):
            for qb in range(nq):
                nf, npart = cnt[b_, h, qb]
                seen = walk[b_, h, qb, :nf + npart]
                assert len(set(seen.tolist())) == len(seen), "a key block listed twice"
                for t in range(nf + npart):
                    kb = walk[b_, h, qb, t]
                    rows, cols = slice(qb * 128, qb * 128 + 128), slice(kb * 128, kb * 128 + 128)
                    if t < nf:
                        tile = np.ones((128, 128), bool)
                    else:
                        w = bits[ptid[b_, h, qb, t]]  # (128, 4)
                        tile = (w[:, col // 32] >> (col % 32)[None, :]) & 1 != 0
                        if causal:
                            i = qb * 128 + np.arange(128)[:, None]
                            tile &= kb * 128 + col[None, :] <= i + (sk - sq)
                    pic[b_, h, rows, cols] = tile
    return pic[:, :, :sq, :sk]


@pytest.mark.parametrize("sq,sk,causal,heads", [(300, 300, False, None), (384, 200, True, 2),
                                                (256, 256, False, 2)])
def test_walk_lists_rebuild_the_mask(sq, sk, causal, heads):
    """Every allowed element is computed once, no disallowed one (full tiles cut by the diagonal
    or the key end become partial; tiles causal empties are dropped); fails on a walk that
    forgets the ragged key end, drops a cut tile or keeps a dead one."""
    seg = np.sort(np.random.default_rng(0).integers(0, 3, (1, max(sq, sk))), axis=1)
    if heads:
        fn = lambda b, h, q, kv: ((q + 2 * kv + h) % 5 != 0) | (kv < 130)  # noqa: E731
    else:
        fn = M.or_(M.document(seg), M.prefix_lm(150))
    bm = flashmux.create_block_mask(fn, None, heads, sq, sk, block_size=128)
    got = _walk_picture(bm, sq, sk, causal)
    hi = np.arange(heads or 1).reshape(-1, 1, 1)
    want = np.asarray(fn(np.zeros((1, 1, 1), np.int64), hi, np.arange(sq)[None, :, None],
                         np.arange(sk)[None, None, :]), bool)
    want = np.broadcast_to(want, (heads or 1, sq, sk)) & allowed_mask(sq, sk, causal)[None]
    assert np.array_equal(got[0], want)


def test_dense_alibi_walk():
    """The dense ALiBi call's all-full walk: every key block once, causal cut at the diagonal."""
    from flashmux_pallas import mosaic_masks as mm

    for sq, sk, causal in ((256, 384, False), (300, 300, True), (128, 200, True)):
        bm = mm.dense_mask(sq, sk)
        got = _walk_picture(bm, sq, sk, causal, from_kind=True)[0, 0]
        assert np.array_equal(got, allowed_mask(sq, sk, causal))


# ----------------------------------------------------------------------------- CPU: routing


def test_routing_and_reasons(monkeypatch):
    """sm90 + mode: block masks of 128 in fp16/bf16, head_dim 64/128 take the Mosaic forward and
    (auto, measured) backward; dense ALiBi's backward follows ALIBI_MOSAIC_AUTO under auto;
    other calls and other devices keep the Triton lowering, with a reason."""
    from flashmux.spec import Params
    from flashmux_pallas import mosaic_kernels, ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mosaic_kernels, "available", lambda: True)
    monkeypatch.setattr(ops, "MASKS_MODE", "mosaic")
    monkeypatch.setattr(ops, "ALIBI_MODE", "mosaic")
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    p = Params(scale=0.1, causal=True, mask_block_size=128)
    assert ops.lowering(q, k, k, p, False) == "mosaic_gpu"
    assert ops.backward_lowering(q, k, k, p, False) == "mosaic_gpu"  # auto: measured (s12)
    monkeypatch.setattr(ops, "MASKS_BWD_MOSAIC_AUTO", False)
    assert ops.backward_lowering(q, k, k, p, False) == "triton"
    monkeypatch.setattr(ops, "MASKS_BWD_MOSAIC_AUTO", True)
    monkeypatch.setattr(ops, "ALIBI_MOSAIC_AUTO", False)
    assert ops.backward_lowering(q, k, k, Params(scale=0.1, alibi=True), False) == "triton"
    monkeypatch.setattr(ops, "MASKS_BWD_MODE", "mosaic")
    assert ops.backward_lowering(q, k, k, p, False) == "mosaic_gpu"
    assert ops.backward_lowering(q, k, k, Params(scale=0.1, alibi=True), False) == "mosaic_gpu"
    assert ops.backward_lowering(q, k, k, Params(scale=0.1, mask_block_size=64), False) == "triton"
    assert ops.backward_lowering(q, k, k, Params(scale=0.1), False) != "interpret"
    assert ops.lowering(q, k, k, p, True) == "interpret"
    assert ops.lowering(q, k, k, Params(scale=0.1, alibi=True), False) == "mosaic_gpu"
    for bad, word in ((Params(scale=0.1, mask_block_size=64), "block_size 64"),
                      (Params(scale=0.1, mask_block_size=128, softcap=5.0), "softcap"),
                      (Params(scale=-0.1, mask_block_size=128), "scale")):
        assert ops.lowering(q, k, k, bad, False) == "triton"
        assert any(word in r for r in ops.mosaic_masks_reasons(q, k, k, bad))
    q32 = q.astype(jnp.float32)
    assert ops.lowering(q32, q32, q32, p, False) == "triton"
    monkeypatch.setattr(ops, "MASKS_MODE", "triton")
    assert ops.mosaic_masks_reasons(q, k, k, p) == ["FLASHMUX_PALLAS_MASKS=triton"]
    monkeypatch.setattr(ops, "MASKS_MODE", "auto")
    monkeypatch.setattr(ops, "MASKS_MOSAIC_AUTO", False)
    assert "measured" in " ".join(ops.mosaic_masks_reasons(q, k, k, p))
    monkeypatch.setattr(ops, "MASKS_MOSAIC_AUTO", True)
    assert ops.lowering(q, k, k, p, False) == "mosaic_gpu"
    monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
    assert ops.lowering(q, k, k, p, False) == "triton"


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_lowers_to_mosaic_gpu_for_cuda(which, monkeypatch):
    """ops.forward (and, long tier, ops.backward) of a block-masked call (causal on top, ALiBi,
    ragged lengths, GQA) and of a dense ALiBi call lower to Mosaic GPU custom calls only, from
    the CPU (not a run)."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    if which == "backward" and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("long tier (FLASHMUX_TEST_SIZE=full): ~20 s of lowering")
    from flashmux.spec import Params
    from flashmux_pallas import mosaic_kernels, ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mosaic_kernels, "available", lambda: True)
    monkeypatch.setattr(ops, "MASKS_MODE", "mosaic")
    monkeypatch.setattr(ops, "ALIBI_MODE", "mosaic")
    monkeypatch.setattr(ops, "MASKS_BWD_MODE", "mosaic")
    B, S, Hq, Hkv, D = 2, 1000, 4, 2, 128
    seg = np.sort(np.random.default_rng(0).integers(0, 4, (B, S)), axis=1)
    bm = flashmux.create_block_mask(M.document(seg), B, None, S, S, block_size=128,
                                    like=jnp.zeros(1))
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, S, Hq, D), bf)
    k = jax.ShapeDtypeStruct((B, S, Hkv, D), bf)
    sl = jax.ShapeDtypeStruct((B, Hq), jnp.float32)
    pm = Params(scale=D**-0.5, causal=True, window_right=0, alibi=True, mask_block_size=128)
    pa = Params(scale=D**-0.5, alibi=True)

    lse = jax.ShapeDtypeStruct((B, Hq, S), jnp.float32)

    def f(q, k, sl, bm, lse):
        if which == "forward":
            a = ops.forward(q, k, k, None, None, pm, residual=True, interpret=False,
                            alibi_slopes=sl, block_mask=bm)
            b = ops.forward(q, k, k, None, None, pa, residual=True, interpret=False,
                            alibi_slopes=sl)
            return a, b
        ga = ops.backward(q, lse, q, k, k, q, lse, None, None, pm, out_residual=q,
                          interpret=False, alibi_slopes=sl, block_mask=bm)
        gb = ops.backward(q, None, q, k, k, q, lse, None, None, pa, out_residual=q,
                          interpret=False, alibi_slopes=sl)
        return ga, gb

    try:
        text = jax.jit(f).trace(q, k, sl, bm, lse).lower(lowering_platforms=("cuda",)).as_text()
    except (AttributeError, TypeError) as e:  # a jax without cross-platform lowering
        pytest.skip(f"cross-platform lowering unavailable: {e}")
    assert text.count("mosaic_gpu") >= (2 if which == "forward" else 4)
    assert "xla.gpu.triton" not in text


# ----------------------------------------------------------------------------- interpreter


def _icase(name):
    seg = np.sort(np.random.default_rng(1).integers(0, 3, (1, 384)), axis=1)
    return {
        "doc": (1, 384, 384, 2, 1, None, False, None, M.and_(M.causal(0), M.document(seg))),
        "ragged_causal_alibi_gqa": (1, 200, 300, 2, 1, None, True, (2,),
                                    lambda b, h, q, kv: (kv % 7 != 0) & (q > 20)),
        "per_head_alibi_bh": (2, 256, 256, 2, 2, 2, False, (2, 2),
                              lambda b, h, q, kv: (kv <= q + 64 * h) | (kv < 8)),
        "dense_alibi_causal": (1, 200, 300, 2, 1, None, True, (2,), None),
        "dense_alibi": (1, 200, 256, 2, 2, None, False, (1, 2), None),  # the all-full walk
    }[name]


interpreter = pytest.mark.skipif(
    os.environ.get("FLASHMUX_TEST_MOSAIC_INTERPRET") != "1",
    reason="Mosaic GPU interpreter: slow, FLASHMUX_TEST_MOSAIC_INTERPRET=1")
ICASES = ["doc", "ragged_causal_alibi_gqa", "per_head_alibi_bh", "dense_alibi_causal",
          "dense_alibi"]


@interpreter
@pytest.mark.parametrize("name", ICASES)
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_interpreted_kernels_match_reference(which, name):
    """mosaic_masks.forward (out, lse) and mosaic_masks_bwd.backward (dq, dk, dv from the
    reference out/lse, with an lse gradient) in Mosaic GPU's interpreter against float64
    (bf16 inputs: bounds of bf16 rounding)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from flashmux_pallas import mosaic_masks as mm
    from flashmux_pallas import mosaic_masks_bwd as mmb

    b, sq, sk, hq, hkv, heads, causal, alibi, fn = _icase(name)
    rng = np.random.default_rng(7)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(jnp.bfloat16)
                   for s in ((b, sq, hq, 64), (b, sk, hkv, 64), (b, sk, hkv, 64), (b, sq, hq, 64)))
    bm = None if fn is None else flashmux.create_block_mask(fn, b, heads, sq, sk, block_size=128,
                                                            like=q)
    sl = None if alibi is None else rng.uniform(0.02, 0.5, alibi).astype(np.float32)
    x64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)]
    ro, rl = reference_forward(*x64, causal=causal, block_mask=fn, alibi_slopes=sl)
    if which == "forward":
        out, lse = mm.forward(q, k, v, _params(causal), block_mask=bm, alibi_slopes=sl,
                              interpret=InterpretGPUParams())
        lse = np.asarray(lse, np.float64)
        assert np.array_equal(np.isneginf(lse), np.isneginf(rl))
        fin = np.isfinite(rl)
        assert np.abs(lse[fin] - rl[fin]).max() < 1e-3
        assert np.abs(np.asarray(out.astype(jnp.float32), np.float64) - ro).max() < 3e-2
        return
    dlse = np.where(np.isfinite(rl), rng.standard_normal(rl.shape), 0.0)
    do64 = np.asarray(do.astype(jnp.float32), np.float64)
    ref = reference_backward(do64, *x64, dlse=dlse, causal=causal, block_mask=fn, alibi_slopes=sl)
    out = jnp.asarray(ro, jnp.float32).astype(jnp.bfloat16)
    res = (jnp.asarray(ro, jnp.float32) - out.astype(jnp.float32)).astype(jnp.bfloat16)
    got = mmb.backward(do, jnp.asarray(dlse, jnp.float32), q, k, v, out,
                       jnp.asarray(rl, jnp.float32), _params(causal), block_mask=bm,
                       out_residual=res, alibi_slopes=sl, interpret=True)
    for name_, g, r in zip(("dq", "dk", "dv"), got, ref):
        err = np.abs(np.asarray(g.astype(jnp.float32), np.float64) - r).max()
        assert err < 1e-2 * max(1.0, np.abs(r).max()), (name_, err)


# ----------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class GCase:
    name: str
    mask: str
    batch: int = 2
    seqlen_q: int = 1000
    seqlen_k: int = 1000
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 128
    causal: bool = False
    slopes: str | None = None
    lse_grad: bool = False
    dtype: str = "bfloat16"
    transform: str = "jit"
    bwd: str = "mosaic"  # FLASHMUX_PALLAS_MASKS_BWD: mosaic_masks_bwd.py or the Triton lowering


GCASES = [
    GCase("causal", "causal", seqlen_q=1024, seqlen_k=1024),
    GCase("sliding_ragged_fp16", "sliding", dtype="float16", head_dim=64),
    GCase("doc_per_batch_lse", "doc", lse_grad=True),
    GCase("prefix_causal_flag", "prefix", causal=True, seqlen_q=700, seqlen_k=1100),
    GCase("chunked_alibi_h", "chunked", slopes="h"),
    GCase("dilated_alibi_bh", "dilated", slopes="bh", heads_kv=1),
    GCase("lambda_empty_rows", "lambda", seqlen_q=777, seqlen_k=1300, lse_grad=True),
    GCase("per_head_eager", "per_head", transform="eager"),
    GCase("doc_vmap", "doc", batch=1, transform="vmap"),
    GCase("dense_alibi_causal", "dense", causal=True, slopes="h"),
    GCase("dense_alibi_bh", "dense", seqlen_q=640, seqlen_k=1024, slopes="bh"),
    GCase("doc_lse_triton_bwd", "doc", lse_grad=True, bwd="triton"),
    GCase("lambda_alibi_triton_bwd", "lambda", slopes="h", bwd="triton"),
]


def _gmask(case: GCase, rng):
    s = max(case.seqlen_q, case.seqlen_k)
    off = case.seqlen_k - case.seqlen_q
    if case.mask == "causal":
        return M.causal(off), None
    if case.mask == "sliding":
        return M.sliding_window(200, 0), None
    if case.mask == "doc":
        seg = np.sort(rng.integers(0, 5, (case.batch, s)), axis=1)
        return M.and_(M.causal(off), M.document(seg)), None
    if case.mask == "prefix":
        return M.prefix_lm(300), None
    if case.mask == "chunked":
        return M.and_(M.causal(off), M.chunked(256)), None
    if case.mask == "dilated":
        return M.and_(M.causal(off), M.dilated(100, 300)), None
    if case.mask == "lambda":  # the first 150 query rows see nothing
        return (lambda b, h, q, kv: (q >= 150) & ((kv % 3 == 0) | (kv > q - 40))), None
    if case.mask == "per_head":
        return (lambda b, h, q, kv: ((q + kv + h) % 4 != 0) | (kv == q)), case.heads_q
    if case.mask == "dense":
        return None, None
    raise KeyError(case.mask)


def _gmeasure(case: GCase, seed: int):
    rng = np.random.default_rng(seed)
    b, sq, sk, hq, hkv, d = (case.batch, case.seqlen_q, case.seqlen_k, case.heads_q,
                             case.heads_kv, case.head_dim)
    dt = jnp.dtype(case.dtype)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dt)
               for s in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    do = jnp.asarray(rng.standard_normal((b, sq, hq, d)), jnp.float32).astype(dt)
    fn, heads = _gmask(case, rng)
    kw = dict(causal=case.causal)
    if fn is not None:
        kw["block_mask"] = flashmux.create_block_mask(
            fn, b if case.mask == "doc" else None, heads, sq, sk, block_size=128, like=q)
    slopes = None
    if case.slopes:
        slopes = rng.uniform(0.02, 0.6, (hq,) if case.slopes == "h" else (b, hq)).astype(np.float32)
        kw["alibi_slopes"] = jnp.asarray(slopes)
    ex = flashmux.explain(q, k, v, backend="pallas", return_lse=True, **kw)
    assert ex.chosen == "pallas", ex.reasons("pallas")
    dlse = jnp.asarray(rng.standard_normal((b, hq, sq)), jnp.float32) if case.lse_grad else None

    def run(q, k, v, do, dl):
        (out, lse), vjp = jax.vjp(lambda q, k, v: flashmux.attention(
            q, k, v, backend="pallas", return_lse=True, **kw), q, k, v)
        dl = jnp.zeros_like(lse) if dl is None else jnp.where(jnp.isfinite(lse), dl, 0.0)
        return (out, lse, *vjp((do, dl)))

    if case.transform == "vmap":
        dl1 = None if dlse is None else dlse[None]
        got = jax.jit(jax.vmap(run))(q[None], k[None], v[None], do[None], dl1)
        got = [x[0] for x in got]
    else:
        got = (jax.jit(run) if case.transform == "jit" else run)(q, k, v, do, dlse)
    got = [np.asarray(x.astype(jnp.float32), np.float64) for x in got]
    d64 = None if dlse is None else np.where(np.isfinite(got[1]), np.asarray(dlse, np.float64), 0.0)
    rkw = dict(causal=case.causal, alibi_slopes=slopes, block_mask=fn)
    x64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)]
    do64 = np.asarray(do.astype(jnp.float32), np.float64)
    ref = [*reference_forward(*x64, **rkw), *reference_backward(do64, *x64, dlse=d64, **rkw)]
    allowed = np.broadcast_to(allowed_mask(sq, sk, case.causal)[None, None], (b, hq, sq, sk))
    if fn is not None:
        bi, hi = np.arange(b).reshape(-1, 1, 1, 1), np.arange(hq).reshape(1, -1, 1, 1)
        allowed = allowed & np.asarray(fn(bi, hi, np.arange(sq).reshape(1, 1, -1, 1),
                                          np.arange(sk).reshape(1, 1, 1, -1)), bool)
    scale = 1.0 / np.sqrt(d)
    dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :]).astype(np.float32)

    def attend(q, k, v):
        s, vv = plain_scores(jnp, q, k, v, scale, "bqhd,bkhd->bhqk", 2, None)
        if slopes is not None:
            sl = slopes.reshape((1, -1, 1, 1) if slopes.ndim == 1 else (b, -1, 1, 1))
            s = s - jnp.asarray(sl) * jnp.asarray(dist)
        lse, p = masked_softmax(jnp, s, jnp.asarray(allowed))
        return plain_pv(jnp, "bhqk,bkhd->bqhd", p, vv, q.dtype), lse

    (po, pls), vjp = jax.vjp(attend, q, k, v)
    cl = jnp.zeros_like(pls) if d64 is None else jnp.asarray(d64, jnp.float32)
    plain = [np.asarray(x.astype(jnp.float32), np.float64) for x in (po, pls, *vjp((do, cl)))]
    names = ("out", "lse", "dq", "dk", "dv")
    return {n: (max_err(g, r), 2 * max_err(p, r) + ATOL)
            for n, g, r, p in zip(names, got, ref, plain)}


def _seed() -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int(np.random.default_rng().integers(0, 2**31))


@pytest.mark.skipif(not _gpu_sm90(), reason="needs a Hopper GPU under JAX")
@pytest.mark.parametrize("case", GCASES, ids=[c.name for c in GCASES])
def test_mosaic_masks_on_gpu(case, monkeypatch):
    from flashmux import dispatch
    from flashmux_pallas import ops

    monkeypatch.setattr(ops, "MASKS_MODE", "mosaic")
    monkeypatch.setattr(ops, "ALIBI_MODE", "mosaic")
    monkeypatch.setattr(ops, "MASKS_BWD_MODE", case.bwd)
    dispatch.clear_caches()
    q = jnp.zeros((case.batch, case.seqlen_q, case.heads_q, case.head_dim), case.dtype)
    p = types.SimpleNamespace(causal=case.causal, scale=0.1, has_window=False, softcap=None,
                              dropout_p=0.0, varlen=False, alibi=bool(case.slopes),
                              mask_block_size=0 if case.mask == "dense" else 128)
    assert ops.lowering(q, q, q, p, False) == "mosaic_gpu", ops.mosaic_masks_reasons(q, q, q, p)
    assert ops.backward_lowering(q, q, q, p, False) == ("mosaic_gpu" if case.bwd == "mosaic"
                                                        else "triton")
    ok, draws = redraw(lambda s: _gmeasure(case, s), _seed())
    assert ok, "\n".join(f"{case.name} seed {s}:\n  {format_report(r)}" for s, r in draws)
