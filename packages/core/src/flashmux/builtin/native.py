"""The `native` backend: the frameworks' own fused attention kernels, where they compute exactly
what the contract (docs/spec.md) asks.

- torch: the kernels behind `torch.nn.functional.scaled_dot_product_attention`, called through
  their aten ops so that the forward returns the log-sum-exp the backward needs:
  `cudnn` (cuDNN), `flash` (FlashAttention-2), `efficient` (memory-efficient) on CUDA and
  `cpu_flash` (torch's CPU flash kernel) on the CPU. SDPA's math kernel is not a candidate: it is
  what the reference backend already does.
- JAX: `jax.nn.dot_product_attention` with implementation `cudnn` (GPU) or `xla` (any device).

A call takes the first kernel of its framework, in the order above, that has no reason against
it; `reasons(spec)` lists every kernel's reasons when none fits, so the dispatcher passes the
backend over instead of running something that computes a different function. What none of them
does (each with its sentence): softcap; causal masks with Sq != Sk (SDPA's and jax's `is_causal`
are aligned top-left, the contract bottom-right; Sq == 1 is run as non-causal, which is what a
bottom-right causal mask means for a single query row); windows (except `xla` with Sq == Sk);
packed variable-length batches; dropout (their masks are not the contract's counter-based one);
deterministic=True with a gradient;
Dv != D. Head-dim and dtype limits are per kernel (see `_torch_kernel_reasons`).

GQA: cuDNN, FlashAttention-2 (GPU_GQA, checked on the H200) and the CPU flash kernel (NATIVE_GQA)
take the KV heads as they are; the memory-efficient kernel gets K and V repeated to Hq heads (its
dK/dV summed back per KV head); $FLASHMUX_NATIVE_GQA overrides the GPU list for A/B runs;
jax.nn.dot_product_attention groups heads itself. The JAX backward recomputes the forward under
jax.vjp (an extra forward pass): the framework function keeps its residuals private. A gradient
through lse, which the torch backward kernels do not take, costs two more kernel calls
(`_torch_backward`, `_jax_backward`).

FLASHMUX_NATIVE_KERNELS=cudnn,flash (a comma list) restricts the kernels tried, in its order,
for A/B runs and for switching one off; `NativeBackend(name=..., kernels=(...))` does the same for one instance
(the benchmark harness registers one per kernel).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

from .._arrays import array_kind
from ..backend import FEATURES, Backend, Capabilities
from ..spec import Params, ProblemSpec

TORCH_KERNELS = ("cudnn", "flash", "efficient", "cpu_flash")
# cuDNN is not asked for shorter sequences (see _torch_kernel_reasons)
CUDNN_MIN_SEQLEN = 128
# torch kernels that take K/V with fewer heads than Q as they are (GQA/MQA, forward and backward,
# dK/dV returned per KV head): checked against the repeated-K/V path on the CPU (torch 2.13,
# equal to 1.2e-7). The GPU kernels get repeated K/V unless listed in GPU_GQA (or in
# $FLASHMUX_NATIVE_GQA, a comma list of GPU kernels, "" or "none" for none: the A/B switch the
# GPU tests and the model benchmark use to check each kernel against the repeated path).
NATIVE_GQA = frozenset({"cpu_flash"})
# H200, torch 2.11, cuDNN 9.19 (2026-11-30, test_torch_cuda_kernel_unrepeated_gqa and
# benchmarks/native_gqa_kernels.py): cuDNN and FlashAttention-2 take the KV heads as they are
# (judged against float64, equal to the repeated path; cuDNN's output bitwise equal to SDPA's
# enable_gqa call); the memory-efficient kernel raises "Expected query.size(2) == key.size(2)".
GPU_GQA: frozenset[str] = frozenset({"cudnn", "flash"})
ENV_GQA = "FLASHMUX_NATIVE_GQA"
# GQA calls (torch): try the kernels that take the KV heads as they are before the others (when
# that was measured faster than repeating K/V for the first kernel); $FLASHMUX_NATIVE_KERNELS,
# when set, keeps its own order
GQA_KV_HEADS_FIRST = False
JAX_KERNELS = ("cudnn", "xla")
ALL_KERNELS = tuple(dict.fromkeys(TORCH_KERNELS + JAX_KERNELS))
# The xla implementation materializes the (B, Hq, Sq, Sk) scores (and, with a gradient, the
# probabilities): above this many bytes per buffer it is passed over.
XLA_SCORE_BYTES = 1 << 30
ENV_KERNELS = "FLASHMUX_NATIVE_KERNELS"


@dataclass(frozen=True)
class _Facts:
    """What the kernel checks look at, from a ProblemSpec or from the arrays of a call."""

    kind: str
    device_type: str
    cc: tuple[int, int] | None
    dtype: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int
    causal: bool
    window: bool
    softcap: bool
    dropout: bool
    varlen: bool
    return_lse: bool
    lse_grad: bool
    deterministic: bool
    nonpositive_scale: bool = False


def _facts_from_spec(s: ProblemSpec) -> _Facts:
    return _Facts(
        s.kind, s.device_type, s.compute_capability, s.dtype, s.batch, s.seqlen_q, s.seqlen_k,
        s.heads_q, s.heads_kv, s.head_dim, s.head_dim_v, s.causal, s.window, s.softcap,
        s.dropout, s.varlen, s.return_lse, s.return_lse and s.requires_grad,
        s.deterministic and s.requires_grad, s.nonpositive_scale,
    )


def _common_reasons(f: _Facts) -> list[str]:
    """What no native kernel does, as the contract defines it."""
    out = []
    if f.softcap:
        out.append("softcap: the frameworks' fused attention has no logit softcapping")
    if f.varlen:
        out.append("variable-length batches (cu_seqlens): not taken through the framework kernels")
    if f.dropout:
        out.append("dropout: the framework kernels draw their own masks, not the contract's "
                   "counter-based one (keep(seed, batch, head, i, j))")
    if f.deterministic:
        out.append("deterministic=True: the framework backward kernels are not promised to be "
                   "bitwise repeatable")
    if f.head_dim_v != f.head_dim:
        out.append(f"head_dim_v {f.head_dim_v} != head_dim {f.head_dim}: the framework kernels "
                   "need equal head dims")
    if f.causal and f.seqlen_q != f.seqlen_k and f.seqlen_q != 1:
        out.append(f"causal with seqlen_q {f.seqlen_q} != seqlen_k {f.seqlen_k}: the framework's "
                   "is_causal is aligned top-left, the contract's bottom-right")
    return out


def _torch_kernel_reasons(kernel: str, f: _Facts) -> list[str]:
    out = []
    if f.nonpositive_scale:  # measured: the CPU kernel returns NaN for scale -0.3
        out.append("scale <= 0: SDPA's fused kernels assume a positive scale")
    if f.window:
        out.append("sliding windows: SDPA has no window argument")
    d = f.head_dim
    if kernel == "cpu_flash":
        if f.device_type != "cpu":
            out.append(f"runs on the CPU, inputs are on {f.device_type}")
        if f.dtype not in ("float32", "bfloat16", "float16"):
            out.append(f"dtype {f.dtype} not taken (float32, bfloat16, float16)")
        return out
    if f.device_type != "cuda":
        return out + ["needs a CUDA device"]
    cc = f.cc or (0, 0)
    if kernel == "cudnn":
        if cc < (8, 0):
            out.append(f"cuDNN attention needs sm80+, got sm{cc[0]}{cc[1]}")
        if f.dtype not in ("float16", "bfloat16"):
            out.append(f"cuDNN attention takes float16/bfloat16, got {f.dtype}")
        limit = 256 if cc >= (9, 0) else 128
        if d % 8 or d > limit:
            out.append(f"cuDNN attention takes head_dim a multiple of 8 up to {limit} here, got {d}")
        if not _cudnn_available():
            out.append("torch was built without cuDNN attention (torch.backends.cudnn unavailable)")
        if min(f.seqlen_q, f.seqlen_k) < CUDNN_MIN_SEQLEN:
            # Measured on the H200 (torch 2.11, 2026-11-30), calling the aten ops directly as this
            # backend does: s_q = s_kv = 1 raised "cuDNN Frontend error: s_q = s_kv = 1 is not
            # supported" in the backward, and a small generated shape crashed the process
            # (segfault) in the backward. SDPA's own dispatcher checks shapes before calling them.
            out.append(f"cuDNN attention: sequences shorter than {CUDNN_MIN_SEQLEN} rows are not "
                       f"taken (seqlen_q {f.seqlen_q}, seqlen_k {f.seqlen_k}); cuDNN refused or "
                       "crashed on such shapes on the H200")
    elif kernel == "flash":
        if cc < (8, 0):
            out.append(f"FlashAttention-2 needs sm80+, got sm{cc[0]}{cc[1]}")
        if f.dtype not in ("float16", "bfloat16"):
            out.append(f"FlashAttention-2 takes float16/bfloat16, got {f.dtype}")
        if d % 8 or d > 256:
            out.append(f"FlashAttention-2 takes head_dim a multiple of 8 up to 256, got {d}")
    elif kernel == "efficient":
        if cc < (5, 0):
            out.append(f"memory-efficient attention needs sm50+, got sm{cc[0]}{cc[1]}")
        if f.dtype not in ("float16", "bfloat16", "float32"):
            out.append(f"memory-efficient attention takes float16/bfloat16/float32, got {f.dtype}")
        align = 4 if f.dtype == "float32" else 8
        if d % align:
            out.append(f"memory-efficient attention takes head_dim a multiple of {align}, got {d}")
    return out


def _jax_kernel_reasons(kernel: str, f: _Facts) -> list[str]:
    out = []
    d = f.head_dim
    if kernel == "cudnn":
        if f.device_type not in ("gpu", "cuda"):
            return [f"cuDNN needs a GPU, inputs are on {f.device_type}"]
        cc = f.cc or (0, 0)
        if f.cc is not None and cc < (8, 0):
            out.append(f"cuDNN attention needs sm80+, got sm{cc[0]}{cc[1]}")
        if f.dtype not in ("float16", "bfloat16"):
            out.append(f"cuDNN attention takes float16/bfloat16, got {f.dtype}")
        # head_dim 256 on sm90: jax.nn.dot_product_attention(implementation="cudnn") ran forward
        # and forward+backward correctly at d256 on the H200 (jax 0.11.2, 2026-11-30, the
        # harness's jax-cudnn anchor, S=4k, 529-676 TFLOP/s forward)
        limit = 256 if f.cc is not None and cc >= (9, 0) else 128
        if d % 8 or d > limit:
            out.append(f"jax's cuDNN attention takes head_dim a multiple of 8 up to {limit} here, "
                       f"got {d}")
        if f.window:
            out.append("sliding windows: not taken through jax's cuDNN path")
        if f.return_lse:
            out.append("return_lse: jax's cuDNN path returns no float32 lse here")
        if f.nonpositive_scale:
            out.append("scale <= 0: not taken through jax's cuDNN path")
        return out
    # xla
    if f.window and f.seqlen_q != f.seqlen_k:
        out.append(f"sliding windows with seqlen_q {f.seqlen_q} != seqlen_k {f.seqlen_k}: "
                   "local_window_size is aligned top-left")
    if f.return_lse and f.dtype != "float32":
        out.append(f"return_lse with {f.dtype}: the xla implementation returns lse in the input "
                   "dtype, not float32")
    nbytes = 4 * f.batch * f.heads_q * f.seqlen_q * f.seqlen_k
    if nbytes > XLA_SCORE_BYTES:
        out.append(f"the xla implementation materializes the scores: {nbytes / 2**30:.1f} GiB "
                   f"> {XLA_SCORE_BYTES / 2**30:.0f} GiB")
    return out


def _cudnn_available() -> bool:
    """torch has cuDNN and the cuDNN attention op. Read on every reasons() call (two attribute
    reads, no cache): torch.compile traces the dispatcher, and dynamo refuses
    torch.backends.cudnn.is_available() ("torch.* op returned non-Tensor", the H200 run of
    2026-11-30) and ignores functools caches; these two reads it folds into constants."""
    import torch

    return bool(getattr(torch._C, "_has_cudnn", False)) and hasattr(
        torch.ops.aten, "_scaled_dot_product_cudnn_attention")


@dataclass
class NativeBackend(Backend):
    # None: every kernel of the framework (minus what $FLASHMUX_NATIVE_KERNELS leaves out)
    kernels: tuple[str, ...] | None = field(default=None)
    _picks: dict = field(default_factory=dict, repr=False, compare=False)

    def _allowed(self, kind: str) -> tuple[str, ...]:
        ks: tuple[str, ...] = TORCH_KERNELS if kind == "torch" else JAX_KERNELS
        if self.kernels is not None:
            ks = tuple(k for k in ks if k in self.kernels)
        env = os.environ.get(ENV_KERNELS, "").strip()
        if env:  # the list's order is the order tried (an A/B of which kernel goes first)
            want = dict.fromkeys(k.strip() for k in env.split(","))
            ks = tuple(k for k in want if k in ks)
        return ks

    def availability(self) -> list[str]:
        # an imported framework answers without importlib: torch.compile traces this when the
        # compiled call is the process's first, and dynamo (torch 2.11) refuses find_spec
        if "torch" in sys.modules or "jax" in sys.modules:
            return []
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("torch", "jax")):
            return ["neither torch nor jax is installed"]
        return []

    def kernel_reasons(self, f: _Facts) -> list[tuple[str, list[str]]]:
        """(kernel, reasons) for every kernel of the call's framework, in the order tried."""
        common = _common_reasons(f)
        check = _torch_kernel_reasons if f.kind == "torch" else _jax_kernel_reasons
        ks = self._allowed(f.kind)
        if not ks:
            return [("-", [f"no kernel left by {ENV_KERNELS} / this instance's kernel list"])]
        if (GQA_KV_HEADS_FIRST and f.kind == "torch" and f.heads_q != f.heads_kv
                and not os.environ.get(ENV_KERNELS)):
            # stable: the kernels that take the KV heads as they are first, in their order
            ks = tuple([k for k in ks if _takes_kv_heads(k)] +
                       [k for k in ks if not _takes_kv_heads(k)])
        return [(k, common + check(k, f)) for k in ks]

    def pick(self, f: _Facts) -> str | None:
        for k, r in self.kernel_reasons(f):
            if not r:
                return k
        return None

    def reasons(self, spec: ProblemSpec) -> list[str]:
        if spec.kind not in ("torch", "jax"):
            return []  # the capabilities already say so
        f = _facts_from_spec(spec)
        rows = self.kernel_reasons(f)
        if any(not r for _, r in rows):
            return []
        # what every kernel says once, then each kernel's own reasons
        shared = [x for x in rows[0][1] if all(x in r for _, r in rows[1:])]
        out = list(shared)
        for k, r in rows:
            extra = [x for x in r if x not in shared]
            if extra:
                out.append(f"{k}: " + "; ".join(extra))
        return out

    def lowerings(self, q, k, v, params: Params):
        k_ = self.pick(_facts_from_arrays(q, k, v, params, None))
        return None if k_ is None else {"forward": k_, "backward": k_}

    def info(self):
        return {"kernels tried (torch)": ", ".join(self._allowed("torch")),
                "kernels tried (jax)": ", ".join(self._allowed("jax"))}

    # -- kernels ------------------------------------------------------------------------
    def _kernel(self, q, k, v, p: Params, cu) -> str:
        # the pick depends on shapes, dtype, device, params and the allowed kernels only: cached,
        # so a repeated call (forward, then backward, every layer) skips the facts and reasons
        # (about 30 us of Python per call on the development CPU)
        key = None
        if type(q).__module__.startswith("torch"):  # JAX tracers have no device to key on
            key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, p,
                   cu is None, self.kernels, os.environ.get(ENV_KERNELS, ""),
                   os.environ.get(ENV_GQA))
            hit = self._picks.get(key)
            if hit is not None:
                return hit
        f = _facts_from_arrays(q, k, v, p, cu)
        kern = self.pick(f)
        if kern is None:
            rows = self.kernel_reasons(f)
            raise ValueError("native: no kernel can run this call: "
                             + " | ".join(f"{n}: {'; '.join(r)}" for n, r in rows))
        if key is not None:
            if len(self._picks) > 4096:
                self._picks.clear()
            self._picks[key] = kern
        return kern

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: Params):
        kern = self._kernel(q, k, v, params, cu_seqlens_q)
        if array_kind(q) == "torch":
            return _torch_forward(kern, q, k, v, params)
        return _jax_forward(kern, q, k, v, params)

    def forward_autograd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, params: Params):
        """(out, lse) with torch's own autograd: eager torch calls that need gradients of `out`
        only (no lse gradient: the aten ops mark their logsumexp non-differentiable) run the aten
        op under autograd, so the backward is the op's registered derivative (the same backward
        kernel `backward` calls, in C++: no Python backward per call, host time). None: take the
        generic path (flashmux's autograd Function)."""
        if params.return_lse or cu_seqlens_q is not None or array_kind(q) != "torch":
            return None
        return _torch_forward(self._kernel(q, k, v, params, cu_seqlens_q), q, k, v, params)

    def prepare_torch(self, params: Params, q, k, v, grad: bool):
        """For flashmux's prepared eager calls (flashmux/_prepared.py): a runner (q, k, v) ->
        (out, lse) for every later call of this signature, the same ops as `forward` /
        `forward_autograd` with the kernel, its aten op, causal flag and scale fixed now (the
        backward, when a gradient is needed, is the op's own derivative under torch's autograd).
        None where the generic path runs: a gradient through lse (flashmux's autograd Function),
        packed batches, dropout."""
        if params.varlen or params.dropout_p or (grad and params.return_lse):
            return None
        kern = self._kernel(q, k, v, params, None)
        run = _torch_runner(kern, params, int(q.shape[1]), int(q.shape[2]) // int(k.shape[2]),
                            grad)
        if SDPA_CALL and not params.return_lse:
            sdpa = _sdpa_runner(kern, params, q, k, v)
            if sdpa is not None:
                return sdpa
        return run

    def backward(self, do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, params: Params):
        kern = self._kernel(q, k, v, params, cu_seqlens_q)
        if array_kind(q) == "torch":
            return _torch_backward(kern, do, dlse, q, k, v, out, lse, params)
        return _jax_backward(kern, do, dlse, q, k, v, params)


