"""`flashmux.attention` and `flashmux.explain`: argument checks, dispatch, and the route to the
framework glue (torch custom op + autograd, jax.custom_vjp, plain NumPy)."""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass

import numpy as np

from . import dispatch
from ._arrays import (
    array_kind,
    device_of,
    dtype_name,
    is_traced,
    same_device,
    to_numpy_int,
    torch_compiling,
)
from .spec import Params, ProblemSpec, default_scale

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class _Call:
    kind: str
    params: Params
    spec: ProblemSpec
    empty: bool  # no work for a kernel: B, Sq, Sk, Tq or Tk is zero


def _shape(x):
    return tuple(int(d) for d in x.shape)


def _check_scalars(scale, d: int, window, causal, softcap):
    """The checks attention and attention_with_kvcache share: -> (scale, window left, window
    right, softcap). scale: 1/sqrt(head_dim) for None (1.0 for an empty head_dim), else a finite
    real; causal clips the window's right side to 0; softcap: None or a finite number > 0."""
    if scale is None:
        scale_f = default_scale(d) if d else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a finite real number or None, got {scale!r}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale: expected a finite number, got {scale_f}")
    left, right = _check_window(window)
    if not isinstance(causal, bool | np.bool_):  # 1 == True, so test the type
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if causal:
        right = 0 if right is None else min(right, 0)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap: expected a positive number or None, got {softcap!r}")
        if not (float(softcap) > 0 and math.isfinite(float(softcap))):
            raise ValueError(f"softcap: expected a finite number > 0 or None, got {softcap}")
        softcap = float(softcap)
    return scale_f, left, right, softcap


def _check_window(window):
    if window is None:
        return None, None
    if not isinstance(window, tuple | list) or len(window) != 2:
        raise ValueError(f"window: expected None or a pair (left, right), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window: expected the {side} entry to be an int or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window: expected the {side} entry to be >= 0 or None, got {w}")
        out.append(int(w))
    return out[0], out[1]


# FLASHMUX_CHECK_VALUES=1: read cu_seqlens on the host and check their values even where that
# synchronizes a device (a debugging aid; never inside torch.compile or a JAX trace).
CHECK_VALUES_ENV = "FLASHMUX_CHECK_VALUES"


def _reads_cu_values(kind, cu, hints: bool) -> bool:
    """Whether a varlen call reads cu_seqlens on the host (to check the offsets, and to find the
    longest sequence when max_seqlen_q/k are not given).

    Never under torch.compile or inside a JAX transformation (the max_seqlen default is then the
    row count). With both max_seqlen hints given, only host-visible inputs (NumPy, CPU tensors,
    JAX arrays on the CPU) are read, unless FLASHMUX_CHECK_VALUES=1: a device-resident packed
    call then costs no synchronization. Without the hints, eager calls read the values to find
    the maxima (on a GPU that synchronizes once per call: pass the hints to avoid it)."""
    where = _cu_location(kind, cu)
    if where == "traced":
        return False
    if not hints or where == "host":
        return True
    return os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _cu_location(kind, cu) -> str:
    """"host" (readable for free), "device" (reading synchronizes) or "traced" (not readable)."""
    if kind == "numpy" or array_kind(cu) != kind:
        return "host"  # (a wrong kind is _check_cu's error)
    if kind == "torch":
        if sys.modules["torch"].compiler.is_compiling():
            return "traced"
        return "host" if cu.device.type == "cpu" else "device"
    if is_traced(cu):
        return "traced"
    try:
        return "host" if all(d.platform == "cpu" for d in cu.devices()) else "device"
    except Exception:
        return "device"


