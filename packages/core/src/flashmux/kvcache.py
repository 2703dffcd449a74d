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
- ``decode_kernel(spec, params) -> str``: optional, a description of the kernel (explain).
- ``decode_append(k_cache, v_cache, k, v, cache_seqlens, block_table, page_size) -> None``:
  optional, torch backends only: write the new tokens into the caches in place (clamped as
  above) with the backend's own kernel instead of the core's torch ops (eager calls; traced
  ones keep the torch ops).
"""

from __future__ import annotations

import numbers
import os
import sys
from dataclasses import dataclass

import numpy as np

from . import dispatch
from ._arrays import array_kind, device_of, dtype_name, is_traced, same_device, torch_compiling
from .api import _backend_table, _check_scalars, _Decided, _requires_grad
from .backend import Backend, Capabilities, platform_reasons


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
    out = platform_reasons(caps, spec)
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


# -- the public call --------------------------------------------------------------------------


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Decode is its own problem class: its own priority per device class and array kind. A
# "decode" entry in the priority table (flashmux/priority.json, same shape: device class ->
# array kind -> names) overrides these defaults. On CPUs the reference runs first: the Triton
# and Pallas interpreters are for tests and run only when forced.
DECODE_PRIORITY: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "numpy": ["reference"],
        "torch": ["reference", "triton"],
        "jax": ["reference", "pallas"],
    },
    "default": {
        "numpy": ["reference"],
        "torch": ["triton", "cuda", "reference"],
        "jax": ["pallas", "cuda", "triton", "reference"],
    },
}


@dataclass(frozen=True)
class _DecodeCall:
    kind: str
    params: DecodeParams
    spec: DecodeSpec
    empty: bool  # no kernel work: B, Sq, D or Dv is zero, or the cache holds no token at all


def _shape(x):
    return tuple(int(d) for d in x.shape)


def _dev_str(x, kind):
    try:
        return str(x.device) if kind == "torch" else str(x.devices())
    except Exception:
        return "?"


def _check_array(name, x, kind, like, dtypes=None, rank=None):
    kd = array_kind(x)
    if kd != kind:
        got = type(x).__name__ if kd is None else f"a {kd} array"
        raise TypeError(f"{name}: expected a {kind} array like q, got {got}")
    if dtypes is not None and dtype_name(x) not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {dtype_name(x)}")
    if rank is not None and len(x.shape) != rank:
        raise ValueError(f"{name}: expected rank {rank}, got shape {_shape(x)}")
    if kind != "numpy" and not same_device(x, like, kind):
        raise ValueError(
            f"{name}: expected it on q's device ({_dev_str(like, kind)}), got {_dev_str(x, kind)}"
        )


def _host_ints(x, kind):
    """Values of a small int array when reading them costs no device sync (NumPy, CPU torch
    outside torch.compile, concrete JAX arrays on the CPU); else None."""
    if kind == "numpy":
        return np.asarray(x).astype(np.int64)
    if kind == "torch":
        import torch

        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        return x.detach().numpy().astype(np.int64)
    if is_traced(x):
        return None
    try:
        if any(d.platform != "cpu" for d in x.devices()):
            return None
    except Exception:
        return None
    return np.asarray(x).astype(np.int64)


def _resolve(q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, scale, window,
             softcap, alibi_slopes, return_lse, num_splits) -> _DecodeCall:
    kind = array_kind(q)
    if kind is None:
        raise TypeError(
            f"q: expected a torch tensor, JAX array or NumPy array, got {type(q).__name__}"
        )
    dt = dtype_name(q)
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {dt}")
    if len(q.shape) != 4:
        raise ValueError(f"q: expected rank 4 (B, Sq, Hq, D), got shape {_shape(q)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_array(name, x, kind, q, rank=4)
        if dtype_name(x) != dt:
            raise TypeError(f"{name}: expected dtype {dt} like q, got {dtype_name(x)}")
    b, sq, hq, d = _shape(q)
    ks, vs = _shape(k_cache), _shape(v_cache)
    paged = block_table is not None
    layout = "(num_pages, page_size, Hkv, D)" if paged else "(B, S_max, Hkv, D)"
    if ks[:3] != vs[:3]:
        raise ValueError(f"v_cache: expected shape {ks[:3]} + (Dv,) to match k_cache {ks}, got {vs}")
    if ks[3] != d:
        raise ValueError(f"k_cache: expected head_dim {d} like q, got {ks[3]} (shape {ks}, {layout})")
    hkv, dv = ks[2], vs[3]
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"k_cache: expected a KV head count that divides q's {hq} heads, got {hkv} (shape {ks})"
        )
    if paged:
        _check_array("block_table", block_table, kind, q, ("int32",), rank=2)
        if _shape(block_table)[0] != b:
            raise ValueError(
                f"block_table: expected shape ({b}, max_pages) for q's batch {b}, "
                f"got {_shape(block_table)}"
            )
        page_size = ks[1]
        if page_size < 1:
            raise ValueError(f"k_cache: expected page_size >= 1 (shape {ks} {layout}), got 0")
        capacity = _shape(block_table)[1] * page_size
    else:
        if ks[0] != b:
            raise ValueError(
                f"k_cache: expected batch {b} like q (contiguous cache {layout}), got {ks[0]} "
                f"(pass block_table for a paged cache)"
            )
        page_size = 0
        capacity = ks[1]
    if cache_seqlens is None:
        raise TypeError("cache_seqlens: expected a (B,) int32 array, got None")
    _check_array("cache_seqlens", cache_seqlens, kind, q, ("int32",), rank=1)
    if _shape(cache_seqlens)[0] != b:
        raise ValueError(f"cache_seqlens: expected shape ({b},), got {_shape(cache_seqlens)}")
    if (k is None) != (v is None):
        raise ValueError(f"{'v' if v is None else 'k'}: expected it too, since "
                         f"{'k' if v is None else 'v'} was given, got None")
    snew = 0
    if k is not None:
        for name, x, last in (("k", k, d), ("v", v, dv)):
            _check_array(name, x, kind, q, rank=4)
            if dtype_name(x) != dt:
                raise TypeError(f"{name}: expected dtype {dt} like the cache, got {dtype_name(x)}")
            xs = _shape(x)
            snew = _shape(k)[1]
            want = (b, snew, hkv, last)
            if xs != want:
                raise ValueError(f"{name}: expected shape (B, Snew, Hkv, {'D' if name == 'k' else 'Dv'})"
                                 f" = {want}, got {xs}")
    if alibi_slopes is not None:
        _check_array("alibi_slopes", alibi_slopes, kind, q, ("float32",))
        sh = _shape(alibi_slopes)
        if sh not in ((hq,), (b, hq)):
            raise ValueError(f"alibi_slopes: expected shape ({hq},) or ({b}, {hq}), got {sh}")

    scale_f, left, right, softcap = _check_scalars(scale, d, window, causal, softcap)
    if not isinstance(return_lse, bool | np.bool_):
        raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
            raise TypeError(f"num_splits: expected an int >= 1 or None, got {num_splits!r}")
        if num_splits < 1:
            raise ValueError(f"num_splits: expected an int >= 1 or None, got {num_splits}")
        num_splits = int(num_splits)

    # Values: checked only where the host can see them without a device sync.
    lens = _host_ints(cache_seqlens, kind)
    if lens is not None and b:
        if (lens < 0).any():
            raise ValueError(f"cache_seqlens: expected values >= 0, got {lens.tolist()}")
        if (lens + snew > capacity).any():
            worst = int((lens + snew).max())
            raise ValueError(
                f"cache_seqlens: expected cache_seqlens + Snew ({snew}) <= the cache's capacity "
                f"{capacity}, got {worst} tokens for a sequence"
            )
        if paged:
            tbl = _host_ints(block_table, kind)
            if tbl is not None:
                num_pages = ks[0]
                for i in range(b):
                    used = tbl[i, : -(-int(lens[i] + snew) // page_size)]
                    if ((used < 0) | (used >= num_pages)).any():
                        raise ValueError(
                            f"block_table: expected the pages sequence {i} uses to be in "
                            f"[0, {num_pages}), got {used.tolist()}"
                        )

    arrays = [q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes]
    present = [x for x in arrays if x is not None]
    traced = kind == "jax" and any(is_traced(x) for x in present)
    # torch as attention's check; a traced JAX decode call is never differentiated (no backward)
    requires_grad = kind == "torch" and _requires_grad(
        kind, [x for x in (q, k_cache, v_cache, k, v) if x is not None], traced)
    dev = device_of(q, kind)
    params = DecodeParams(
        scale=scale_f,
        causal=bool(causal),
        window_left=left,
        window_right=right,
        softcap=softcap,
        alibi=alibi_slopes is not None,
        num_splits=num_splits,
        page_size=page_size,
        return_lse=bool(return_lse),
    )
    has_window = left is not None or (right is not None and not (causal and right == 0))
    spec = DecodeSpec(
        kind=kind,
        device_type=dev.type,
        device_name=dev.name,
        compute_capability=dev.compute_capability,
        dtype=dt,
        batch=b,
        seqlen_q=sq,
        seqlen_new=snew,
        heads_q=hq,
        heads_kv=hkv,
        head_dim=d,
        head_dim_v=dv,
        capacity=capacity,
        paged=paged,
        page_size=page_size,
        causal=bool(causal),
        window=has_window,
        softcap=softcap is not None,
        alibi=alibi_slopes is not None,
        return_lse=bool(return_lse),
        num_splits=num_splits,
        traced=traced,
        requires_grad=requires_grad,
    )
    empty = b == 0 or sq == 0 or d == 0 or dv == 0 or capacity == 0 or ks[0] == 0
    return _DecodeCall(kind, params, spec, empty)


# -- dispatch: decode is its own problem class --------------------------------------------------

_decisions: dict[tuple, Backend] = {}


def decode_order(spec: DecodeSpec) -> list:
    """Every backend, in the order the decode dispatcher tries them for this call."""
    table = dispatch.priority_table().get("decode") or {}
    dc = dispatch.device_class(spec)  # type: ignore[arg-type]
    entry = (table.get(dc) or DECODE_PRIORITY.get(dc) or table.get("default")
             or DECODE_PRIORITY["default"])
    names = list(entry.get(spec.kind, []))
    rank = {n: i for i, n in enumerate(names)}
    return sorted(
        dispatch.registry().values(),
        key=lambda be: (rank.get(be.name, len(rank)), be.capabilities.priority, be.name),
    )


def decode_reasons(be, spec: DecodeSpec) -> list[str]:
    out = list(dispatch.availability(be))
    if out:
        return out
    fn = getattr(be, "decode_reasons", None)
    if fn is None:
        return ["no KV-cache (decode) kernel"]
    try:
        return list(fn(spec))
    except Exception as e:
        return [f"decode_reasons() failed: {type(e).__name__}: {e}"]


def _candidates(spec, forced):
    reg = dispatch.registry()
    return [reg[n] for n in forced] if forced else decode_order(spec)


def decide(spec: DecodeSpec, forced) -> dispatch.Decision:
    """Walk every backend and record why each one is passed over (explain_kvcache)."""
    rows: list[tuple[str, list[str]]] = []
    chosen = None
    for be in _candidates(spec, forced):
        r = decode_reasons(be, spec)
        rows.append((be.name, r))
        if not r and chosen is None:
            chosen = be.name
    if forced:
        for be in decode_order(spec):
            if be.name not in forced:
                rows.append((be.name, ["not in the forced list"]))
    return dispatch.Decision(spec, forced, chosen, rows)  # type: ignore[arg-type]


_decisions_gen = [dispatch._generation]  # the dispatch generation _decisions belongs to


def select(spec: DecodeSpec, forced):
    if _decisions_gen[0] != dispatch._generation:  # register / clear_caches since: choose again
        _decisions.clear()
        _decisions_gen[0] = dispatch._generation
    key = (spec, forced)
    be = _decisions.get(key)
    if be is not None and dispatch.registry().get(be.name) is be:
        return be
    for be in _candidates(spec, forced):
        if not decode_reasons(be, spec):
            if not torch_compiling():
                if len(_decisions) > 4096:
                    _decisions.clear()
                _decisions[key] = be
            return be
    raise dispatch.NoBackendError(dispatch._no_backend_message(decide(spec, forced), "decode call"))


def clear_caches() -> None:
    """Forget cached decode decisions and prepared steps (after registering or installing a
    backend)."""
    _decisions.clear()
    _validated.clear()


# -- appending new tokens -----------------------------------------------------------------------


def _append(kind, k_cache, v_cache, k, v, cache_seqlens, block_table, page_size):
    """Write k, v (B, Snew, ...) at positions cache_seqlens[b] + t of each sequence, in the
    framework's own ops, on the device. Positions past the capacity are clamped to the last slot
    and block-table entries to [0, num_pages) (the caller's error: never a write outside the
    arrays). torch and NumPy write in place; JAX returns new arrays (in place under jit when the
    caches are donated)."""
    b, snew = int(k.shape[0]), int(k.shape[1])
    if kind == "torch":
        import torch

        pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(
            snew, device=k.device, dtype=torch.int64
        )
        if page_size:
            cap = block_table.shape[1] * page_size
            pos = pos.clamp(0, cap - 1)
            page = block_table.to(torch.int64).gather(1, pos // page_size)
            idx = (page.clamp(0, k_cache.shape[0] - 1), pos % page_size)
        else:
            pos = pos.clamp(0, k_cache.shape[1] - 1)
            bi = torch.arange(b, device=k.device, dtype=torch.int64)[:, None].expand(b, snew)
            idx = (bi, pos)
        k_cache.index_put_(idx, k)
        v_cache.index_put_(idx, v)
        return k_cache, v_cache
    if kind == "jax":
        return _jax_append()(k_cache, v_cache, k, v, cache_seqlens, block_table, page_size)
    import numpy as np

    pos = np.asarray(cache_seqlens, np.int64)[:, None] + np.arange(snew)[None]
    if page_size:
        cap = block_table.shape[1] * page_size
        pos = np.clip(pos, 0, cap - 1)
        page = np.take_along_axis(np.asarray(block_table, np.int64), pos // page_size, axis=1)
        idx = (np.clip(page, 0, k_cache.shape[0] - 1), pos % page_size)
    else:
        pos = np.clip(pos, 0, k_cache.shape[1] - 1)
        idx = (np.broadcast_to(np.arange(b)[:, None], (b, snew)), pos)
    k_cache[idx] = k
    v_cache[idx] = v
    return k_cache, v_cache


_jax_append_fn = None


def _jax_append():
    """The JAX append as one jitted function (eager JAX would compile each small op); inside
    the caller's jit it inlines, and donated caches are updated in place."""
    global _jax_append_fn
    if _jax_append_fn is None:
        import jax
        import jax.numpy as jnp

        def append(k_cache, v_cache, k, v, cache_seqlens, block_table, page_size):
            b, snew = k.shape[0], k.shape[1]
            pos = cache_seqlens.astype(jnp.int32)[:, None] + jnp.arange(snew, dtype=jnp.int32)
            if page_size:
                pos = jnp.clip(pos, 0, block_table.shape[1] * page_size - 1)
                page = jnp.take_along_axis(block_table.astype(jnp.int32), pos // page_size, axis=1)
                idx = (jnp.clip(page, 0, k_cache.shape[0] - 1), pos % page_size)
            else:
                pos = jnp.clip(pos, 0, k_cache.shape[1] - 1)
                idx = (jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, snew)), pos)
            return k_cache.at[idx].set(k), v_cache.at[idx].set(v)

        _jax_append_fn = jax.jit(append, static_argnums=6)
    return _jax_append_fn


