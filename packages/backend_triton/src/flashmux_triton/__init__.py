"""flashmux's triton backend: FlashAttention-2 forward and backward kernels written in Triton.

Importing this module imports neither torch nor triton; both load on first use
(availability(), forward(), backward()). The kernels live in `_kernels`, the torch launchers in
`_launch`, block sizes in `tuning`.

Dtypes: float16 and bfloat16 on tensor cores with float32 accumulation; float32 is supported
with IEEE float32 dot products (input_precision="ieee", no TF32), correct but several times
slower than the 16-bit paths.

With TRITON_INTERPRET=1 the same kernels run in Triton's interpreter on CPU tensors (slow; for CI).
"""

from __future__ import annotations

import importlib.util
import os

from flashmux.backend import EXTRA_FEATURES, FEATURES, Backend, Capabilities


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})


class TritonBackend(Backend):
    def availability(self) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["package triton not installed"]
        if importlib.util.find_spec("torch") is None:
            return ["package torch not installed"]
        if _interpreting():
            return []
        import torch

        if not torch.cuda.is_available():
            return ["no CUDA device"]
        return []

    def reasons(self, spec) -> list[str]:
        # Offsets inside one sequence are 32-bit in the kernels (batch/sequence starts are 64-bit).
        out = []
        for name, n, h, d in (
            ("q", spec.seqlen_q, spec.heads_q, max(spec.head_dim, spec.head_dim_v)),
            ("k/v", spec.seqlen_k, spec.heads_kv, max(spec.head_dim, spec.head_dim_v)),
        ):
            if n * h * d >= 2**31:
                out.append(f"one sequence of {name} spans {n * h * d} elements >= 2^31 (32-bit offsets)")
        return out

    # Capabilities depend on TRITON_INTERPRET (CPU tensors allowed), so they are read when asked.
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            array_kinds=frozenset({"torch"}),
            devices=_devices(),
            dtypes=frozenset({"float16", "bfloat16", "float32"}),
            max_head_dim=256,
            min_compute_capability=(8, 0),
            features=frozenset(FEATURES) | frozenset(EXTRA_FEATURES),
            crosses_from=frozenset({"jax"}),
            out_residual=True,
            priority=20,
        )

    @capabilities.setter
    def capabilities(self, value) -> None:  # Backend.__init__ assigns a default; ignore it
        pass

    def info(self):
        try:
            import triton

            ver = triton.__version__
        except ImportError:  # pragma: no cover
            ver = None
        return {"triton": ver, "interpreter": _interpreting()}

    def lowerings(self, q, k, v, params):
        """Which kernel family each pass takes (Gluon on sm_90 where `Tuning.gluon` says so,
        else Triton); None off CUDA."""
        if not getattr(q, "is_cuda", False):
            return None
        from . import _launch

        return _launch.lowerings(q, k, v, params)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, residual=False, **masks):
        # masks: alibi_slopes= and/or block_mask= (block-sparse kernels in _kernels_bs.py)
        from . import _launch

        return _launch.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params, residual, **masks)

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                 out_residual=None, **masks):
        from . import _launch

        return _launch.backward(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                                out_residual, **masks)

    # -- KV-cache decode (split-KV, paged): _decode.py; contract in flashmux/kvcache.py ------
    def decode_reasons(self, spec) -> list[str]:
        from flashmux.kvcache import decode_capability_reasons

        out = decode_capability_reasons(self.capabilities, spec)
        if spec.paged and spec.page_size % 8:  # cache offsets are 64-bit: no size limit
            out.append(f"page_size {spec.page_size} is not a multiple of 8")
        return out

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
        from . import _decode

        return _decode.decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params)

    def decode_append(self, k_cache, v_cache, k, v, cache_seqlens, block_table, page_size):
        from . import _decode

        _decode.append(k_cache, v_cache, k, v, cache_seqlens, block_table, page_size)

    def decode_runner(self, spec, params, q, k_cache, v_cache, block_table, alibi_slopes):
        """The core's fast path for a validated torch call signature (flashmux/kvcache.py)."""
        from . import _decode

        return _decode.runner(spec, params, q, k_cache, v_cache, block_table, alibi_slopes)

    def decode_splits(self, spec, params) -> int:
        from . import _decode

        return _decode.splits_for(spec, params)

    def decode_kernel(self, spec, params) -> str:
        from . import _decode

        return _decode.kernel_for(spec, params)

    def dropout_keep_mask(self, seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like):
        from . import _launch

        return _launch.dropout_keep_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like)


backend = TritonBackend(
    name="triton",
    description="Triton FlashAttention-2 kernels (forward, backward, every feature)",
)