def _check_cu(name, cu, kind, rows, q, batch=None, read_values=True):
    """Validate one cu_seqlens vector; returns (host values or None when not read, batch)."""
    if array_kind(cu) != kind:
        raise TypeError(f"{name}: expected a {kind} array like q, got {type(cu).__name__}")
    if dtype_name(cu) != "int32":
        raise TypeError(f"{name}: expected dtype int32, got {dtype_name(cu)}")
    if len(cu.shape) != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D vector of length B+1 >= 1, got shape {_shape(cu)}")
    if kind != "numpy" and not same_device(cu, q, kind):
        raise ValueError(f"{name}: expected it on q's device, got another device")
    n = int(cu.shape[0]) - 1
    if batch is not None and n != batch:
        raise ValueError(
            f"{name}: expected length {batch + 1} like cu_seqlens_q, got length {n + 1}"
        )
    host = to_numpy_int(cu, kind) if read_values else None
    if host is not None:
        if host[0] != 0:
            raise ValueError(f"{name}: expected to start at 0, got {int(host[0])}")
        if n and (host[1:] < host[:-1]).any():
            raise ValueError(f"{name}: expected non-decreasing offsets, got {host.tolist()}")
        if host[-1] != rows:
            raise ValueError(f"{name}: expected to end at the row count {rows}, got {int(host[-1])}")
    return host, n