def _seqlens_k(kind, cache_seqlens, snew):
    if not snew:
        return cache_seqlens
    if kind == "torch":
        import torch

        return (cache_seqlens + snew).to(torch.int32)
    if kind == "jax":
        import jax.numpy as jnp

        return (cache_seqlens + snew).astype(jnp.int32)
    import numpy as np

    return (np.asarray(cache_seqlens) + snew).astype(np.int32)


def _empty_result(kind, q, spec: DecodeSpec):
    shape_o = (spec.batch, spec.seqlen_q, spec.heads_q, spec.head_dim_v)
    shape_l = (spec.batch, spec.heads_q, spec.seqlen_q)
    if kind == "torch":
        import torch

        return (q.new_zeros(shape_o),
                torch.full(shape_l, float("-inf"), dtype=torch.float32, device=q.device))
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.zeros(shape_o, q.dtype), jnp.full(shape_l, -jnp.inf, jnp.float32)
    import numpy as np

    return np.zeros(shape_o, q.dtype), np.full(shape_l, -np.inf, np.float32)


def _run(be, call: _DecodeCall, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes):
    kind, p = call.kind, call.params
    native = be.capabilities.array_kinds
    if kind == "torch" and "torch" in native:
        from . import _torch_decode

        return _torch_decode.run(be.name, q, k_cache, v_cache, seqlens_k, block_table,
                                 alibi_slopes, p)
    if kind in native:  # numpy; jax (eager or traced) on a backend that takes JAX arrays
        return be.decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, p)
    if kind == "jax" and "torch" in native:  # eager JAX arrays into a torch backend (DLPack)
        import jax
        import torch

        def to_t(x):
            return None if x is None else torch.from_dlpack(x)

        out, lse = be.decode(to_t(q), to_t(k_cache), to_t(v_cache), to_t(seqlens_k),
                             to_t(block_table), to_t(alibi_slopes), p)
        return jax.dlpack.from_dlpack(out), jax.dlpack.from_dlpack(lse)
    raise dispatch.NoBackendError(f"backend {be.name!r} cannot take {kind} arrays")


