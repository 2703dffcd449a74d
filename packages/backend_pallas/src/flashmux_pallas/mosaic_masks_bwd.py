"""The backward of block-masked (and ALiBi) calls on Hopper through Mosaic GPU (issue 15,
session 11): mosaic_backward.py's dQ and dK/dV kernels with their loops replaced by walks over
the BlockMask's lists, as mosaic_masks.py does for the forward.

  dQ     grid (Hq, nQ, B): two consumer warpgroups own 64 query rows each of a 128-row mask
         block (Q, dO, lse2, delta resident); the producer streams the listed 128-key K/V tiles
         (full first, then partial with their bitmask). dS * scale rounded, as the dense kernel.
  dK/dV  grid (Hkv, nK, B): two consumer warpgroups own 64 keys each of a 128-key mask block
         (K, V resident); the producer streams, for each query head of the GQA group, the
         key block's listed query blocks (the BlockMask's transposed lists) as two 64-row
         (Q, dO, lse2, delta) steps each, with the bitmask half of a partial tile. On the
         transposed tiles (rows are keys) a bitmask word is a column vector: word 2 wg + (key
         row // 32) of the step's query rows, one select, a shift and an AND per element.

delta = rowsum(dO * (O + out_residual)) - dlse in XLA (one pass, as blocksparse.py). Padded
query rows carry lse2 = +inf (P = 0); padded keys are masked by the walk (the last key block's
tiles are partial with an all-ones-up-to-Sk bitmask: mosaic_masks.walk_operands). Scope: that
of mosaic_masks.reasons. `interpret=True`: Mosaic GPU's CPU interpreter (tests).
"""

from __future__ import annotations

import math

from .mosaic_backward import _kernel, _Ops
from .mosaic_masks import BLOCK, BQ, LOG2E, _round_up, dense_mask, lists_walk, walk_operands


def walk_operands_t(bm, sq: int, sk: int, causal: bool, from_kind: bool = False):
    """The transposed walk for dK/dV: (walk, cnt, ptid) with walk (Bm, Hm, nK, nQ) the listed
    query blocks of each key block (full first, then partial), cnt (Bm, Hm, nK, 2), ptid the
    partial entries' bitmask ids (the same `bits` as walk_operands). Causal drops the tiles it
    empties and turns the full tiles the diagonal cuts into partial (all-ones bitmask)."""
    import jax.numpy as jnp

    i32 = jnp.int32
    nq, nk = bm.num_q_blocks, bm.num_kv_blocks
    n_p = int(bm.bits.shape[0])
    ones_id, ragged_id = n_p, n_p + 1
    tail = sk - (nk - 1) * BLOCK
    if not causal and not from_kind:
        return lists_walk(bm.kv_num_full, bm.kv_num_part, bm.kv_full_idx, bm.kv_part_idx,
                          jnp.swapaxes(jnp.asarray(bm.tile_id), -1, -2))
    kind = jnp.swapaxes(jnp.asarray(bm.kind).astype(i32), -1, -2)  # (Bm, Hm, nK, nQ)
    tile = jnp.swapaxes(jnp.asarray(bm.tile_id).astype(i32), -1, -2)
    kb = jnp.arange(nk, dtype=i32)[:, None]
    qb = jnp.arange(nq, dtype=i32)[None, :]
    full = kind == 1
    part = kind == 2
    tid = jnp.where(part, tile, ones_id)
    if tail != BLOCK:  # as the forward walk (harmless here: padded keys' rows are dropped)
        last = (kb == nk - 1) & full
        tid = jnp.where(last, ragged_id, tid)
        part = part | last
        full = full & ~last
    if causal:
        off = sk - sq
        dead = kb * BLOCK > jnp.minimum(qb * BLOCK + BLOCK - 1, sq - 1) + off
        cut = kb * BLOCK + BLOCK - 1 > qb * BLOCK + off
        part = (part | (full & cut)) & ~dead
        full = full & ~cut
    cls = jnp.where(full, 0, jnp.where(part, 1, 2))
    walk = jnp.argsort(cls * nq + qb, axis=-1).astype(i32)
    ptid = jnp.take_along_axis(jnp.broadcast_to(tid, kind.shape), walk, axis=-1)
    cnt = jnp.stack([jnp.sum(full, axis=-1, dtype=i32), jnp.sum(part, axis=-1, dtype=i32)],
                    axis=-1)
    return walk, cnt, ptid


