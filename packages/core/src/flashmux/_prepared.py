"""Prepared eager torch calls of `flashmux.attention`: the first call of a signature runs the
checks and the dispatch, later calls of the same signature go straight to the chosen backend.

What a repeated model layer pays per call is then a key (shapes, strides, dtypes, devices, grad
flags, keyword values with their types, the forced backends, the environment variables the
dispatcher and the native backend read, SDPA's backend switches and torch's deterministic flag,
which native's runner depends on when it calls SDPA; not SDPA's priority order, set through
sdpa_kernel(..., set_priority=True)) and one dict lookup, then the backend's own runner:
`Backend.prepare_torch(params, q, k, v, grad)` when it has one (native: the aten SDPA op with
its kernel, causal flag and scale fixed, under torch's own autograd), else the checked path's
`_run` minus the checks and the dispatch.

Only for plain eager calls: torch.Tensor inputs (no subclass: FakeTensor, DTensor, functional
tensors take the checked path), outside torch.compile tracing (the traced path is unchanged),
without cu_seqlens, dropout, ALiBi slopes or a block mask (their operands are checked or drawn per
call), and with `backend` None or one name. A step stays valid while the dispatcher's registry,
its generation (bumped by `register` and `clear_caches`) and the priority table are the ones it
was made under. FLASHMUX_ATTENTION_FASTPATH=0 (read at import) turns it off.

Imported by `flashmux.attention` only when torch tensors reach it (torch is imported already).
"""

from __future__ import annotations

import os

import torch

from . import dispatch
from .api import attention

ENABLED = os.environ.get("FLASHMUX_ATTENTION_FASTPATH", "1") != "0"
# the environment variables that change what the dispatcher or the native backend choose
_ENV_BACKEND = dispatch.ENV_VAR
_ENV_KERNELS = "FLASHMUX_NATIVE_KERNELS"
_ENV_GQA = "FLASHMUX_NATIVE_GQA"
_MAX_STEPS = 4096

_Tensor = torch.Tensor
# SDPA's backend switches (torch.backends.cuda.enable_*_sdp, sdpa_kernel): part of the signature,
# since native's runner may call SDPA itself when SDPA would pick native's kernel
_sdp_flags = tuple(getattr(torch._C, n, None) for n in (
    "_get_flash_sdp_enabled", "_get_mem_efficient_sdp_enabled", "_get_cudnn_sdp_enabled",
    "_get_math_sdp_enabled"))
if None in _sdp_flags:  # pragma: no cover - an older torch: no SDPA call from the runner
    _sdp_flags = ()
_f0, _f1, _f2, _f3 = _sdp_flags or (bool, bool, bool, bool)
# SDPA's choice may depend on it (the C function behind torch.are_deterministic_algorithms_enabled)
_deterministic = getattr(torch._C, "_get_deterministic_algorithms",
                         torch.are_deterministic_algorithms_enabled)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
# os.environ's own mapping (what os.environ.get reads, minus its key encoding and KeyError: ~0.6
# us per read), where this Python has it
_env_data = getattr(os.environ, "_data", None)
_env_key = getattr(os.environ, "encodekey", None)
if isinstance(_env_data, dict) and _env_key is not None:
    _env_keys = tuple(_env_key(n) for n in (_ENV_BACKEND, _ENV_KERNELS, _ENV_GQA))

    def _env():
        return _env_data.get(_env_keys[0]), _env_data.get(_env_keys[1]), _env_data.get(_env_keys[2])
else:  # pragma: no cover - other Pythons
    def _env():
        return os.environ.get(_ENV_BACKEND), os.environ.get(_ENV_KERNELS), os.environ.get(_ENV_GQA)

steps: dict[tuple, _Step] = {}


