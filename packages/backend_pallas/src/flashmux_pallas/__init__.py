"""flashmux's pallas backend (skeleton: registers, reports itself unavailable until kernels land)."""

from flashmux.backend import Backend, Capabilities


class PallasBackend(Backend):
    def availability(self):
        return ["no kernels yet"]


backend = PallasBackend(
    name="pallas",
    description="pallas kernels (not yet implemented)",
    capabilities=Capabilities(
        array_kinds=frozenset(), devices=frozenset(), dtypes=frozenset()
    ),
)
