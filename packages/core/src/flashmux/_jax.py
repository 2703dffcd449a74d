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
