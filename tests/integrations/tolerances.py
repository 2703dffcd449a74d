"""Comparison tolerances shared by the integration tests."""


def tf32(*xs) -> bool:
    """JAX arrays on a GPU: float32 matmuls run in TF32 by default there (XLA and the Pallas
    kernels alike), so float32 comparisons take TF32's tolerance (measured on the H200,
    2026-11-30: up to ~1e-3 of the largest value between two correct float32 attentions)."""
    for x in xs:
        if type(x).__module__.startswith("jax"):
            try:
                if any(d.platform != "cpu" for d in x.devices()):
                    return True
            except Exception:
                pass
    return False