# Prepared steps by call signature, so a decode loop pays the argument checks, the dispatch and
# the backend's launch planning once. Only for torch tensors on a GPU outside torch.compile:
# there the checks read no values (NumPy and CPU tensors have their lengths and page ids checked
# on every call; JAX traces once per shape). The key holds everything the checks and the
# planning look at: shapes, strides, dtypes, devices, requires_grad, the keyword values (with
# their types: True == 1 must not let num_splits=True through), grad mode and the forced
# backends; the entry re-checks that the chosen backend is still the registered one.
_validated: dict[tuple, _FastStep] = {}


# FLASHMUX_DECODE_FASTPATH=0 (read at import) sends every call through the checked path (a
# switch for diagnosing a GPU run).
_FASTPATH = os.environ.get("FLASHMUX_DECODE_FASTPATH", "1") != "0"


def _fast_eligible(q) -> bool:
    """A torch tensor on a GPU, outside torch.compile (tests widen this to CPU tensors)."""
    if not _FASTPATH or not type(q).__module__.startswith("torch"):
        return False
    torch = sys.modules["torch"]
    return isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling()


def _fast_key(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, causal, scale,
              window, softcap, return_lse, num_splits, forced=None):
    if not _fast_eligible(q):
        return None
    torch = sys.modules["torch"]
    if window is not None:
        if type(window) not in (tuple, list):
            return None
        window = tuple((type(w), w) for w in window)
    tensor = torch.Tensor
    try:
        key = (
            type(causal), causal, type(scale), scale, window, type(softcap), softcap,
            type(return_lse), return_lse, type(num_splits), num_splits,
            torch.is_grad_enabled(), forced,
            q.shape, q.stride(), q.dtype, q.get_device(), q.requires_grad,
            _sig(k_cache, tensor), _sig(v_cache, tensor), _sig(cache_seqlens, tensor),
            None if k is None else _sig(k, tensor), None if v is None else _sig(v, tensor),
            None if block_table is None else _sig(block_table, tensor),
            None if alibi_slopes is None else _sig(alibi_slopes, tensor),
        )
        hash(key)
    except (TypeError, AttributeError):  # not tensors, or an odd keyword value: the checked
        return None                       # path reports it
    return key


