"""Counter-based dropout: keep(seed, batch, head, i, j) from integer hashing alone.

The same jnp expression runs inside the Pallas kernels (forward, dK/dV, dQ) and in the testing
hook, so the backward regenerates exactly the mask the forward drew, with no mask in memory.
i and j are row offsets inside the sequence (query row, key row), head is the query head.
"""

from __future__ import annotations

import numpy as np

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_ROW = 0x9E3779B1
_COL = 0x85EBCA77


def _fmix(x):
    """A 32-bit avalanche mix (xor-shift-multiply), on uint32 jax values."""
    import jax.numpy as jnp

    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> jnp.uint32(15))
    x = x * jnp.uint32(_M2)
    return x ^ (x >> jnp.uint32(16))


def seed32(seed: int) -> int:
    """Fold a Python int seed of any size into 32 bits (static, compile-time)."""
    s = int(seed) & ((1 << 64) - 1)
    return (s ^ (s >> 32)) & 0xFFFFFFFF


def threshold24(dropout_p: float) -> int:
    """Keep an element when its 24-bit hash is >= this (probability 1 - dropout_p)."""
    return int(np.round(float(dropout_p) * (1 << 24)))


def seed_operand(seed):
    """The kernels' seed operand: (1, 16) int32, every lane the 32-bit key (the bits of
    seed32(seed) for a Python int; the low 32 bits of a scalar integer array, traced or not,
    which for values below 2**32 is the same key). An operand, never a constant baked into the
    kernel, so a new seed compiles nothing."""
    import numbers

    import jax.numpy as jnp
    from jax import lax

    if isinstance(seed, numbers.Integral):
        s = seed32(int(seed))
        word = jnp.int32(s - (1 << 32) if s >= 1 << 31 else s)
    else:
        word = lax.bitcast_convert_type(jnp.asarray(seed).reshape(()).astype(jnp.uint32),
                                        jnp.int32)
    return jnp.broadcast_to(word, (1, 16))


def seed_of(ref):
    """Inside a kernel: the uint32 key from a seed_operand block (all 16 lanes equal)."""
    import jax.numpy as jnp

    return jnp.max(ref[...]).astype(jnp.uint32)


def keep(seed, dropout_p: float, b, h, i, j):
    """Bool keep mask, broadcast over i (rows) and j (cols); b, h scalars (int32 or uint32).
    seed: a Python int (folded by seed32) or a traced uint32 key (seed_of)."""
    import numbers

    import jax.numpy as jnp

    u = jnp.uint32
    if isinstance(seed, numbers.Integral):
        key0 = u(seed32(seed))
    else:  # a uint32 key (seed_of) or another scalar integer array: its low 32 bits
        key0 = jnp.asarray(seed).reshape(()).astype(jnp.uint32)
    key = _fmix(key0 ^ _fmix(b.astype(jnp.uint32) + u(0x68E31DA4)))
    key = _fmix(key ^ (h.astype(jnp.uint32) + u(0x1B56C4E9)))
    row = _fmix(key + i.astype(jnp.uint32) * u(_ROW))
    x = _fmix(row + j.astype(jnp.uint32) * u(_COL))
    return (x >> u(8)).astype(jnp.int32) >= jnp.int32(threshold24(dropout_p))


def keep_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k):
    """The full (batch, heads, seqlen_q, seqlen_k) keep mask, computed outside any kernel."""
    import jax
    import jax.numpy as jnp

    i = jnp.arange(seqlen_q, dtype=jnp.int32)[:, None]
    j = jnp.arange(seqlen_k, dtype=jnp.int32)[None, :]

    def one(b, h):
        return keep(seed, dropout_p, b, h, i, j)

    bs = jnp.arange(batch, dtype=jnp.int32)
    hs = jnp.arange(heads, dtype=jnp.int32)
    return jax.vmap(lambda b: jax.vmap(lambda h: one(b, h))(hs))(bs)