def _resolve(
    q, k, v, causal, scale, window, softcap, dropout_p, dropout_seed, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, return_lse, deterministic,
) -> _Call:
    kinds = [array_kind(x) for x in (q, k, v)]
    for name, x, kd in zip("qkv", (q, k, v), kinds):
        if kd is None:
            raise TypeError(
                f"{name}: expected a torch tensor, JAX array or NumPy array, got {type(x).__name__}"
            )
    kind = kinds[0]
    for name, kd in zip("kv", kinds[1:]):
        if kd != kind:
            raise TypeError(f"{name}: expected a {kind} array like q, got a {kd} array")
    dts = [dtype_name(x) for x in (q, k, v)]
    if dts[0] not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {dts[0]}")
    for name, dt in zip("kv", dts[1:]):
        if dt != dts[0]:
            raise TypeError(f"{name}: expected dtype {dts[0]} like q, got {dt}")
    for name, x in zip("kv", (k, v)):
        if not same_device(q, x, kind):
            raise ValueError(f"{name}: expected it on q's device ({_dev_str(q, kind)}), got {_dev_str(x, kind)}")

    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"{missing}: expected it too, since the other cu_seqlens was given, got None")
    rank = 3 if varlen else 4
    layout = "(T, H, D) with cu_seqlens" if varlen else "(B, S, H, D)"
    for name, x in zip("qkv", (q, k, v)):
        if len(x.shape) != rank:
            raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {_shape(x)}")
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not varlen and not (qs[0] == ks[0] == vs[0]):
        raise ValueError(f"k, v: expected batch size {qs[0]} like q, got {ks[0]} and {vs[0]}")
    if ks[:-1] != vs[:-1]:
        raise ValueError(f"v: expected shape {ks[:-1]} + (Dv,) to match k {ks}, got {vs}")
    if ks[-1] != qs[-1]:
        raise ValueError(f"k: expected head_dim {qs[-1]} like q, got {ks[-1]} (shape {ks})")
    hq, hkv = qs[-2], ks[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"k: expected a KV head count that divides q's {hq} heads, got {hkv} (shape {ks})"
        )
    d, dv = qs[-1], vs[-1]

    scale_f, left, right, softcap = _check_scalars(scale, d, window, causal, softcap)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    seed, seed_array = 0, False
    if dropout_p > 0:
        seed = _seed(dropout_seed, kind, q)
        if seed is None:  # a scalar integer array: an operand beside q, k, v (see attention)
            seed, seed_array = 0, True

    if varlen:
        hints = max_seqlen_q is not None and max_seqlen_k is not None
        read = _reads_cu_values(kind, cu_seqlens_q, hints)
        host_q, batch = _check_cu("cu_seqlens_q", cu_seqlens_q, kind, qs[0], q, None, read)
        host_k, _ = _check_cu("cu_seqlens_k", cu_seqlens_k, kind, ks[0], q, batch, read)
        mq = _max_len("max_seqlen_q", max_seqlen_q, host_q, qs[0])
        mk = _max_len("max_seqlen_k", max_seqlen_k, host_k, ks[0])
        seqlen_q, seqlen_k = mq, mk
        empty = qs[0] == 0 or batch == 0
        empty_k = ks[0] == 0
    else:
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if m is not None:
                raise ValueError(f"{name}: expected None without cu_seqlens, got {m!r}")
        batch, seqlen_q, seqlen_k = qs[0], qs[1], ks[1]
        mq, mk = seqlen_q, seqlen_k
        empty = batch == 0 or seqlen_q == 0
        empty_k = seqlen_k == 0
    for name, flag in (("return_lse", return_lse), ("deterministic", deterministic)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")

    traced = kind == "jax" and any(is_traced(x) for x in (q, k, v))
    requires_grad = _requires_grad(kind, (q, k, v), traced)
    dev = device_of(q, kind)
    params = Params(
        scale=scale_f,
        causal=bool(causal),
        window_left=left,
        window_right=right,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=seed,
        varlen=varlen,
        max_seqlen_q=int(mq),
        max_seqlen_k=int(mk),
        return_lse=bool(return_lse),
        deterministic=bool(deterministic),
    )
    spec = ProblemSpec(
        kind=kind,
        device_type=dev.type,
        device_name=dev.name,
        compute_capability=dev.compute_capability,
        dtype=dts[0],
        batch=batch,
        seqlen_q=int(seqlen_q),
        seqlen_k=int(seqlen_k),
        heads_q=hq,
        heads_kv=hkv,
        head_dim=d,
        head_dim_v=dv,
        varlen=varlen,
        causal=bool(causal),
        window=params.has_window,
        softcap=softcap is not None,
        dropout=dropout_p > 0,
        return_lse=bool(return_lse),
        deterministic=bool(deterministic),
        requires_grad=requires_grad,
        traced=traced,
        nonpositive_scale=params.scale <= 0,
        seed_array=seed_array,
    )
    return _Call(kind, params, spec, empty or empty_k or d == 0 or dv == 0)


def _dev_str(x, kind):
    try:
        return str(x.device) if kind == "torch" else str(x.devices())
    except Exception:
        return "?"


def _max_len(name, given, host, rows):
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 0:
            raise ValueError(f"{name}: expected an int >= 0 or None, got {given!r}")
        if host is not None and len(host) > 1:
            actual = int((host[1:] - host[:-1]).max())
            if given < actual:
                raise ValueError(f"{name}: expected >= the longest sequence ({actual}), got {given}")
        return int(given)
    if host is None:  # offsets not read (traced, compiled): the row count bounds every sequence
        return rows
    return int((host[1:] - host[:-1]).max()) if len(host) > 1 else 0


_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _seed(seed, kind, q=None) -> int | None:
    """The dropout seed: an int in [0, 2**32) for Python ints, NumPy integer arrays and
    generator draws; None for a scalar integer torch tensor or JAX array (traced or not), which
    the kernels read as an operand (its low 32 bits: the same mask as the int of that value)."""
    ak = array_kind(seed)
    if ak is not None:
        shape = _shape(seed)
        if dtype_name(seed) not in _INT_DTYPES:
            raise TypeError(f"dropout_seed: expected an integer array, got dtype {dtype_name(seed)}")
        if shape not in ((), (1,)):
            raise ValueError(f"dropout_seed: expected a scalar (shape () or (1,)), got shape {shape}")
        if ak == "numpy":
            return int(np.asarray(seed).reshape(())) & 0xFFFFFFFF
        if ak != kind:
            raise TypeError(f"dropout_seed: expected an int or a {kind} array like q, got a "
                            f"{ak} array")
        if q is not None and not same_device(seed, q, kind):
            raise ValueError(f"dropout_seed: expected it on q's device ({_dev_str(q, kind)}), "
                             f"got {_dev_str(seed, kind)}")
        return None
    if seed is None:
        if kind == "torch":
            import torch

            return int(torch.randint(0, 2**31 - 1, (1,)).item())
        if kind == "numpy":
            return int(np.random.randint(0, 2**31 - 1))
        raise ValueError(
            "dropout_seed: expected an int when dropout_p > 0 with JAX arrays "
            "(JAX has no global random state), got None; under jit pass a scalar integer array, "
            "e.g. jax.random.bits(key, (), jnp.uint32), so that a new seed compiles nothing"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"dropout_seed: expected an int or None, got {seed!r} (a scalar integer "
                        "tensor or JAX array is also accepted)")
    return int(seed) & 0xFFFFFFFF


def _requires_grad(kind, xs, traced) -> bool:
    if kind == "torch":
        import torch

        return torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    if kind == "jax":
        return traced  # a traced call may be differentiated later: assume it will be
    return False


# Validated calls by signature (array type, shapes, dtypes, devices, grad flags, keywords): a
# repeated call skips the argument checks. Only for calls without cu_seqlens (whose values must
# be checked each time) and without dropout (whose seed may be drawn each time).
_validated: dict[tuple, _Call] = {}


def _fast_key(q, k, v, causal, scale, window, softcap, return_lse, deterministic):
    t = type(q)
    if t is not type(k) or t is not type(v):
        return None
    if t is not np.ndarray and not (t.__module__ or "").startswith("torch"):
        return None  # JAX, or not an array at all: _resolve says which
    if not all(type(f) is bool for f in (causal, return_lse, deterministic)):
        return None  # causal=1 hashes like True: let _resolve reject it
    if window is not None:
        if type(window) not in (tuple, list):
            return None
        window = tuple(window)
    base = (t, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, causal, scale, window,
            softcap, return_lse, deterministic)
    if t is np.ndarray:
        return base
    if t.__module__.startswith("torch"):
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return None
        return base + (q.device, k.device, v.device, q.requires_grad, k.requires_grad,
                       v.requires_grad, torch.is_grad_enabled())
    return None  # JAX: traced calls run once per trace; eager ones are dominated by JAX itself


_PREPARED = None  # flashmux._prepared, imported by the first torch call


def _load_prepared():
    global _PREPARED
    from . import _prepared

    _PREPARED = _prepared
    return _prepared


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    dropout_p=0.0,
    dropout_seed=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    return_lse=False,
    deterministic=False,
    alibi_slopes=None,
    block_mask=None,
    backend=None,
):
    """Exact scaled-dot-product attention, FlashAttention-style, on the best backend here.

    q: (B, Sq, Hq, D), k: (B, Sk, Hkv, D), v: (B, Sk, Hkv, Dv), all torch tensors, all JAX arrays
    or all NumPy arrays; packed (T, H, D) rows with cu_seqlens_q/k (int32, length B+1).
    Returns out (B, Sq, Hq, Dv) in q's dtype, and with return_lse=True also lse (B, Hq, Sq)
    float32 (natural log; (Hq, Tq) when packed). See docs/spec.md for masks and semantics.
    `backend` forces a backend name or priority list (also `use_backend`, $FLASHMUX_BACKEND).
    alibi_slopes: float32 (Hq,) or (B, Hq), bias -slope * |i + Sk - Sq - j| on the scores.
    block_mask: a `flashmux.BlockMask` (see `flashmux.create_block_mask`), ANDed with causal/window.
    """
    key = prep = None
    if (cu_seqlens_q is None and cu_seqlens_k is None and not dropout_p
            and alibi_slopes is None and block_mask is None):
        if "torch" in sys.modules and type(q).__module__ == "torch":
            # eager torch: a prepared step per call signature skips the checks and the dispatch
            # (flashmux/_prepared.py; None under torch.compile and for ineligible calls)
            _prepared = _PREPARED
            if _prepared is None and not torch_compiling():  # never imported inside a trace
                _prepared = _load_prepared()
            if _prepared is not None:
                prep = _prepared.key(q, k, v, causal, scale, window, softcap, return_lse,
                                     deterministic, backend)
            if prep is not None:
                step = _prepared.steps.get(prep)
                if step is not None and step.valid():
                    return step(q, k, v)
        key = _fast_key(q, k, v, causal, scale, window, softcap, return_lse, deterministic)
    call = _validated.get(key) if key is not None else None
    if call is None:
        call = _resolve(
            q, k, v, causal, scale, window, softcap, dropout_p, dropout_seed, cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse, deterministic,
        )
        if key is not None:
            if len(_validated) > 4096:
                _validated.clear()
            _validated[key] = call
    extra = {}
    if alibi_slopes is not None or block_mask is not None:
        call, extra = _extend(call, q, alibi_slopes, block_mask)
    if call.spec.seed_array:  # the seed array travels as an operand (docs/spec.md, "Dropout seeds")
        extra["dropout_seed"] = dropout_seed
    forced = dispatch.forced_backends(backend)
    if call.empty:
        # No kernel work: the reference path answers with zeros / -inf and zero gradients.
        be = dispatch.get_backend("reference")
    else:
        be = dispatch.select(call.spec, forced)
        if prep is not None and not extra:
            return _PREPARED.prepare(prep, be, call, _run, q, k, v)(q, k, v)
    out, lse = _run(be, call, q, k, v, cu_seqlens_q, cu_seqlens_k, extra)
    return (out, lse) if return_lse else out