def _sig(x, tensor):
    if not isinstance(x, tensor):
        raise TypeError
    return (x.shape, x.stride(), x.dtype, x.get_device(), x.requires_grad)


_FORCED: dict[str, tuple | None] = {}


def _forced(backend):
    """dispatch.forced_backends, memoized for a backend named by a string."""
    if type(backend) is str:
        f = _FORCED.get(backend, _FORCED)
        if f is _FORCED:
            f = _FORCED[backend] = dispatch.forced_backends(backend)
        return f
    return dispatch.forced_backends(backend)


class _FastStep:
    """One validated torch GPU call signature: the chosen backend and what runs per step.

    `runner`, when the backend offers one (`decode_runner(spec, params, q, k_cache, v_cache,
    block_table, alibi_slopes)`), takes (q, k_cache, v_cache, cache_seqlens, k, v, block_table,
    alibi_slopes) and does the append and the attention for any call of this signature (the
    backend plans once; the lengths seqlens_k = cache_seqlens + Snew may be formed on the
    device inside its kernels). Without one, the step is the checked path minus the checks."""

    __slots__ = ("be", "reg", "gen", "table", "call", "runner", "with_new", "return_lse")

    def __init__(self, be, call: _DecodeCall, runner):
        self.be = be
        self.reg = dispatch._backends
        # register(), clear_caches() and a pending backend's load bump the generation: a backend
        # registered since (under any name) may now be the dispatcher's choice
        self.gen = dispatch._generation
        self.table = dispatch._priority_table
        self.call = call
        self.runner = runner
        self.with_new = call.spec.seqlen_new > 0
        self.return_lse = call.params.return_lse

    def valid(self) -> bool:
        reg = self.reg
        return (dispatch._generation == self.gen and dispatch._backends is reg
                and reg is not None and not dispatch._pending
                and reg.get(self.be.name) is self.be and dispatch._priority_table is self.table)

    def __call__(self, q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes):
        if self.runner is not None:
            out, lse = self.runner(q, k_cache, v_cache, cache_seqlens, k, v, block_table,
                                   alibi_slopes)
        else:
            call, be = self.call, self.be
            if self.with_new:
                _append_torch(be, call, k_cache, v_cache, k, v, cache_seqlens, block_table)
            seqlens_k = _seqlens_k("torch", cache_seqlens, call.spec.seqlen_new)
            out, lse = _run(be, call, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes)
        if self.with_new:
            return (out, lse, k_cache, v_cache) if self.return_lse else (out, k_cache, v_cache)
        return (out, lse) if self.return_lse else out


