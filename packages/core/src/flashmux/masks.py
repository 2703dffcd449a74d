"""Ready-made mask functions for `flashmux.create_block_mask`.

Each is a vectorized `mask_fn(b, h, q_idx, kv_idx) -> bool array` working on NumPy, torch and
jax.numpy index arrays, and carries a tile classifier (`block_fn`) that tells full and empty
tiles from their index ranges alone, so building the BlockMask evaluates the mask only inside the
few tiles it cannot decide. Positions are those of the score matrix (query q_idx in 0..Sq-1, key
kv_idx in 0..Sk-1); nothing is aligned for you: `causal(offset=Sk - Sq)` is the bottom-right
causal mask of `attention(causal=True)` when Sq != Sk.

    m = masks.and_(masks.causal(), masks.document(segment_ids))
    bm = flashmux.create_block_mask(m, B, None, S, S, like=q)
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["MaskFn", "and_", "causal", "chunked", "dilated", "document", "or_", "prefix_lm",
           "sliding_window"]


class MaskFn:
    """A mask function with an optional tile classifier.

    fn(b, h, q_idx, kv_idx) -> bool array. block_fn(ops, b, h, q0, q1, k0, k1) -> (full, empty),
    bool arrays over tiles whose query rows are q0..q1 and keys k0..k1 (inclusive): `full` only
    where every element is allowed, `empty` only where none is (undecided tiles are evaluated
    element by element)."""

    def __init__(self, fn, block_fn=None, name="mask"):
        self.fn = fn
        self.block_fn = block_fn
        self.name = name

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self):
        return f"flashmux.masks.{self.name}"


def _int(name, x, lo=0, none_ok=False):
    if x is None and none_ok:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int{' or None' if none_ok else ''}, got {x!r}")
    if x < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {x}")
    return int(x)


def causal(offset: int = 0) -> MaskFn:
    """Key j allowed for query i when j <= i + offset (offset = Sk - Sq: bottom-right aligned)."""
    off = _int("offset", offset, lo=-(1 << 62))

    def fn(b, h, q, kv):
        return kv <= q + off

    def block_fn(ops, b, h, q0, q1, k0, k1):
        return k1 <= q0 + off, k0 > q1 + off

    return MaskFn(fn, block_fn, f"causal(offset={off})")


def sliding_window(left: int | None, right: int | None = 0) -> MaskFn:
    """Key j allowed for query i when i - left <= j <= i + right (None: unbounded side)."""
    left = _int("left", left, none_ok=True)
    right = _int("right", right, none_ok=True)

    def fn(b, h, q, kv):
        ok = (q >= 0) & (kv >= 0)
        if left is not None:
            ok = ok & (kv >= q - left)
        if right is not None:
            ok = ok & (kv <= q + right)
        return ok

    def block_fn(ops, b, h, q0, q1, k0, k1):
        full = (k0 >= 0) & (q0 >= 0)
        empty = (k0 < 0) & (q0 < 0)
        if left is not None:
            full = full & (k0 >= q1 - left)
            empty = empty | (k1 < q0 - left)
        if right is not None:
            full = full & (k1 <= q0 + right)
            empty = empty | (k0 > q1 + right)
        return full, empty

    return MaskFn(fn, block_fn, f"sliding_window({left}, {right})")


def prefix_lm(prefix_len: int) -> MaskFn:
    """Keys < prefix_len are seen by every query (bidirectional prefix); later keys causally."""
    p = _int("prefix_len", prefix_len)

    def fn(b, h, q, kv):
        return (kv < p) | (kv <= q)

    def block_fn(ops, b, h, q0, q1, k0, k1):
        return (k1 < p) | (k1 <= q0), (k0 >= p) & (k0 > q1)

    return MaskFn(fn, block_fn, f"prefix_lm({p})")


def chunked(chunk_size: int) -> MaskFn:
    """Local attention inside fixed chunks: i // chunk_size == j // chunk_size (combine with
    causal() for Llama-4-style chunked causal attention)."""
    c = _int("chunk_size", chunk_size, lo=1)

    def fn(b, h, q, kv):
        return (q // c) == (kv // c)

    def block_fn(ops, b, h, q0, q1, k0, k1):
        full = ((q0 // c) == (q1 // c)) & ((k0 // c) == (k1 // c)) & ((q0 // c) == (k0 // c))
        empty = ((q1 // c) < (k0 // c)) | ((k1 // c) < (q0 // c))
        return full, empty

    return MaskFn(fn, block_fn, f"chunked({c})")


def dilated(local: int, stride: int) -> MaskFn:
    """Sparse-Transformer strided pattern: |i - j| <= local, or i - j a multiple of stride."""
    lo = _int("local", local)
    s = _int("stride", stride, lo=1)

    def fn(b, h, q, kv):
        d = q - kv
        return ((d <= lo) & (d >= -lo)) | ((d % s) == 0)

    def block_fn(ops, b, h, q0, q1, k0, k1):
        dmin, dmax = q0 - k1, q1 - k0  # every difference in between occurs in the tile
        band_full = (dmin >= -lo) & (dmax <= lo)
        band_empty = (dmin > lo) | (dmax < -lo)
        has_multiple = (dmax // s) * s >= dmin
        full = band_full | (dmin == dmax) & ((dmin % s) == 0) if s > 1 else band_full | (dmin <= dmax)
        return full, band_empty & ~has_multiple

    return MaskFn(fn, block_fn, f"dilated({lo}, {s})")


def document(segment_ids, segment_ids_kv=None) -> MaskFn:
    """Packed documents: query i sees key j when both lie in the same segment.

    segment_ids: integer array (S,) or (B, S), NumPy or of the mask's framework (converted when
    the mask is built); segment_ids_kv: the keys' ids when Sk != Sq (default: the same)."""
    ids_q = _ids("segment_ids", segment_ids)
    ids_k = ids_q if segment_ids_kv is None else _ids("segment_ids_kv", segment_ids_kv)
    cache: dict = {}

    def conv(xp_name, xp, like_dev):
        if xp_name == "jax":
            # JAX: cache host int32 copies and wrap them per call. A cached jnp array made while
            # jit traces (the element mask inside a jitted function) is a tracer of that trace
            # and leaks into the next one (UnexpectedTracerError under jax.grad after jax.jit).
            if "jax-host" not in cache:
                cache["jax-host"] = tuple(_convert(x, "numpy", np, None).astype(np.int32)
                                          for x in (ids_q, ids_k))
            return tuple(xp.asarray(x) for x in cache["jax-host"])
        key = (xp_name, like_dev)
        if key not in cache:
            cache[key] = tuple(_convert(x, xp_name, xp, like_dev) for x in (ids_q, ids_k))
        return cache[key]

    def pick(ids, b, idx):
        return ids[b, idx] if ids.ndim == 2 else ids[idx]

    def fn(b, h, q, kv):
        xp_name, xp, dev = _framework(q)
        iq, ik = conv(xp_name, xp, dev)
        return pick(iq, b, q) == pick(ik, b, kv)

    def block_fn(ops, b, h, q0, q1, k0, k1):
        # per-block min and max of the ids: full when one id covers both blocks, empty when
        # the ranges are disjoint (exact claims for any ids; tight for sorted ones)
        if ops.name not in ("numpy", "torch", "jax"):
            return None
        xp_name, xp, dev = ops.name, ops.xp, getattr(ops, "device", None)
        iq, ik = conv(xp_name, xp, dev)
        bs = ops.block_size
        qmin, qmax = _block_minmax(xp_name, xp, iq, bs)
        kmin, kmax = _block_minmax(xp_name, xp, ik, bs)
        nq, nk = q0.shape[-2], k0.shape[-1]
        qmin, qmax, kmin, kmax = qmin[:, :nq], qmax[:, :nq], kmin[:, :nk], kmax[:, :nk]
        qmin, qmax = (x.reshape(-1, 1, nq, 1) for x in (qmin, qmax))
        kmin, kmax = (x.reshape(-1, 1, 1, nk) for x in (kmin, kmax))
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        empty = (qmax < kmin) | (kmax < qmin)
        return full, empty

    return MaskFn(fn, block_fn, "document(...)")


