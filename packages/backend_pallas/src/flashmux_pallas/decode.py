"""KV-cache decode (split-KV, Flash-Decoding) as a Pallas kernel: Triton lowering on NVIDIA GPUs,
interpret mode on the CPU.

One program per (key split x row block, KV head, sequence). Its rows are the Sq query positions
x the G = Hq/Hkv query heads sharing the KV head (row r = i * G + g, padded to a block of at
least 16 rows for the tensor cores), so every byte of K and V a split covers is read once for
the whole group. The program streams its share of the sequence's keys in blocks of `block_n`
keys (contiguous cache: a clamped slice of the sequence's rows; paged cache: a slice of one page
looked up in the block table), with a float32 online softmax in base 2. One split: the program
writes out and lse itself. Several: each writes a float32 partial output and its lse, merged by
lse in a short XLA epilogue.

Nothing reads a device value on the host: seqlens_k and the block table are kernel inputs, the
split boundaries are computed inside the kernel, so the call traces under jax.jit (with donated
caches the caller's append and this read happen in place). seqlens_k is clamped to the cache's
capacity and block-table entries to [0, num_pages); a contiguous block that would run past S_max
is shifted back (clamped start) and its already-seen keys masked, so no read leaves the arrays.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

from ._compat import block_spec, out_struct, pallas, triton_params
from .ops import _next_pow2
from .triton_kernels import LN2, LOG2E, _exp2

# GPU programs per SM the split heuristic aims at, and the fewest keys worth a split.
_PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeStatic:
    """Everything the decode kernel is specialised on (hashable: part of the compile key)."""

    scale: float
    window_left: int | None
    window_right: int | None
    softcap: float | None
    alibi: bool
    paged: bool
    group: int  # Hq // Hkv
    seqlen_q: int
    rows: int  # seqlen_q * group (real rows)
    block_m: int  # rows per program (padded)
    block_n: int  # keys per tile
    pages_per_step: int  # paged: tiles (each within one page) per loop trip
    num_splits: int
    capacity: int  # S_max or max_pages * page_size
    page_size: int
    num_pages: int
    max_pages: int
    num_warps: int
    num_stages: int
    interpret: bool
    f32: bool
    fast_exp: bool


_override: list[dict] = []


@contextlib.contextmanager
def tuning(**kw):
    """Force plan() fields for tuning runs (read at trace time): block_m, block_n, num_warps,
    num_stages, fast_exp, pages_per_step (paged), or programs_per_sm (the
    split target)."""
    _override.append(kw)
    try:
        yield
    finally:
        _override.pop()


_TUNING_FIELDS = ("block_m", "block_n", "num_warps", "num_stages", "fast_exp", "pages_per_step",
                  "programs_per_sm", "waves", "mosaic", "consumers", "mosaic_min_keys")


def _env_override() -> dict:
    """FLASHMUX_PALLAS_DECODE="pages_per_step=16,num_warps=4,...": the `tuning` fields for
    a whole process (benchmark runs); the fields a `tuning` block names take precedence."""
    import os

    text = os.environ.get("FLASHMUX_PALLAS_DECODE", "").strip()
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in _TUNING_FIELDS:
            raise ValueError(f"FLASHMUX_PALLAS_DECODE: unknown field {name!r} in {text!r} "
                             f"(known: {', '.join(_TUNING_FIELDS)})")
        out[name] = int(val)
    return out


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def gpu_reasons(spec) -> list[str]:
    """What the Triton lowering of the decode kernel cannot take (interpret mode takes all)."""
    out = []
    for name, d in (("head_dim", spec.head_dim), ("head_dim_v", spec.head_dim_v)):
        if d < 16 or d & (d - 1):
            out.append(
                f"{name} {d}: the Pallas decode kernel on GPU needs a power of two >= 16 "
                "(the cache is read in place, never padded)"
            )
    if spec.paged and spec.page_size % 16:
        out.append(
            f"page_size {spec.page_size}: the Pallas decode kernel on GPU needs a multiple of 16 "
            "(key blocks of at least 16 rows within one page)"
        )
    return out


def choose_splits(
    batch: int, heads_kv: int, row_blocks: int, capacity: int, cores: int, per_sm: int = 0
) -> int:
    """Key splits when the caller does not force them: enough programs for about
    _PROGRAMS_PER_SM per SM, no split shorter than MIN_KEYS_PER_SPLIT keys of the capacity
    (the real lengths stay on the device), at most MAX_SPLITS."""
    programs = max(1, batch * heads_kv * row_blocks)
    want = -(-(per_sm or _PROGRAMS_PER_SM) * max(cores, 1) // programs)
    by_len = max(1, capacity // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def whole_wave_splits(batch: int, heads_kv: int, row_blocks: int, capacity: int, cores: int,
                      block_n: int, head_dim: int, itemsize: int, stages: int,
                      waves: int) -> int:
    """Splits that fill `waves` whole waves (session 8, `waves` tuning field): the programs
    that fit the GPU at once are SMs x programs per SM, estimated from the pipeline's K/V
    buffers ((stages - 1) tiles of block_n keys of K and V, plus ~8 KiB; at most 4 per SM), and
    the splits are the most that keep every program in those waves."""
    smem = max(1, stages - 1) * block_n * 2 * head_dim * itemsize + 8 * 1024
    per_sm = max(1, min(4, (227 * 1024) // smem))
    programs = max(1, batch * heads_kv * row_blocks)
    want = (waves * per_sm * max(cores, 1)) // programs
    by_len = max(1, capacity // MIN_KEYS_PER_SPLIT)
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def _core_count(default: int = 132) -> int:
    try:
        import jax

        n = getattr(jax.devices()[0], "core_count", None)
        return int(n) if n else default
    except Exception:
        return default


def plan(spec_or_shapes, params, interpret: bool, cores: int | None = None) -> DecodeStatic:
    """The kernel's static configuration for a decode call. `spec_or_shapes` is a DecodeSpec or
    any object with batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, paged, page_size,
    dtype (and num_pages / max_pages for a paged cache, when known)."""
    s = spec_or_shapes
    group = s.heads_q // s.heads_kv
    rows = s.seqlen_q * group
    if interpret:
        bm_cap, bn_cap, warps, stages = 16, 16, 4, 1
    else:
        bm_cap, bn_cap, warps, stages = 64, (64 if s.head_dim >= 256 else 128), 4, 2
    ov = {**_env_override(), **(_override[-1] if _override else {})}
    import jax.numpy as jnp

    if not interpret and not s.paged and jnp.dtype(s.dtype).itemsize == 2:
        # contiguous 16-bit caches: 3 stages and splits filling one whole wave (2 x 64 programs
        # at B8 Hkv8 on 132 SMs). H200 (jax 0.11.2, B8 Hq32 Hkv8 D128 bf16 Sq1, NOTES.md
        # "Decode, session 9"): call s9b 1.35x / 1.05x / 1.01x JAX cuDNN at 4k / 32k / 128k
        # (2 stages x 9 splits: 1.21x / 0.97x / 0.95x). Paged caches keep 2 stages x ~4
        # programs per SM: with this config 16- / 64-token pages read 2395 / 3449 GB/s at 32k
        # (s9b), against 3514 / 3991 with the old one (session 5)
        stages = 3
        ov = {"waves": 1, **ov}
    bm_cap, bn_cap = ov.get("block_m", bm_cap), ov.get("block_n", bn_cap)
    warps, stages = ov.get("num_warps", warps), ov.get("num_stages", stages)
    block_m = max(16, min(bm_cap, _next_pow2(rows)))
    row_blocks = -(-rows // block_m)
    if s.paged:
        block_n = _pow2_divisor(s.page_size, bn_cap)
    else:
        block_n = min(bn_cap, max(1, 1 << (max(s.capacity, 1).bit_length() - 1)))
    if not interpret:
        block_n = max(16, block_n)
    # Small pages: several page tiles per loop trip, so a trip streams about bn_cap keys.
    pages = max(1, bn_cap // block_n) if s.paged else 1
    pages = ov.get("pages_per_step", pages) if s.paged else 1
    ns = params.num_splits
    if ns is None:
        if interpret:
            ns = 1
        elif ov.get("waves"):
            ns = whole_wave_splits(
                s.batch, s.heads_kv, row_blocks, s.capacity, cores or _core_count(), block_n * pages,
                s.head_dim, jnp.dtype(s.dtype).itemsize, stages, ov["waves"])
        else:
            ns = choose_splits(
                s.batch,
                s.heads_kv,
                row_blocks,
                s.capacity,
                cores or _core_count(),
                ov.get("programs_per_sm", 0),
            )

    return DecodeStatic(
        scale=float(params.scale),
        window_left=params.window_left,
        window_right=params.window_right,
        softcap=float(params.softcap) if params.softcap else None,
        alibi=bool(params.alibi),
        paged=bool(s.paged),
        group=group,
        seqlen_q=s.seqlen_q,
        rows=rows,
        block_m=block_m,
        block_n=block_n,
        pages_per_step=pages,
        num_splits=int(ns),
        capacity=int(s.capacity),
        page_size=int(s.page_size),
        num_pages=int(getattr(s, "num_pages", 0) or 0),
        max_pages=int(getattr(s, "max_pages", 0) or 0),
        num_warps=warps,
        num_stages=stages,
        interpret=interpret,
        f32=jnp.dtype(s.dtype) == jnp.float32,
        fast_exp=ov.get("fast_exp", True) and not interpret,
    )


# ----------------------------------------------------------------------------- the kernel


def _decode_kernel(*refs, st: DecodeStatic):
    import jax.numpy as jnp
    from jax import lax

    pl = pallas()
    it = iter(refs)
    q_ref, k_ref, v_ref, len_ref = next(it), next(it), next(it), next(it)
    bt_ref = next(it) if st.paged else None
    sl_ref = next(it) if st.alibi else None
    o_ref, lse_ref = next(it), next(it)

    bm, bn, G, ns = st.block_m, st.block_n, st.group, st.num_splits
    pid = pl.program_id(0)
    # Row blocks of one split are neighbours in launch order (they read the same keys: L2 hits).
    nrb = -(-st.rows // bm)
    split = lax.div(pid, jnp.int32(nrb)) if ns > 1 else jnp.int32(0)
    rb = lax.rem(pid, jnp.int32(nrb)) if ns > 1 else pid
    r0 = rb * bm

    sk = jnp.minimum(jnp.maximum(jnp.max(len_ref[...]), 0), st.capacity).astype(jnp.int32)
    off = sk - st.seqlen_q
    rows = r0 + jnp.arange(bm, dtype=jnp.int32)[:, None]  # (bm, 1)
    row_ok = rows < st.rows
    pos = off + lax.div(rows, jnp.int32(G))  # query position of each row

    # Keys any row of this block may see, cut into splits of whole key blocks.
    i_first = lax.div(r0, jnp.int32(G))
    i_last = jnp.minimum(lax.div(r0 + (bm - 1), jnp.int32(G)), st.seqlen_q - 1)
    lo = jnp.int32(0)
    hi = sk
    if st.window_left is not None:
        lo = jnp.clip(off + i_first - st.window_left, 0, sk)
    if st.window_right is not None:
        hi = jnp.clip(off + i_last + st.window_right + 1, lo, sk)
    hi = jnp.maximum(hi, lo)
    P = st.pages_per_step if st.paged else 1
    step = bn * P  # keys per loop trip: P tiles of bn keys (paged: each within one page)
    lo_al = lax.div(lo, jnp.int32(step)) * step
    per = lax.div(hi - lo_al + (ns - 1), jnp.int32(ns))
    chunk = lax.div(per + (step - 1), jnp.int32(step)) * step
    k_begin = jnp.minimum(lo_al + split * chunk, hi)
    k_end = jnp.minimum(k_begin + chunk, hi)
    nblocks = lax.div(k_end - k_begin + (step - 1), jnp.int32(step))

    q = q_ref[...]
    if st.softcap:
        q_mult, cap2 = st.scale / st.softcap, st.softcap * LOG2E
    else:
        q_mult, cap2 = st.scale * LOG2E, None
    slopes = sl_ref[...].astype(jnp.float32)[:, None] * LOG2E if st.alibi else None
    prec = lax.Precision.HIGHEST if st.f32 else None
    dv = o_ref.shape[-1]

    def page_of(start):
        """The (clamped) page of the tile at `start`: a scalar load of the block table."""
        pi = jnp.minimum(lax.div(start, jnp.int32(st.page_size)), st.max_pages - 1)
        return jnp.clip(bt_ref[pi], 0, st.num_pages - 1)

    def tile(start):
        """K, V and masked base-2 scores of the bn keys from `start`."""
        if st.paged:
            # start is a multiple of bn and bn divides page_size: the tile lies in one page.
            # Tiles past the sequence (a step's tail) read a clamped page, fully masked.
            page = page_of(start)
            slot = pl.multiple_of(lax.rem(start, jnp.int32(st.page_size)), bn)
            k = k_ref[page, pl.ds(slot, bn), :]
            v = v_ref[page, pl.ds(slot, bn), :]
            c0 = start
        else:
            c0 = jnp.minimum(start, st.capacity - bn)  # never past S_max (block shifted back)
            k = k_ref[pl.ds(c0, bn), :]
            v = v_ref[pl.ds(c0, bn), :]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
        if cap2 is not None:
            s = jnp.tanh(s * q_mult) * cap2
        else:
            s = s * q_mult
        cols = c0 + jnp.arange(bn, dtype=jnp.int32)[None, :]
        if slopes is not None:
            s = s - slopes * jnp.abs(pos - cols).astype(jnp.float32)
        ok = row_ok & (cols >= start) & (cols < k_end)
        if st.window_left is not None:
            ok = ok & (cols >= pos - st.window_left)
        if st.window_right is not None:
            ok = ok & (cols <= pos + st.window_right)
        return jnp.where(ok, s, -jnp.inf), v

    def body(t, carry):
        acc, m, l = carry
        start = k_begin + t * step
        # all P tiles' loads, then the math
        tiles = [tile(start + j * bn) for j in range(P)]
        m_new = m
        for s, _ in tiles:
            m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        acc = acc * alpha[:, None]
        l = l * alpha
        for s, v in tiles:
            p = _exp2(s - m_use[:, None], st)
            l = l + jnp.sum(p, axis=1)
            acc = acc + lax.dot_general(
                p.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                precision=prec,
                preferred_element_type=jnp.float32,
            )
        return acc, m_new, l

    carry = (
        jnp.zeros((bm, dv), jnp.float32),
        jnp.full((bm,), -jnp.inf, jnp.float32),
        jnp.zeros((bm,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, nblocks, body, carry)
    empty = l == 0.0
    inv = 1.0 / jnp.where(empty, 1.0, l)
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)


def _call(st: DecodeStatic, qp, k_cache, v_cache, lens, bt, slopes):
    """pallas_call over the packed q (B, Hkv, Rp, D). Returns (out, lse) packed: with one
    split (B, Hkv, Rp, Dv) in q's dtype and (B, Hkv, Rp); with several, float32 partials with a
    leading split axis."""
    import jax.numpy as jnp

    pl = pallas()
    B, Hkv, Rp, D = qp.shape
    Dv = v_cache.shape[-1]
    bm, ns = st.block_m, st.num_splits
    nrb = Rp // bm
    grid = (ns * nrb, Hkv, B)

    def rb(p):
        return p % nrb if ns > 1 else p

    in_specs = [block_spec((None, None, bm, D), lambda p, h, b: (b, h, rb(p), 0))]
    if st.paged:
        NP, PS = k_cache.shape[0], k_cache.shape[1]
        in_specs += [
            block_spec((NP, PS, None, D), lambda p, h, b: (0, 0, h, 0)),
            block_spec((NP, PS, None, Dv), lambda p, h, b: (0, 0, h, 0)),
        ]
    else:
        S = k_cache.shape[1]
        in_specs += [
            block_spec((None, S, None, D), lambda p, h, b: (b, 0, h, 0)),
            block_spec((None, S, None, Dv), lambda p, h, b: (b, 0, h, 0)),
        ]
    in_specs.append(block_spec((None, 16), lambda p, h, b: (b, 0)))
    args = [qp, k_cache, v_cache, lens]
    if st.paged:
        in_specs.append(block_spec((None, bt.shape[1]), lambda p, h, b: (b, 0)))
        args.append(bt)
    if st.alibi:
        in_specs.append(block_spec((None, None, bm), lambda p, h, b: (b, h, rb(p))))
        args.append(slopes)
    if ns == 1:
        out_specs = [
            block_spec((None, None, bm, Dv), lambda p, h, b: (b, h, p, 0)),
            block_spec((None, None, bm), lambda p, h, b: (b, h, p)),
        ]
        out_shape = [
            out_struct((B, Hkv, Rp, Dv), qp.dtype, qp),
            out_struct((B, Hkv, Rp), jnp.float32, qp),
        ]
    else:
        out_specs = [
            block_spec((None, None, None, bm, Dv), lambda p, h, b: (p // nrb, b, h, p % nrb, 0)),
            block_spec((None, None, None, bm), lambda p, h, b: (p // nrb, b, h, p % nrb)),
        ]
        out_shape = [
            out_struct((ns, B, Hkv, Rp, Dv), jnp.float32, qp),
            out_struct((ns, B, Hkv, Rp), jnp.float32, qp),
        ]
    return pl.pallas_call(
        functools.partial(_decode_kernel, st=st),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if st.interpret else triton_params(st.num_warps, st.num_stages),
        interpret=st.interpret,
        name="flashmux_decode",
    )(*args)


def _merge(o_part, lse_part, dtype):
    """Merge split partials by lse (XLA): (ns, ...) -> (...)."""
    import jax.numpy as jnp

    mx = jnp.max(lse_part, axis=0)
    safe = jnp.where(jnp.isneginf(mx), 0.0, mx)
    w = jnp.exp(lse_part - safe[None])  # exp(-inf) = 0 for empty splits
    tot = jnp.sum(w, axis=0)
    empty = tot == 0.0
    lse = jnp.where(empty, -jnp.inf, safe + jnp.log(jnp.where(empty, 1.0, tot)))
    wn = w / jnp.where(empty, 1.0, tot)[None]
    out = jnp.sum(o_part * wn[..., None], axis=0)
    return out.astype(dtype), lse


@dataclass(frozen=True)
class _Shapes:
    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    head_dim: int
    capacity: int
    paged: bool
    page_size: int
    dtype: object
    num_pages: int
    max_pages: int


def shapes_of(q, k_cache, block_table) -> _Shapes:
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    if paged:
        NP, PS = k_cache.shape[0], k_cache.shape[1]
        MP = block_table.shape[1]
        cap = MP * PS
    else:
        NP = MP = PS = 0
        cap = k_cache.shape[1]
    return _Shapes(B, Sq, Hq, k_cache.shape[2], D, cap, paged, PS, q.dtype, NP, MP)


def decode(q, k_cache, v_cache, seqlens_k, block_table, alibi_slopes, params, interpret: bool):
    """(out (B, Sq, Hq, Dv) in q's dtype, lse (B, Hq, Sq) float32); see the module docstring."""
    import jax.numpy as jnp

    sh = shapes_of(q, k_cache, block_table)
    if not interpret and _mosaic_wanted(q, k_cache, v_cache, sh, params, alibi_slopes):
        from . import decode_mosaic

        ov = {**_env_override(), **(_override[-1] if _override else {})}
        # paged caches: two consumer warpgroups unless told otherwise (the configuration the
        # page bars were measured with, NOTES.md "Decode, session 10")
        nc = ov.get("consumers", MOSAIC_PAGED_CONSUMERS if sh.paged else 0)
        return decode_mosaic.decode(q, k_cache, v_cache, seqlens_k, params, _core_count(),
                                    block_table=block_table, block_n=ov.get("block_n", 0),
                                    stages=ov.get("num_stages", 0),
                                    consumers=nc)
    st = plan(sh, params, interpret)
    B, Sq, Hq, D = q.shape
    Hkv, G = sh.heads_kv, st.group
    Dv = v_cache.shape[-1]
    R = Sq * G
    Rp = -(-R // st.block_m) * st.block_m
    if not sh.paged and sh.capacity < st.block_n:  # a cache shorter than one key block (tiny)
        pad = [(0, 0), (0, st.block_n - sh.capacity), (0, 0), (0, 0)]
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
        st = replace(st, capacity=st.block_n)
        # the real capacity still clamps the lengths: the padded keys are never valid
        seqlens_k = jnp.minimum(seqlens_k, sh.capacity)
    # q (B, Sq, Hq, D) -> (B, Hkv, Sq*G, D) rows r = i*G + g, padded to Rp rows.
    qp = q.reshape(B, Sq, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
    if Rp != R:
        qp = jnp.pad(qp, [(0, 0), (0, 0), (0, Rp - R), (0, 0)])
    lens = jnp.broadcast_to(seqlens_k.astype(jnp.int32).reshape(B, 1), (B, 16))
    bt = block_table.astype(jnp.int32) if sh.paged else None
    slopes = None
    if alibi_slopes is not None:
        sl = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, Hq), (B, Hq))
        # per packed row: slope of head hk*G + g for row r = i*G + g
        sl = sl.reshape(B, Hkv, 1, G)
        sl = jnp.broadcast_to(sl, (B, Hkv, Sq, G)).reshape(B, Hkv, R)
        slopes = jnp.pad(sl, [(0, 0), (0, 0), (0, Rp - R)]) if Rp != R else sl
    o, lse = _call(st, qp, k_cache, v_cache, lens, bt, slopes)
    if st.num_splits > 1:
        o, lse = _merge(o, lse, q.dtype)
    o = o[:, :, :R].reshape(B, Hkv, Sq, G, Dv).transpose(0, 2, 1, 3, 4).reshape(B, Sq, Hq, Dv)
    lse = lse[:, :, :R].reshape(B, Hkv, Sq, G).transpose(0, 1, 3, 2).reshape(B, Hq, Sq)
    return o, lse


# The Mosaic GPU decode kernel by default on sm90 (when in its scope)? The `mosaic` tuning field
# (FLASHMUX_PALLAS_DECODE=mosaic=0/1) overrides both. Contiguous caches: off (session 9, H200:
# equal to the Triton lowering's 3-stage default at 32k / 128k, slower at 4k). Paged caches: on
# (session 10): the Triton lowering's paged kernel read 16- / 64-token pages at 0.82x / 0.91x
# (32k) and 0.73x / 0.90x (128k) of the contiguous default, the Mosaic kernel with two consumer
# warpgroups 0.96x / 1.00x at 32k (call s9c). The Triton lowering stays the fallback (sm80,
# page sizes it cannot take, window / softcap / ALiBi, float32, jax older than MOSAIC_MIN_JAX).
MOSAIC_DEFAULT = 0
MOSAIC_PAGED_DEFAULT = 1
MOSAIC_PAGED_CONSUMERS = 2
# paged caches holding fewer keys per sequence than this (max_pages x page_size) keep the Triton
# lowering by default (the `mosaic_min_keys` tuning field overrides); 0: Mosaic at every size
MOSAIC_PAGED_MIN_KEYS = 0
# the oldest jax the Mosaic decode kernel ran on a GPU with (0.11.2, H200; 0.10's Mosaic GPU
# layout inference differs, and its compiled kernel was never run)
MOSAIC_MIN_JAX = (0, 11)


def _jax_version() -> tuple[int, ...]:
    import jax

    out = []
    for part in jax.__version__.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def mosaic_choice(q_shape, k_shape, v_shape, dtype, paged: bool, params, alibi: bool,
                  cc=None, capacity: int = 0) -> tuple[bool, str]:
    """(whether a GPU decode call takes the Mosaic GPU kernel, a sentence saying why or why
    not) for explain() and decode(). Shapes and dtypes only: callable with a DecodeSpec.
    capacity: keys one sequence can hold (paged: max_pages x page_size; 0 = unknown)."""
    from . import decode_mosaic, mosaic_kernels, ops

    ov = {**_env_override(), **(_override[-1] if _override else {})}
    default = MOSAIC_PAGED_DEFAULT if paged else MOSAIC_DEFAULT
    want = ov.get("mosaic", default)
    kind = "paged" if paged else "contiguous"
    if not want:
        if "mosaic" in ov:
            return False, "the Mosaic GPU decode kernel is switched off (mosaic=0)"
        return False, (f"Triton lowering: the default for {kind} caches (the Mosaic GPU decode "
                       "kernel is opt-in there: mosaic=1)")
    min_keys = ov.get("mosaic_min_keys", MOSAIC_PAGED_MIN_KEYS) if paged else 0
    if "mosaic" not in ov and capacity and capacity < min_keys:
        return False, (f"Triton lowering: the default for paged caches shorter than {min_keys} "
                       f"keys per sequence (this one holds {capacity})")
    cc = ops._compute_capability() if cc is None else cc
    if cc is None or cc[0] != 9:
        here = "unknown" if cc is None else f"sm{cc[0]}{cc[1]}"
        return False, ("Triton lowering: the Mosaic GPU decode kernel needs an sm90 (Hopper) "
                       f"GPU, this is {here}")
    if not mosaic_kernels.available():
        return False, "Triton lowering: this jax has no usable Mosaic GPU (plgpu) module"
    # the version floor holds for the default; mosaic=1 forces the kernel on any jax
    if "mosaic" not in ov and _jax_version() < MOSAIC_MIN_JAX:
        return False, ("Triton lowering: the Mosaic GPU decode kernel needs jax >= "
                       f"{'.'.join(map(str, MOSAIC_MIN_JAX))} (ran on 0.11.2), this is "
                       f"{'.'.join(map(str, _jax_version()))}")
    why = decode_mosaic.reasons(q_shape, k_shape, v_shape, dtype, paged, params)
    if alibi:
        why = why + ["ALiBi"]
    if why:
        return False, ("Triton lowering: outside the Mosaic GPU decode kernel's scope ("
                       + "; ".join(why) + ")")
    return True, (f"Mosaic GPU kernel (TMA + wgmma) for {kind} caches on sm90"
                  + ("" if "mosaic" not in ov else ", forced by mosaic=1"))


def mosaic_choice_for_spec(spec, params) -> tuple[bool, str]:
    """mosaic_choice for a DecodeSpec (explain): the shapes the call's arrays have."""
    q_shape = (spec.batch, spec.seqlen_q, spec.heads_q, spec.head_dim)
    if spec.paged:
        k_shape = (1, spec.page_size, spec.heads_kv, spec.head_dim)
        v_shape = (1, spec.page_size, spec.heads_kv, spec.head_dim_v)
    else:
        k_shape = (spec.batch, spec.capacity, spec.heads_kv, spec.head_dim)
        v_shape = (spec.batch, spec.capacity, spec.heads_kv, spec.head_dim_v)
    cc = tuple(spec.compute_capability) if spec.compute_capability else None
    return mosaic_choice(q_shape, k_shape, v_shape, spec.dtype, spec.paged, params,
                         bool(spec.alibi), cc=cc, capacity=spec.capacity)


def _mosaic_wanted(q, k_cache, v_cache, sh, params, alibi_slopes) -> bool:
    """The Mosaic GPU kernel (decode_mosaic.py) on sm90 when asked for (the `mosaic` tuning
    field, else MOSAIC_DEFAULT / MOSAIC_PAGED_DEFAULT) and the call is in its scope."""
    return mosaic_choice(q.shape, k_cache.shape, v_cache.shape, q.dtype, sh.paged, params,
                         alibi_slopes is not None, capacity=sh.capacity)[0]


def decode_mosaic_reasons(q, k_cache, v_cache, params, paged: bool) -> list[str]:
    """Why a call stays off the Mosaic GPU decode kernel (tests, explain)."""
    from . import decode_mosaic

    return decode_mosaic.reasons(q.shape, k_cache.shape, v_cache.shape, q.dtype, paged, params)


def splits_for(spec, params, interpret: bool) -> int:
    """The number of key splits `decode` runs for this call (explain)."""
    if not interpret and getattr(spec, "device_type", "cuda") == "cuda":
        mosaic, _ = mosaic_choice_for_spec(spec, params)
        if mosaic:
            from . import decode_mosaic

            ov = {**_env_override(), **(_override[-1] if _override else {})}
            nc = ov.get("consumers", MOSAIC_PAGED_CONSUMERS if spec.paged else 0)
            return decode_mosaic.plan(
                spec.batch, spec.seqlen_q, spec.heads_q, spec.heads_kv, spec.head_dim,
                spec.capacity, params, _core_count(), block_n=ov.get("block_n", 0),
                stages=ov.get("num_stages", 0), page_size=spec.page_size if spec.paged else 0,
                consumers=nc).num_splits
    return plan(spec, params, interpret).num_splits


__all__ = ["decode", "plan", "gpu_reasons", "choose_splits", "splits_for"]