def _facts_from_arrays(q, k, v, p: Params, cu) -> _Facts:
    from .._arrays import device_of, dtype_name

    kind = array_kind(q)
    assert kind is not None  # the api checked q before a backend sees it
    dev = device_of(q, kind)
    varlen = cu is not None or p.varlen
    b, sq, hq, d = (1, *q.shape) if varlen else q.shape
    sk, hkv, dv = k.shape[-3], k.shape[-2], v.shape[-1]
    return _Facts(
        kind, dev.type, dev.compute_capability, dtype_name(q), int(b), int(sq), int(sk),
        int(hq), int(hkv), int(d), int(dv), p.causal, p.has_window, p.softcap is not None,
        p.dropout_p > 0, varlen, p.return_lse, False, False, p.scale <= 0,
    )


# -- torch -----------------------------------------------------------------------------------


def _takes_kv_heads(kern: str) -> bool:
    """Whether `kern` gets K/V with their own (fewer) heads rather than repeated to Hq."""
    if kern in NATIVE_GQA:
        return True
    env = os.environ.get(ENV_GQA)
    if env is None:
        return kern in GPU_GQA
    return kern in {x.strip() for x in env.split(",")}


def _is_causal(p: Params, sq: int) -> bool:
    # bottom-right causal with one query row sees every key: not SDPA's top-left causal
    return p.causal and sq > 1


