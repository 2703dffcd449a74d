"""ALiBi in the Pallas backend's kernels (interpret mode on CPU), judged against flashmux.reference.

Each case runs flashmux.attention(backend="pallas", alibi_slopes=...) with return_lse under
jax.jit (or eagerly) and its VJP for a random dO (and dlse), and applies SPEC.md's rule with the
repo's judge (flashmux.testing.judge): error <= 2 * error(plain float32 JAX attention with the same
bias) + ATOL for out, lse, dq, dk, dv, against the float64 reference (which takes alibi_slopes=).
Interpret mode uses 16x16 blocks, so these small shapes cross several blocks, tails and diagonals.
Inputs are fresh random numbers every run; a failure prints its seed, FLASHMUX_TEST_SEED replays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flashmux  # noqa: E402
from flashmux.reference import allowed_mask, reference_backward, reference_forward  # noqa: E402
from flashmux.testing.judge import ATOL, format_report, max_err, redraw  # noqa: E402


@dataclass(frozen=True)
class ACase:
    batch: int = 2
    seqlen_q: int = 33
    seqlen_k: int = 33
    heads_q: int = 2
    heads_kv: int = 2
    head_dim: int = 32
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    slopes: str = "h"  # "h": (Hq,), "bh": (B, Hq)
    seqlens: tuple | None = None  # varlen: ((sq, sk), ...) per sequence
    lse_grad: bool = False
    transform: str = "jit"  # "jit" or "eager"

    def id(self) -> str:
        parts = [f"b{self.batch}q{self.seqlen_q}k{self.seqlen_k}h{self.heads_q}-{self.heads_kv}"]
        parts += ["causal"] * self.causal + [f"win{self.window}"] * bool(self.window)
        parts += [f"cap{self.softcap}"] * bool(self.softcap) + [f"slopes_{self.slopes}"]
        parts += ["varlen"] * bool(self.seqlens) + ["lsegrad"] * self.lse_grad
        return "-".join(parts + [self.transform])


# Causal with (Hq,) slopes at Sq != Sk and window + softcap + (B, Hq) slopes with GQA are also
# the Pallas pass of tests/conformance/test_masks.py (alibi_h_causal_sq_ne_sk,
# alibi_bh_window_softcap), so they are not repeated here (CI time).
CASES = [
    ACase(seqlen_q=20, seqlen_k=45, heads_q=4, heads_kv=2, causal=True, slopes="bh", lse_grad=True),
    ACase(seqlen_q=45, seqlen_k=20, heads_q=4, heads_kv=1, causal=True),  # Sq > Sk: empty rows
    ACase(seqlen_q=35, seqlen_k=35, softcap=2.5, transform="eager"),
    ACase(
        seqlens=((5, 9), (0, 3), (20, 17), (33, 30)),
        heads_q=4,
        heads_kv=2,
        causal=True,
        slopes="bh",
        lse_grad=True,
    ),
    ACase(seqlens=((18, 30), (33, 12)), heads_q=2, heads_kv=1, window=(4, 2), slopes="h"),
]


def _seed() -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def _plain(q, k, v, sl, case: ACase, do, dlse):
    """One sequence, float32 JAX with materialized scores: -> (out, lse, dq, dk, dv) float64."""
    sq, sk = q.shape[0], k.shape[0]
    g = case.heads_q // case.heads_kv
    ok = jnp.asarray(allowed_mask(sq, sk, case.causal, case.window))
    dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :]).astype(np.float32)
    bias = -jnp.asarray(sl, jnp.float32)[:, None, None] * jnp.asarray(dist)[None]
    scale = 1.0 / np.sqrt(case.head_dim)

    def f(q, k, v):
        kk, vv = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
        s = jnp.einsum("qhd,khd->hqk", q, kk, precision="highest") * scale
        if case.softcap:
            s = case.softcap * jnp.tanh(s / case.softcap)
        s = jnp.where(ok[None], s + bias, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True) if sk else jnp.zeros((s.shape[0], sq, 1))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.exp(s - m)
        den = jnp.sum(e, axis=-1, keepdims=True)
        lse = jnp.where(
            den[..., 0] > 0, jnp.log(jnp.where(den > 0, den, 1.0))[..., 0] + m[..., 0], -jnp.inf
        )
        p = e / jnp.where(den > 0, den, 1.0)
        return jnp.einsum("hqk,khd->qhd", p, vv, precision="highest"), lse

    (out, lse), vjp = jax.vjp(f, q, k, v)
    dl = jnp.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = vjp((do, dl))
    return [np.asarray(x, np.float64) for x in (out, lse, dq, dk, dv)]


def _measure(case: ACase, seed: int):
    rng = np.random.default_rng(seed)
    hq, hkv, d = case.heads_q, case.heads_kv, case.head_dim
    if case.seqlens:
        lq = [a for a, _ in case.seqlens]
        lk = [b for _, b in case.seqlens]
        cu_q, cu_k = np.cumsum([0] + lq).astype(np.int32), np.cumsum([0] + lk).astype(np.int32)
        b = len(case.seqlens)
        qs, ks = (int(cu_q[-1]),), (int(cu_k[-1]),)
    else:
        b, cu_q, cu_k = case.batch, None, None
        qs, ks = (b, case.seqlen_q), (b, case.seqlen_k)
    q = rng.standard_normal(qs + (hq, d)).astype(np.float32)
    k = rng.standard_normal(ks + (hkv, d)).astype(np.float32)
    v = rng.standard_normal(ks + (hkv, d)).astype(np.float32)
    sl_shape = (hq,) if case.slopes == "h" else (b, hq)
    slopes = rng.uniform(0.02, 0.6, sl_shape).astype(np.float32)
    do = rng.standard_normal(q.shape).astype(np.float32)
    lse_shape = (hq, qs[0]) if case.seqlens else (b, hq, case.seqlen_q)
    dlse = rng.standard_normal(lse_shape).astype(np.float32) if case.lse_grad else None
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap)
    vkw = {}
    if case.seqlens:
        vkw = dict(
            cu_seqlens_q=jnp.asarray(cu_q),
            cu_seqlens_k=jnp.asarray(cu_k),
            max_seqlen_q=max(lq),
            max_seqlen_k=max(lk),
        )

    def run(q, k, v, sl):
        return flashmux.attention(
            q, k, v, alibi_slopes=sl, return_lse=True, backend="pallas", **kw, **vkw
        )

    fn = jax.jit(run) if case.transform == "jit" else run
    (out, lse), vjp = jax.vjp(fn, *(jnp.asarray(x) for x in (q, k, v, slopes)))
    dl = jnp.zeros_like(lse) if dlse is None else jnp.asarray(dlse)
    dq, dk, dv, dsl = vjp((jnp.asarray(do), dl))
    assert not np.any(np.asarray(dsl)), "no gradient flows into the slopes"
    got = [np.asarray(x, np.float64) for x in (out, lse, dq, dk, dv)]

    rkw = dict(kw, alibi_slopes=slopes)
    if case.seqlens:
        rkw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = list(reference_forward(q, k, v, **rkw))
    ref += list(reference_backward(do, q, k, v, dlse=dlse, **rkw))

    # plain float32 attention, sequence by sequence
    plain = [np.zeros_like(r) for r in ref]
    for i in range(b):
        sl = slopes[i] if slopes.ndim == 2 else slopes
        if case.seqlens:
            qi, ki = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            dli = None if dlse is None else jnp.asarray(dlse[:, qi])
            o, ls, gq, gk, gv = _plain(q[qi], k[ki], v[ki], sl, case, do[qi], dli)
            plain[0][qi], plain[1][:, qi], plain[2][qi], plain[3][ki], plain[4][ki] = (
                o,
                ls,
                gq,
                gk,
                gv,
            )
        else:
            dli = None if dlse is None else jnp.asarray(dlse[i])
            o, ls, gq, gk, gv = _plain(q[i], k[i], v[i], sl, case, do[i], dli)
            plain[0][i], plain[1][i], plain[2][i], plain[3][i], plain[4][i] = o, ls, gq, gk, gv
    names = ("out", "lse", "dq", "dk", "dv")
    return {
        n: (max_err(g, r), 2 * max_err(p, r) + ATOL) for n, g, r, p in zip(names, got, ref, plain)
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_alibi_against_reference(case):
    ok, draws = redraw(lambda s: _measure(case, s), _seed())
    assert ok, "\n".join(f"seed {s}:\n  {format_report(r)}" for s, r in draws)


def test_unfused_uneven_blocks():
    """The other backward schedule (delta in XLA before dK/dV), one all-masked loop, dS rounded
    before the scale, and block_m != block_n: ALiBi's |i + off - j| on every tile."""
    from flashmux_pallas.ops import Blocks, Config, use_config

    cfg = Config(
        Blocks(32, 16, 4, 1),
        Blocks(16, 32, 4, 1),
        Blocks(32, 16, 4, 1),
        fused_delta=False,
        one_loop=True,
        scale_ds=False,
    )
    case = ACase(
        seqlen_q=37, seqlen_k=50, heads_q=4, heads_kv=2, causal=True, slopes="bh", lse_grad=True
    )
    with use_config(cfg):
        ok, draws = redraw(lambda s: _measure(case, s), _seed())
    assert ok, "\n".join(f"seed {s}:\n  {format_report(r)}" for s, r in draws)


