"""Block masks on Hopper through Pallas' Mosaic GPU lowering (issue 15): the dense Mosaic forward
(mosaic_kernels.py: 2 consumer warpgroups x 64 query rows, a TMA producer warpgroup, a K/V ring,
wgmma, ping-pong) with its key loop replaced by a walk over the query block's listed key blocks.

- One CTA per (query head, 128-row mask block, batch entry): both consumers walk the same list,
  so the producer streams each listed K/V tile once for the 128 rows. The list is one int32 row
  per (mask batch, mask head, query block): full tiles first, then partial ones, with the two
  counts and each partial tile's bitmask id beside it (`walk_operands`, built in XLA from the
  BlockMask's own lists: a few small ops per call, no S x S array). Key blocks reach the TMA
  copies as a leading index of K/V viewed as (B, nK, 128, Hkv, D) (a free reshape), read with
  one scalar load per tile by the producer. Empty tiles are never loaded.
- Full tiles run the dense kernel's unmasked step. Partial tiles also copy their bitmask (2 KiB:
  four 32-key words per row, rearranged per consumer so that each word column is one (64,) row
  vector) beside K and V; the consumer selects each column's word and bit: ~5 integer ops per
  score element on partial tiles only. The bitmask, not mask_fn traced in the kernel: mask_fn may
  close over arrays (document ids), which a Mosaic GPU kernel cannot gather per element; the
  bitmask serves every mask, custom ones included, and is the same the Triton-lowered kernels
  (blocksparse.py) read, so both agree bit for bit on which elements are allowed.
- causal on top of the mask (bottom-right) and ragged lengths: `walk_operands` drops tiles that
  causal empties, and turns full tiles that the diagonal or the last key block's end cut into
  partial ones with an all-ones (or all-ones up to Sk) bitmask; partial tiles then apply causal
  by an index compare (static flag). Query rows are padded to a multiple of 128 (the padding
  rows are computed and dropped).
- ALiBi (static flag): -slope * |i + off - j| added in log2 units in the softmax's FMA, on every
  tile (3 ops per element); the dense ALiBi call can take this kernel with an all-full walk.
- Rows that see nothing: out 0, lse -inf (the running max is guarded on partial steps).

Scope: float16/bfloat16, head_dim 64 or 128 (Dv == D), mask block_size 128, scale > 0, no
window / softcap / dropout (those take the Triton lowering, blocksparse.py). Forward only: the
backward of a block-masked call stays on the Triton lowering (blocksparse.py's dQ and dK/dV);
out and lse are those of the blocksparse forward, so its backward serves both.

`interpret`: Mosaic GPU's interpreter on the CPU (tests): wgmma becomes lax.dot_general and the
layout hints plain ops, as in decode_mosaic.py.
"""

from __future__ import annotations

from dataclasses import dataclass

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK = 128  # mask block = CTA rows (2 consumers x 64) = key tile
BQ = 64


@dataclass(frozen=True)
class MaskPlan:
    causal: bool
    alibi: bool
    scale: float
    seqlen_q: int  # the call's (unpadded) lengths: off = Sk - Sq
    seqlen_k: int
    stages: int = 2
    pingpong: bool = True
    dense: bool = False  # an all-full walk (dense ALiBi): key block i is step i, no list read
    reverse: bool = True  # query blocks launched last-first (the heavy rows of causal-like masks)


