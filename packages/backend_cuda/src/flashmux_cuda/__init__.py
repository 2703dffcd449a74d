"""flashmux's CUDA backend: hand-written CuTe FlashAttention-2 kernels behind one C ABI.

The kernels (csrc/) are compiled on first use into a cached libflashmux_cuda.so (see `build`),
loaded with ctypes (no libtorch ABI coupling), and driven from PyTorch (`torch_glue`) and from
JAX through XLA FFI handlers (`jax_glue`, csrc/jax_ffi/). Importing this module imports neither
framework and builds nothing; `availability()` does the work and says why when it can't.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flashmux.backend import FEATURES, Backend, Capabilities
from flashmux.spec import ProblemSpec

from .abi import ABI_VERSION, MAX_HEAD_DIM

__all__ = ["backend", "CudaBackend", "ABI_VERSION"]

_I32_MAX = 2**31 - 1


class CudaBackend(Backend):
    """The backend object registered as ``flashmux_cuda:backend``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._lock = threading.Lock()
        self._lib = None  # abi.Library once loaded
        self._unavailable: list[str] | None = None
        self._jax_ready = False

    # -- availability ----------------------------------------------------------------------
    def availability(self) -> list[str]:
        """[] when the library is built (building it now if needed) and a GPU is visible."""
        with self._lock:
            if self._unavailable is None:
                self._unavailable = self._load()
            return list(self._unavailable)

    def _load(self) -> list[str]:
        from . import build as b
        from .abi import Library

        prebuilt = os.environ.get("FLASHMUX_CUDA_LIB")
        try:
            if prebuilt:
                path = Path(prebuilt)
            else:
                if b.find_nvcc() is None:
                    return ["nvcc not found (install the CUDA toolkit or set CUDA_HOME)"]
                if not b.detect_devices():
                    return ["no CUDA device"]
                cfg = b.BuildConfig.from_env()
                if os.environ.get("FLASHMUX_CUDA_NO_BUILD") and not cfg.library_path().is_file():
                    return [
                        "library not built and FLASHMUX_CUDA_NO_BUILD is set "
                        "(run python -m flashmux_cuda build)"
                    ]
                path = b.build(cfg)
            self._lib = Library(path)
        except b.BuildError as e:
            return [str(e)]
        except OSError as e:
            return [f"cannot load the CUDA library: {e}"]
        except Exception as e:  # a broken toolchain must never break `import flashmux`
            return [f"CUDA backend unavailable: {type(e).__name__}: {e}"]
        return []

    @property
    def lib(self):
        if self._lib is None:
            reasons = self.availability()
            if reasons:
                raise RuntimeError("flashmux_cuda is unavailable: " + "; ".join(reasons))
        return self._lib

    def info(self) -> dict:
        out = {"abi_version": ABI_VERSION}
        if self._lib is not None:
            out["library"] = self._lib.path
        return out

    # -- support ---------------------------------------------------------------------------
    def reasons(self, spec: ProblemSpec) -> list[str]:
        out = []
        if spec.varlen:
            rows_q, rows_k = spec.seqlen_q, spec.seqlen_k  # hints; totals checked at launch
        else:
            rows_q, rows_k = spec.batch * spec.seqlen_q, spec.batch * spec.seqlen_k
        if max(rows_q, rows_k) > _I32_MAX:
            out.append("more than 2^31-1 rows: the kernels index rows with int32")
        if getattr(spec, "nonpositive_scale", False) and not spec.softcap:
            out.append("scale <= 0 without softcap: the kernels' masking assumes scale > 0")
        if getattr(spec, "block_mask", False):  # block-sparse sm80 forward and backward
            from .abi import MASK_BLOCK_MULTIPLE

            if spec.requires_grad and spec.deterministic:
                out.append("block masks: no deterministic backward in the CUDA kernels (the dQ "
                           "order follows the mask's lists)")
            bs = int(getattr(spec, "mask_block_size", 0) or 0)
            if bs % MASK_BLOCK_MULTIPLE:
                out.append(f"block masks: block_size {bs} is not a multiple of "
                           f"{MASK_BLOCK_MULTIPLE} (the CUDA kernels' query tile)")
        return out

    def lowerings(self, q, k, v, params) -> dict[str, str]:
        """The kernel family each pass takes on these arrays (see `family`): the forward runs
        the sm90 (wgmma/TMA) kernels on compute capability 9.0 where they have the problem, else
        sm80; the backward likewise (family.backward_family)."""
        from . import family as fam

        cc = fam.device_capability(q)
        if cc is None:
            from . import build as b

            caps = b.detect_devices()
            cc = caps[0] if caps else None
        families = None
        if self._lib is not None:
            get = getattr(self._lib.lib, "fmx_families", None)
            families = int(get()) if get is not None else 1
        shared = dict(
            families=families,
            varlen=params.varlen,
            softcap=params.softcap,
            head_dim=int(q.shape[-1]),
            head_dim_v=int(v.shape[-1]),
            seqlen_k=int(k.shape[-3]),
            alibi=bool(getattr(params, "alibi", False)),
            block_mask=bool(getattr(params, "mask_block_size", 0)),
        )
        fwd, why = fam.forward_family(cc, **shared)
        bwd, bwhy = fam.backward_family(
            cc, deterministic=bool(getattr(params, "deterministic", False)), **shared
        )
        return {"forward": fam.describe(fwd, why), "backward": fam.describe(bwd, bwhy)}

    # -- kernels ---------------------------------------------------------------------------
    def _is_jax(self, x) -> bool:
        mod = type(x).__module__ or ""
        return mod.startswith(("jax", "jaxlib"))

    def _ensure_jax(self):
        if self._jax_ready:
            return
        from . import build as b
        from . import jax_glue

        lib = self.lib
        with self._lock:
            if not self._jax_ready:
                cfg = b.BuildConfig.from_env()
                jax_glue.register(b.build_jax_ffi(cfg, Path(lib.path)))
                self._jax_ready = True

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params, alibi_slopes=None,
                block_mask=None):
        if params.dropout_p:
            from .abi import Unsupported

            raise Unsupported("dropout not implemented in CUDA kernels")
        if self._is_jax(q):
            from . import jax_glue

            self._ensure_jax()
            return jax_glue.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, params,
                                    alibi_slopes=alibi_slopes, block_mask=block_mask)
        from . import torch_glue

        return torch_glue.forward(self.lib, q, k, v, cu_seqlens_q, cu_seqlens_k, params,
                                  alibi_slopes=alibi_slopes, block_mask=block_mask)

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                 alibi_slopes=None, block_mask=None):
        if self._is_jax(q):
            from . import jax_glue

            self._ensure_jax()
            return jax_glue.backward(
                self.lib, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
                alibi_slopes=alibi_slopes, block_mask=block_mask,
            )
        from . import torch_glue

        return torch_glue.backward(
            self.lib, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params,
            alibi_slopes=alibi_slopes, block_mask=block_mask,
        )

    # -- KV-cache decode (csrc/decode/) ----------------------------------------------------
    def decode_reasons(self, spec) -> list[str]:
        """Why the split-KV decode kernel cannot run this decode call (DecodeSpec)."""
        from flashmux.kvcache import decode_capability_reasons

        out = decode_capability_reasons(self.capabilities, spec)
        if spec.head_dim_v != spec.head_dim:  # `attention` takes Dv != D; fmx_decode does not
            out.append(
                f"head_dim_v {spec.head_dim_v} != head_dim {spec.head_dim}: the decode kernels "
                "need equal head dims"
            )
        if spec.head_dim % 8:
            out.append(
                f"head_dim {spec.head_dim} is not a multiple of 8: the decode kernels read the "
                "cache in place (16-byte rows) and never copy it"
            )
        if spec.batch * spec.heads_kv > 65535:
            out.append(f"batch x heads_kv = {spec.batch * spec.heads_kv} exceeds 65535")
        if spec.capacity > _I32_MAX:
            out.append("cache capacity above 2^31-1 tokens")
        return out

    def decode_splits(self, spec, params) -> int:
        """Key splits fmx_decode runs (params.num_splits when forced), for explain."""
        from .abi import choose_splits

        if params.num_splits:
            return int(params.num_splits)
        sms = 132
        if spec.kind == "torch":
            try:
                import torch

                sms = torch.cuda.get_device_properties(
                    torch.cuda.current_device()
                ).multi_processor_count
            except Exception:
                pass
        elif spec.kind == "jax":
            from .jax_decode import _sm_count

            sms = _sm_count()
        rows = spec.seqlen_q * (spec.heads_q // max(spec.heads_kv, 1))
        return choose_splits(spec.batch, spec.heads_kv, rows, spec.capacity, sms)

    def decode_kernel(self, spec, params) -> str:
        from .abi import rows_per_program

        rows = spec.seqlen_q * (spec.heads_q // max(spec.heads_kv, 1))
        cache = f"paged (page_size {spec.page_size})" if spec.paged else "contiguous"
        return (
            f"fmx_decode split-KV (csrc/decode, {cache}, {rows} query rows packed per KV head, "
            f"{rows_per_program(rows)} per program) + lse merge"
        )

    def decode(self, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params):
        if self._is_jax(q):
            from . import jax_decode

            self._ensure_jax()
            if "lib" not in jax_decode._registered:
                from . import build as b

                cfg = b.BuildConfig.from_env()
                jax_decode.register(b.build_jax_ffi(cfg, Path(self.lib.path)))
            return jax_decode.decode(
                self.lib, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params
            )
        from . import torch_glue

        return torch_glue.decode(
            self.lib, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params
        )

backend = CudaBackend(
    name="cuda",
    description="CuTe FlashAttention-2 kernels (mma.sync, cp.async), one C ABI for torch and JAX",
    capabilities=Capabilities(
        array_kinds=frozenset({"torch", "jax"}),
        devices=frozenset({"cuda"}),
        dtypes=frozenset({"float16", "bfloat16"}),
        max_head_dim=MAX_HEAD_DIM,
        min_compute_capability=(8, 0),
        # ALiBi and block masks in the sm80 kernels (forward and backward; block masks with
        # block_size a multiple of 128, not deterministic: `reasons`). Dv != D (session 9): the
        # kernels of max(D, Dv), the smaller head dim zero-filled on load; sm80 backward.
        features=(frozenset(FEATURES) - {"dropout"}) | {"alibi", "block_mask"},
        runs_under_jit=True,
    ),
)