def and_(*fns) -> MaskFn:
    """Allowed where every mask allows."""
    return _combine(fns, "and")


def or_(*fns) -> MaskFn:
    """Allowed where any mask allows."""
    return _combine(fns, "or")


def _combine(fns, how):
    if not fns:
        raise ValueError(f"{how}_: expected at least one mask function, got none")
    for i, f in enumerate(fns):
        if not callable(f):
            raise TypeError(f"{how}_: argument {i}: expected a mask function, got {type(f).__name__}")

    def fn(b, h, q, kv):
        out = fns[0](b, h, q, kv)
        for f in fns[1:]:
            out = (out & f(b, h, q, kv)) if how == "and" else (out | f(b, h, q, kv))
        return out

    block_fn = None
    if all(getattr(f, "block_fn", None) is not None for f in fns):

        def block_fn(ops, b, h, q0, q1, k0, k1):
            got = [f.block_fn(ops, b, h, q0, q1, k0, k1) for f in fns]
            if any(g is None for g in got):
                return None
            full, empty = got[0]
            for f2, e2 in got[1:]:
                if how == "and":
                    full, empty = full & f2, empty | e2
                else:
                    full, empty = full | f2, empty & e2
            return full, empty

    names = ", ".join(getattr(f, "name", getattr(f, "__name__", "fn")) for f in fns)
    return MaskFn(fn, block_fn, f"{how}_({names})")