def reasons(q, k, v, params, block_size: int) -> list[str]:
    """Why this call cannot take the Mosaic GPU block-mask forward (empty when it can)."""
    import jax.numpy as jnp

    out = []
    if q.ndim != 4:
        out.append("varlen")
        return out
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        out.append(f"dtype {jnp.dtype(q.dtype).name} (fp16/bf16 only)")
    if q.shape[-1] not in (64, 128) or v.shape[-1] != q.shape[-1]:
        out.append(f"head_dim {q.shape[-1]}/{v.shape[-1]} (64 or 128, Dv == D)")
    if block_size != BLOCK:
        out.append(f"mask block_size {block_size} (the Mosaic kernel takes {BLOCK})")
    if params.has_window or params.softcap or params.dropout_p or params.varlen:
        out.append("window/softcap/dropout")
    if not params.scale > 0:
        out.append("scale <= 0")
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def lists_walk(nf, npart, full, part, tile):
    """A BlockMask's full-then-partial lists as one walk (walk_operands and the backward's
    walk_operands_t): walk[..., t] = full[t] for t < nf, else part[t - nf] (clipped to the n
    blocks of the lists' last axis), cnt = [nf, npart] on a new last axis, ptid = each entry's
    bitmask id from `tile` (indexed like the lists' rows; >= 0). All int32."""
    import jax.numpy as jnp

    i32 = jnp.int32
    nf, npart, full, part, tile = (jnp.asarray(x).astype(i32)
                                   for x in (nf, npart, full, part, tile))
    n = full.shape[-1]
    t = jnp.arange(n, dtype=i32)
    pidx = jnp.clip(t - nf[..., None], 0, n - 1)
    walk = jnp.where(t < nf[..., None], full, jnp.take_along_axis(part, pidx, axis=-1))
    walk = jnp.clip(walk, 0, n - 1)
    ptid = jnp.maximum(jnp.take_along_axis(tile, walk, axis=-1), 0)
    return walk, jnp.stack([nf, npart], axis=-1), ptid