def key(q, k, v, causal, scale, window, softcap, return_lse, deterministic, backend):
    """The call's signature, or None when it is not eligible (the checked path then runs).
    Keyword values keep their types: causal=1 hashes like True, and must reach the checks."""
    if not ENABLED or type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor:
        return None
    if _is_compiling():
        return None
    if window is not None:
        if type(window) is not tuple and type(window) is not list:
            return None
        window = tuple((type(w), w) for w in window)
    env = _env()
    if backend is None:
        stack = dispatch._forced_stack
        forced = ("use", stack[-1]) if stack else ("env", env[0])
    elif type(backend) is str:
        forced = ("arg", backend)
    else:
        return None
    try:
        sig = (
            q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, q.requires_grad, k.requires_grad,
            v.requires_grad, _grad_enabled(), type(causal), causal, type(scale), scale, window,
            type(softcap), softcap, type(return_lse), return_lse, type(deterministic),
            deterministic, forced, env[1], env[2], _f0(), _f1(), _f2(), _f3(),
            _deterministic(),
        )
        hash(sig)
    except TypeError:  # an unhashable keyword value: the checked path says what is wrong
        return None
    return sig


class _Step:
    """One validated call signature: the backend the dispatcher chose and its runner."""

    __slots__ = ("be", "reg", "gen", "table", "runner", "return_lse")

    def __init__(self, be, runner, return_lse):
        self.be = be
        self.reg = dispatch._backends
        self.gen = dispatch._generation
        self.table = dispatch._priority_table
        self.runner = runner
        self.return_lse = return_lse

    def valid(self) -> bool:
        return (dispatch._generation == self.gen and dispatch._backends is self.reg
                and dispatch._priority_table is self.table and not dispatch._pending)

    def __call__(self, q, k, v):
        out, lse = self.runner(q, k, v)
        return (out, lse) if self.return_lse else out


def prepare(sig, be, call, run, q, k, v):
    """Make the step for `sig` (be: the chosen backend, call: the checked api._Call, run: the
    checked path's `_run`, q/k/v: this call's tensors, for the backend's planning; the step keeps
    none of them); returns it after keeping it."""
    params = call.params
    runner = None
    make = getattr(be, "prepare_torch", None)
    if make is not None and "torch" in be.capabilities.array_kinds:
        runner = make(params, q, k, v, call.spec.requires_grad)
    if runner is None:
        def runner(q, k, v, be=be, call=call):
            return run(be, call, q, k, v, None, None, None)
    step = _Step(be, runner, params.return_lse)
    if len(steps) >= _MAX_STEPS:
        steps.clear()
    steps[sig] = step
    return step


# Prepared calls for (B, H, S, D) tensors (`attention_bhsd`), keyed by their own signature.
bhsd_steps: dict[tuple, _Step] = {}


def attention_bhsd(query, key_, value, causal, scale, window, softcap):
    """`flashmux.attention(query.transpose(1, 2), key_.transpose(1, 2), value.transpose(1, 2),
    causal=..., scale=..., window=..., softcap=...)` for (B, H, S, D) tensors (the layout
    transformers' layers hand over), returning out (B, Sq, Hq, Dv). The first call of a signature
    takes that route (checks, dispatch, the BSHD step); when the chosen backend's runner has a
    `bhsd` form (native: the aten op takes (B, H, S, D) as it is), later calls run it directly,
    without the six transposes in and out of flashmux's layout."""
    sig = key(query, key_, value, causal, scale, window, softcap, False, False, None)
    if sig is not None:
        step = bhsd_steps.get(sig)
        if step is not None and step.valid():
            return step.runner(query, key_, value)[0]
    q, k, v = query.transpose(1, 2), key_.transpose(1, 2), value.transpose(1, 2)
    out = attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    if sig is not None:
        inner = steps.get(key(q, k, v, causal, scale, window, softcap, False, False, None))
        bhsd = getattr(inner.runner, "bhsd", None) if inner is not None else None
        if bhsd is not None and inner.valid():
            step = _Step(inner.be, bhsd, False)
            step.reg, step.gen, step.table = inner.reg, inner.gen, inner.table
            if len(bhsd_steps) >= _MAX_STEPS:
                bhsd_steps.clear()
            bhsd_steps[sig] = step
    return out


def clear() -> None:
    """Forget every prepared step (the dispatcher's generation does this implicitly)."""
    steps.clear()
    bhsd_steps.clear()
