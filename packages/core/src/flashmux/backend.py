"""The backend contract.

A backend is one object, registered in the ``flashmux.backends`` entry-point group, with:

- ``name`` and ``capabilities`` (plain data, see `Capabilities`);
- ``availability()``: reasons it cannot run at all on this machine (a package missing, no GPU,
  a failed build), empty when usable. Called once and cached by the registry;
- ``reasons(spec)``: reasons it cannot run one problem, beyond what the capabilities say;
- ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params) -> (out, lse)`` and
  ``backward(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params) -> (dq, dk, dv)``
  on arrays of one of its native kinds (``capabilities.array_kinds``);
- optionally, with ``capabilities.out_residual``: ``forward(..., params, residual=True)`` returns
  ``(out, lse, out_residual)``, where ``out_residual`` has out's shape and dtype and holds the
  rounding error of the stored output (float32 out minus out). The core asks for it only when a
  gradient will be needed and the output is float16/bfloat16, keeps it with the saved tensors,
  and hands it to
  ``backward(..., params, out_residual=...)``. With it, the backward's row term
  ``delta = rowsum(dO * O)`` uses the float32 output instead of the rounded one, which matters on
  rows that see few keys (see docs/architecture.md, "The delta residual");
- optionally ``dropout_keep_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like)``,
  the testing hook that returns the keep mask its kernels draw, shape (batch, heads, seqlen_q,
  seqlen_k), bool, of the kind and device of ``like``.

Shapes (BSHD): q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), out (B, Sq, Hq, Dv) and
lse (B, Hq, Sq) float32; varlen (cu_seqlens given): q (Tq, Hq, D), ..., lse (Hq, Tq).
``dlse`` is None unless the caller returned lse and it carries a gradient. Empty problems
(a zero-size q, k or v) never reach a backend: the core answers them itself.
The core wraps forward/backward in torch.autograd / jax.custom_vjp, so the backward always runs
on the backend that ran the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .spec import Params, ProblemSpec

FEATURES = (
    "causal",
    "window",
    "softcap",
    "dropout",
    "varlen",
    "gqa",
    "dv_differs",
    "lse_grad",
    "deterministic",
    "backward",
)

# Second-round features, outside FEATURES on purpose: backends declare
# ``features=frozenset(FEATURES)``, so a name added there would be claimed by all of them. A
# backend that does these lists them itself: ``frozenset(FEATURES) | {"alibi", "block_mask"}``.
# "seed_array": dropout_seed as a scalar integer array (torch tensor, JAX array traced under
# jit), read by the kernels as an operand, so that a new seed compiles nothing.
EXTRA_FEATURES = ("alibi", "block_mask", "seed_array")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data. The core turns every mismatch into a sentence."""

    array_kinds: frozenset[str]  # native kinds its kernels take: "torch", "jax", "numpy"
    devices: frozenset[str]  # "cpu", "cuda"
    dtypes: frozenset[str]
    max_head_dim: int = 256
    min_compute_capability: tuple[int, int] | None = None  # for CUDA devices
    features: frozenset[str] = frozenset(FEATURES)
    # Kinds it accepts by crossing through DLPack outside any JAX transformation.
    crosses_from: frozenset[str] = frozenset()
    # Whether it runs on traced JAX values (inside jax.jit / grad / vmap).
    runs_under_jit: bool = False
    # Whether forward(..., residual=True) returns the output's rounding error for the backward.
    out_residual: bool = False
    # Default rank when the priority table has nothing for the device (lower runs first).
    priority: int = 100


@dataclass
class Backend:
    """Base class with the checks shared by every backend; subclasses fill in the kernels."""

    name: str = "base"
    description: str = ""
    capabilities: Capabilities = field(
        default_factory=lambda: Capabilities(frozenset(), frozenset(), frozenset())
    )

    # -- availability and support -------------------------------------------------------
    def availability(self) -> list[str]:
        return []

    def reasons(self, spec: ProblemSpec) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        """Extra facts for `flashmux info` / explain (versions, build path, lowering...)."""
        return {}

    def lowerings(self, q, k, v, params: Params) -> dict[str, str] | None:
        """Optional: which kernel family each pass would take on these arrays, e.g.
        ``{"forward": "mosaic_gpu", "backward": "triton"}``; explain() prints it for the chosen
        backend. None (the default) when a backend has one kernel family per pass."""
        return None

    # -- kernels ------------------------------------------------------------------------
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: Params):
        raise NotImplementedError(f"backend {self.name!r} has no forward")

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params: Params):
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    dropout_keep_mask = None  # optional testing hook, see the module docstring

    # -- KV-cache decoding (optional; contract in flashmux/kvcache.py) -----------------------
    def decode_reasons(self, spec) -> list[str]:
        """Why this backend can't run a decode call (`kvcache.DecodeSpec`); default: no kernel."""
        return ["no KV-cache (decode) kernel"]

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
        """-> (out, lse) for `flashmux.attention_with_kvcache`; see flashmux/kvcache.py."""
        raise NotImplementedError(f"backend {self.name!r} has no decode kernel")


def platform_reasons(caps: Capabilities, spec) -> list[str]:
    """The checks every kind of call shares (attention and KV-cache decode): array kind and JAX
    tracing, device and compute capability, dtype, head_dim. `spec` is a ProblemSpec or a
    kvcache.DecodeSpec (anything with those fields)."""
    out: list[str] = []
    kind_ok = spec.kind in caps.array_kinds
    if not kind_ok:
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
    return out


def capability_reasons(caps: Capabilities, spec: ProblemSpec) -> list[str]:
    """The reasons a problem falls outside a backend's declared capabilities, one check each."""
    out = platform_reasons(caps, spec)
    f = caps.features
    checks = (
        ("causal", spec.causal, "causal masking not supported"),
        ("window", spec.window, "sliding windows not supported"),
        ("softcap", spec.softcap, "softcap not supported"),
        ("dropout", spec.dropout, "dropout not supported"),
        ("varlen", spec.varlen, "variable-length batches (cu_seqlens) not supported"),
        ("gqa", spec.gqa, "grouped/multi-query attention (Hq != Hkv) not supported"),
        (
            "dv_differs",
            spec.head_dim_v != spec.head_dim,
            f"head_dim_v {spec.head_dim_v} != head_dim {spec.head_dim} not supported",
        ),
        ("lse_grad", spec.return_lse and spec.requires_grad, "gradient through lse not supported"),
        ("deterministic", spec.deterministic and spec.requires_grad, "no deterministic backward"),
        ("backward", spec.requires_grad, "no backward pass (inputs require grad)"),
        ("alibi", getattr(spec, "alibi", False), "ALiBi (alibi_slopes) not supported"),
        ("block_mask", getattr(spec, "block_mask", False), "block masks (block_mask) not supported"),
        ("seed_array", getattr(spec, "seed_array", False),
         "dropout seeds as arrays (a tensor or traced dropout_seed) not supported"),
    )
    for feat, wanted, sentence in checks:
        if wanted and feat not in f:
            out.append(sentence)
    return out
