"""JAX glue of `flashmux.ring_attention`: a jax.custom_vjp per (variant, config), called inside
`shard_map` with the mesh axis that splits the sequence.

The ring passes K/V with `lax.ppermute` (the next block's transfer is issued before the current
block's kernel, so XLA's scheduler can overlap the two); the rank is `lax.axis_index`, a traced
value, so the two shapes of work a zigzag step can take (all queries x first key half, or second
query half x all keys) are the two branches of a `lax.cond`. The all-gather variant gathers K/V
with `lax.all_gather`, runs the ring's blocks on slices of the gathered arrays, and returns
dK/dV with `lax.psum_scatter`. Works under jit and grad. Imported only when JAX arrays reach
ring_attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import (
    Config,
    block_backend,
    merge,
    ring_block,
    rows,
    takes_residual,
)

_F32 = jnp.float32
_LOW = (jnp.float16, jnp.bfloat16)


def world_size(axis_name) -> int:
    try:
        size = lax.axis_size(axis_name) if hasattr(lax, "axis_size") else lax.psum(1, axis_name)
        return int(size)
    except Exception as e:  # unbound axis: NameError / ValueError depending on the JAX version
        raise ValueError(
            f"axis_name: {axis_name!r} is not a mesh axis bound here (call ring_attention inside "
            f"shard_map over that axis): {type(e).__name__}: {e}"
        ) from None


def run(q, k, v, cfg: Config, axis_name):
    fn = _allgather_fn if cfg.variant == "allgather" else _ring_fn
    return fn(cfg, axis_name)(q, k, v)


def _pad_rows(x, sl: slice, n: int, fill, dim=1):
    """x holds rows `sl` of n along dim: the full-size array with `fill` elsewhere."""
    if sl.start == 0 and sl.stop == n:
        return x
    shape = list(x.shape)
    shape[dim] = n
    full = jnp.full(shape, fill, x.dtype)
    idx = (slice(None),) * dim + (sl,)
    return full.at[idx].set(x)


def _perm(p):
    return [(i, (i + 1) % p) for i in range(p)]


# -- ring --------------------------------------------------------------------------------------


def _schedule(cfg: Config):
    """(block of step 0, block when src < rank, block when src > rank): static for every rank."""
    b0 = ring_block(cfg.layout, cfg.causal, 0, 0)
    if cfg.world_size == 1:
        return b0, None, None
    return b0, ring_block(cfg.layout, cfg.causal, 1, 0), ring_block(cfg.layout, cfg.causal, 0, 1)


def _fwd_block(blk, q, kc, vc, cfg: Config):
    n = q.shape[1]
    b, _, hq, _ = q.shape
    if blk is None:
        return jnp.zeros((b, n, hq, vc.shape[-1]), _F32), jnp.full((b, hq, n), -jnp.inf, _F32)
    qr, kr = rows(blk.q, n), rows(blk.k, n)
    qs, ks, vs = q[:, qr], kc[:, kr], vc[:, kr]
    be, prm = block_backend(qs, ks, vs, blk.causal, cfg.scale, cfg.softcap, cfg.return_lse,
                            True, cfg.forced)
    o, l = be.forward(qs, ks, vs, None, None, prm)
    return _pad_rows(o.astype(_F32), qr, n, 0.0), _pad_rows(l.astype(_F32), qr, n, -jnp.inf, 2)


def _bwd_block(blk, do, dlse, q, kc, vc, out, lse, res, cfg: Config):
    n = q.shape[1]
    if blk is None:
        return (jnp.zeros(q.shape, _F32), jnp.zeros(kc.shape, _F32), jnp.zeros(vc.shape, _F32))
    qr, kr = rows(blk.q, n), rows(blk.k, n)
    qs, ks, vs = q[:, qr], kc[:, kr], vc[:, kr]
    be, prm = block_backend(qs, ks, vs, blk.causal, cfg.scale, cfg.softcap, cfg.return_lse,
                            True, cfg.forced)
    kw = {"out_residual": res[:, qr]} if takes_residual(be) else {}
    dq, dk, dv = be.backward(
        do[:, qr], None if dlse is None else dlse[:, :, qr], qs, ks, vs, out[:, qr],
        lse[:, :, qr], None, None, prm, **kw,
    )
    return (_pad_rows(dq.astype(_F32), qr, n, 0.0), _pad_rows(dk.astype(_F32), kr, n, 0.0),
            _pad_rows(dv.astype(_F32), kr, n, 0.0))


def _step(fn, s, rank, cfg: Config, *args):
    """Run `fn(block, *args)` for ring step s >= 1, whose block depends on the traced rank."""
    _, lt, gt = _schedule(cfg)
    if lt == gt:
        return fn(lt, *args)
    src = (rank - s) % cfg.world_size
    return lax.cond(src < rank, lambda *a: fn(lt, *a), lambda *a: fn(gt, *a), *args)


def _ring_forward(q, k, v, cfg: Config, axis):
    p = cfg.world_size
    rank = lax.axis_index(axis)
    perm = _perm(p)
    b0, _, _ = _schedule(cfg)
    kc, vc = k, v
    out = lse = None
    for s in range(p):
        if s < p - 1:  # the next block travels while this one is computed
            kn, vn = lax.ppermute(kc, axis, perm), lax.ppermute(vc, axis, perm)
        if s == 0:
            out, lse = _fwd_block(b0, q, kc, vc, cfg)
        else:
            o, l = _step(lambda blk, q, kc, vc: _fwd_block(blk, q, kc, vc, cfg), s, rank, cfg,
                         q, kc, vc)
            out, lse = merge(out, lse, o, l)
        if s < p - 1:
            kc, vc = kn, vn
    return out, lse


def _ring_backward(do, dlse, q, k, v, out, lse, res, cfg: Config, axis):
    p = cfg.world_size
    rank = lax.axis_index(axis)
    perm = _perm(p)
    b0, _, _ = _schedule(cfg)
    dq = jnp.zeros(q.shape, _F32)
    kc, vc = k, v
    acc = None  # dK/dV of the block held now, arriving from the previous rank

    def blk_grads(blk, do, dlse, q, kc, vc, out, lse, res):
        return _bwd_block(blk, do, dlse, q, kc, vc, out, lse, res, cfg)

    for s in range(p):
        if s < p - 1:
            kn, vn = lax.ppermute(kc, axis, perm), lax.ppermute(vc, axis, perm)
        args = (do, dlse, q, kc, vc, out, lse, res)
        if s == 0:
            dq_b, dk_b, dv_b = blk_grads(b0, *args)
        else:
            dq_b, dk_b, dv_b = _step(blk_grads, s, rank, cfg, *args)
        dq = dq + dq_b
        if acc is not None:
            dk_b, dv_b = dk_b + acc[0], dv_b + acc[1]
        # after P sends each accumulator is back with the rank that owns its block; the last hop
        # (nothing is added after it) travels in the input dtype, which the owner rounds to anyway
        if p > 1:
            if s == p - 1:
                dk_b, dv_b = dk_b.astype(k.dtype), dv_b.astype(v.dtype)
            acc = (lax.ppermute(dk_b, axis, perm), lax.ppermute(dv_b, axis, perm))
        else:
            acc = (dk_b, dv_b)
        if s < p - 1:
            kc, vc = kn, vn
    assert acc is not None
    return dq, acc[0], acc[1]


@functools.lru_cache(maxsize=64)
def _ring_fn(cfg: Config, axis):
    def forward(q, k, v):
        out32, lse = _ring_forward(q, k, v, cfg, axis)
        out = out32.astype(q.dtype)
        # the stored output's rounding error: the backward's delta comes from the float32 output
        res = (out32 - out.astype(_F32)).astype(q.dtype)
        return out, lse, res, k, v

    return _with_vjp(forward, functools.partial(_ring_backward, cfg=cfg, axis=axis), cfg)


def _with_vjp(forward, backward, cfg: Config):
    """The jax.custom_vjp of a schedule: forward(q, k, v) -> (out, lse, res, k_saved, v_saved)
    (the ring saves its own k, v; the all-gather the gathered K/V, which its backward reads
    instead of gathering again); backward(do, dlse, q, k_saved, v_saved, out, lse, res) ->
    (dq, dk, dv), cast here to the inputs' dtypes. The lse cotangent is used when cfg.return_lse."""

    @jax.custom_vjp
    def f(q, k, v):
        out, lse, *_ = forward(q, k, v)
        return out, lse

    def f_fwd(q, k, v):
        out, lse, res, ks, vs = forward(q, k, v)
        return (out, lse), (q, ks, vs, out, lse, res)

    def f_bwd(saved, cts):
        q, ks, vs, out, lse, res = saved
        do, dlse = cts
        dlse = dlse.astype(_F32) if cfg.return_lse else None
        dq, dk, dv = backward(do.astype(q.dtype), dlse, q, ks, vs, out, lse, res)
        return dq.astype(q.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype)

    f.defvjp(f_fwd, f_bwd)
    return f


