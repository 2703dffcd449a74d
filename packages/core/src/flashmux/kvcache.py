"""Decoding with a KV cache: `flashmux.attention_with_kvcache`, its checks, the append of new
tokens into the cache, the decode dispatcher and `flashmux.explain_kvcache`.

The backend contract (a backend that has decode kernels implements these optional methods):

- ``decode_reasons(spec: DecodeSpec) -> list[str]``: why it cannot run this decode call; the
  `Backend` default says it has no decode kernel. `decode_capability_reasons(caps, spec)` is the
  shared helper for array kinds, devices, dtypes, head_dim and the mask features of
  ``capabilities``; alibi, paging and page sizes are the backend's own checks.
- ``decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params: DecodeParams)
  -> (out, lse)``:
  q (B, Sq, Hq, D); contiguous cache k_cache (B, S_max, Hkv, D), v_cache (B, S_max, Hkv, Dv);
  paged cache (num_pages, page_size, Hkv, D / Dv) with block_table (B, max_pages) int32 (else
  None). seqlens_k (B,) int32 on the device = cache_seqlens + Snew: the new tokens are already in
  the cache. The keys of sequence b are positions 0 .. seqlens_k[b]-1 (paged: token t in page
  block_table[b, t // page_size], slot t % page_size). Query row i sits at position off + i,
  off = seqlens_k[b] - Sq (bottom-right); rows that see no key give out 0 and lse -inf.
  Kernels never read outside the arrays: seqlens_k[b] above the capacity (S_max, or
  max_pages * page_size) is clamped to it, block_table entries outside [0, num_pages) are
  clamped. No host reads of seqlens_k / block_table. alibi_slopes: float32 (Hq,) or (B, Hq) or
  None; the score s_ij -= slope * |i + off - j| after scale and softcap.
  Returns out (B, Sq, Hq, Dv) in q's dtype and lse (B, Hq, Sq) float32 (always).
- ``decode_splits(spec, params) -> int``: optional, how many key splits it would run (explain).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backend import Capabilities


@dataclass(frozen=True)
class DecodeParams:
    """Resolved keyword arguments of one decode call, as kernels see them.

    window_left / window_right: None = unbounded; causal is already folded in
    (window_right = min(right, 0)), as in `Params`.
    """

    scale: float
    causal: bool
    window_left: int | None  # None = unbounded; causal already folded in (right = min(right, 0))
    window_right: int | None
    softcap: float | None
    alibi: bool  # an alibi_slopes array is passed
    num_splits: int | None  # None: the backend chooses; an int forces it (>= 1)
    page_size: int  # 0 for a contiguous cache
    return_lse: bool


@dataclass(frozen=True)
class DecodeSpec:
    """Everything about a decode call that decides which backend can and should run it.

    capacity: tokens one sequence can hold (S_max, or max_pages * page_size when paged).
    seqlen_new: Snew, the tokens appended by this call (0 without k/v).
    """

    kind: str  # "torch" | "jax" | "numpy"
    device_type: str
    device_name: str
    compute_capability: tuple[int, int] | None
    dtype: str
    batch: int
    seqlen_q: int
    seqlen_new: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    capacity: int
    paged: bool
    page_size: int  # 0 for a contiguous cache
    causal: bool
    window: bool
    softcap: bool
    alibi: bool
    return_lse: bool
    num_splits: int | None
    traced: bool
    requires_grad: bool

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv


def decode_capability_reasons(caps: Capabilities, spec: DecodeSpec) -> list[str]:
    """The reasons a decode call falls outside a backend's declared capabilities (array kinds,
    JAX tracing, devices, compute capability, dtypes, head_dim, causal/window/softcap/GQA/Dv
    features), one sentence each. Alibi, paging and page sizes are left to the backend."""
    out: list[str] = []
    if spec.kind not in caps.array_kinds:
        if spec.kind in caps.crosses_from and not spec.traced:
            pass
        elif spec.traced and spec.kind == "jax" and "jax" in caps.crosses_from:
            served = "/".join(sorted(caps.array_kinds))
            out.append(f"inside a JAX transformation (jit/grad/vmap): backend serves {served} only")
        else:
            served = "/".join(sorted(caps.array_kinds | caps.crosses_from))
            out.append(f"{spec.kind} arrays not supported (serves {served})")
    elif spec.traced and spec.kind == "jax" and not caps.runs_under_jit:
        out.append("inside a JAX transformation (jit/grad/vmap): backend runs eagerly only")
    if spec.device_type not in caps.devices:
        if spec.device_type == "cpu" and "cuda" in caps.devices:
            out.append("no CUDA device: inputs are on the CPU")
        else:
            out.append(
                f"device {spec.device_type} not supported (runs on {'/'.join(sorted(caps.devices))})"
            )
    elif spec.device_type == "cuda" and caps.min_compute_capability and spec.compute_capability:
        if tuple(spec.compute_capability) < tuple(caps.min_compute_capability):
            need = ".".join(map(str, caps.min_compute_capability))
            have = ".".join(map(str, spec.compute_capability))
            out.append(f"compute capability {have} < {need}")
    if spec.dtype not in caps.dtypes:
        out.append(f"dtype {spec.dtype} not supported ({', '.join(sorted(caps.dtypes))})")
    hd = max(spec.head_dim, spec.head_dim_v)
    if hd > caps.max_head_dim:
        out.append(f"head_dim {hd} > {caps.max_head_dim}")
    f = caps.features
    checks = (
        ("causal", spec.causal, "causal masking not supported"),
        ("window", spec.window, "sliding windows not supported"),
        ("softcap", spec.softcap, "softcap not supported"),
        ("gqa", spec.gqa, "grouped/multi-query attention (Hq != Hkv) not supported"),
        (
            "dv_differs",
            spec.head_dim_v != spec.head_dim,
            f"head_dim_v {spec.head_dim_v} != head_dim {spec.head_dim} not supported",
        ),
    )
    for feat, wanted, sentence in checks:
        if wanted and feat not in f:
            out.append(sentence)
    if spec.requires_grad:
        out.append("inference only: attention_with_kvcache has no backward (inputs require grad)")
    return out
