"""flashmux's triton backend (skeleton: registers, reports itself unavailable until kernels land)."""

from flashmux.backend import Backend, Capabilities


class TritonBackend(Backend):
    def availability(self):
        return ["no kernels yet"]


backend = TritonBackend(
    name="triton",
    description="triton kernels (not yet implemented)",
    capabilities=Capabilities(
        array_kinds=frozenset(), devices=frozenset(), dtypes=frozenset()
    ),
)