def _run(be, call: _Call, q, k, v, cu_q, cu_k, extra=None):
    kind = call.kind
    extra = extra or {}  # alibi_slopes= / block_mask=, only when given (see _extend)
    if kind == "numpy":
        return be.forward(q, k, v, cu_q, cu_k, call.params, **extra)
    native = be.capabilities.array_kinds
    if kind == "torch" and "torch" in native:
        from . import _torch

        if extra:
            return _torch.run_ext(be.name, q, k, v, cu_q, cu_k, call.params, **extra)
        return _torch.run(be.name, q, k, v, cu_q, cu_k, call.params)
    if kind == "jax" and "jax" in native:
        from . import _jax

        if extra:
            return _jax.run_ext(be.name, q, k, v, cu_q, cu_k, call.params, **extra)
        return _jax.run(be.name, q, k, v, cu_q, cu_k, call.params)
    if kind == "jax" and "torch" in native:
        from . import _jax

        if extra:
            return _jax.run_through_torch_ext(be, q, k, v, cu_q, cu_k, call.params, **extra)
        return _jax.run_through_torch(be, q, k, v, cu_q, cu_k, call.params)
    raise dispatch.NoBackendError(f"backend {be.name!r} cannot take {kind} arrays")


def _extend(call: _Call, q, alibi_slopes, block_mask):
    """Check alibi_slopes / block_mask against the call; returns the call with Params and
    ProblemSpec marked, and the keyword operands for the backend."""
    from dataclasses import replace

    from .blockmask import BlockMask

    kind, spec = call.kind, call.spec
    extra = {}
    p_kw, s_kw = {}, {}
    if alibi_slopes is not None:
        ak = array_kind(alibi_slopes)
        if ak != kind:
            raise TypeError(f"alibi_slopes: expected a {kind} array like q, got "
                            f"{ak + ' array' if ak else type(alibi_slopes).__name__}")
        if dtype_name(alibi_slopes) != "float32":
            raise TypeError(f"alibi_slopes: expected dtype float32, got {dtype_name(alibi_slopes)}")
        shp = _shape(alibi_slopes)
        ok = ((spec.heads_q,), (spec.batch, spec.heads_q))
        if shp not in ok:
            raise ValueError(f"alibi_slopes: expected shape ({spec.heads_q},) or "
                             f"({spec.batch}, {spec.heads_q}) (Hq,) or (B, Hq), got {shp}")
        if kind != "numpy" and not same_device(alibi_slopes, q, kind):
            raise ValueError(f"alibi_slopes: expected it on q's device ({_dev_str(q, kind)}), "
                             f"got {_dev_str(alibi_slopes, kind)}")
        extra["alibi_slopes"] = alibi_slopes
        p_kw["alibi"] = s_kw["alibi"] = True
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask: expected a flashmux.BlockMask (from "
                            f"flashmux.create_block_mask), got {type(block_mask).__name__}")
        if spec.varlen:
            raise ValueError("block_mask: expected None with cu_seqlens (packed batches); use a "
                             "padded batch with a masks.document(segment_ids) block mask instead")
        if block_mask.array_kind != kind:
            raise TypeError(f"block_mask: expected a mask of {kind} arrays like q (create_block_mask"
                            f"(..., like=q)), got one of {block_mask.array_kind} arrays")
        if kind != "numpy" and not same_device(block_mask.kind, q, kind):
            raise ValueError(f"block_mask: expected its arrays on q's device ({_dev_str(q, kind)}), "
                             f"got {_dev_str(block_mask.kind, kind)}")
        want = (spec.seqlen_q, spec.seqlen_k)
        got = (block_mask.seqlen_q, block_mask.seqlen_k)
        if got != want:
            raise ValueError(f"block_mask: expected (seqlen_q, seqlen_k) = {want} like q and k, "
                             f"got a mask built for {got}")
        if block_mask.batch not in (None, spec.batch):
            raise ValueError(f"block_mask: expected batch None or {spec.batch}, got a mask built "
                             f"for batch {block_mask.batch}")
        if block_mask.heads not in (None, spec.heads_q):
            raise ValueError(f"block_mask: expected heads None or {spec.heads_q} (query heads), "
                             f"got a mask built for heads {block_mask.heads}")
        extra["block_mask"] = block_mask
        p_kw["mask_block_size"] = block_mask.block_size
        s_kw["block_mask"] = True
        s_kw["mask_block_size"] = block_mask.block_size
    return replace(call, params=replace(call.params, **p_kw), spec=replace(call.spec, **s_kw)), extra


