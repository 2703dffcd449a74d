"""JAX glue: each (backend, params) pair becomes a jax.custom_vjp function whose forward and
backward call the same backend, so jax.grad / vjp / jit / vmap all work and the backward never
runs elsewhere. Backends that take torch tensors are reached eagerly through DLPack.

Imported only when JAX arrays reach `flashmux.attention`.
"""

from __future__ import annotations

import functools

import jax

from . import dispatch
from .spec import Params


@functools.lru_cache(maxsize=256)
def _vjp_fn(backend: str, p: Params):
    be = dispatch.get_backend(backend)

    @jax.custom_vjp
    def f(q, k, v, cu_q, cu_k):
        return be.forward(q, k, v, cu_q, cu_k, p)

    residual = be.capabilities.out_residual

    def f_fwd(q, k, v, cu_q, cu_k):
        # only 16-bit outputs are rounded enough to matter (as in the torch glue)
        if residual and q.dtype in (jax.numpy.float16, jax.numpy.bfloat16):
            out, lse, r = be.forward(q, k, v, cu_q, cu_k, p, residual=True)
        else:
            (out, lse), r = be.forward(q, k, v, cu_q, cu_k, p), None
        return (out, lse), (q, k, v, cu_q, cu_k, out, lse, r)

    def f_bwd(saved, cts):
        q, k, v, cu_q, cu_k, out, lse, r = saved
        dout, dlse = cts
        extra = {"out_residual": r} if r is not None else {}
        dq, dk, dv = be.backward(
            dout, dlse if p.return_lse else None, q, k, v, out, lse, cu_q, cu_k, p, **extra
        )
        return dq, dk, dv, None, None

    f.defvjp(f_fwd, f_bwd)
    return f


def run(backend: str, q, k, v, cu_q, cu_k, p: Params):
    return _vjp_fn(backend, p)(q, k, v, cu_q, cu_k)


def run_through_torch(be, q, k, v, cu_q, cu_k, p: Params):
    """Eager JAX arrays into a torch backend and back, without copies (DLPack)."""
    import torch

    def to_t(x):
        return None if x is None else torch.from_dlpack(x)

    out, lse = be.forward(to_t(q), to_t(k), to_t(v), to_t(cu_q), to_t(cu_k), p)
    return jax.dlpack.from_dlpack(out), jax.dlpack.from_dlpack(lse)


# -- ALiBi slopes and block masks (issue 15): extra operands of the custom_vjp -------------------


@functools.lru_cache(maxsize=256)
def _vjp_fn_ext(backend: str, p: Params):
    """Like _vjp_fn, with (slopes, block_mask) operands (None when absent; a BlockMask is a
    pytree). No gradient flows into either."""
    be = dispatch.get_backend(backend)

    def kw(slopes, bm, seed):
        extra = {}
        if slopes is not None:
            extra["alibi_slopes"] = slopes
        if bm is not None:
            extra["block_mask"] = bm
        if seed is not None:  # dropout_seed as an array operand (traced under jit)
            extra["dropout_seed"] = seed
        return extra

    @jax.custom_vjp
    def f(q, k, v, cu_q, cu_k, slopes, bm, seed):
        return be.forward(q, k, v, cu_q, cu_k, p, **kw(slopes, bm, seed))

    residual = be.capabilities.out_residual

    def f_fwd(q, k, v, cu_q, cu_k, slopes, bm, seed):
        if residual and q.dtype in (jax.numpy.float16, jax.numpy.bfloat16):
            out, lse, r = be.forward(q, k, v, cu_q, cu_k, p, residual=True,
                                     **kw(slopes, bm, seed))
        else:
            (out, lse), r = be.forward(q, k, v, cu_q, cu_k, p, **kw(slopes, bm, seed)), None
        return (out, lse), (q, k, v, cu_q, cu_k, slopes, bm, seed, out, lse, r)

    def f_bwd(saved, cts):
        q, k, v, cu_q, cu_k, slopes, bm, seed, out, lse, r = saved
        dout, dlse = cts
        extra = kw(slopes, bm, seed)
        if r is not None:
            extra["out_residual"] = r
        dq, dk, dv = be.backward(
            dout, dlse if p.return_lse else None, q, k, v, out, lse, cu_q, cu_k, p, **extra
        )
        dslopes = None if slopes is None else jax.numpy.zeros_like(slopes)
        return dq, dk, dv, None, None, dslopes, None, None

    f.defvjp(f_fwd, f_bwd)
    return f


def run_ext(backend: str, q, k, v, cu_q, cu_k, p: Params, alibi_slopes=None, block_mask=None,
            dropout_seed=None):
    return _vjp_fn_ext(backend, p)(q, k, v, cu_q, cu_k, alibi_slopes, block_mask, dropout_seed)


def run_through_torch_ext(be, q, k, v, cu_q, cu_k, p: Params, alibi_slopes=None, block_mask=None,
                          dropout_seed=None):
    """Eager JAX arrays (and the slopes / block mask) into a torch backend and back (DLPack)."""
    import torch

    from .blockmask import BlockMask

    def to_t(x):
        return None if x is None else torch.from_dlpack(x)

    extra = {}
    if alibi_slopes is not None:
        extra["alibi_slopes"] = to_t(alibi_slopes)
    if block_mask is not None:
        meta = block_mask.meta()[:-1] + ("torch",)
        extra["block_mask"] = BlockMask.from_arrays(meta, [to_t(a) for a in block_mask.arrays()])
    if dropout_seed is not None:
        extra["dropout_seed"] = to_t(dropout_seed)
    out, lse = be.forward(to_t(q), to_t(k), to_t(v), to_t(cu_q), to_t(cu_k), p, **extra)
    return jax.dlpack.from_dlpack(out), jax.dlpack.from_dlpack(lse)