def _append_torch(be, call, k_cache, v_cache, k, v, cache_seqlens, block_table):
    append = getattr(be, "decode_append", None)
    if append is not None and "torch" in be.capabilities.array_kinds and not torch_compiling():
        # the backend's own append kernel (one launch); traced code takes the torch ops
        append(k_cache, v_cache, k, v, cache_seqlens, block_table, call.params.page_size)
    else:
        _append("torch", k_cache, v_cache, k, v, cache_seqlens, block_table,
                call.params.page_size)


def _fast_step(be, call: _DecodeCall, q, k_cache, v_cache, block_table, alibi_slopes):
    runner = None
    make = getattr(be, "decode_runner", None)
    if make is not None and "torch" in be.capabilities.array_kinds:
        runner = make(call.spec, call.params, q, k_cache, v_cache, block_table, alibi_slopes)
    return _FastStep(be, call, runner)


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    *,
    cache_seqlens,
    k=None,
    v=None,
    block_table=None,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    alibi_slopes=None,
    return_lse=False,
    num_splits=None,
    backend=None,
):
    """Attention of new queries against a KV cache (decoding, speculative decoding, chunked
    prefill), with the new tokens k, v appended to the cache first.

    q: (B, Sq, Hq, D). Contiguous cache: k_cache (B, S_max, Hkv, D), v_cache (B, S_max, Hkv, Dv).
    Paged cache: k_cache (num_pages, page_size, Hkv, D) and block_table (B, max_pages) int32;
    token t of sequence b lives in page block_table[b, t // page_size], slot t % page_size.
    cache_seqlens (B,) int32: tokens already cached. k, v (B, Snew, Hkv, D / Dv): new tokens,
    written at positions cache_seqlens[b] ... + Snew - 1. The queries are the last Sq of the
    cache_seqlens[b] + Snew keys (bottom-right alignment, as in `attention`).

    Returns out (B, Sq, Hq, Dv) in q's dtype; with return_lse also lse (B, Hq, Sq) float32;
    with k, v also the caches: (out[, lse], k_cache, v_cache). torch and NumPy update the caches
    in place and return the same arrays; JAX returns new arrays (updated in place under jit when
    the caller donates them). cache_seqlens is not advanced. No host synchronization: the device
    values of cache_seqlens and block_table are never read by the host (see docs/kvcache.md).
    num_splits forces the number of key splits (Flash-Decoding); None lets the backend choose.
    Inference only. `backend` forces a backend, as for `attention`.
    """
    forced = _forced(backend)
    key = _fast_key(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, causal,
                    scale, window, softcap, return_lse, num_splits, forced)
    if key is not None:
        step = _validated.get(key)
        if step is not None and step.valid():
            return step(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes)
    call = _resolve(q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, scale,
                    window, softcap, alibi_slopes, return_lse, num_splits)
    kind = call.kind
    # choose first: a call no backend can run fails before it touches the caches
    be = None if call.empty else select(call.spec, forced)
    if key is not None and be is not None:
        step = _fast_step(be, call, q, k_cache, v_cache, block_table, alibi_slopes)
        res = step(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes)
        if len(_validated) > 4096:
            _validated.clear()
        _validated[key] = step  # kept once it ran
        return res
    if call.spec.seqlen_new and call.spec.batch:
        if kind == "torch" and be is not None:
            _append_torch(be, call, k_cache, v_cache, k, v, cache_seqlens, block_table)
        else:
            k_cache, v_cache = _append(kind, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                       call.params.page_size)
    if be is None:
        out, lse = _empty_result(kind, q, call.spec)
    else:
        seqlens_k = _seqlens_k(kind, cache_seqlens, call.spec.seqlen_new)
        out, lse = _run(be, call, q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes)
    res = (out, lse) if return_lse else (out,)
    if k is not None:
        res = res + (k_cache, v_cache)
    return res[0] if len(res) == 1 else res