class _Decided:
    """A dispatch decision as explain() and explain_kvcache() report it: the problem (spec),
    the chosen backend, the forced list, the (backend, reasons) rows and a note."""

    def __init__(self, decision, note: str | None = None):
        self.decision = decision
        self.spec = decision.spec
        self.chosen = decision.chosen
        self.forced = decision.forced
        self.rows = decision.rows
        self.note = note

    def reasons(self, name: str) -> list[str]:
        """Why backend `name` was passed over ([] when usable or chosen); KeyError if unknown."""
        for n, r in self.rows:
            if n == name:
                return r
        raise KeyError(name)


class Explanation(_Decided):
    """What the dispatcher would do with a call: every backend, the chosen one, and why each
    other one was passed over. str() gives a table."""

    def __init__(
        self,
        decision: dispatch.Decision,
        note: str | None = None,
        lowerings: dict[str, str] | None = None,
    ):
        super().__init__(decision, note)
        self.lowerings = lowerings  # the chosen backend's kernel family per pass, if it says

    def __str__(self) -> str:
        s = self.spec
        shape = (
            f"{s.kind} {s.dtype} on {s.device_name}"
            + (f" (sm{s.compute_capability[0]}{s.compute_capability[1]})" if s.compute_capability else "")
            + f": B={s.batch} Sq={s.seqlen_q} Sk={s.seqlen_k} Hq={s.heads_q} Hkv={s.heads_kv}"
            + f" D={s.head_dim} Dv={s.head_dim_v}"
        )
        feats = [
            n
            for n, on in (
                ("causal", s.causal), ("window", s.window), ("softcap", s.softcap),
                ("dropout", s.dropout), ("varlen", s.varlen), ("return_lse", s.return_lse),
                ("deterministic", s.deterministic), ("grad", s.requires_grad), ("traced", s.traced),
                ("alibi", getattr(s, "alibi", False)), ("block_mask", getattr(s, "block_mask", False)),
                ("seed_array", getattr(s, "seed_array", False)),
            )
            if on
        ]
        lines = [f"flashmux.explain: {shape}" + (f" [{', '.join(feats)}]" if feats else "")]
        lines.append(f"problem class {dispatch.spec_class(s)}; order from the "
                     f"{dispatch.priority_source(s)}")
        lines += _backend_table(self.forced, self.note, self.rows, self.chosen)
        if self.chosen is None:
            lines.append("  -> no backend can run this call")
        elif self.lowerings:
            passes = ", ".join(f"{k}: {v}" for k, v in self.lowerings.items())
            lines.append(f"  -> {self.chosen} lowering: {passes}")
        return "\n".join(lines)

    __repr__ = __str__