# -- helpers for document() -----------------------------------------------------------------------


def _ids(name, x):
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an integer array (S,) or (B, S), got {type(x).__name__}")
    if len(shape) not in (1, 2):
        raise ValueError(f"{name}: expected shape (S,) or (B, S), got {tuple(shape)}")
    dt = str(x.dtype)
    if "int" not in dt:
        raise TypeError(f"{name}: expected an integer dtype, got {dt}")
    return x


def _framework(x):
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        return "torch", torch, x.device
    if mod.startswith(("jax", "jaxlib")):
        import jax.numpy as jnp

        return "jax", jnp, None
    return "numpy", np, None


def _convert(x, xp_name, xp, dev):
    if xp_name == "torch":
        if not isinstance(x, xp.Tensor):
            x = xp.as_tensor(np.asarray(x))
        return x.to(device=dev, dtype=xp.int64)
    if xp_name == "jax":
        return xp.asarray(np.asarray(x) if not hasattr(x, "devices") else x).astype(xp.int32)
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64)


def _block_minmax(xp_name, xp, ids, bs):
    """(Bd, nblocks) min and max of ids per block of bs positions (a short tail block is padded
    with its own last value)."""
    ids2 = ids if ids.ndim == 2 else ids.reshape(1, -1)
    s = ids2.shape[-1]
    nb = -(-s // bs)
    pad = nb * bs - s
    if pad:
        last = ids2[:, -1:]
        if xp_name == "torch":
            tail = last.expand(ids2.shape[0], pad)
            ids2 = xp.cat([ids2, tail], 1)
        elif xp_name == "jax":
            ids2 = xp.concatenate([ids2, xp.broadcast_to(last, (ids2.shape[0], pad))], 1)
        else:
            ids2 = np.concatenate([ids2, np.broadcast_to(last, (ids2.shape[0], pad))], 1)
    blocks = ids2.reshape(ids2.shape[0], nb, bs)
    if xp_name == "torch":
        return blocks.amin(-1), blocks.amax(-1)
    return blocks.min(-1), blocks.max(-1)
