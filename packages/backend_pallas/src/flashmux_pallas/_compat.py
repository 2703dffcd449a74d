"""Small shims over the Pallas API differences between the JAX versions we run on.

jax 0.10 (CI, CPU interpret) and jax 0.11 (the GPU machine) both take BlockSpec(block_shape,
index_map) by keyword and call the Triton compiler parameters `CompilerParams`; older releases
called them `TritonCompilerParams` and took the index map first. Keywords everywhere keep us safe.
"""

from __future__ import annotations


def pallas():
    from jax.experimental import pallas as pl

    return pl


def block_spec(block_shape, index_map):
    pl = pallas()
    return pl.BlockSpec(block_shape=tuple(block_shape), index_map=index_map)


def triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plt

    cls = getattr(plt, "CompilerParams", None) or plt.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def jax_version() -> tuple[int, ...]:
    import jax

    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def out_struct(shape, dtype, like):
    """jax.ShapeDtypeStruct for a kernel output, carrying `like`'s manual-axis (shard_map)
    typing so that pallas_call runs inside shard_map with check_vma=True."""
    import jax

    mat = None
    try:
        mat = getattr(jax.typeof(like), "manual_axis_type", None)
    except Exception:
        pass
    if mat is None:
        return jax.ShapeDtypeStruct(tuple(shape), dtype)
    try:
        return jax.ShapeDtypeStruct(tuple(shape), dtype, manual_axis_type=mat)
    except TypeError:  # a jax without the keyword
        return jax.ShapeDtypeStruct(tuple(shape), dtype)


def varying(x) -> bool:
    """Whether x is typed as varying over a shard_map manual axis (check_vma)."""
    import jax

    try:
        t = jax.typeof(x)
    except Exception:
        return False
    mat = getattr(t, "manual_axis_type", None)
    vary = getattr(mat, "varying", None) if mat is not None else getattr(t, "vma", None)
    return bool(vary)
