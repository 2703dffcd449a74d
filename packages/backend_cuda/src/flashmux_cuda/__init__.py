"""flashmux's cuda backend (skeleton: registers, reports itself unavailable until kernels land)."""

from flashmux.backend import Backend, Capabilities


class CudaBackend(Backend):
    def availability(self):
        return ["no kernels yet"]


backend = CudaBackend(
    name="cuda",
    description="cuda kernels (not yet implemented)",
    capabilities=Capabilities(
        array_kinds=frozenset(), devices=frozenset(), dtypes=frozenset()
    ),
)
