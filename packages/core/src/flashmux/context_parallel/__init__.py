"""Context parallelism: exact attention over a sequence split across devices.

    out = flashmux.ring_attention(q, k, v, causal=True)                  # torch.distributed
    out = flashmux.ring_attention(q, k, v, axis_name="sp", causal=True)  # JAX, inside shard_map

q, k, v are this rank's shards (B, S/P, H, D) of the global sequence; the result is this rank's
shard of `flashmux.attention` on the global arrays. Two variants:

- ``ring``: each rank keeps its queries and passes K/V (Hkv heads) around the ring, one block per
  step, overlapping the send with the attention of the block it holds; partial results are merged
  by their lse in float32 (`merge`). The backward runs the ring again: dK/dV travel with their
  blocks back to the owner, dQ stays local.
- ``allgather``: K/V are gathered once and each local query chunk runs one kernel call against
  the whole key prefix it may see (bottom-right causal alignment does the masking); dK/dV are
  reduce-scattered back. Cheaper when K/V are small against Q (strong GQA).

Every block runs on a flashmux backend through the backend contract (`dispatch.select` on the
block's `ProblemSpec`, then ``backend.forward`` / ``backend.backward``), so any backend that
returns lse works. The ring's backward hands each block the *global* out and lse (as
ring-flash-attn does): a backend's backward must take ``delta = rowsum(dO * out)`` from the
``out`` it is given (every kernel backend does; the reference does when handed
``out_residual``, which the ring always passes to backends that take it).

Layouts (`shard_sequence`): "contiguous" gives rank r rows [r*S/P, (r+1)*S/P); "zigzag" cuts the
sequence in 2P chunks and gives rank r chunks r and 2P-1-r, so every rank has the same causal
work. Imports no framework at import time.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .._arrays import array_kind

LAYOUTS = ("zigzag", "contiguous")
VARIANTS = ("auto", "ring", "allgather")


# -- the lse merge -----------------------------------------------------------------------------


def merge(out, lse, out_blk, lse_blk):
    """Merge two partial attentions over disjoint key sets into one, exactly, in float32.

    out, out_blk: (B, S, H, Dv); lse, lse_blk: (B, H, S), natural log, -inf for a row that saw no
    key. out must be float32; out_blk may be any float dtype (it is promoted). Returns
    (out, lse) float32 with lse = log(exp(lse) + exp(lse_blk)) and out the lse-weighted average.
    A row that saw no key in either part stays (0, -inf), never NaN. Works on torch tensors, JAX
    arrays and NumPy arrays alike (only operators and methods the three share).
    """
    xp = _xp(out)
    hi = xp.maximum(lse, lse_blk)
    hi = xp.where(xp.isfinite(hi), hi, 0.0)  # both -inf: any finite pivot gives exp(-inf) = 0
    wa = xp.exp(lse - hi)
    wb = xp.exp(lse_blk - hi)
    tot = wa + wb
    pos = tot > 0
    new = xp.where(pos, xp.log(xp.where(pos, tot, 1.0)) + hi, -float("inf"))  # -inf: no key
    safe = xp.where(xp.isfinite(new), new, 0.0)
    ca = _to_rows(xp.exp(lse - safe))
    cb = _to_rows(xp.exp(lse_blk - safe))
    return out * ca + _f32(out_blk) * cb, new


def _xp(x):
    kind = array_kind(x)
    if kind == "torch":
        import torch

        return torch
    if kind == "jax":
        import jax.numpy as jnp

        return jnp
    import numpy as np

    return np


def _to_rows(w):
    """(B, H, S) -> (B, S, H, 1), to scale out rows."""
    return w.swapaxes(1, 2)[..., None]


def _f32(x):
    kind = array_kind(x)
    if kind == "torch":
        import torch

        return x.to(torch.float32)
    import numpy as np

    return x.astype(np.float32)


# -- layouts -----------------------------------------------------------------------------------


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def layout_chunks(layout: str, world_size: int) -> list[int]:
    """The global chunk index held at each slot of the rank-ordered concatenation of shards.

    contiguous: [0, 1, ..., P-1]; zigzag: [0, 2P-1, 1, 2P-2, ..., P-1, P] (rank r holds slots
    2r and 2r+1, i.e. chunks r and 2P-1-r).
    """
    _check_layout(layout)
    p = world_size
    if layout == "contiguous":
        return list(range(p))
    out = []
    for r in range(p):
        out += [r, 2 * p - 1 - r]
    return out


def _check_world(rank, world_size):
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size
    ):
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")


def _check_divisible(s: int, p: int, layout: str, name: str = "x"):
    n = p if layout == "contiguous" else 2 * p
    if s % n:
        what = "P" if layout == "contiguous" else "2P"
        raise ValueError(
            f"{name}: the sequence length S={s} must be divisible by {what}={n} for the "
            f"{layout} layout with P={p} ranks"
        )
    return s // n


def _concat(parts, dim, like):
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.cat(parts, dim)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.concatenate(parts, dim)
    import numpy as np

    return np.concatenate(parts, dim)


def _take(x, dim, start, stop):
    idx = [slice(None)] * len(x.shape)
    idx[dim] = slice(start, stop)
    return x[tuple(idx)]


def _norm_dim(x, dim, name="dim"):
    nd = len(x.shape)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -nd <= dim < nd:
        raise ValueError(f"{name}: expected an axis of an array of rank {nd}, got {dim!r}")
    return dim % nd


def shard_sequence(x, rank, world_size, layout="zigzag", dim=1):
    """This rank's shard of the sequence axis `dim` of a global array (torch, JAX or NumPy).

    rank=None returns every shard concatenated in rank order: the array to split evenly over a
    JAX mesh axis (``NamedSharding(mesh, P(None, "sp"))``) so that device r holds shard r.
    For lse-shaped arrays (B, H, S) pass dim=2. Raises ValueError when S is not divisible by P
    (contiguous) or 2P (zigzag).
    """
    if array_kind(x) is None:
        raise TypeError(f"x: expected a torch tensor, JAX array or NumPy array, got {type(x).__name__}")
    _check_world(rank, world_size)
    _check_layout(layout)
    dim = _norm_dim(x, dim)
    c = _check_divisible(int(x.shape[dim]), world_size, layout)
    order = layout_chunks(layout, world_size)
    per = len(order) // world_size
    slots = range(len(order)) if rank is None else range(rank * per, (rank + 1) * per)
    parts = [_take(x, dim, order[i] * c, (order[i] + 1) * c) for i in slots]
    return parts[0] if len(parts) == 1 else _concat(parts, dim, x)


def unshard_sequence(x_locals, layout="zigzag", dim=1, world_size=None):
    """The global array from every rank's shard: the inverse of `shard_sequence`.

    x_locals: a list/tuple of the P shards in rank order, or (with world_size) one array holding
    them concatenated in rank order along `dim` (what a JAX mesh-sharded array is).
    """
    _check_layout(layout)
    if isinstance(x_locals, list | tuple):
        if not x_locals:
            raise ValueError("x_locals: expected at least one shard, got an empty sequence")
        if world_size is not None and world_size != len(x_locals):
            raise ValueError(f"world_size: expected {len(x_locals)} (the number of shards), got {world_size}")
        like = x_locals[0]
        dim = _norm_dim(like, dim)
        p = len(x_locals)
        shapes = {int(s.shape[dim]) for s in x_locals}
        if len(shapes) != 1:
            raise ValueError(f"x_locals: expected shards of equal length along dim {dim}, got {sorted(shapes)}")
        whole = _concat(list(x_locals), dim, like) if p > 1 else like
    else:
        if world_size is None:
            raise ValueError("world_size: expected the number of shards when x_locals is one array, got None")
        _check_world(None, world_size)
        whole, p = x_locals, world_size
        if array_kind(whole) is None:
            raise TypeError(f"x_locals: expected arrays, got {type(whole).__name__}")
        dim = _norm_dim(whole, dim)
    c = _check_divisible(int(whole.shape[dim]), p, layout, "x_locals")
    order = layout_chunks(layout, p)
    slot_of = {g: i for i, g in enumerate(order)}
    parts = [_take(whole, dim, slot_of[g] * c, (slot_of[g] + 1) * c) for g in range(len(order))]
    return parts[0] if len(parts) == 1 else _concat(parts, dim, whole)


# -- the block schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One kernel call of the ring: which local query rows and which rows of the held K/V block
    ("all", "lo" = first half, "hi" = second half), and whether the causal (diagonal) mask
    applies. Bottom-right alignment on a square block is the ordinary diagonal."""

    q: str
    k: str
    causal: bool