# -- explain ------------------------------------------------------------------------------------


class DecodeExplanation(_Decided):
    """What the decode dispatcher would do with a call: every backend, the chosen one, why each
    other one was passed over, and the chosen backend's kernel and number of key splits.
    str() gives a table."""

    spec: DecodeSpec

    def __init__(self, decision, params: DecodeParams, note=None, kernel=None, splits=None):
        super().__init__(decision, note)
        self.params = params
        self.kernel = kernel  # the chosen backend's description of its decode kernel, if any
        self.splits = splits  # key splits it would run (None when it does not say)

    def __str__(self) -> str:
        s = self.spec
        cache = f"paged cache (page_size {s.page_size})" if s.paged else "contiguous cache"
        head = (
            f"flashmux.explain_kvcache: {s.kind} {s.dtype} on {s.device_name}"
            + (f" (sm{s.compute_capability[0]}{s.compute_capability[1]})"
               if s.compute_capability else "")
            + f": B={s.batch} Sq={s.seqlen_q} Snew={s.seqlen_new} capacity={s.capacity}"
            + f" Hq={s.heads_q} Hkv={s.heads_kv} D={s.head_dim} Dv={s.head_dim_v}, {cache}"
        )
        feats = [
            n for n, on in (
                ("causal", s.causal), ("window", s.window), ("softcap", s.softcap),
                ("alibi", s.alibi), ("return_lse", s.return_lse), ("grad", s.requires_grad),
                ("traced", s.traced),
                (f"num_splits={s.num_splits}", s.num_splits is not None),
            ) if on
        ]
        lines = [head + (f" [{', '.join(feats)}]" if feats else "")]
        lines += _backend_table(self.forced, self.note, self.rows, self.chosen)
        if self.chosen is None:
            lines.append("  -> no backend can run this decode call")
        else:
            tail = [f"  -> {self.chosen}"]
            if self.kernel:
                tail.append(f"kernel: {self.kernel}")
            if self.splits is not None:
                tail.append(f"key splits: {self.splits}")
            lines.append(", ".join(tail))
        return "\n".join(lines)

    __repr__ = __str__