def test_feature_and_lowerings(monkeypatch):
    """ALiBi (and block masks) are declared; with alibi both passes take the Mosaic GPU kernels
    on sm90 (the Triton lowering when told) and the slopes reach the kernels as an operand."""
    from flashmux.spec import Params
    from flashmux_pallas import backend, mosaic_kernels, ops

    caps = backend.capabilities
    assert "alibi" in caps.features and "block_mask" in caps.features  # blocksparse.py
    # Pretend to be on an sm90 with Mosaic GPU, and ask for the GPU answer (interpret=False).
    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mosaic_kernels, "available", lambda: True)
    monkeypatch.setattr(ops, "MOSAIC_MODE", "on")
    monkeypatch.setattr(ops, "MOSAIC_BWD_MODE", "on")
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    plain, alibi = Params(scale=0.125), Params(scale=0.125, alibi=True)
    # Without ALiBi this problem would take Mosaic GPU (a check that the patching reaches it).
    assert ops.lowering(q, q, q, plain, False) == "mosaic_gpu"
    assert ops.backward_lowering(q, q, q, plain, False) == "mosaic_gpu"
    # ALiBi on sm90: the Mosaic GPU kernels (mosaic_masks.py, the dense walk; measured faster
    # in session 12), the Triton lowering when FLASHMUX_PALLAS_ALIBI / _MASKS_BWD say triton
    assert ops.lowering(q, q, q, alibi, False) == "mosaic_gpu"
    assert ops.backward_lowering(q, q, q, alibi, False) == "mosaic_gpu"
    monkeypatch.setattr(ops, "ALIBI_MODE", "triton")
    monkeypatch.setattr(ops, "MASKS_BWD_MODE", "triton")
    assert ops.lowering(q, q, q, alibi, False) == "triton"
    assert ops.backward_lowering(q, q, q, alibi, False) == "triton"
    want = {"forward": "triton", "backward": "triton"}
    assert ops.lowering(q, q, q, alibi, True) == "interpret"
    monkeypatch.setattr(ops, "on_cpu", lambda x: False)
    assert backend.lowerings(q, q, q, alibi) == want
    monkeypatch.undo()
    # The slopes are traced values of the jitted call (an operand), not baked into the kernel:
    # one compile serves two slope vectors.
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, 24, 2, 16)), jnp.float32)
    f = jax.jit(lambda q, sl: flashmux.attention(q, q, q, alibi_slopes=sl, backend="pallas"))
    a = f(k, jnp.asarray([0.1, 0.5], jnp.float32))
    b_ = f(k, jnp.asarray([0.9, 0.0], jnp.float32))
    assert f._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b_))


