"""The implementations a benchmark compares: flashmux backends (each forced, and the dispatcher's
own choice, "auto") under each framework they serve, and the anchors a user would pick instead.

An implementation turns a `Point` into ``fn(q, k, v) -> out`` on native arrays of its framework,
in its layout ("bshd" as flashmux, or "bhsd" as torch SDPA). The runner adds gradients, timing
and the correctness check. Every optional dependency is imported inside ``build`` so a missing
one becomes a skip reason, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .frameworks import is_oom
from .shapes import Point

TORCH_ANCHORS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex", "standard")
JAX_ANCHORS = ("jax-xla", "jax-cudnn", "pallas-mha", "pallas-mgpu")
ANCHORS = TORCH_ANCHORS + JAX_ANCHORS
# Quick (CPU) mode: anchors that run on the CPU and need no compiler.
QUICK_ANCHORS = ("sdpa-math", "sdpa-flash", "standard", "jax-xla")


@dataclass
class Context:
    device: str  # "cuda" | "cpu"
    capability: tuple[int, int] | None
    quick: bool
    fws: dict  # framework name -> Framework


def cu_seqlens(point: Point) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(point.seqlens)]).astype(np.int32)


class Impl:
    id = "impl"
    framework = "torch"
    family = "anchor"  # "flashmux" | "anchor"
    backend: str | None = None
    layout = "bshd"
    jit = True  # jax: wrap in jax.jit
    compile_heavy = False
    precompile = True  # jax: may be compiled ahead in a worker thread
    quadratic = False  # materializes the Sq x Sk score matrix
    dtype_override: str | None = None
    prescale_q = False  # q arrives multiplied by the softmax scale (kernels without a scale)
    # Correctness tolerance: err <= factor * err(plain attention) + atol. flashmux backends are
    # held to SPEC (2x, 1e-5); anchors get a sanity bound that only catches wiring mistakes.
    tol_factor = 4.0
    tol_abs = 1e-4

    def dtype_for(self, point: Point) -> str:
        return self.dtype_override or point.dtype

    def input_q_scale(self, point: Point) -> float:
        return 1.0 / math.sqrt(point.head_dim) if self.prescale_q else 1.0

    def ref_scale(self, point: Point) -> float:
        return 1.0 if self.prescale_q else 1.0 / math.sqrt(point.head_dim)

    def unavailable(self, ctx: Context) -> str | None:
        return None

    def unsupported(self, point: Point, mode: str, ctx: Context) -> str | None:
        return None

    def build(self, point: Point, ctx: Context):
        raise NotImplementedError

    def on_failure(self, exc: BaseException) -> bool:
        """Adjust after a failed first call (e.g. a smaller tile); True to try again."""
        return False

    def describe_choice(self, point, q, k, v, ctx) -> str | None:
        return None

    def info(self) -> dict:
        return {
            "id": self.id,
            "framework": self.framework,
            "family": self.family,
            "backend": self.backend,
            "layout": self.layout,
            "dtype_override": self.dtype_override,
        }


# --------------------------------------------------------------------------------------------
# flashmux
class FlashmuxImpl(Impl):
    family = "flashmux"
    tol_factor = 2.0
    tol_abs = 1e-5

    def __init__(self, backend: str, framework: str, reason: str | None = None, jit: bool = True):
        self.backend = backend
        self.framework = framework
        self.id = f"flashmux-{backend}[{framework}]"
        self._reason = reason
        self.jit = jit

    def unavailable(self, ctx):
        return self._reason

    def unsupported(self, point, mode, ctx):
        if self.framework == "numpy" and mode != "fwd":
            return "numpy arrays have no autograd: forward only"
        if point.kvcache and mode != "fwd":
            return "attention_with_kvcache is inference only: forward only"
        if point.mask is not None and self.framework == "jax" and not ctx.quick and (
                self.backend in ("reference", "auto")):
            # Pallas declines block masks, so JAX calls land on the reference backend, whose
            # query chunks unroll under jax.jit (hundreds at 32k): not a kernel worth timing
            return "JAX with a block mask runs the reference backend (Pallas declines block masks)"
        return None

    def _kvcache_kwargs(self, point, ctx):
        """cache_seqlens (full, or the ragged lengths) and the in-order block table."""
        fw = ctx.fws[self.framework]
        lens = point.kv_lens or (point.seqlen_k,) * point.batch
        # cache_seqlens counts tokens before this step's queries: the Sq query tokens are the
        # cache's last ones (bottom-right), as after an append
        kw = dict(causal=point.causal, cache_seqlens=fw.int32(np.asarray(lens, np.int32)))
        if point.page_size:
            mp = point.seqlen_k // point.page_size
            kw["block_table"] = fw.int32(np.arange(point.batch * mp).reshape(point.batch, mp))
        return kw

    def _kwargs(self, point, ctx):
        kw = dict(causal=point.causal)
        if point.mask is not None:  # masks sweep: the BlockMask, built once per point
            from .maskbench import alibi_for, block_mask_for

            fw = ctx.fws[self.framework]
            like = fw.int32(np.zeros(1, np.int32))
            bm = block_mask_for(point.mask, point.seqlen_q, point.seqlen_k, like,
                                (self.framework, ctx.device))
            if bm is not None:
                kw["block_mask"] = bm
            slopes = alibi_for(point.mask, point.heads_q)  # "+alibi" specs
            if slopes is not None:
                kw["alibi_slopes"] = fw.from_numpy(slopes, "fp32")
        if point.varlen:
            fw = ctx.fws[self.framework]
            cu = cu_seqlens(point)
            kw.update(
                cu_seqlens_q=fw.int32(cu),
                cu_seqlens_k=fw.int32(cu),
                max_seqlen_q=int(max(point.seqlens)),
                max_seqlen_k=int(max(point.seqlens)),
            )
        return kw

    def build(self, point, ctx):
        import flashmux

        backend = None if self.backend == "auto" else self.backend
        if point.kvcache:
            kw = self._kvcache_kwargs(point, ctx)
            page = point.page_size

            def kv_fn(q, k, v):
                if page:  # (B, Sk, Hkv, D) -> pages in order: a view, nothing copied
                    k = k.reshape((-1, page) + tuple(k.shape[2:]))
                    v = v.reshape((-1, page) + tuple(v.shape[2:]))
                return flashmux.attention_with_kvcache(q, k, v, backend=backend, **kw)

            return kv_fn
        kw = self._kwargs(point, ctx)

        def fn(q, k, v):
            return flashmux.attention(q, k, v, backend=backend, **kw)

        return fn

    def on_failure(self, exc):
        if self.framework == "jax" and self.jit:
            self.jit = False  # the backend may run eagerly only: time it as users would call it
            return True
        return False

    def describe_choice(self, point, q, k, v, ctx):
        try:
            import flashmux

            if point.kvcache:
                if point.page_size:
                    k = k.reshape((-1, point.page_size) + tuple(k.shape[2:]))
                    v = v.reshape((-1, point.page_size) + tuple(v.shape[2:]))
                rep = flashmux.explain_kvcache(q, k, v, **self._kvcache_kwargs(point, ctx))
                return getattr(rep, "chosen", None)
            rep = flashmux.explain(q, k, v, **self._kwargs(point, ctx))
            return getattr(rep, "chosen", None)
        except Exception as e:
            return f"explain failed: {type(e).__name__}"


def kvcache_unsupported(impl: Impl, point: Point) -> str | None:
    """Anchors run the decode sweep's KV-cache rows only where they compute the same thing:
    a contiguous cache read in full (plain attention of the last Sq queries)."""
    if not point.kvcache or impl.family == "flashmux":
        return None
    if point.page_size:
        return "no paged KV cache"
    if point.kv_lens is not None:
        return "no ragged cache lengths (reads every key of a padded batch)"
    return None


def masks_unsupported(impl: Impl, point: Point) -> str | None:
    """The masks sweep runs flashmux, FlexAttention (the same mask as its BlockMask) and
    jax.nn.dot_product_attention (XLA, with the dense mask); other anchors have no mask input."""
    if point.mask is None or impl.family == "flashmux":
        return None
    from .maskbench import split_spec

    if split_spec(point.mask)[1]:
        return "ALiBi points time flashmux against its own call without ALiBi"
    if impl.id in ("flex", "jax-xla"):
        return None
    return "no block mask / mask function input"


def _discovered_backends() -> list:
    import flashmux

    f = getattr(flashmux, "backends", None)
    if callable(f):
        return list(f())
    # `flashmux.backends` is shadowed by the subpackage of that name once it was imported.
    from flashmux import dispatch

    return list(dispatch.registry().values())


def flashmux_impls(wanted: list[str] | None, ctx: Context, fw_reasons: dict) -> list[Impl]:
    """One impl per (backend, framework it serves), plus "auto" per framework.

    wanted None: every discovered backend, but the reference only on the CPU.
    """
    out: list[Impl] = []
    frameworks = ["torch", "jax", "numpy"]
    try:
        import flashmux

        found = _discovered_backends()
        _ = flashmux.attention
    except Exception as e:
        reason = f"flashmux API not importable: {type(e).__name__}: {e}"
        names = wanted or ["auto"]
        return [FlashmuxImpl(n, fw, reason) for n in names for fw in ("torch", "jax")]
    by_name = {b.name: b for b in found}
    names = list(wanted) if wanted else [b.name for b in found] + ["auto"]
    for name in names:
        if name == "auto":
            for fw in frameworks:
                if fw == "numpy" and ctx.device != "cpu":
                    continue
                out.append(FlashmuxImpl("auto", fw, fw_reasons.get(fw)))
            continue
        b = by_name.get(name)
        if b is None:
            known = ", ".join(sorted(by_name)) or "none"
            out.append(FlashmuxImpl(name, "torch", f"no backend named {name!r} (found: {known})"))
            continue
        if name == "reference" and wanted is None and ctx.device != "cpu":
            out.append(
                FlashmuxImpl(
                    name,
                    "torch",
                    "reference backend is timed on the GPU only when named in --backends",
                )
            )
            continue
        caps = b.capabilities
        kinds = set(caps.array_kinds) | set(getattr(caps, "crosses_from", ()) or ())
        try:
            avail = list(b.availability())
        except Exception as e:
            avail = [f"availability() raised {type(e).__name__}: {e}"]
        reason = "; ".join(avail) if avail else None
        fws = [f for f in frameworks if f in kinds] or ["torch"]
        for fw in fws:
            if fw == "numpy" and ctx.device != "cpu":
                continue
            r = reason or fw_reasons.get(fw)
            if (
                r is None
                and ctx.device not in caps.devices
                and not (ctx.device == "cuda" and "gpu" in caps.devices)
            ):
                r = f"runs on {'/'.join(sorted(caps.devices)) or 'no device'}, not {ctx.device}"
            jit = bool(getattr(caps, "runs_under_jit", False)) and fw in caps.array_kinds
            out.append(FlashmuxImpl(name, fw, r, jit=jit))
    return out


# --------------------------------------------------------------------------------------------
# torch anchors
class SdpaImpl(Impl):
    framework = "torch"
    layout = "bhsd"

    def __init__(self, kind: str):
        self.kind = kind  # flash | efficient | cudnn | math
        self.id = f"sdpa-{kind}"
        self.quadratic = kind == "math"

    def unsupported(self, point, mode, ctx):
        if point.varlen:
            return "no packed variable-length input (SDPA takes padded batches)"
        if ctx.device != "cuda" and self.kind in ("efficient", "cudnn"):
            return "needs a CUDA device"
        return None

    def build(self, point, ctx):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[self.kind]
        kw: dict = dict(scale=1.0 / math.sqrt(point.head_dim))
        if point.causal and point.seqlen_q != 1:  # Sq = 1: bottom-right causal is no mask
            if point.seqlen_q == point.seqlen_k:
                kw["is_causal"] = True
            else:
                from torch.nn.attention.bias import causal_lower_right

                kw["attn_mask"] = causal_lower_right(point.seqlen_q, point.seqlen_k)
        if point.heads_q != point.heads_kv:
            kw["enable_gqa"] = True
        del torch

        def fn(q, k, v):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, **kw)

        return fn


_FLEX: dict = {}


def _compiled_flex(dynamic: bool):
    """torch.compile(flex_attention), once per process. dynamic=True compiles one kernel for
    every batch and sequence length (size-1 dims still get their own), instead of one per shape."""
    if dynamic not in _FLEX:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _FLEX[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _FLEX[dynamic]


def _flex_dynamic_env() -> str:
    """FLASHMUX_BENCH_FLEX_DYNAMIC: "1" every flex compile with dynamic shapes, "0" one compile
    per shape, "auto" (default): one per shape for masks-sweep points (a fixed training shape,
    as a user's loop compiles it: inductor's flex kernels then know S % 128 == 0, IS_DIVISIBLE,
    and skip bounds checks; with a symbolic S they cannot), dynamic shapes elsewhere."""
    import os

    v = os.environ.get("FLASHMUX_BENCH_FLEX_DYNAMIC", "auto")
    if v not in ("0", "1", "auto"):
        raise ValueError(f"FLASHMUX_BENCH_FLEX_DYNAMIC: expected 0, 1 or auto, got {v!r}")
    return v


class FlexImpl(Impl):
    id = "flex"
    framework = "torch"
    layout = "bhsd"
    compile_heavy = True
    dynamic = True
    fell_back: str | None = None  # the failure that turned dynamic shapes off in this process
    describes_build = True  # the runner records describe_choice() as the record's "chosen"
    _built = ""

    def on_failure(self, exc):
        declined = isinstance(exc, (NotImplementedError, ValueError, TypeError))
        if self.dynamic and not declined and not is_oom(exc):
            self.dynamic = False  # fall back to one compile per shape
            self.fell_back = f"{type(exc).__name__}: {str(exc)[:80]}"
            return True
        return False

    def _dynamic_for(self, point) -> bool:
        env = _flex_dynamic_env()
        if env != "auto":
            return env == "1" and self.dynamic
        return self.dynamic and point.mask is None

    def describe_choice(self, point, q, k, v, ctx) -> str | None:
        """What the timed call compiles (the masks sweep's flex line, issue 15): dynamic or
        static shapes (and IS_DIVISIBLE, which inductor sets only when it can prove both lengths
        are multiples of 128), the BlockMask's tiles, the kernel options."""
        return self._built or None

    def build(self, point, ctx):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        dynamic = self._dynamic_for(point)
        flex = _compiled_flex(dynamic)
        dev = ctx.device
        block_mask = None
        if point.mask is not None:  # the masks sweep: the same mask function, flex's BlockMask
            from .maskbench import BLOCK, mask_fn_for

            block_mask = create_block_mask(
                mask_fn_for(point.mask, point.seqlen_q, point.seqlen_k), None, None,
                point.seqlen_q, point.seqlen_k, device=dev, BLOCK_SIZE=BLOCK,
            )
        elif point.varlen:
            doc = torch.repeat_interleave(
                torch.arange(len(point.seqlens), device=dev),
                torch.tensor(point.seqlens, device=dev),
            )
            causal = point.causal

            def mask_mod(b, h, qi, ki):
                same = doc[qi] == doc[ki]
                return (same & (qi >= ki)) if causal else same

            t = point.total_q
            block_mask = create_block_mask(mask_mod, None, None, t, t, device=dev)
        elif point.causal:
            off = point.seqlen_k - point.seqlen_q

            def mask_mod(b, h, qi, ki):
                return qi + off >= ki

            block_mask = create_block_mask(
                mask_mod, None, None, point.seqlen_q, point.seqlen_k, device=dev
            )
        scale = 1.0 / math.sqrt(point.head_dim)
        gqa = point.heads_q != point.heads_kv
        div = (not dynamic and point.seqlen_q % 128 == 0 and point.seqlen_k % 128 == 0)
        desc = (f"torch.compile(flex_attention, dynamic={dynamic})"
                + (f" [dynamic off after {self.fell_back}]" if self.fell_back else "")
                + f", IS_DIVISIBLE={div}, kernel_options default")
        if block_mask is not None:
            n_all = int(block_mask.kv_num_blocks.sum())
            full = block_mask.full_kv_num_blocks
            n_full = int(full.sum()) if full is not None else 0
            bs = tuple(block_mask.BLOCK_SIZE)
            desc += (f", BlockMask {bs[0]}x{bs[1]}: {n_full} full + {n_all} partial kv tiles"
                     f" (mask_mod on partial only)")
        self._built = desc

        def fn(q, k, v):
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return fn


class StandardTorchImpl(Impl):
    """Attention as written in a textbook: scores materialized, float32 softmax."""

    id = "standard"
    framework = "torch"
    layout = "bhsd"
    quadratic = True

    def unsupported(self, point, mode, ctx):
        if point.varlen:
            return "padded batches only"
        return None

    def build(self, point, ctx):
        import torch

        scale = 1.0 / math.sqrt(point.head_dim)
        g = point.heads_q // point.heads_kv
        masked = None
        if point.causal:
            sq, sk = point.seqlen_q, point.seqlen_k
            i = torch.arange(sq, device=ctx.device)[:, None]
            j = torch.arange(sk, device=ctx.device)[None, :]
            masked = j > i + (sk - sq)

        def fn(q, k, v):
            if g > 1:
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
            s = torch.matmul(q, k.transpose(-2, -1)).float() * scale
            if masked is not None:
                s = s.masked_fill(masked, float("-inf"))
            p = torch.softmax(s, dim=-1).to(q.dtype)
            return torch.matmul(p, v)

        return fn


# --------------------------------------------------------------------------------------------
# jax anchors
class JaxDpaImpl(Impl):
    framework = "jax"

    def __init__(self, kind: str):
        self.kind = kind  # xla | cudnn
        self.id = f"jax-{kind}"
        self.quadratic = kind == "xla"
        # XLA autotunes its GEMMs on the device while compiling: compiled alone, not alongside
        # other compilations, so that its tuning is measured on an idle GPU.
        self.precompile = kind != "xla"

    def unsupported(self, point, mode, ctx):
        if point.varlen:
            return "no packed variable-length input"
        # Sq = 1: bottom-right causal masks nothing (the one query sees every key), so the call
        # runs without is_causal (build); other Sq != Sk have no bottom-right form here
        if point.causal and point.seqlen_q not in (1, point.seqlen_k):
            return "is_causal is top-left aligned: no bottom-right causal for Sq != Sk"
        if self.kind == "cudnn" and ctx.device != "cuda":
            return "needs a CUDA GPU"
        return None

    def build(self, point, ctx):
        import jax

        scale = 1.0 / math.sqrt(point.head_dim)
        # a decode step (Sq = 1) attends to every key: bottom-right causal is no mask
        causal, kind = point.causal and point.seqlen_q != 1, self.kind
        fn_m = None
        if point.mask is not None:  # masks sweep: the dense (Sq, Sk) bool mask of the same function
            from .maskbench import mask_fn_for

            fn_m = mask_fn_for(point.mask, point.seqlen_q, point.seqlen_k)
        sq, sk = point.seqlen_q, point.seqlen_k

        def fn(q, k, v):
            mask = None
            if fn_m is not None:
                # built inside the traced function (from iota under jit): a closed-over array
                # would be a constant of Sq x Sk bytes in the compiled program (1 GiB at 32k)
                import jax.numpy as jnp

                zero = jnp.zeros((1, 1), jnp.int32)
                mask = fn_m(zero, zero, jnp.arange(sq, dtype=jnp.int32)[:, None],
                            jnp.arange(sk, dtype=jnp.int32)[None, :])
                mask = jnp.broadcast_to(mask, (sq, sk))[None, None]
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=causal, implementation=kind, mask=mask
            )

        return fn