def explain_kvcache(q, k_cache, v_cache, **kwargs) -> DecodeExplanation:
    """Report, without running or appending anything, which backend `attention_with_kvcache`
    would use for these arguments, why the others were passed over, which decode kernel the
    chosen one runs and how many key splits. Takes the same arguments."""
    backend = kwargs.pop("backend", None)
    defaults = dict(attention_with_kvcache.__kwdefaults__ or {})
    defaults["cache_seqlens"] = None  # required; _resolve says so when it is missing
    allowed = set(defaults) - {"backend"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"explain_kvcache: unexpected keyword argument(s) {sorted(unknown)}")
    f = {n: defaults[n] for n in allowed} | kwargs
    call = _resolve(q, k_cache, v_cache, f["cache_seqlens"], f["k"], f["v"], f["block_table"],
                    f["causal"], f["scale"], f["window"], f["softcap"], f["alibi_slopes"],
                    f["return_lse"], f["num_splits"])
    d = decide(call.spec, dispatch.forced_backends(backend))
    note = kernel = splits = None
    if call.empty:
        note = "empty problem (a zero-size dimension or cache): answered by the core, no kernel runs"
    elif d.chosen is not None:
        be = dispatch.registry()[d.chosen]
        try:
            fn = getattr(be, "decode_kernel", None)
            kernel = fn(call.spec, call.params) if fn else None
            fn = getattr(be, "decode_splits", None)
            splits = fn(call.spec, call.params) if fn else None
        except Exception as e:  # explain reports; it never fails because a backend's report did
            kernel = f"report unavailable ({type(e).__name__}: {e})"
    return DecodeExplanation(d, call.params, note, kernel, splits)