def _backend_table(forced, note, rows, chosen) -> list[str]:
    """The lines that explain() and explain_kvcache() share: the forced list, the note, and one
    row per backend with its status (chosen, usable, or passed over with its reasons)."""
    lines = []
    if forced:
        lines.append(f"forced: {', '.join(forced)}")
    if note:
        lines.append(note)
    width = max([len(n) for n, _ in rows] + [7])
    lines.append(f"  {'backend'.ljust(width)}  status")
    for name, r in rows:
        if name == chosen:
            status = "CHOSEN"
        elif not r:
            status = "usable (lower priority)"
        else:
            status = "passed over: " + "; ".join(r)
        lines.append(f"  {name.ljust(width)}  {status}")
    return lines


def explain(q, k, v, **kwargs) -> Explanation:
    """Report, without running anything, which backend `attention` would use and why.

    Takes the same arguments as `attention`.
    """
    backend = kwargs.pop("backend", None)
    allowed = set(attention.__kwdefaults__) - {"backend"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"explain: unexpected keyword argument(s) {sorted(unknown)}")
    full = {n: attention.__kwdefaults__[n] for n in allowed} | kwargs
    call = _resolve(
        q, k, v, full["causal"], full["scale"], full["window"], full["softcap"],
        full["dropout_p"], 0 if full["dropout_seed"] is None else full["dropout_seed"],
        full["cu_seqlens_q"], full["cu_seqlens_k"], full["max_seqlen_q"], full["max_seqlen_k"],
        full["return_lse"], full["deterministic"],
    )
    mask_note = None
    if full.get("alibi_slopes") is not None or full.get("block_mask") is not None:
        call, _ = _extend(call, q, full.get("alibi_slopes"), full.get("block_mask"))
        mask_note = _extension_note(full.get("alibi_slopes"), full.get("block_mask"))
    forced = dispatch.forced_backends(backend)
    d = dispatch.decide(call.spec, forced)
    note = mask_note
    lowerings = None
    if call.empty:
        note = "empty problem (a zero-size dimension): answered by the core, no kernel runs"
        note = note if mask_note is None else mask_note + "\n" + note
    elif d.chosen is not None:
        lowerings = _lowerings(dispatch.registry()[d.chosen], q, k, v, call.params)
    return Explanation(d, note, lowerings)


def _extension_note(alibi_slopes, block_mask) -> str:
    lines = []
    if alibi_slopes is not None:
        lines.append(f"alibi: slopes of shape {_shape(alibi_slopes)} (bias -slope * |i + Sk - Sq - j|)")
    if block_mask is not None:
        lines.append(f"block_mask: {block_mask.summary()}")
    return "\n".join(lines)


def _lowerings(be, q, k, v, params) -> dict[str, str] | None:
    """The chosen backend's own report of its kernel family per pass (explain only)."""
    try:
        got = be.lowerings(q, k, v, params)
    except Exception as e:  # explain reports; it never fails because a backend's report did
        return {"report": f"unavailable ({type(e).__name__}: {e})"}
    return dict(got) if got else None