def walk_operands(bm, sq: int, sk: int, causal: bool, from_kind: bool = False):
    """(walk, cnt, ptid, bits) from a BlockMask (block_size 128):
    walk (Bm, Hm, nQ, nK) int32: per query block its listed key blocks, full first, then partial
    (ascending each; the rest is padding); cnt (Bm, Hm, nQ, 2): [num_full, num_part]; ptid
    (Bm, Hm, nQ, nK): each partial entry's bitmask id; bits (nP + 2, 2, 4, 64) int32: each
    partial tile's words as [consumer, word, row], then an all-ones tile and an all-ones tile up
    to Sk's last block. With causal or a ragged Sk the lists are re-derived from `kind`."""
    import jax.numpy as jnp

    i32 = jnp.int32
    nq, nk = bm.num_q_blocks, bm.num_kv_blocks
    bits = jnp.asarray(bm.bits).astype(i32)  # (nP, 128, 4)
    n_p = int(bits.shape[0])
    ones_id, ragged_id = n_p, n_p + 1
    tail = sk - (nk - 1) * BLOCK  # keys of the last key block, 1..128
    col = jnp.arange(BLOCK, dtype=i32)
    word_of = (col // 32)[None, :] == jnp.arange(4, dtype=i32)[:, None]  # (4, 128)
    lim_bits = jnp.where(word_of & (col[None, :] < tail), jnp.left_shift(i32(1), col % 32), 0)
    ragged_words = jnp.sum(lim_bits, axis=1, dtype=i32)  # (4,) (bits are disjoint: sum == or)
    extra = jnp.stack([jnp.full((BLOCK, 4), -1, i32),
                       jnp.broadcast_to(ragged_words[None, :], (BLOCK, 4))])
    bits = jnp.concatenate([bits, extra], axis=0)
    bits = bits.reshape(n_p + 2, 2, BQ, 4).transpose(0, 1, 3, 2)  # [tile, consumer, word, row]

    ragged_k = tail != BLOCK
    if not causal and not ragged_k and not from_kind:  # the BlockMask's lists, full then partial
        return (*lists_walk(bm.q_num_full, bm.q_num_part, bm.q_full_idx, bm.q_part_idx,
                            bm.tile_id), bits)

    kind = jnp.asarray(bm.kind).astype(i32)  # (Bm, Hm, nQ, nK)
    tile = jnp.asarray(bm.tile_id).astype(i32)
    qb = jnp.arange(nq, dtype=i32)[:, None]
    kb = jnp.arange(nk, dtype=i32)[None, :]
    full = kind == 1
    part = kind == 2
    tid = jnp.where(part, tile, ones_id)
    if ragged_k:  # a full last key block holds padding keys: a partial tile up to Sk
        last = (kb == nk - 1) & full
        tid = jnp.where(last, ragged_id, tid)
        part = part | last
        full = full & ~last
    if causal:
        off = sk - sq
        r_first = qb * BLOCK
        r_last = jnp.minimum(qb * BLOCK + BLOCK - 1, sq - 1)
        dead = kb * BLOCK > r_last + off  # no key of the tile is allowed to any row
        cut = kb * BLOCK + BLOCK - 1 > r_first + off  # the diagonal crosses it
        part = (part | (full & cut)) & ~dead  # a cut full tile keeps its all-ones id
        full = full & ~cut
    cls = jnp.where(full, 0, jnp.where(part, 1, 2))
    order = jnp.argsort(cls * nk + kb, axis=-1).astype(i32)  # full, partial, then the rest
    walk = order
    ptid = jnp.take_along_axis(jnp.broadcast_to(tid, kind.shape), walk, axis=-1)
    cnt = jnp.stack([jnp.sum(full, axis=-1, dtype=i32), jnp.sum(part, axis=-1, dtype=i32)],
                    axis=-1)
    return walk, cnt, ptid, bits


def dense_mask(sq: int, sk: int):
    """A BlockMask stand-in whose every tile is full (the dense ALiBi call): walk_operands with
    from_kind=True derives causal and the ragged ends from it."""
    import types

    import jax.numpy as jnp

    nq, nk = -(-sq // BLOCK), -(-sk // BLOCK)
    return types.SimpleNamespace(
        num_q_blocks=nq, num_kv_blocks=nk, kind=jnp.ones((1, 1, nq, nk), jnp.int32),
        tile_id=jnp.full((1, 1, nq, nk), -1, jnp.int32), bits=jnp.zeros((0, BLOCK, 4), jnp.int32))


def call(pl_: MaskPlan, q, k, v, walk, cnt, ptid, bits, slopes=None, residual=False,
         interpret=None):
    """q (B, Sqp, Hq, D) with Sqp a multiple of 128, k/v (B, Skp, Hkv, D) with Skp = 128 nK;
    walk/cnt/ptid/bits from walk_operands (mask batch/head axes of size 1 or B/Hq); slopes
    (Bs, Hq) float32 with pl_.alibi. Returns out (B, Sqp, Hq, D), lse (B, Hq, Sqp) float32
    [, out_residual]."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, Sqp, Hq, D = q.shape
    Skp, Hkv = k.shape[1], k.shape[2]
    nk = Skp // BLOCK
    G = Hq // Hkv
    bq, bkv = BQ, BLOCK
    dtype = q.dtype
    causal, alibi = pl_.causal, pl_.alibi
    stages = pl_.stages
    pingpong = pl_.pingpong
    c2 = float(pl_.scale) * LOG2E
    off = pl_.seqlen_k - pl_.seqlen_q
    mask_b, mask_h = walk.shape[0] > 1, walk.shape[1] > 1
    slope_b = slopes is not None and slopes.shape[0] > 1
    k5 = k.reshape(B, nk, bkv, Hkv, D)
    v5 = v.reshape(B, nk, bkv, Hkv, D)
    if slopes is None:
        slopes = jnp.zeros((1, 1), jnp.float32)

    if interpret is None:
        layout_cast, iota = plgpu.layout_cast, plgpu.broadcasted_iota

        def ld(ref, layout):
            return plgpu.load(ref, (), layout=layout, optimized=False)
    else:
        def layout_cast(x, _layout):
            return x

        def ld(ref, layout):
            return ref[...]

        def iota(dt, shape, dim, layout=None):
            return lax.broadcasted_iota(dt, shape, dim)

    def body(q_ref, k_ref, v_ref, walk_ref, cnt_ref, ptid_ref, bits_ref, sl_ref, o_ref, lse_ref,
             r_ref, scoped):
        smem, (k_full, v_full, q_full, b_full), (k_free, v_free), sched = scoped
        qo_smem, k_smem, v_smem, lse_smem, bits_smem, *r_smem = smem
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        if pl_.reverse:
            tile = (Sqp // BLOCK - 1) - tile
        wg = lax.axis_index("wg")
        mb = b if mask_b else 0
        mh = h if mask_h else 0
        n_full = cnt_ref[mb, mh, tile, 0]
        n_all = n_full + cnt_ref[mb, mh, tile, 1]

        def sync():  # both consumers meet here (tensor-core hand-off)
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = tile * (2 * bq) + wg * bq
            my_q = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], my_q, q_full.at[wg])
            plgpu.barrier_wait(q_full.at[wg])
            red = plgpu.Layout.WGMMA.reduce(1)
            wl = plgpu.Layout.WGMMA
            m = layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), red)
            l_ = layout_cast(jnp.full((bq,), 0.0, jnp.float32), red)
            acc = layout_cast(jnp.full((bq, D), 0.0, jnp.float32), wl)
            r = iota(jnp.int32, (bq, bkv), 0, layout=wl)
            c = iota(jnp.int32, (bq, bkv), 1, layout=wl)
            if alibi:
                slope2 = sl_ref[b if slope_b else 0, h] * LOG2E
                rc = (r - c).astype(jnp.float32)  # (i - j) up to the tile's offsets
            if pingpong:
                pl.when(wg == 1)(sync)

            def step(i, carry, partial):
                acc, m, l_ = carry
                slot = lax.rem(i, jnp.int32(stages))
                if causal or alibi:  # the key block, loaded before the wait hides its latency
                    kb = i if pl_.dense else walk_ref[mb, mh, tile, i]
                plgpu.barrier_wait(k_full.at[slot])

                if interpret is None:
                    def qk(s_ref):
                        plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                        if pingpong:
                            sync()
                        return s_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                else:  # the interpreter takes no transposed shared-memory operand
                    s = lax.dot_general(my_q[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    if pingpong:
                        sync()
                # free the slot only when the producer refills it (every barrier phase has a
                # waiter: the interpreter checks it, and no arrival is left pending at exit)
                refill = i + stages < n_all
                pl.when(refill)(lambda: plgpu.barrier_arrive(k_free.at[slot]))
                if alibi:  # -slope |i + off - j| in log2 units
                    d = rc + (row0 + off - kb * bkv).astype(jnp.float32)
                    t2 = s * c2 - slope2 * jnp.abs(d)
                else:
                    t2 = s * c2
                if partial:
                    plgpu.barrier_wait(b_full.at[slot])
                    w = [ld(bits_smem.at[slot, wg, j], red) for j in range(4)]
                    wb = [lax.broadcast_in_dim(x, (bq, bkv), [0]) for x in w]
                    word = jnp.where(c < 64, jnp.where(c < 32, wb[0], wb[1]),
                                     jnp.where(c < 96, wb[2], wb[3]))
                    ok = lax.shift_right_logical(word, c & 31) & 1
                    ok = ok != 0
                    if causal:
                        ok = ok & (c + kb * bkv <= r + (row0 + off))
                    t2 = jnp.where(ok, t2, -jnp.inf)
                m_new = jnp.maximum(m, t2.max(axis=1))
                if partial:  # a row may have seen nothing yet: exp2(-inf - -inf) is NaN
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                else:
                    m_use = m_new
                p = jnp.exp2(t2 - lax.broadcast_in_dim(m_use, t2.shape, [0]))
                alpha = jnp.exp2(m - m_use)
                l_ = l_ * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_full.at[slot])
                if pingpong:
                    plgpu.barrier_wait(sched)
                if interpret is None:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:
                    acc = acc + lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                pl.when(refill)(lambda: plgpu.barrier_arrive(v_free.at[slot]))
                return acc, m_new, l_

            carry = (acc, m, l_)
            carry = lax.fori_loop(0, n_full, lambda i, cr: step(i, cr, False), carry)
            carry = lax.fori_loop(n_full, n_all, lambda i, cr: step(i, cr, True), carry)
            acc, m, l_ = carry
            if pingpong:
                pl.when(wg == 0)(sync)
            empty = l_ == 0.0  # a row that sees no key: out 0, lse -inf
            inv = 1.0 / jnp.where(empty, 1.0, l_)
            o32 = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            o16 = o32.astype(dtype)
            my_q[...] = o16
            if residual:
                r_smem[0].at[wg][...] = (o32 - o16.astype(jnp.float32)).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(
                empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l_))) * LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, pl.ds(row0, bq), h])
            if residual:
                plgpu.copy_smem_to_gmem(r_smem[0].at[wg], r_ref.at[b, pl.ds(row0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            hk = lax.div(h, jnp.int32(G))

            def load(i, slot, refill, kb=None):
                if kb is None:
                    kb = i if pl_.dense else walk_ref[mb, mh, tile, i]
                if refill:
                    plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, kb, pl.ds(0, bkv), hk], k_smem.at[slot],
                                        k_full.at[slot])
                if refill:
                    plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, kb, pl.ds(0, bkv), hk], v_smem.at[slot],
                                        v_full.at[slot])

                @pl.when(i >= n_full)  # a partial tile: its bitmask too (read before v_free)
                def _():
                    tid = ptid_ref[mb, mh, tile, i]
                    plgpu.copy_gmem_to_smem(bits_ref.at[tid], bits_smem.at[slot],
                                            b_full.at[slot])

            # the first ring's key blocks read together with the counts (clamped: harmless
            # past the list), not one list round trip per tile inside each condition
            first = [jnp.int32(s_) if pl_.dense else walk_ref[mb, mh, tile, min(s_, nk - 1)]
                     for s_ in range(stages)]
            for s_ in range(stages):
                pl.when(s_ < n_all)(lambda s_=s_: load(jnp.int32(s_), s_, False, first[s_]))

            def refill(i, _):
                load(i + stages, lax.rem(i, jnp.int32(stages)), True)

            lax.fori_loop(0, jnp.maximum(n_all - stages, 0), refill, None)

    def entry(q_ref, k_ref, v_ref, walk_ref, cnt_ref, ptid_ref, bits_ref, sl_ref, o_ref, lse_ref,
              *r_ref):
        tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((stages, 2, 4, bq), jnp.int32),
        )
        if residual:
            smem = smem + (plgpu.SMEM((2, bq, D), dtype, transforms=tr),)
        r_out = r_ref[0] if residual else None
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, walk_ref, cnt_ref, ptid_ref, bits_ref,
                                 sl_ref, o_ref, lse_ref, r_out, scoped),
            smem,
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2),
                plgpu.Barrier(num_barriers=stages),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out_type = (out_struct((B, Sqp, Hq, D), dtype, q), out_struct((B, Hq, Sqp), jnp.float32, q))
    if residual:
        out_type = out_type + (out_struct((B, Sqp, Hq, D), dtype, q),)
    kw = {} if interpret is None else {"interpret": interpret}
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(Hq, Sqp // (2 * bq), B),
        grid_names=("heads", "tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(q, k5, v5, walk, cnt, ptid, bits, slopes.astype(jnp.float32))


def forward(q, k, v, params, *, block_mask=None, alibi_slopes=None, residual=False,
            interpret=None, **plan_kw):
    """(out, lse[, out_residual]) of a block-masked (or, with block_mask None, a dense ALiBi)
    call on the Mosaic GPU kernel; q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), any lengths."""
    import jax.numpy as jnp

    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    sqp, skp = _round_up(max(Sq, 1), BLOCK), _round_up(max(Sk, 1), BLOCK)
    causal = bool(params.causal)
    if block_mask is not None:
        walk, cnt, ptid, bits = walk_operands(block_mask, Sq, Sk, causal)
    else:  # dense (ALiBi): every tile full, causal and the ragged ends derived as for a mask
        walk, cnt, ptid, bits = walk_operands(dense_mask(Sq, Sk), Sq, Sk, causal, from_kind=True)
        # no tile dropped or reordered (no causal, Sk a block multiple): step i is key block i
        plan_kw.setdefault("dense", not causal and Sk % BLOCK == 0)
    slopes = None
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32)
        slopes = slopes.reshape(1, Hq) if slopes.ndim == 1 else slopes
    pad = [(0, 0)] * 4
    qp = jnp.pad(q, [(0, 0), (0, sqp - Sq), (0, 0), (0, 0)]) if sqp != Sq else q
    if skp != Sk:
        pad[1] = (0, skp - Sk)
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    pl_ = MaskPlan(causal=causal, alibi=slopes is not None, scale=float(params.scale),
                   seqlen_q=Sq, seqlen_k=Sk, **plan_kw)
    outs = call(pl_, qp, k, v, walk, cnt, ptid, bits, slopes, residual=residual,
                interpret=interpret)
    out, lse = outs[0][:, :Sq], outs[1][:, :, :Sq]
    return (out, lse, outs[2][:, :Sq]) if residual else (out, lse)
