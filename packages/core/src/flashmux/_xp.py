"""The handful of array operations the framework-native reference needs, for NumPy, torch and
jax.numpy, so that one algorithm (flashmux/backends/_chunked.py) serves all three.
"""

from __future__ import annotations

import numbers

import numpy as np


class NumpyOps:
    name = "numpy"

    def __init__(self):
        self.m = np

    def f32(self, x):
        x = np.asarray(x)
        return x if x.dtype == np.float64 else x.astype(np.float32)

    def cast_like(self, x, like):
        return np.asarray(x).astype(like.dtype)

    def einsum(self, eq, *xs):
        return np.einsum(eq, *xs)

    def amax(self, x, axis):
        if x.shape[axis]:
            return x.max(axis=axis, keepdims=True)
        shape = list(x.shape)
        shape[axis] = 1
        return np.full(shape, -np.inf, dtype=x.dtype)

    def arange(self, n, like):
        return np.arange(n, dtype=np.int64)

    def searchsorted(self, cu, idx):
        return np.searchsorted(cu, idx, side="right") - 1

    def asint(self, x, like):
        return np.asarray(x).astype(np.int64)

    def zeros(self, shape, like):
        return np.zeros(shape, dtype=like.dtype)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def add_rows(self, acc, lo, hi, x):
        """acc[:, lo:hi] += x (in place where the framework allows)."""
        acc[:, lo:hi] += x
        return acc

    def where(self, c, a, b):
        return np.where(c, a, b)


class TorchOps:
    name = "torch"

    def __init__(self):
        import torch

        self.m = torch
        self.torch = torch

    def f32(self, x):
        return x if x.dtype == self.torch.float64 else x.float()

    def cast_like(self, x, like):
        return x.to(like.dtype)

    def einsum(self, eq, *xs):
        return self.torch.einsum(eq, *xs)

    def amax(self, x, axis):
        if x.shape[axis] == 0:
            shape = list(x.shape)
            shape[axis] = 1
            return x.new_full(shape, float("-inf"))
        return self.torch.amax(x, dim=axis, keepdim=True)

    def arange(self, n, like):
        return self.torch.arange(n, device=like.device, dtype=self.torch.int64)

    def searchsorted(self, cu, idx):
        return self.torch.searchsorted(cu.to(self.torch.int64), idx, right=True) - 1

    def asint(self, x, like):
        return x.to(device=like.device, dtype=self.torch.int64)

    def zeros(self, shape, like):
        return self.torch.zeros(shape, dtype=like.dtype, device=like.device)

    def concat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def add_rows(self, acc, lo, hi, x):
        acc[:, lo:hi] += x
        return acc

    def where(self, c, a, b):
        t = self.torch
        # t.full fills on the device; t.tensor(scalar, device=cuda) would be a synchronizing copy
        if not isinstance(a, t.Tensor):
            a = t.full((), a, dtype=b.dtype, device=b.device)
        if not isinstance(b, t.Tensor):
            b = t.full((), b, dtype=a.dtype, device=a.device)
        return t.where(c, a, b)


class JaxOps:
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.m = jnp
        self.jax = jax
        self._prec = jax.lax.Precision.HIGHEST

    def f32(self, x):
        return x if x.dtype == self.m.float64 else x.astype(self.m.float32)

    def cast_like(self, x, like):
        return x.astype(like.dtype)

    def einsum(self, eq, *xs):
        # HIGHEST: on GPUs the default precision of a float32 dot is TF32-like.
        return self.m.einsum(eq, *xs, precision=self._prec)

    def amax(self, x, axis):
        if x.shape[axis] == 0:
            shape = list(x.shape)
            shape[axis] = 1
            return self.m.full(shape, -self.m.inf, dtype=x.dtype)
        return self.m.max(x, axis=axis, keepdims=True)

    def arange(self, n, like):
        return self.m.arange(n, dtype=self.m.int32)

    def searchsorted(self, cu, idx):
        return self.m.searchsorted(cu.astype(self.m.int32), idx, side="right") - 1

    def asint(self, x, like):
        return self.m.asarray(x).astype(self.m.int32)

    def zeros(self, shape, like):
        return self.m.zeros(shape, dtype=like.dtype)

    def concat(self, xs, axis):
        return self.m.concatenate(xs, axis=axis)

    def add_rows(self, acc, lo, hi, x):
        return acc.at[:, lo:hi].add(x)

    def where(self, c, a, b):
        return self.m.where(c, a, b)


_OPS: dict[str, object] = {}


def ops_for(kind: str):
    if kind not in _OPS:
        _OPS[kind] = {"numpy": NumpyOps, "torch": TorchOps, "jax": JaxOps}[kind]()
    return _OPS[kind]


# -- the reference backend's dropout RNG: a counter-based hash of (seed, batch, head, i, j) -------
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_MASK32 = 0xFFFFFFFF


def _mix32(x, ops):
    """lowbias32 finalizer on values held in 32 bits (int64 with a mask for numpy/torch,
    uint32 for JAX where int64 needs x64 mode)."""
    if ops.name == "jax":
        x = x ^ (x >> 16)
        x = x * ops.m.uint32(_M1)
        x = x ^ (x >> 15)
        x = x * ops.m.uint32(_M2)
        return x ^ (x >> 16)
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def _seed_bits(ops, seed):
    """The seed's low 32 bits: a Python int, or a scalar integer array (torch tensor or JAX
    array, traced or not: never read on the host), as uint32 (JAX) or int64 (NumPy, torch)."""
    if isinstance(seed, numbers.Integral):
        return int(seed) & _MASK32
    if ops.name == "jax":  # integer -> uint32 keeps the low 32 bits (two's complement)
        return ops.m.asarray(seed).reshape(()).astype(ops.m.uint32)
    if ops.name == "torch":
        return seed.reshape(()).to(ops.m.int64) & _MASK32
    return int(seed) & _MASK32


def dropout_uniform(ops, seed, b, h, i, j):
    """Uniform [0, 1) numbers, a pure function of (seed, batch, head, row, col); broadcasting.
    seed: an int or a scalar integer array (see _seed_bits); the same value gives the same bits."""
    seed = _seed_bits(ops, seed)
    if ops.name == "jax":
        u32 = ops.m.uint32

        def c(v):
            return ops.m.asarray(v).astype(u32)

        seed = u32(seed) if isinstance(seed, int) else seed  # ints >= 2**31 too
        x = _mix32(seed ^ u32(0x9E3779B9), ops)
        for part in (b, h, i, j):
            x = _mix32(x ^ c(part), ops)
        return (x >> 8).astype(ops.m.float32) * (1.0 / (1 << 24))
    x = _mix32(seed ^ 0x9E3779B9, ops)
    for part in (b, h, i, j):
        x = _mix32(x ^ part, ops)
    return (x >> 8) * (1.0 / (1 << 24))
