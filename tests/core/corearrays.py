"""Array makers shared by the core tests (any kind: numpy, torch, jax)."""

import importlib.util

import numpy as np

KINDS = ["numpy"] + [k for k in ("torch", "jax") if importlib.util.find_spec(k) is not None]


def make(kind, shape, dtype="float32", rng=None):
    rng = rng or np.random.default_rng()
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "torch":
        import torch

        return torch.from_numpy(x).to(getattr(torch, dtype))
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x, dtype=getattr(jnp, dtype))
    return x.astype(dtype)


def ints(kind, values):
    a = np.asarray(values, dtype=np.int32)
    if kind == "torch":
        import torch

        return torch.from_numpy(a)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a