# -- all-gather --------------------------------------------------------------------------------
#
# K/V of every rank are gathered once (lax.all_gather, rank order) and dK/dV return with one
# lax.psum_scatter. The blocks are the ring's (the same static schedule and the same lax.cond on
# the traced rank), taken from the gathered arrays with a dynamic slice instead of arriving by
# ppermute. An earlier version called each rank's static prefix calls through a P-way lax.switch;
# XLA (jax 0.11.2, 2 H200s) died with SIGSEGV compiling its backward, while the ring's lax.cond
# compiled, so the all-gather variant now shares the ring's blocks.


def _src_block(xg, src, n):
    return lax.dynamic_slice_in_dim(xg, src * n, n, axis=1)


def _ag_forward(q, kg, vg, cfg: Config, axis):
    p, n = cfg.world_size, q.shape[1]
    rank = lax.axis_index(axis)
    b0, _, _ = _schedule(cfg)
    out, lse = _fwd_block(b0, q, _src_block(kg, rank, n), _src_block(vg, rank, n), cfg)
    for s in range(1, p):
        src = (rank - s) % p
        o, l = _step(lambda blk, q, kc, vc: _fwd_block(blk, q, kc, vc, cfg), s, rank, cfg,
                     q, _src_block(kg, src, n), _src_block(vg, src, n))
        out, lse = merge(out, lse, o, l)
    return out, lse


