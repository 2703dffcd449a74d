"""Block masks: which (query block, key block) tiles of the score matrix a call computes.

    bm = flashmux.create_block_mask(mask_fn, batch, heads, seqlen_q, seqlen_k, block_size=128, like=q)
    out = flashmux.attention(q, k, v, block_mask=bm)

`mask_fn(b, h, q_idx, kv_idx)` returns True where key kv_idx is allowed for query q_idx; it is
called on broadcastable integer index arrays of `like`'s framework (NumPy, torch or jax.numpy),
so it must be vectorized (as FlexAttention's mask_mod). The score matrix of every (batch, head)
is cut into block_size x block_size tiles, each one of:

- empty: no allowed element; kernels never load it;
- full: every element (inside the sequence) allowed; kernels apply no element mask;
- partial: some allowed; kernels apply the element mask, read from a per-tile bitmask.

Arrays (int32, of `like`'s framework and device; Bm = batch or 1, Hm = heads or 1,
nQ = ceil(seqlen_q / block_size), nK = ceil(seqlen_k / block_size), bs = block_size):

    kind        (Bm, Hm, nQ, nK) int8: 0 empty, 1 full, 2 partial
    q_num_full  (Bm, Hm, nQ)     full key blocks of each query block
    q_full_idx  (Bm, Hm, nQ, nK) their key-block indices first, ascending (the rest is padding)
    q_num_part, q_part_idx       the same for partial tiles
    kv_num_full, kv_full_idx     (Bm, Hm, nK) / (Bm, Hm, nK, nQ): the transposed lists, query
    kv_num_part, kv_part_idx     blocks per key block (the backward's dK/dV pass)
    tile_id     (Bm, Hm, nQ, nK) index of a partial tile's bitmask in `bits` (-1 otherwise)
    bits        (nP, bs, bs // 32) int32: bit c % 32 of word c // 32 of row r is the element
                (r, c) of the partial tile (rows and columns past the sequence are 0)

Construction never materializes the S x S mask: the ready-made masks of `flashmux.masks` carry a
tile classifier (`block_fn`) that labels tiles from their index ranges alone, so mask_fn is
evaluated only inside the tiles it could not decide (a document mask of 128k x 128k evaluates a
few hundred tiles, not 16 billion elements); a custom mask_fn is evaluated tile by tile, in
chunks of tiles bounded by `EVAL_BUDGET` elements.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import array_kind, is_traced

EVAL_BUDGET = 1 << 24  # mask elements evaluated per chunk (bool: 16 MiB, plus index arrays)

_ARRAYS = (
    "kind", "q_num_full", "q_full_idx", "q_num_part", "q_part_idx",
    "kv_num_full", "kv_full_idx", "kv_num_part", "kv_part_idx", "tile_id", "bits",
)


# -- the few array operations construction needs, per framework --------------------------------


class _NP:
    name = "numpy"

    def __init__(self, like=None):
        self.xp = np

    def arange(self, n, dtype="int32"):
        return np.arange(n, dtype=dtype)

    def asarray(self, x, dtype=None):
        return np.asarray(x, dtype=dtype)

    def astype(self, x, dtype):
        return np.asarray(x).astype(dtype)

    def nonzero_flat(self, x):
        return np.flatnonzero(x)

    def argsort_stable(self, x, axis=-1):
        return np.argsort(x, axis=axis, kind="stable")

    def sum(self, x, axis, dtype="int32"):
        return np.sum(x, axis=axis, dtype=dtype)

    def cumsum(self, x):
        return np.cumsum(x)

    def unravel(self, flat, shape):
        return np.unravel_index(flat, shape)

    def swap(self, x):
        return np.ascontiguousarray(np.swapaxes(x, -1, -2))

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def concat(self, xs, axis=0):
        return np.concatenate(xs, axis=axis)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def to_numpy(self, x):
        return np.asarray(x)


class _Torch(_NP):
    name = "torch"

    def __init__(self, like):
        import torch

        self.xp = torch
        self.t = torch
        self.device = like.device

    def _dt(self, dtype):
        return getattr(self.t, dtype) if isinstance(dtype, str) else dtype

    def arange(self, n, dtype="int32"):
        return self.t.arange(n, dtype=self._dt(dtype), device=self.device)

    def asarray(self, x, dtype=None):
        if isinstance(x, self.t.Tensor):
            return x.to(self.device) if dtype is None else x.to(self.device, self._dt(dtype))
        return self.t.as_tensor(np.asarray(x), device=self.device, dtype=None if dtype is None else self._dt(dtype))

    def astype(self, x, dtype):
        return x.to(self._dt(dtype))

    def nonzero_flat(self, x):
        return self.t.nonzero(x.reshape(-1)).reshape(-1)

    def argsort_stable(self, x, axis=-1):
        return self.t.sort(x, dim=axis, stable=True).indices

    def sum(self, x, axis, dtype="int32"):
        return self.t.sum(x, dim=axis, dtype=self._dt(dtype))

    def cumsum(self, x):
        return self.t.cumsum(x, 0)

    def unravel(self, flat, shape):
        return self.t.unravel_index(flat, shape)

    def swap(self, x):
        return x.transpose(-1, -2).contiguous()

    def zeros(self, shape, dtype):
        return self.t.zeros(shape, dtype=self._dt(dtype), device=self.device)

    def full(self, shape, value, dtype):
        return self.t.full(shape, value, dtype=self._dt(dtype), device=self.device)

    def concat(self, xs, axis=0):
        return self.t.cat(xs, dim=axis)

    def where(self, c, a, b):
        return self.t.where(c, a, b)

    def minimum(self, a, b):
        return self.t.clamp(a, max=b) if isinstance(b, int) else self.t.minimum(a, b)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()


class _Jax(_NP):
    name = "jax"

    def __init__(self, like=None):
        import jax.numpy as jnp

        self.xp = jnp

    def arange(self, n, dtype="int32"):
        return self.xp.arange(n, dtype=dtype)

    def asarray(self, x, dtype=None):
        return self.xp.asarray(x, dtype=dtype)

    def astype(self, x, dtype):
        return x.astype(dtype)

    def nonzero_flat(self, x):
        return self.xp.flatnonzero(x)

    def argsort_stable(self, x, axis=-1):
        return self.xp.argsort(x, axis=axis, stable=True)

    def sum(self, x, axis, dtype="int32"):
        return self.xp.sum(x, axis=axis, dtype=dtype)

    def cumsum(self, x):
        return self.xp.cumsum(x)

    def unravel(self, flat, shape):
        return self.xp.unravel_index(flat, shape)

    def swap(self, x):
        return self.xp.swapaxes(x, -1, -2)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        return self.xp.full(shape, value, dtype=dtype)

    def concat(self, xs, axis=0):
        return self.xp.concatenate(xs, axis=axis)

    def where(self, c, a, b):
        return self.xp.where(c, a, b)

    def minimum(self, a, b):
        return self.xp.minimum(a, b)


def _ops(kind, like):
    return {"numpy": _NP, "torch": _Torch, "jax": _Jax}[kind](like)


def _shift_table(ops):
    return ops.astype(ops.arange(32), "int32")


def _pack_bits(ops, allowed, bs):
    """(n, bs, bs) bool -> (n, bs, bs // 32) int32 (bit c % 32 of word c // 32)."""
    n = allowed.shape[0]
    a = ops.astype(allowed, "int32").reshape(n, bs, bs // 32, 32)
    sh = _shift_table(ops)
    return ops.sum(a << sh, axis=-1, dtype="int32")  # distinct bits: the sum is the OR


def unpack_bits(xp, words, bs):
    """(..., bs, bs // 32) int32 -> (..., bs, bs) bool; `xp` is numpy, torch or jax.numpy."""
    if xp is np:
        sh = np.arange(32, dtype=np.int32)
    elif getattr(xp, "__name__", "") == "torch":
        sh = xp.arange(32, dtype=xp.int32, device=words.device)
    else:
        sh = xp.arange(32, dtype=xp.int32)
    b = (words[..., None] >> sh) & 1
    return (b != 0).reshape(words.shape[:-1] + (bs,))


# -- the BlockMask value --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockMask:
    """An immutable block-sparse mask for `flashmux.attention(..., block_mask=)`; see the module
    docstring for the arrays. Build it with `flashmux.create_block_mask`."""

    kind: Any
    q_num_full: Any
    q_full_idx: Any
    q_num_part: Any
    q_part_idx: Any
    kv_num_full: Any
    kv_full_idx: Any
    kv_num_part: Any
    kv_part_idx: Any
    tile_id: Any
    bits: Any
    block_size: int
    seqlen_q: int
    seqlen_k: int
    batch: int | None  # None: one mask for every batch entry
    heads: int | None  # None: one mask for every head
    array_kind: str

    # -- shape facts --------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return -(-self.seqlen_q // self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.seqlen_k // self.block_size)

    @property
    def num_partial(self) -> int:
        return int(self.bits.shape[0])

    def arrays(self) -> tuple:
        """The arrays, in a fixed order (the glue carries them as operands)."""
        return tuple(getattr(self, n) for n in _ARRAYS)

    def meta(self) -> tuple:
        return (self.block_size, self.seqlen_q, self.seqlen_k, self.batch, self.heads, self.array_kind)

    @classmethod
    def from_arrays(cls, meta, arrays) -> BlockMask:
        bs, sq, sk, b, h, kind = meta
        return cls(**dict(zip(_ARRAYS, arrays)), block_size=bs, seqlen_q=sq, seqlen_k=sk, batch=b,
                   heads=h, array_kind=kind)

    # -- summaries (host reads: for printing and explain, never in a hot path) ----------------
    def counts(self) -> dict:
        """{'full': n, 'partial': n, 'empty': n, 'tiles': n, 'density': fraction of the tiles
        computed} over every (batch, head) the mask holds."""
        if is_traced(self.kind):
            return {}
        k = _host(self.kind)
        full, part = int((k == 1).sum()), int((k == 2).sum())
        tiles = int(k.size)
        return {"full": full, "partial": part, "empty": tiles - full - part, "tiles": tiles,
                "density": (full + part) / tiles if tiles else 0.0}

    def summary(self) -> str:
        c = self.counts()
        if not c:
            return f"BlockMask(block_size={self.block_size}, traced)"
        return (f"density {c['density']:.1%} ({c['full']} full + {c['partial']} partial of "
                f"{c['tiles']} tiles, block {self.block_size})")

    def picture(self, max_blocks: int = 16) -> str:
        """The tile pattern of batch 0, head 0: '#' full, '+' partial, '.' empty (coarsened to
        at most max_blocks x max_blocks cells; a cell shows its densest tile)."""
        k = _host(self.kind)[0, 0]
        nq, nk = k.shape
        fq, fk = max(1, -(-nq // max_blocks)), max(1, -(-nk // max_blocks))
        rows = []
        for r in range(0, nq, fq):
            line = []
            for c in range(0, nk, fk):
                cell = k[r:r + fq, c:c + fk]
                line.append("#" if (cell == 1).all() else "+" if cell.any() else ".")
            rows.append("".join(line))
        return "\n".join(rows)

    def __repr__(self) -> str:
        if is_traced(self.kind):
            return f"BlockMask(block_size={self.block_size}, traced arrays)"
        bh = f"batch={self.batch}, heads={self.heads}"
        head = (f"BlockMask(seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, {bh}, "
                f"{self.array_kind}): {self.summary()}")
        pic = "\n".join("  " + line for line in self.picture().splitlines())
        return head + "\n" + pic

    __str__ = __repr__

    def to_dense(self):
        """(Bm, Hm, seqlen_q, seqlen_k) bool mask of `like`'s framework: the exact element mask
        this BlockMask stands for (materializes S x S: for tests and small problems)."""
        return dense_rows(self, 0, self.seqlen_q, 0, self.seqlen_k)


def _host(x):
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _xp_of(x):
    kind = array_kind(x)
    if kind == "numpy":
        return np
    if kind == "torch":
        return sys.modules["torch"]
    import jax.numpy as jnp

    return jnp


def dense_rows(bm: BlockMask, r0: int, r1: int, c0: int, c1: int):
    """Element mask (Bm, Hm, r1 - r0, c1 - c0) bool for query rows r0:r1, keys c0:c1, from the
    tile kinds and bitmasks (works in NumPy, torch and jax.numpy, also under jax.jit)."""
    xp = _xp_of(bm.kind)
    bs = bm.block_size
    qb0, qb1 = r0 // bs, -(-r1 // bs)
    kb0, kb1 = c0 // bs, -(-c1 // bs)
    kind = bm.kind[:, :, qb0:qb1, kb0:kb1]
    tid = bm.tile_id[:, :, qb0:qb1, kb0:kb1]
    bmb, hm, nq, nk = kind.shape
    if bm.bits.shape[0]:
        safe = xp.where(tid >= 0, tid, xp.zeros_like(tid))
        words = bm.bits[safe.reshape(-1)]  # (tiles, bs, bs // 32)
        el = unpack_bits(xp, words, bs).reshape(bmb, hm, nq, nk, bs, bs)
        part = (kind == 2)[..., None, None] & el
    else:
        part = xp.zeros((bmb, hm, nq, nk, bs, bs), dtype=bool) if xp is not np else np.zeros(
            (bmb, hm, nq, nk, bs, bs), dtype=bool)
        if xp.__name__ == "torch":
            part = xp.zeros((bmb, hm, nq, nk, bs, bs), dtype=xp.bool, device=kind.device)
    ok = part | (kind == 1)[..., None, None]
    # (B, H, nq, nk, bs, bs) -> (B, H, nq*bs, nk*bs)
    if xp is np:
        ok = np.moveaxis(ok, 4, 3)
    elif xp.__name__ == "torch":
        ok = ok.permute(0, 1, 2, 4, 3, 5)
    else:
        ok = xp.moveaxis(ok, 4, 3)
    ok = ok.reshape(bmb, hm, nq * bs, nk * bs)
    return ok[:, :, r0 - qb0 * bs:r1 - qb0 * bs, c0 - kb0 * bs:c1 - kb0 * bs]


_JAX_REGISTERED = False


def _register_jax():
    """BlockMask as a JAX pytree (arrays are leaves, the rest static), so it passes through
    jax.jit; registered when the first JAX BlockMask is made (flashmux never imports JAX)."""
    global _JAX_REGISTERED
    if _JAX_REGISTERED:
        return
    import jax

    jax.tree_util.register_pytree_node(
        BlockMask,
        lambda bm: (bm.arrays(), bm.meta()),
        lambda meta, arrays: BlockMask.from_arrays(meta, arrays),
    )
    _JAX_REGISTERED = True


# -- construction ---------------------------------------------------------------------------------


def _check_dim(name, x, allow_none):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < (1 if allow_none else 0):
        want = "an int >= 1 or None" if allow_none else "an int >= 0"
        raise (TypeError if not isinstance(x, int | np.integer) or isinstance(x, bool) else ValueError)(
            f"{name}: expected {want}, got {x!r}")
    return int(x)


def create_block_mask(mask_fn, batch, heads, seqlen_q, seqlen_k, *, block_size=128, like=None):
    """Build the `BlockMask` of `mask_fn` for (batch, heads, seqlen_q, seqlen_k).

    mask_fn(b, h, q_idx, kv_idx) -> bool array, True where key kv_idx is allowed for query
    q_idx; called with broadcastable int32 index arrays of like's framework (q_idx and kv_idx are
    positions 0..seqlen-1; b and h are 0 where batch or heads is None). batch / heads: ints, or
    None for a mask shared by every batch entry / head. block_size: the tile edge, a power of
    two >= 32 (the kernels' tiles divide it). like: an array whose framework and device the
    mask's arrays take (default NumPy). Call it outside jax.jit / torch.compile and reuse it.
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn: expected a callable mask_fn(b, h, q_idx, kv_idx), got {type(mask_fn).__name__}")
    batch = _check_dim("batch", batch, True)
    heads = _check_dim("heads", heads, True)
    seqlen_q = _check_dim("seqlen_q", seqlen_q, False)
    seqlen_k = _check_dim("seqlen_k", seqlen_k, False)
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(f"block_size: expected an int, got {block_size!r}")
    block_size = int(block_size)
    if block_size < 32 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 32, got {block_size}")
    kind = "numpy" if like is None else array_kind(like)
    if kind is None:
        raise TypeError(f"like: expected a torch tensor, JAX array or NumPy array, got {type(like).__name__}")
    if kind == "jax" and is_traced(like):
        raise ValueError("like: expected a concrete JAX array; call create_block_mask outside "
                         "jax.jit (the mask's tile lists have data-dependent sizes) and pass the "
                         "BlockMask in")
    ops = _ops(kind, like)
    bs = ops.block_size = block_size
    bm_, hm = batch or 1, heads or 1
    nq, nk = -(-seqlen_q // bs), -(-seqlen_k // bs)

    # 1. tile classes from index ranges alone, where the mask function can say (ready-made masks)
    block_fn = getattr(mask_fn, "block_fn", None)
    shape = (bm_, hm, nq, nk)
    undecided = None
    full = None
    if block_fn is not None and nq and nk:
        bidx = ops.arange(bm_).reshape(-1, 1, 1, 1)
        hidx = ops.arange(hm).reshape(1, -1, 1, 1)
        q0 = (ops.arange(nq) * bs).reshape(1, 1, -1, 1)
        k0 = (ops.arange(nk) * bs).reshape(1, 1, 1, -1)
        q1 = ops.minimum(q0 + bs, seqlen_q) - 1
        k1 = ops.minimum(k0 + bs, seqlen_k) - 1
        got = block_fn(ops, bidx, hidx, q0, q1, k0, k1)
        if got is not None:
            full_t, empty_t = got
            full = _bcast(ops, full_t, shape)
            undecided = ~(full | _bcast(ops, empty_t, shape))
    if undecided is None:
        full = ops.zeros(shape, "bool")
        undecided = ops.full(shape, True, "bool")

    # 2. evaluate mask_fn element by element inside the undecided tiles, in chunks of tiles
    cand = ops.nonzero_flat(undecided)
    n_cand = int(cand.shape[0])
    kinds_c, bits_c = [], []
    per_chunk = max(1, EVAL_BUDGET // (bs * bs))
    ar = ops.arange(bs)
    for c0 in range(0, n_cand, per_chunk):
        flat = cand[c0:c0 + per_chunk]
        tb, th, tq, tk = (ops.astype(x, "int32") for x in ops.unravel(flat, shape))
        qi = tq.reshape(-1, 1, 1) * bs + ar.reshape(1, -1, 1)
        ki = tk.reshape(-1, 1, 1) * bs + ar.reshape(1, 1, -1)
        inside = (qi < seqlen_q) & (ki < seqlen_k)
        qc = ops.minimum(qi, max(seqlen_q - 1, 0))
        kc = ops.minimum(ki, max(seqlen_k - 1, 0))
        allowed = mask_fn(tb.reshape(-1, 1, 1), th.reshape(-1, 1, 1), qc, kc)
        allowed = _as_bool(ops, allowed, (int(flat.shape[0]), bs, bs)) & inside
        n_ok = ops.sum(allowed.reshape(-1, bs * bs), axis=1)
        n_in = ops.sum(inside.reshape(-1, bs * bs), axis=1)
        kd = ops.where(n_ok == 0, 0, ops.where(n_ok == n_in, 1, 2))
        kinds_c.append(ops.astype(kd, "int8"))
        bits_c.append((kd == 2, _pack_bits(ops, allowed, bs)))

    kind_map = ops.astype(full, "int8")
    if n_cand:
        kd_all = ops.concat(kinds_c)
        kflat = kind_map.reshape(-1)
        if kind == "jax":
            kflat = kflat.at[cand].set(kd_all)
        else:
            kflat[cand] = kd_all
        kind_map = kflat.reshape(shape)
        bits = ops.concat([w[p] for p, w in bits_c])
    else:
        bits = ops.zeros((0, bs, bs // 32), "int32")
    is_part = (kind_map == 2).reshape(-1)
    tile_id = ops.cumsum(ops.astype(is_part, "int32")) - 1
    tile_id = ops.astype(ops.where(is_part, tile_id, -1), "int32").reshape(shape)

    def lists(kmap):
        isf, isp = kmap == 1, kmap == 2
        return (
            ops.sum(isf, axis=-1), ops.astype(ops.argsort_stable(ops.astype(~isf, "int8")), "int32"),
            ops.sum(isp, axis=-1), ops.astype(ops.argsort_stable(ops.astype(~isp, "int8")), "int32"),
        )

    qf, qfi, qp, qpi = lists(kind_map)
    kf, kfi, kp, kpi = lists(ops.swap(kind_map))
    out = BlockMask(
        kind_map, qf, qfi, qp, qpi, kf, kfi, kp, kpi, tile_id, bits,
        block_size=bs, seqlen_q=seqlen_q, seqlen_k=seqlen_k, batch=batch, heads=heads,
        array_kind=kind,
    )
    if kind == "jax":
        _register_jax()
    return out


def _bcast(ops, x, shape):
    if ops.name == "torch":
        return x.expand(shape).contiguous() if x.shape != shape else x
    return ops.xp.broadcast_to(x, shape) if ops.name == "jax" else np.ascontiguousarray(np.broadcast_to(x, shape))


def _as_bool(ops, x, shape):
    if ops.name == "torch":
        t = ops.t
        if not isinstance(x, t.Tensor):
            x = t.as_tensor(x, device=ops.device)
        return x.to(t.bool).expand(shape)
    x = ops.xp.asarray(x).astype(bool)
    return ops.xp.broadcast_to(x, shape)
