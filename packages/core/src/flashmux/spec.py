"""What a call asks for: `Params` (what the kernels need) and `ProblemSpec` (what the dispatcher
needs to choose a backend). Both are frozen and hashable: Params is a static argument of
jax.custom_vjp, ProblemSpec is the key of the dispatch cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    """Resolved, validated keyword arguments of one attention call, as kernels see them.

    window_left / window_right: None means unbounded. `causal` is already folded into
    window_right (causal => window_right == min(right, 0) == 0 or less), so a kernel may use the
    two window bounds alone; `causal` stays set so kernels can take a causal fast path.
    Masking is bottom-right aligned: key j is allowed for query i when
    i + off - window_left <= j <= i + off + window_right, off = seqlen_k - seqlen_q of the sequence.
    """

    scale: float
    causal: bool = False
    window_left: int | None = None
    window_right: int | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    varlen: bool = False
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    return_lse: bool = False
    deterministic: bool = False
    # ALiBi slopes and a block mask travel as array operands beside q, k, v (see api.py);
    # these say they are there. mask_block_size: the BlockMask's tile edge (0: no block mask).
    alibi: bool = False
    mask_block_size: int = 0

    @property
    def has_window(self) -> bool:
        return self.window_left is not None or (
            self.window_right is not None and not (self.causal and self.window_right == 0)
        )


@dataclass(frozen=True)
class ProblemSpec:
    """Everything about a call that decides which backend can and should run it.

    Shapes are per-sequence: for varlen calls batch is the number of sequences and seqlen_q/k
    the max_seqlen hints (or the total rows when no hint was given).
    """

    kind: str  # "torch" | "jax" | "numpy"
    device_type: str  # "cpu" | "cuda" | "gpu" ...
    device_name: str
    compute_capability: tuple[int, int] | None
    dtype: str  # "float16" | "bfloat16" | "float32" | "float64"
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    varlen: bool
    causal: bool
    window: bool
    softcap: bool
    dropout: bool
    return_lse: bool
    deterministic: bool
    requires_grad: bool
    traced: bool  # inside a JAX transformation (jit, grad, vmap, ...)
    nonpositive_scale: bool = False  # scale <= 0 (valid; a backend whose kernels assume > 0 declines)
    alibi: bool = False  # alibi_slopes given
    block_mask: bool = False  # block_mask given
    mask_block_size: int = 0  # its block_size (a backend may take only some tile edges)
    seed_array: bool = False  # dropout_seed is a scalar integer array (an operand, never baked in)

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