def _ag_backward(do, dlse, q, kg, vg, out, lse, res, cfg: Config, axis):
    p, n = cfg.world_size, q.shape[1]
    rank = lax.axis_index(axis)
    b0, _, _ = _schedule(cfg)
    dq = jnp.zeros(q.shape, _F32)
    dkg = jnp.zeros(kg.shape, _F32)
    dvg = jnp.zeros(vg.shape, _F32)

    def blk_grads(blk, do, dlse, q, kc, vc, out, lse, res):
        return _bwd_block(blk, do, dlse, q, kc, vc, out, lse, res, cfg)

    for s in range(p):
        src = (rank - s) % p
        args = (do, dlse, q, _src_block(kg, src, n), _src_block(vg, src, n), out, lse, res)
        if s == 0:
            dq_b, dk_b, dv_b = blk_grads(b0, *args)
        else:
            dq_b, dk_b, dv_b = _step(blk_grads, s, rank, cfg, *args)
        dq = dq + dq_b
        dkg = lax.dynamic_update_slice_in_dim(dkg, _src_block(dkg, src, n) + dk_b, src * n, 1)
        dvg = lax.dynamic_update_slice_in_dim(dvg, _src_block(dvg, src, n) + dv_b, src * n, 1)
    dk = lax.psum_scatter(dkg, axis, scatter_dimension=1, tiled=True)
    dv = lax.psum_scatter(dvg, axis, scatter_dimension=1, tiled=True)
    return dq, dk, dv


@functools.lru_cache(maxsize=64)
def _allgather_fn(cfg: Config, axis):
    def forward(q, k, v):
        kg = lax.all_gather(k, axis, axis=1, tiled=True)  # rank order: rank r's shard at r * n
        vg = lax.all_gather(v, axis, axis=1, tiled=True)
        out32, lse = _ag_forward(q, kg, vg, cfg, axis)
        out = out32.astype(q.dtype)
        res = (out32 - out.astype(_F32)).astype(q.dtype)
        return out, lse, res, kg, vg

    return _with_vjp(forward, functools.partial(_ag_backward, cfg=cfg, axis=axis), cfg)