def _torch_forward(kern, q, k, v, p: Params):
    import torch

    aten = torch.ops.aten
    b, sq, hq, _ = q.shape
    g = hq // k.shape[2]
    if g > 1 and not _takes_kv_heads(kern):  # repeated in BSHD, q's layout
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) views
    causal = _is_causal(p, sq)
    if kern == "cpu_flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=p.scale)
    elif kern == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, causal, False, scale=p.scale)[:2]
    elif kern == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, 0.0, causal, scale=p.scale)[:2]
    elif kern == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, causal, False, scale=p.scale)[:2]
    else:
        raise ValueError(f"native: unknown torch kernel {kern!r}")
    # lse: (B, H, Sq) float32, natural log; efficient pads rows to a multiple of 32, cuDNN adds
    # a trailing axis of 1 (the others' is already right: no more ops for them, host time)
    if lse.dim() != 3 or lse.shape[2] != sq:
        lse = lse.reshape(b, hq, -1)[:, :, :sq].contiguous()
    lse = lse.float().contiguous()
    return out.transpose(1, 2).contiguous(), lse


def _torch_runner(kern, p: Params, sq: int, g: int, grad: bool):
    """`_torch_forward` for one call signature (kern, p, Sq, the GQA group g, whether a gradient
    is needed, fixed): the aten op and its arguments chosen once; per call three transposes
    (views), the op, the output's transpose (a view whose .contiguous() is free: the kernels write
    (B, Sq, H, D) underneath) and, only with return_lse, the lse fix-up. Same ops as
    _torch_forward, except that cuDNN and the memory-efficient kernel are not asked for the
    log-sum-exp when neither the caller nor a backward needs it (SDPA's own inference call)."""
    import torch

    aten = torch.ops.aten
    repeat = g > 1 and not _takes_kv_heads(kern)
    causal, scale = _is_causal(p, sq), p.scale
    stats = p.return_lse or grad  # the log-sum-exp: returned, or the backward's
    if kern == "cpu_flash":
        op = aten._scaled_dot_product_flash_attention_for_cpu.default

        def attend(qt, kt, vt):
            return op(qt, kt, vt, 0.0, causal, scale=scale)
    elif kern == "flash":
        op = aten._scaled_dot_product_flash_attention.default

        def attend(qt, kt, vt):
            return op(qt, kt, vt, 0.0, causal, False, scale=scale)[:2]
    elif kern == "efficient":
        op = aten._scaled_dot_product_efficient_attention.default

        def attend(qt, kt, vt):
            return op(qt, kt, vt, None, stats, 0.0, causal, scale=scale)[:2]
    elif kern == "cudnn":
        op = aten._scaled_dot_product_cudnn_attention.default

        def attend(qt, kt, vt):
            return op(qt, kt, vt, None, stats, 0.0, causal, False, scale=scale)[:2]
    else:
        raise ValueError(f"native: unknown torch kernel {kern!r}")
    want_lse = p.return_lse

    def run(q, k, v):
        if repeat:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        out, lse = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).contiguous()
        if not want_lse:
            return out, lse  # lse is not returned to the caller: left as the kernel made it
        if lse.dim() != 3 or lse.shape[2] != sq:
            lse = lse.reshape(out.shape[0], out.shape[2], -1)[:, :, :sq].contiguous()
        return out, lse.float().contiguous()

    def run_bhsd(qt, kt, vt):
        # the same call for (B, H, S, D) views of the same tensors (transformers' layout): no
        # transposes in and out of flashmux's (B, S, H, D); repeated K/V built in BSHD as above
        if repeat:
            kt = kt.transpose(1, 2).repeat_interleave(g, dim=2).transpose(1, 2)
            vt = vt.transpose(1, 2).repeat_interleave(g, dim=2).transpose(1, 2)
        out, lse = attend(qt, kt, vt)
        return out.transpose(1, 2).contiguous(), lse

    run.bhsd = None if want_lse else run_bhsd  # type: ignore[attr-defined]
    return run