def ring_block(layout: str, causal: bool, rank: int, src: int) -> Block | None:
    """The call rank `rank` makes against the K/V block that rank `src` owns (None: skipped).

    zigzag (rank r holds chunks r and 2P-1-r): src == r is the local causal block; src < r: all
    local queries see the first half (chunk src, earlier than both) and not the second (chunk
    2P-1-src, later than both); src > r: only the second query half (chunk 2P-1-r) sees anything,
    and it sees both halves (chunks src and 2P-1-src, both earlier). So each rank does the same
    work at every step after the first.
    """
    if not causal:
        return Block("all", "all", False)
    if src == rank:
        return Block("all", "all", True)
    if layout == "contiguous":
        return Block("all", "all", False) if src < rank else None
    return Block("all", "lo", False) if src < rank else Block("hi", "all", False)


def allgather_calls(layout: str, causal: bool, world_size: int, rank: int, s_local: int):
    """The calls of the all-gather variant on rank `rank`: (first local row, last local row + 1,
    number of global keys from 0, causal). Causal calls take the key prefix [0, end of the
    chunk) and the bottom-right alignment masks exactly the keys after each row."""
    if not causal:
        return [(0, s_local, world_size * s_local, False)]
    if layout == "contiguous":
        return [(0, s_local, (rank + 1) * s_local, True)]
    c = s_local // 2
    p = world_size
    return [(0, c, (rank + 1) * c, True), (c, 2 * c, (2 * p - rank) * c, True)]


