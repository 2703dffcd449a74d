"""Testing aid for dropout seeds as arrays (docs/spec.md, "Dropout seeds").

`array_seeds(monkeypatch)` patches `flashmux.attention` so that an int `dropout_seed` reaches it
as a scalar integer array of the same value: a torch tensor on q's device, or a JAX int32 array
computed from q (so that inside jax.jit it is a traced value, not a constant). The conformance
judge (flashmux.testing.judge) then judges dropout cases with array seeds against the keep mask
of the int seed: the two forms must draw the same mask.
"""

from __future__ import annotations

import flashmux

from .._arrays import array_kind


def as_array_seed(seed: int, like):
    """`seed` as a scalar integer array of like's kind and device (JAX: int32 with the same low
    32 bits, derived from `like` so that it is traced wherever `like` is)."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.tensor(seed, dtype=torch.int64, device=like.device)
    if kind == "jax":
        import jax.numpy as jnp
        import numpy as np

        word = int(np.uint32(seed % 2**32).view(np.int32))
        return jnp.int32(word) + jnp.zeros((), jnp.int32) * like.ravel()[0].astype(jnp.int32)
    return seed


def array_seeds(monkeypatch) -> list[str]:
    """Patch flashmux.attention (restored by pytest's monkeypatch) to pass int dropout seeds as
    arrays; returns the list of seed types it passed (to assert that the route was taken)."""
    real = flashmux.attention
    used: list[str] = []

    def attention(q, k, v, **kw):
        s = kw.get("dropout_seed")
        if isinstance(s, int) and kw.get("dropout_p") and array_kind(q) in ("torch", "jax"):
            kw["dropout_seed"] = as_array_seed(s, q)
            used.append(type(kw["dropout_seed"]).__name__)
        return real(q, k, v, **kw)

    monkeypatch.setattr(flashmux, "attention", attention)
    return used


def assert_tensor_seed_equals_int(q, k, v, value: int, seed, dropout_p: float, backend: str):
    """torch: `seed` (a scalar integer tensor holding `value`) draws the int's dropout mask: out
    and the gradients of q, k, v (which require grad) bitwise equal; seed + 1 draws another."""
    import torch

    o_int = flashmux.attention(q, k, v, dropout_p=dropout_p, dropout_seed=value, backend=backend)
    o_arr = flashmux.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed, backend=backend)
    assert torch.equal(o_int, o_arr)
    g_int = torch.autograd.grad(o_int.square().sum(), (q, k, v))
    g_arr = torch.autograd.grad(o_arr.square().sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g_int, g_arr))
    other = flashmux.attention(q, k, v, dropout_p=dropout_p, dropout_seed=seed + 1,
                               backend=backend)
    assert not torch.equal(o_arr, other)


def recorded_seeds(monkeypatch) -> list:
    """Patch flashmux.attention (restored by pytest's monkeypatch) to record each call's
    dropout_seed, unchanged, in the returned list (integrations that draw the seed themselves:
    from the torch generator, as a tensor on the device)."""
    real = flashmux.attention
    seeds: list = []

    def attention(q, k, v, **kw):
        seeds.append(kw.get("dropout_seed"))
        return real(q, k, v, **kw)

    monkeypatch.setattr(flashmux, "attention", attention)
    return seeds
