"""flashmux: one FlashAttention call for PyTorch, JAX and NumPy.

    out = flashmux.attention(q, k, v, causal=True)

The dispatcher runs the call on the fastest installed backend that supports it (CUDA C++,
Triton, Pallas, or the framework-native reference). `flashmux.explain(q, k, v, ...)` says which
and why. Importing flashmux imports no framework: torch and JAX are loaded when their arrays arrive.
"""

from . import reference
from .api import Explanation, attention, explain
from .backend import Backend, Capabilities
from .dispatch import NoBackendError, register, use_backend
from .spec import Params, ProblemSpec

__version__ = "0.1.0"


def backends():
    """Every discovered backend object (name, capabilities, availability())."""
    from . import dispatch

    return list(dispatch.registry().values())


__all__ = [
    "Backend",
    "Capabilities",
    "Explanation",
    "NoBackendError",
    "Params",
    "ProblemSpec",
    "attention",
    "backends",
    "explain",
    "reference",
    "register",
    "use_backend",
    "__version__",
]