def rows(part: str, n: int) -> slice:
    """Rows of a local block of n rows that a Block part names."""
    return {"all": slice(0, n), "lo": slice(0, n // 2), "hi": slice(n // 2, n)}[part]


# -- choosing a variant ------------------------------------------------------------------------


def choose_variant(variant: str, q_shape, k_shape, v_shape, world_size: int) -> tuple[str, str]:
    """(variant, why). "auto" gathers when K and V of the whole sequence take at most half the
    elements of this rank's Q (strong GQA/MQA: the gather is small beside memory the rank already
    holds); else the ring. Measured on two H200s (2026-11-30): at Hq 32 / Hkv 8, where the whole
    K and V equal the local Q, the ring was 2-4% faster than the gather (its gather and float32
    reduce-scatter are not overlapped), so equality no longer gathers."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    if variant != "auto":
        return variant, f"variant={variant!r} was asked for"
    if world_size == 1:
        return "ring", "one rank: a single local call"
    nq = _numel(q_shape)
    nkv = world_size * (_numel(k_shape) + _numel(v_shape))
    if 2 * nkv <= nq:
        return "allgather", (
            f"K and V of the whole sequence ({nkv} elements) are at most half this rank's "
            f"Q ({nq}): gather them once"
        )
    return "ring", (
        f"K and V of the whole sequence ({nkv} elements) are more than half this rank's Q "
        f"({nq}): pass blocks around the ring"
    )


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


# -- argument checks and block dispatch --------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Static facts of one ring_attention call (hashable: a jax.custom_vjp closure key)."""

    world_size: int
    layout: str
    causal: bool
    scale: float | None
    softcap: float | None
    return_lse: bool
    forced: tuple[str, ...] | None
    variant: str
    why: str = field(default="", compare=False)


def check_call(q, k, v, *, layout, causal, window, softcap, world_size, variant):
    """Checks ring_attention adds to flashmux.attention's (which run on each block)."""
    _check_layout(layout)
    if causal not in (True, False):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if window is not None:
        raise ValueError(
            f"window: sliding windows are not supported by ring_attention in this version "
            f"(blocks outside a window are not skipped yet), got {window!r}"
        )
    for name, x in zip("qkv", (q, k, v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected this rank's shard (B, S/P, H, D), got shape {tuple(x.shape)}")
    sq, sk = int(q.shape[1]), int(k.shape[1])
    if sq != sk:
        raise ValueError(
            f"k: expected the same local sequence length as q ({sq}), got {sk}: ring_attention "
            f"shards one sequence for queries and keys"
        )
    if layout == "zigzag" and sq % 2:
        raise ValueError(
            f"q: the zigzag layout needs an even local length (S={sq * world_size} divisible by "
            f"2P={2 * world_size}), got S/P={sq} with P={world_size}"
        )
    return choose_variant(variant, q.shape, k.shape, v.shape, world_size)


def block_backend(q, k, v, causal, scale, softcap, return_lse, grad, forced, ring=True):
    """(backend, Params) for one block call, chosen by the dispatcher as for `attention`.

    ring=True: the block's backward will get the whole sequence's out and lse, so backends with
    `ring_reasons` against it are passed over too (a forced one raises NoBackendError)."""
    from dataclasses import replace

    from .. import api, dispatch

    call = api._resolve(
        q, k, v, causal, scale, None, softcap, 0.0, None, None, None, None, None, return_lse, False
    )
    spec = replace(call.spec, requires_grad=bool(grad), return_lse=bool(return_lse))
    if not ring:
        return dispatch.select(spec, forced), call.params
    rows = []
    for cand in dispatch._candidates(spec, forced):  # the dispatcher's order (or the forced list)
        why = dispatch.reasons(cand, spec) or ring_reasons(cand, spec)
        if not why:
            return cand, call.params
        rows.append(f"  {cand.name}: " + "; ".join(why))
    head = f"no forced backend ({', '.join(forced)})" if forced else "no backend"
    raise dispatch.NoBackendError(f"{head} can run this ring_attention block:\n" + "\n".join(rows))


def ring_reasons(be, spec) -> list[str]:
    """Why a backend cannot run a ring block, beyond its own reasons: the ring's backward hands
    each block the out and lse of the whole sequence, so the backward must take delta and the
    probabilities from them rather than recompute the block's own forward. A backend may say so
    itself with a `ring_reasons(spec)` method; the known exceptions are listed here."""
    own = getattr(be, "ring_reasons", None)
    if callable(own):
        return list(own(spec))
    if be.name == "native" and spec.requires_grad:
        if spec.kind == "jax":
            return ["its JAX backward recomputes the forward instead of using the out and lse it "
                    "is given (a ring block gets the whole sequence's)"]
        if spec.return_lse:
            return ["its lse gradient recomputes a block-local forward (a ring block needs the "
                    "whole sequence's out and lse)"]
    return []


_takes_residual: dict[tuple[str, int], bool] = {}


def takes_residual(be) -> bool:
    """Whether a backend's backward accepts out_residual (then the ring hands it the float32
    merged output's rounding error, and its delta comes from out + residual)."""
    key = (be.name, id(be))
    if key not in _takes_residual:
        import inspect

        try:
            ok = "out_residual" in inspect.signature(be.backward).parameters
        except (TypeError, ValueError):
            ok = False
        _takes_residual[key] = bool(be.capabilities.out_residual) or ok
    return _takes_residual[key]


# -- the public call ---------------------------------------------------------------------------


def ring_attention(
    q,
    k,
    v,
    *,
    group=None,
    axis_name=None,
    layout="zigzag",
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    return_lse=False,
    backend=None,
    variant="auto",
):
    """Exact attention of this rank's queries over the whole sequence split across ranks.

    q: (B, S/P, Hq, D), k: (B, S/P, Hkv, D), v: (B, S/P, Hkv, Dv): this rank's shards in `layout`
    ("zigzag" or "contiguous", see `shard_sequence`). torch: `group` is a torch.distributed
    process group (default: the world). JAX: call inside `shard_map` with `axis_name` the mesh
    axis that splits the sequence. Returns this rank's shard of out (B, S/P, Hq, Dv), and with
    return_lse=True also lse (B, Hq, S/P) float32. Gradients flow (torch autograd, jax.grad).
    `variant`: "auto" (by size, see `explain`), "ring" or "allgather". `window` is declined.
    """
    if return_lse not in (True, False):
        raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
    kind = array_kind(q)
    if kind == "torch":
        if axis_name is not None:
            raise ValueError(f"axis_name: expected None with torch tensors (pass group=), got {axis_name!r}")
        from . import _torch as impl
    elif kind == "jax":
        if group is not None:
            raise ValueError("group: expected None with JAX arrays (pass axis_name=), got a group")
        if axis_name is None:
            raise ValueError(
                "axis_name: expected the mesh axis that splits the sequence (call ring_attention "
                "inside shard_map), got None"
            )
        from . import _jax as impl
    else:
        raise TypeError(
            f"q: expected a torch tensor (torch.distributed) or a JAX array (inside shard_map), "
            f"got {type(q).__name__}"
        )
    for name, x in zip("kv", (k, v)):
        if array_kind(x) != kind:
            raise TypeError(f"{name}: expected a {kind} array like q, got {type(x).__name__}")
    world = impl.world_size(group if kind == "torch" else axis_name)
    chosen, why = check_call(
        q, k, v, layout=layout, causal=causal, window=window, softcap=softcap,
        world_size=world, variant=variant,
    )
    from .. import dispatch

    cfg = Config(
        world_size=world, layout=layout, causal=bool(causal), scale=scale, softcap=softcap,
        return_lse=bool(return_lse), forced=dispatch.forced_backends(backend), variant=chosen, why=why,
    )
    out, lse = impl.run(q, k, v, cfg, group if kind == "torch" else axis_name)
    return (out, lse) if return_lse else out


def _stretch(x, n):
    """An array shaped like x with n rows along dim 1, for dispatch only (values unused): a
    broadcast view where the framework has one, so explain allocates nothing large."""
    shape = (x.shape[0], n) + tuple(x.shape[2:])
    kind = array_kind(x)
    if kind == "torch":
        return x[:, :1].expand(shape)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.broadcast_to(x[:, :1], shape)
    import numpy as np

    return np.broadcast_to(x[:, :1], shape)


@dataclass
class Plan:
    """What ring_attention would run: the variant and why, and the backend of each block call."""

    variant: str
    why: str
    world_size: int
    layout: str
    calls: list[tuple[str, str]]  # (description of the call, backend chosen)

    def __str__(self):
        lines = [
            f"flashmux ring_attention: {self.variant} over P={self.world_size} ranks, "
            f"layout {self.layout} ({self.why})"
        ]
        lines += [f"  {d}: {b}" for d, b in self.calls]
        return "\n".join(lines)

    __repr__ = __str__


def explain(q, k, v, *, world_size, rank=0, layout="zigzag", causal=False, scale=None,
            window=None, softcap=None, return_lse=False, backend=None, variant="auto",
            grad=True) -> Plan:
    """Say, without running anything, which variant ring_attention takes on these local shards
    and which backend the dispatcher picks for each distinct block call (on rank `rank`)."""
    from .. import dispatch

    chosen, why = check_call(
        q, k, v, layout=layout, causal=causal, window=window, softcap=softcap,
        world_size=world_size, variant=variant,
    )
    _check_world(rank, world_size)
    forced = dispatch.forced_backends(backend)
    n = int(q.shape[1])
    calls = []
    if chosen == "ring":
        seen = {}
        for s in range(world_size):
            src = (rank - s) % world_size
            blk = ring_block(layout, causal, rank, src)
            if blk is None or blk in seen:
                continue
            qs, ks = q[:, rows(blk.q, n)], k[:, rows(blk.k, n)]
            be, _ = block_backend(qs, ks, v[:, rows(blk.k, n)], blk.causal, scale, softcap,
                                  return_lse, grad, forced)
            seen[blk] = be.name
            calls.append((f"queries {blk.q} x keys {blk.k}"
                          f"{' causal' if blk.causal else ''} ({qs.shape[1]}x{ks.shape[1]})", be.name))
    else:
        for r0, r1, nk, c in allgather_calls(layout, causal, world_size, rank, n):
            qs = q[:, r0:r1]
            kk, vv = _stretch(k, nk), _stretch(v, nk)
            be, _ = block_backend(qs, kk, vv, c, scale, softcap, return_lse, grad, forced, ring=False)
            calls.append((f"local rows {r0}:{r1} x keys 0:{nk}{' causal' if c else ''}", be.name))
    return Plan(chosen, why, world_size, layout, calls)


__all__ = [
    "Block",
    "LAYOUTS",
    "Plan",
    "VARIANTS",
    "allgather_calls",
    "choose_variant",
    "explain",
    "layout_chunks",
    "merge",
    "ring_attention",
    "ring_block",
    "shard_sequence",
    "unshard_sequence",
]