@pytest.mark.parametrize("varlen", [False, True])
def test_lowers_to_triton_for_cuda(varlen):
    """The GPU path with ALiBi (forward, fused and unfused backward) lowers to Triton custom calls
    from the CPU (cross-platform lowering): catches constructs the Triton lowering rejects
    without a GPU (not a run)."""
    pytest.importorskip("jax.experimental.pallas.triton")
    from dataclasses import replace

    from flashmux.spec import Params
    from flashmux_pallas import ops

    B, S, Hq, Hkv, D = 2, 256, 8, 2, 64
    p = Params(scale=D**-0.5, causal=True, window_right=0, softcap=20.0, alibi=True)
    bf = jnp.bfloat16
    if varlen:
        p = replace(p, varlen=True, max_seqlen_q=S, max_seqlen_k=S)
        q = jax.ShapeDtypeStruct((B * S, Hq, D), bf)
        k = jax.ShapeDtypeStruct((B * S, Hkv, D), bf)
        lse = jax.ShapeDtypeStruct((Hq, B * S), jnp.float32)
        cu = jax.ShapeDtypeStruct((B + 1,), jnp.int32)
    else:
        q = jax.ShapeDtypeStruct((B, S, Hq, D), bf)
        k = jax.ShapeDtypeStruct((B, S, Hkv, D), bf)
        lse = jax.ShapeDtypeStruct((B, Hq, S), jnp.float32)
        cu = None
    sl = jax.ShapeDtypeStruct((B, Hq), jnp.float32)

    def f(q, k, v, cu, sl, do, lse):
        out = ops.forward(q, k, v, cu, cu, p, alibi_slopes=sl, interpret=False)
        grads = ops.backward(
            do, None, q, k, v, out[0], lse, cu, cu, p, alibi_slopes=sl, interpret=False
        )
        return out, grads

    for fused in (True, False):
        cfg = replace(ops.choose_config(D, True, False), fused_delta=fused)
        with ops.use_config(cfg):
            try:
                lowered = (
                    jax.jit(f).trace(q, k, k, cu, sl, q, lse).lower(lowering_platforms=("cuda",))
                )
            except (AttributeError, TypeError) as e:  # a jax without cross-platform lowering
                pytest.skip(f"cross-platform lowering unavailable: {e}")
        text = lowered.as_text()
        assert "xla.gpu.triton" in text
        for name in ("flashmux_fwd", "flashmux_bwd_dq", "flashmux_bwd_dkdv"):
            assert name in text
