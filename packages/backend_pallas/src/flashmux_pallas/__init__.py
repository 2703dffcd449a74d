"""flashmux's Pallas backend: FlashAttention forward and backward written in JAX Pallas.

On NVIDIA GPUs (sm80+) the kernels go through Pallas' Triton lowering; on the CPU they run in
Pallas interpret mode (correct, slow: meant for tests and CI). The kernels live in
`triton_kernels.py`, the padding/varlen/block-size glue in `ops.py`, dropout hashing in
`dropout.py`. Importing this package does not import JAX: everything JAX is imported lazily.
"""

from __future__ import annotations

__all__ = ["backend", "PallasBackend"]

_built: dict = {}


def __getattr__(name):
    # Built on first access rather than at import, so that importing this package before
    # flashmux (whose import discovers the backends and loads `flashmux_pallas:backend`) is no
    # circular import: by the time discovery asks, flashmux.backend is already importable.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _built:
        import flashmux  # noqa: F401  (may re-enter here through backend discovery)

        if not _built:
            from ._backend import PallasBackend, make_backend

            _built["PallasBackend"] = PallasBackend
            _built["backend"] = make_backend()
    return _built[name]