# The prepared runner calls torch.nn.functional.scaled_dot_product_attention itself when SDPA
# would run the very kernel native chose, with the same arguments (checked once per signature by
# torch._fused_sdp_choice; SDPA's backend switches are part of the signature): the same kernel,
# the same output, without the Python cost of calling the aten op through torch.ops (~5 us per
# call on the development CPU). False: always the aten op.
SDPA_CALL = True
_SDPA_BACKEND = {"cpu_flash": 1, "flash": 1, "efficient": 2, "cudnn": 3}  # torch's SDPBackend


def _sdpa_runner(kern, p: Params, q, k, v):
    """A runner through F.scaled_dot_product_attention for (B, S, H, D) tensors like q, k, v (with
    a `bhsd` form), or None when SDPA would not run `kern` on them: K/V repeated for `kern`,
    $FLASHMUX_NATIVE_KERNELS set (A/B runs pin the aten op), or another choice."""
    import torch

    g = int(q.shape[2]) // int(k.shape[2])
    if (g > 1 and not _takes_kv_heads(kern)) or os.environ.get(ENV_KERNELS):
        return None
    causal, scale, gqa = _is_causal(p, int(q.shape[1])), p.scale, g > 1
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    try:
        choice = int(torch._fused_sdp_choice(qt, kt, vt, None, 0.0, causal, scale=scale,
                                             enable_gqa=gqa))
    except Exception:  # an older torch (no enable_gqa) or no such function: the aten op
        return None
    if choice != _SDPA_BACKEND.get(kern):
        return None
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run_bhsd(qt, kt, vt):
        out = sdpa(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None

    def run(q, k, v):
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                   scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None

    run.bhsd = run_bhsd  # type: ignore[attr-defined]
    run.kernel = kern  # type: ignore[attr-defined]
    return run


def _torch_backward(kern, do, dlse, q, k, v, out, lse, p: Params):
    """dq, dk, dv; with dlse (the gradient of the returned lse, (B, Hq, Sq)) two more kernel
    calls add its terms. d lse_i / d s_ij = P_ij, so dq_i gains scale * dlse_i * sum_j P_ij k_j
    (the output of attention with k as the values) and dk_j gains scale * sum_i P_ij dlse_i q_i
    (the dV of a backward whose output gradient is dlse_i * q_i)."""
    dq, dk, dv = _torch_backward_kernel(kern, do, q, k, v, out, lse, p)
    if dlse is None:
        return dq, dk, dv
    w = dlse.float().transpose(1, 2).unsqueeze(-1) * p.scale  # (B, Sq, Hq, 1)
    ok, _ = _torch_forward(kern, q, k, k, p)
    dq = (dq.float() + w * ok.float()).to(q.dtype)
    _, _, dk_lse = _torch_backward_kernel(kern, (w * q.float()).to(q.dtype), q, k, k, ok, lse, p)
    return dq, (dk.float() + dk_lse.float()).to(k.dtype), dv


def _torch_backward_kernel(kern, do, q, k, v, out, lse, p: Params):
    import torch

    aten = torch.ops.aten
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    repeat = g > 1 and not _takes_kv_heads(kern)
    kr, vr = (k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)) if repeat else (k, v)
    qt, kt, vt = q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2)
    # do and out in the same (BSHD contiguous) layout, seen as (B, H, S, D)
    ot, dot = out.contiguous().transpose(1, 2), do.contiguous().transpose(1, 2)
    causal = _is_causal(p, sq)
    dev = q.device
    if kern == "cpu_flash":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dot, qt, kt, vt, ot, lse, 0.0, causal, scale=p.scale)
    elif kern == "flash":
        # no dropout: the philox state is not read; cum_seq None = not packed
        zero, rng, empty = _backward_consts(dev)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse.contiguous(), None, None, sq, sk, 0.0, causal, rng,
            empty, scale=p.scale)
    elif kern == "efficient":
        pad = -(-sq // 32) * 32
        lse_p = torch.nn.functional.pad(lse, (0, pad - sq)) if pad != sq else lse
        zero = _backward_consts(dev)[0]
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dot, qt, kt, vt, None, ot, lse_p.contiguous(), zero, zero, 0.0,
            [True, True, True, False], causal, scale=p.scale)
    elif kern == "cudnn":
        zero = _backward_consts(dev)[0]
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse.contiguous().unsqueeze(-1), zero, zero, None, None, None,
            sq, sk, 0.0, causal, scale=p.scale)
    else:
        raise ValueError(f"native: unknown torch kernel {kern!r}")
    dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)  # (B, S, H, D)
    if repeat:  # a KV head's gradient sums over the query heads that share it (one pass,
        # written straight in (B, S, Hkv, D) when the kernel's dK/dV are BSHD underneath, as
        # its K/V are)
        dk = dk.reshape(b, sk, hkv, g, d).sum(3)
        dv = dv.reshape(b, sk, hkv, g, dv.shape[-1]).sum(3)
    return dq.contiguous(), dk.contiguous().to(k.dtype), dv.contiguous().to(v.dtype)


