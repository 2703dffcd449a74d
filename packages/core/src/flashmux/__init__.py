"""flashmux: one FlashAttention call for PyTorch, JAX and NumPy.

    out = flashmux.attention(q, k, v, causal=True)

The dispatcher runs the call on the fastest installed backend that supports it (CUDA C++,
Triton, Pallas, or the framework-native reference). `flashmux.explain(q, k, v, ...)` says which
and why. Importing flashmux imports no framework: torch and JAX are loaded when their arrays arrive.
"""

import sys

from . import dispatch, masks, reference
from .api import Explanation, attention, explain
from .backend import Backend, Capabilities
from .blockmask import BlockMask, create_block_mask
from .context_parallel import ring_attention, shard_sequence, unshard_sequence
from .dispatch import NoBackendError, register, use_backend
from .kvcache import (
    DecodeExplanation,
    DecodeParams,
    DecodeSpec,
    attention_with_kvcache,
    explain_kvcache,
)
from .spec import Params, ProblemSpec

__version__ = "0.1.0"


def backends():
    """Every discovered backend object (name, capabilities, availability())."""
    return list(dispatch.registry().values())


# Discover backends and read the priority table now (a few ms, no framework imported):
# torch.compile cannot trace importlib, so a model compiled with fullgraph=True must find them ready.
dispatch.registry()
dispatch.priority_table()
if "torch" in sys.modules:
    # torch is already loaded: register the custom ops now, outside any torch.compile trace.
    from . import _torch, _torch_decode  # noqa: F401

__all__ = [
    "Backend",
    "BlockMask",
    "Capabilities",
    "Explanation",
    "NoBackendError",
    "Params",
    "ProblemSpec",
    "attention",
    "create_block_mask",
    "masks",
    "attention_with_kvcache",
    "DecodeExplanation",
    "DecodeParams",
    "DecodeSpec",
    "explain_kvcache",
    "backends",
    "explain",
    "reference",
    "register",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
    "use_backend",
    "__version__",
]