def _dq(q, k, v, do, lse2q, delta, walk, cnt, ptid, bits, slopes, *, causal, alibi, c2, off,
        stages, interpret):
    """q/do (B, Sqp, Hq, D), k/v (B, nK, 128, Hkv, D), lse2q/delta (B, Hq, Sqp) -> dq."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, Sqp, Hq, D = q.shape
    Hkv = k.shape[3]
    G = Hq // Hkv
    bq, bkv = BQ, BLOCK
    dtype = q.dtype
    ops = _Ops(interpret)
    mask_b, mask_h = walk.shape[0] > 1, walk.shape[1] > 1
    slope_b = slopes.shape[0] > 1
    nqb = Sqp // BLOCK

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, walk_ref, cnt_ref, ptid_ref, bits_ref,
             sl_ref, dq_ref, smem, bars):
        q_smem, do_smem, k_smem, v_smem, lse_smem, dl_smem, bits_smem = smem
        q_full, do_full, lse_full, dl_full, k_full, v_full, b_full, free = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = (nqb - 1) - lax.axis_index("tiles")  # heavy (late) query blocks first
        wg = lax.axis_index("wg")
        mb = b if mask_b else 0
        mh = h if mask_h else 0
        n_full = cnt_ref[mb, mh, tile, 0]
        n_all = n_full + cnt_ref[mb, mh, tile, 1]

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = tile * BLOCK + wg * bq
            rows = (b, pl.ds(row0, bq), h)
            vrows = (b, h, pl.ds(row0, bq))
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, q_full.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, do_full.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[vrows], lse_smem.at[wg], lse_full.at[wg])
            plgpu.copy_gmem_to_smem(dl_ref.at[vrows], dl_smem.at[wg], dl_full.at[wg])
            plgpu.barrier_wait(lse_full.at[wg])
            lse = ops.vec(lse_smem.at[wg], 1)
            plgpu.barrier_wait(dl_full.at[wg])
            dl = ops.vec(dl_smem.at[wg], 1)
            plgpu.barrier_wait(q_full.at[wg])
            plgpu.barrier_wait(do_full.at[wg])
            r = ops.iota((bq, bkv), 0)
            c = ops.iota((bq, bkv), 1)
            if alibi:
                slope2 = sl_ref[b if slope_b else 0, h] * LOG2E
                rc = (r - c).astype(jnp.float32)

            def step(i, dq, partial):
                slot = lax.rem(i, jnp.int32(stages))
                if causal or alibi:
                    kb = walk_ref[mb, mh, tile, i]
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_wait(v_full.at[slot])
                s, dp = ops.mm_t2((bq, bkv), (my_q, k_smem.at[slot]), (my_do, v_smem.at[slot]))
                t2 = s * c2
                if alibi:
                    t2 = t2 - slope2 * jnp.abs(rc + (row0 + off - kb * bkv).astype(jnp.float32))
                p = jnp.exp2(t2 - lax.broadcast_in_dim(lse, s.shape, [0]))  # p * scale
                if partial:
                    plgpu.barrier_wait(b_full.at[slot])
                    w = [lax.broadcast_in_dim(ops.vec(bits_smem.at[slot, wg, j], 1), s.shape, [0])
                         for j in range(4)]
                    word = jnp.where(c < 64, jnp.where(c < 32, w[0], w[1]),
                                     jnp.where(c < 96, w[2], w[3]))
                    ok = (lax.shift_right_logical(word, c & 31) & 1) != 0
                    if causal:
                        ok = ok & (c + kb * bkv <= r + (row0 + off))
                    p = jnp.where(ok, p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(dl, dp.shape, [0]))
                dq = ops.mm_acc(dq, ds.astype(dtype), k_smem.at[slot])
                pl.when(i + stages < n_all)(lambda: plgpu.barrier_arrive(free.at[slot]))
                return dq

            dq = ops.zeros((bq, D))
            dq = lax.fori_loop(0, n_full, lambda i, x: step(i, x, False), dq)
            dq = lax.fori_loop(n_full, n_all, lambda i, x: step(i, x, True), dq)
            my_q[...] = dq.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            hk = lax.div(h, jnp.int32(G))

            def load(i, slot, refill, kb=None):
                if kb is None:
                    kb = walk_ref[mb, mh, tile, i]
                if refill:
                    plgpu.barrier_wait(free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, kb, pl.ds(0, bkv), hk], k_smem.at[slot],
                                        k_full.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, kb, pl.ds(0, bkv), hk], v_smem.at[slot],
                                        v_full.at[slot])

                @pl.when(i >= n_full)
                def _():
                    plgpu.copy_gmem_to_smem(bits_ref.at[ptid_ref[mb, mh, tile, i]],
                                            bits_smem.at[slot], b_full.at[slot])

            nk = k.shape[1]
            first = [walk_ref[mb, mh, tile, min(s_, nk - 1)] for s_ in range(stages)]
            for s_ in range(stages):
                pl.when(s_ < n_all)(lambda s_=s_: load(jnp.int32(s_), s_, False, first[s_]))
            lax.fori_loop(0, jnp.maximum(n_all - stages, 0),
                          lambda i, _: load(i + stages, lax.rem(i, jnp.int32(stages)), True), None)

    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        (
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((stages, 2, 4, bq), jnp.int32),
        ),
        (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ),
    )
    return _kernel(body, out_struct(q.shape, dtype, q), (Hq, nqb, B), ("heads", "tiles", "batch"),
                   interpret, scratch)(q, k, v, do, lse2q, delta, walk, cnt, ptid, bits, slopes)


def _dkdv(q, do, lse2, delta, k, v, walk, cnt, ptid, bits, slopes, *, causal, alibi, c2, scale,
          off, stages, interpret):
    """q/do (B, nQ*2, 64, Hq, D), lse2/delta (B, Hq, nQ*2, 64), k/v (B, Skp, Hkv, D) -> dk, dv."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, _, _, Hq, D = q.shape
    Skp, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bkv = BQ, BQ  # 64 query rows a step, 64 keys per consumer
    dtype = q.dtype
    ops = _Ops(interpret)
    mask_b, mask_h = walk.shape[0] > 1, walk.shape[1] > 1
    slope_b = slopes.shape[0] > 1

    def body(q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, walk_ref, cnt_ref, ptid_ref, bits_ref,
             sl_ref, dk_ref, dv_ref, smem, bars):
        k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem, bits_smem = smem
        k_full, v_full, q_full, do_full, lse_full, dl_full, b_full, free = bars
        b = lax.axis_index("batch")
        hk = lax.axis_index("heads")
        kt = lax.axis_index("tiles")  # the key (mask) block
        wg = lax.axis_index("wg")
        mb = b if mask_b else 0

        def counts(g):
            mh = hk * G + g if mask_h else 0
            nf = cnt_ref[mb, mh, kt, 0]
            return mh, nf, nf + cnt_ref[mb, mh, kt, 1]

        total = jnp.int32(0)  # steps over the group's heads: two per listed query block
        for g in range(G):
            total = total + 2 * counts(g)[2]

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k0 = kt * BLOCK + wg * bkv
            rows = (b, pl.ds(k0, bkv), hk)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[rows], my_k, k_full.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], my_v, v_full.at[wg])
            plgpu.barrier_wait(k_full.at[wg])
            plgpu.barrier_wait(v_full.at[wg])
            kr = ops.iota((bkv, bq), 0)  # key row within the consumer's 64
            qc = ops.iota((bkv, bq), 1)
            if alibi:
                cr = (qc - kr).astype(jnp.float32)

            def head(g, carry):
                dk, dv, base = carry
                mh, nf, na = counts(g)
                if alibi:
                    slope2 = sl_ref[b if slope_b else 0, hk * G + g] * LOG2E

                def step(j, c, partial):
                    dk, dv = c
                    t = base + j
                    slot = lax.rem(t, jnp.int32(stages))
                    e, sub = lax.div(j, 2), lax.rem(j, 2)
                    if causal or alibi:
                        q0 = walk_ref[mb, mh, kt, e] * BLOCK + sub * bq
                    plgpu.barrier_wait(q_full.at[slot])
                    plgpu.barrier_wait(do_full.at[slot])
                    st, dpt = ops.mm_t2((bkv, bq), (my_k, q_smem.at[slot]),
                                        (my_v, do_smem.at[slot]))
                    plgpu.barrier_wait(lse_full.at[slot])
                    lse = ops.vec(lse_smem.at[slot], 0)
                    t2 = st * c2
                    if alibi:  # |i + off - j| with i = q0 + qc, j = k0 + kr
                        t2 = t2 - slope2 * jnp.abs(cr + (q0 + off - k0).astype(jnp.float32))
                    pt = jnp.exp2(t2 - lax.broadcast_in_dim(lse, st.shape, [1]))
                    if partial:
                        plgpu.barrier_wait(b_full.at[slot])
                        w0 = lax.broadcast_in_dim(ops.vec(bits_smem.at[slot, 2 * wg], 0),
                                                  st.shape, [1])
                        w1 = lax.broadcast_in_dim(ops.vec(bits_smem.at[slot, 2 * wg + 1], 0),
                                                  st.shape, [1])
                        word = jnp.where(kr < 32, w0, w1)
                        ok = (lax.shift_right_logical(word, kr & 31) & 1) != 0
                        if causal:
                            ok = ok & (kr + k0 <= qc + (q0 + off))
                        pt = jnp.where(ok, pt, 0.0)
                    plgpu.barrier_wait(dl_full.at[slot])
                    dl = ops.vec(dl_smem.at[slot], 0)
                    dst = pt * (dpt - lax.broadcast_in_dim(dl, dpt.shape, [1])) * scale
                    dk, dv = ops.mm_acc2(
                        (dk, dst.astype(dtype), q_smem.at[slot]),
                        (dv, pt.astype(dtype), do_smem.at[slot]),
                    )
                    pl.when(t + stages < total)(lambda: plgpu.barrier_arrive(free.at[slot]))
                    return dk, dv

                c = lax.fori_loop(0, 2 * nf, lambda j, x: step(j, x, False), (dk, dv))
                c = lax.fori_loop(2 * nf, 2 * na, lambda j, x: step(j, x, True), c)
                return (*c, base + 2 * na)

            carry = (ops.zeros((bkv, D)), ops.zeros((bkv, D)), jnp.int32(0))
            if G == 1:
                dk, dv, _ = head(0, carry)
            else:
                dk, dv, _ = lax.fori_loop(0, G, head, carry)
            my_k[...] = dk.astype(dtype)
            my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(my_v, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def head(g, base):
                mh, nf, na = counts(g)
                hq = hk * G + g

                def load(j, _):
                    t = base + j
                    slot = lax.rem(t, jnp.int32(stages))
                    e, sub = lax.div(j, 2), lax.rem(j, 2)
                    blk = walk_ref[mb, mh, kt, e] * 2 + sub  # 64-row block of the queries

                    @pl.when(t >= stages)
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    plgpu.copy_gmem_to_smem(q_ref.at[b, blk, pl.ds(0, bq), hq], q_smem.at[slot],
                                            q_full.at[slot])
                    plgpu.copy_gmem_to_smem(do_ref.at[b, blk, pl.ds(0, bq), hq],
                                            do_smem.at[slot], do_full.at[slot])
                    plgpu.copy_gmem_to_smem(lse_ref.at[b, hq, blk], lse_smem.at[slot],
                                            lse_full.at[slot])
                    plgpu.copy_gmem_to_smem(dl_ref.at[b, hq, blk], dl_smem.at[slot],
                                            dl_full.at[slot])

                    @pl.when(j >= 2 * nf)
                    def _():
                        plgpu.copy_gmem_to_smem(bits_ref.at[ptid_ref[mb, mh, kt, e], sub],
                                                bits_smem.at[slot], b_full.at[slot])

                lax.fori_loop(0, 2 * na, load, None)
                return base + 2 * na

            if G == 1:
                head(0, jnp.int32(0))
            else:
                lax.fori_loop(0, G, head, jnp.int32(0))

    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        (
            plgpu.SMEM((2, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, 4, bq), jnp.int32),
        ),
        (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ),
    )
    out_type = (out_struct(k.shape, dtype, k), out_struct(v.shape, dtype, k))
    return _kernel(body, out_type, (Hkv, Skp // BLOCK, B), ("heads", "tiles", "batch"), interpret,
                   scratch)(q, do, lse2, delta, k, v, walk, cnt, ptid, bits, slopes)


def backward(do, dlse, q, k, v, out, lse, params, *, block_mask=None, out_residual=None,
             alibi_slopes=None, interpret: bool = False, stages: int = 2):
    """(dq, dk, dv) of a block-masked (or, block_mask None, dense ALiBi) call whose forward
    mosaic_masks.reasons accepts; any lengths."""
    import jax.numpy as jnp

    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    sqp, skp = _round_up(max(Sq, 1), BLOCK), _round_up(max(Sk, 1), BLOCK)
    nq2 = sqp // BQ
    causal = bool(params.causal)
    scale = float(params.scale)
    dtype = q.dtype
    do = do.astype(dtype)
    o32 = out.astype(jnp.float32)
    if out_residual is not None:
        o32 = o32 + out_residual.astype(jnp.float32)
    delta = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o32, axis=-1), -1, -2)  # (B, Hq, Sq)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).astype(jnp.float32)
    if sqp != Sq:
        lse2 = jnp.pad(lse2, [(0, 0), (0, 0), (0, sqp - Sq)], constant_values=jnp.inf)
        delta = jnp.pad(delta, [(0, 0), (0, 0), (0, sqp - Sq)])
    bm = block_mask if block_mask is not None else dense_mask(Sq, Sk)
    fk = block_mask is None
    walk, cnt, ptid, bits = walk_operands(bm, Sq, Sk, causal, from_kind=fk)
    walk_t, cnt_t, ptid_t = walk_operands_t(bm, Sq, Sk, causal, from_kind=fk)
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32)
        slopes = slopes.reshape(1, Hq) if slopes.ndim == 1 else slopes
    else:
        slopes = jnp.zeros((1, 1), jnp.float32)
    qp = jnp.pad(q, [(0, 0), (0, sqp - Sq), (0, 0), (0, 0)]) if sqp != Sq else q
    dop = jnp.pad(do, [(0, 0), (0, sqp - Sq), (0, 0), (0, 0)]) if sqp != Sq else do
    if skp != Sk:
        pad = [(0, 0), (0, skp - Sk), (0, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    Hkv = k.shape[2]
    kw = dict(causal=causal, alibi=alibi_slopes is not None, off=Sk - Sq, stages=stages,
              interpret=interpret)
    c2 = scale * LOG2E
    dq = _dq(qp, k.reshape(B, skp // BLOCK, BLOCK, Hkv, D), v.reshape(B, skp // BLOCK, BLOCK, Hkv, D),
             dop, lse2 - math.log2(scale), delta, walk, cnt, ptid, bits, slopes, c2=c2, **kw)
    dk, dv = _dkdv(qp.reshape(B, nq2, BQ, Hq, D), dop.reshape(B, nq2, BQ, Hq, D),
                   lse2.reshape(B, Hq, nq2, BQ), delta.reshape(B, Hq, nq2, BQ), k, v, walk_t,
                   cnt_t, ptid_t, bits, slopes, c2=c2, scale=scale, **kw)
    return dq[:, :Sq], dk[:, :Sk], dv[:, :Sk]