_consts: dict = {}


def _backward_consts(dev):
    """(int64 zero scalar, int64 zero pair, empty) on `dev`: the philox seed/offset and debug
    arguments the backward ops take and, without dropout, never read. Made once per device
    (two fill kernels and allocations per backward call before)."""
    hit = _consts.get(dev)
    if hit is None:
        import torch

        hit = (torch.zeros((), dtype=torch.int64, device=dev),
               torch.zeros(2, dtype=torch.int64, device=dev), torch.empty(0, device=dev))
        # not kept when made inside a CUDA graph capture: that memory belongs to the graph's pool
        if dev.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _consts[dev] = hit
    return hit


# -- JAX -------------------------------------------------------------------------------------


def _jax_call(kern, p: Params, sq: int, sk: int):
    import jax

    kw = {"scale": p.scale, "is_causal": _is_causal(p, sq), "implementation": kern}
    if p.has_window:  # xla only, Sq == Sk (checked): top-left and bottom-right agree
        big = sk + sq
        left = big if p.window_left is None else p.window_left
        right = big if p.window_right is None else p.window_right
        if p.causal:
            kw["is_causal"] = False
            right = min(right, 0)
        kw["local_window_size"] = (left, right)

    def f(q, k, v):
        # float32: the xla path's matmuls at full float32, whatever the platform's default (the
        # H200 host's jax 0.11.2 on the CPU was off by 3e-4 at Sq=1)
        full = q.dtype == jax.numpy.float32
        with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
            return jax.nn.dot_product_attention(q, k, v, return_residual=True, **kw)

    return f