class PallasMhaImpl(Impl):
    id = "pallas-mha"
    framework = "jax"

    def unsupported(self, point, mode, ctx):
        if ctx.device != "cuda":
            return "needs a CUDA GPU (Pallas Triton lowering)"
        if point.varlen:
            return "no packed variable-length input"
        if point.heads_q != point.heads_kv:
            return "no GQA (needs Hq == Hkv)"
        if point.causal and point.seqlen_q != point.seqlen_k:
            return "causal is top-left aligned: no bottom-right causal for Sq != Sk"
        for s in (point.seqlen_q, point.seqlen_k):
            if s > 128 and s % 128:
                return f"sequence length {s} is not a multiple of its block (128)"
        return None

    def build(self, point, ctx):
        from jax.experimental.pallas.ops.gpu import attention as pa

        scale = 1.0 / math.sqrt(point.head_dim)
        causal = point.causal

        def fn(q, k, v):
            return pa.mha(q, k, v, None, sm_scale=scale, causal=causal)

        return fn


class PallasMgpuImpl(Impl):
    """jax.experimental.pallas.ops.gpu.attention_mgpu: Hopper (warpgroup MMA, TMA), fp16.

    Its backward is fp16 only, so it always runs in fp16 (the FLOP count is the same). It has no
    scale argument: q arrives pre-multiplied by 1/sqrt(D), outside the timing.
    """

    id = "pallas-mgpu"
    framework = "jax"
    dtype_override = "fp16"
    prescale_q = True

    def __init__(self):
        self.block_kv = None

    def unsupported(self, point, mode, ctx):
        if ctx.device != "cuda":
            return "needs a CUDA GPU"
        if ctx.capability is not None and ctx.capability[0] != 9:
            return "needs Hopper (sm90)"
        if point.varlen:
            return "no packed variable-length input"
        if point.head_dim % 64:
            return f"head_dim {point.head_dim} not a multiple of 64"
        if point.causal and point.seqlen_q != point.seqlen_k:
            return "no bottom-right causal for Sq != Sk"
        if point.causal and mode != "fwd":
            return "no causal backward"
        if point.seqlen_q % 128 or point.seqlen_k % 128:
            return "sequence lengths must be multiples of 128"
        return None

    def build(self, point, ctx):
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am

        bkv = self.block_kv or (256 if point.head_dim <= 64 and point.seqlen_k % 256 == 0 else 128)
        self._last_bkv = bkv
        cfg = am.TuningConfig(
            block_q=64,
            block_kv=bkv,
            max_concurrent_steps=2,
            causal=point.causal,
            block_q_dkv=64,
            block_kv_dkv=64,
            block_q_dq=64,
            block_kv_dq=64,
        )

        def fn(q, k, v):
            return am.attention(q, k, v, cfg)

        return fn

    def on_failure(self, exc):
        cur = getattr(self, "_last_bkv", 128)
        if cur > 64 and "memory" in str(exc).lower():
            self.block_kv = cur // 2
            return True
        return False


def anchor_impls(names: list[str]) -> list[Impl]:
    makers = {
        "sdpa-flash": lambda: SdpaImpl("flash"),
        "sdpa-cudnn": lambda: SdpaImpl("cudnn"),
        "sdpa-efficient": lambda: SdpaImpl("efficient"),
        "sdpa-math": lambda: SdpaImpl("math"),
        "flex": FlexImpl,
        "standard": StandardTorchImpl,
        "jax-xla": lambda: JaxDpaImpl("xla"),
        "jax-cudnn": lambda: JaxDpaImpl("cudnn"),
        "pallas-mha": PallasMhaImpl,
        "pallas-mgpu": PallasMgpuImpl,
    }
    out = []
    for n in names:
        if n not in makers:
            raise ValueError(f"unknown anchor {n!r} (expected one of {', '.join(makers)})")
        out.append(makers[n]())
    return out