def _jax_forward(kern, q, k, v, p: Params):
    import jax.numpy as jnp

    out, lse = _jax_call(kern, p, q.shape[1], k.shape[1])(q, k, v)  # lse (B, Sq, Hq)
    return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)


def _jax_backward(kern, do, dlse, q, k, v, p: Params):
    import jax
    import jax.numpy as jnp

    f = _jax_call(kern, p, q.shape[1], k.shape[1])
    _, vjp = jax.vjp(lambda q, k, v: f(q, k, v)[0], q, k, v)
    dq, dk, dv = vjp(do.astype(q.dtype))
    if dlse is None:
        return dq, dk, dv
    # the lse terms, composed as in _torch_backward (jax.vjp through the returned lse itself
    # gave wrong dq/dk): dq += scale * dlse * (P @ K), dk += P^T @ (scale * dlse * q)
    w = jnp.transpose(dlse, (0, 2, 1))[..., None].astype(jnp.float32) * p.scale  # (B, Sq, Hq, 1)
    ok, vjp_v = jax.vjp(lambda kv: f(q, k, kv)[0], k)
    (dk_lse,) = vjp_v((w * q.astype(jnp.float32)).astype(q.dtype))
    dq = (dq.astype(jnp.float32) + w * ok.astype(jnp.float32)).astype(q.dtype)
    return dq, (dk.astype(jnp.float32) + dk_lse.astype(jnp.float32)).astype(k.dtype), dv


backend = NativeBackend(
    name="native",
    description="the frameworks' own fused attention: torch SDPA kernels (cuDNN, FlashAttention-2, "
    "memory-efficient, CPU flash), jax.nn.dot_product_attention (cuDNN, XLA)",
    capabilities=Capabilities(
        array_kinds=frozenset({"torch", "jax"}),
        devices=frozenset({"cpu", "cuda", "gpu"}),
        dtypes=frozenset({"float16", "bfloat16", "float32"}),
        max_head_dim=1 << 16,  # per-kernel limits in reasons()
        features=frozenset(FEATURES),  # every refusal is a sentence of reasons()
        runs_under_jit=True,
        priority=500,
    ),
)
