"""KV-cache decode through Pallas' Mosaic GPU lowering (plgpu: TMA, wgmma, mbarriers), Hopper.

Opt-in (session 9, `FLASHMUX_PALLAS_DECODE=mosaic=1`): the Triton-lowered kernel of decode.py
stays the default until this one is measured faster on the H200 and judged there.

One CTA per (key split, KV head, sequence), two warpgroups: a producer streams the split's K and
V tiles (block_n keys x D) with TMA into a ring of `stages` shared-memory slots, a consumer runs
S = Q K^T on the tensor cores (wgmma; Q is the packed G = Hq/Hkv query heads x Sq rows of this
KV head, padded to the 64 rows of one wgmma), the masked online softmax in base 2 and O += P V,
and frees the slot. The split's key range comes from the sequence's device length (a scalar
load): nothing is read on the host, and a short sequence streams only its own keys.

Scope (everything else takes the Triton lowering): float16/bfloat16, head_dim 64 or 128
(Dv == D), G x Sq <= 64, no window / softcap / ALiBi; a contiguous cache with S_max a multiple
of 64, or a paged one with 16-, 32- or 64-token pages (or multiples of 64) (a tile is 64/page_size whole pages, each
page id a scalar load of the block table, or a slice of one page). Output: one split writes out (in q's dtype) and lse itself; several write float32
partials merged by lse in XLA (decode._merge), as the Triton-lowered kernel does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ROWS = 64  # one wgmma's M


@dataclass(frozen=True)
class MosaicDecode:
    scale: float
    causal: bool
    seqlen_q: int
    group: int
    rows: int  # seqlen_q * group (real rows of the 64)
    block_n: int
    stages: int
    num_splits: int
    capacity: int
    page_size: int = 0  # paged: tokens per page (bn a multiple of it, or it of bn)
    per_sm: int = 1  # CTAs that fit one SM (shared memory): 2 lowers the consumer's registers
    consumers: int = 1  # consumer warpgroups; 2: alternate tiles, merged at the end


def reasons(q_shape, k_shape, v_shape, dtype, paged: bool, params) -> list[str]:
    """Why this decode call cannot take the Mosaic GPU kernel (empty when it can)."""
    import jax.numpy as jnp

    out = []
    B, Sq, Hq, D = q_shape
    if paged:  # k_shape (num_pages, page_size, Hkv, D)
        ps = k_shape[1]
        if ps % 16 or (ps % 64 and 64 % ps):
            out.append(f"page_size {ps}: the Mosaic kernel takes 16, 32 or a multiple of 64")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        out.append(f"dtype {jnp.dtype(dtype).name}")
    if D not in (64, 128) or v_shape[-1] != D:
        out.append(f"head_dim {D} / {v_shape[-1]}")
    if not paged and k_shape[1] % 64:
        out.append(f"S_max {k_shape[1]} not a multiple of 64")
    if Sq * (Hq // k_shape[2]) > ROWS:
        out.append(f"Sq x G = {Sq * (Hq // k_shape[2])} rows > {ROWS}")
    if (params.window_left is not None or params.softcap or params.alibi
            or (params.window_right is not None and not params.causal)):
        out.append("window / softcap / ALiBi")
    return out


def plan(B, Sq, Hq, Hkv, D, capacity, params, cores: int, block_n=0, stages=0, splits=0,
         page_size=0, consumers=0):
    """Splits: one wave of one CTA per SM (the shared memory holds one), at least 4 key blocks
    each. block_n 64 x 4 stages (128 KiB of K/V in flight per SM); the caller may force any.
    Paged: a tile is one slice of a page (page_size a multiple of block_n) or block_n /
    page_size whole pages (16- and 32-token pages), each its own TMA copy."""
    bn = block_n or (64 if capacity % 128 or D > 64 else 128)
    bn = bn if capacity % bn == 0 else 64
    if page_size and page_size % bn and bn % page_size:
        bn = 64
    st = stages or 4
    nc = consumers or 1
    if st % nc:  # each consumer must own whole slots (it waits every phase of its barriers)
        st += nc - st % nc
    per_sm = 1 if nc > 1 else ctas_per_sm(D, bn, st, split=True)
    ns = params.num_splits or splits
    if not ns:  # one wave of the CTAs that fit
        ns = max(1, min(per_sm * cores // max(1, B * Hkv), capacity // (4 * bn), 128))
    ns = max(1, min(int(ns), capacity // bn))
    return MosaicDecode(scale=float(params.scale), causal=bool(params.causal), seqlen_q=Sq,
                        group=Hq // Hkv, rows=Sq * (Hq // Hkv), block_n=bn, stages=st,
                        num_splits=ns, capacity=capacity, page_size=page_size,
                        per_sm=1 if nc > 1 else ctas_per_sm(D, bn, st, split=ns > 1),
                        consumers=nc)


def ctas_per_sm(D: int, bn: int, stages: int, split: bool) -> int:
    """CTAs whose shared memory fits one SM (227 KiB): q (64 x D), the K/V ring, the float32
    partial output (several splits) and ~0.5 KiB of lse and barriers; at most 2 (registers)."""
    smem = ROWS * D * 2 + stages * 2 * bn * D * 2 + (ROWS * D * 4 if split else 0) + 512
    return max(1, min(2, (227 * 1024) // smem))


def call(st: MosaicDecode, qp, k_cache, v_cache, lens, interpret=None, block_table=None):
    """qp (B, Hkv, 64, D) packed queries (rows r = i * G + g, zero-padded), k/v_cache
    (B, S_max, Hkv, D) or paged (num_pages, page_size, Hkv, D) with block_table
    (B, max_pages) int32, lens (B,) int32 keys per sequence (clamped here to the capacity; page
    ids to the pool, table positions to max_pages). Returns
    (o, lse): (B, Hkv, RO, D) in q's dtype and (B, Hkv, RO) with one split, float32 partials
    with a leading split axis otherwise; RO = the real rows rounded up to 8 (the padding rows
    are never written: at G = 4 the partials are 8x smaller than the 64-row tiles). interpret: an InterpretGPUParams (Mosaic GPU's
    interpreter on the CPU, tests): the layout hints, which it does not take, become plain ops."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, Hkv, BM, D = qp.shape
    assert BM == ROWS
    paged = block_table is not None
    S = st.capacity
    bn, stages, ns = st.block_n, st.stages, st.num_splits
    ps = st.page_size if paged else 0
    sub = min(bn, ps) if paged else bn  # rows of one TMA copy
    ncopy = bn // sub  # copies per tile (each arrives on the slot's barrier)
    if paged:
        num_pages, max_pages = k_cache.shape[0], block_table.shape[1]
    dtype = qp.dtype
    c2 = st.scale * LOG2E
    per = -(-S // ns)
    chunk = -(-per // bn) * bn  # keys per split, whole blocks (static)
    G, Sq = st.group, st.seqlen_q
    split = ns > 1
    NC = st.consumers
    RO = min(BM, -(-st.rows // 8) * 8)  # rows written out (real rows, whole 8-row tiles)

    def rows_of(ref):
        return ref if RO == BM else ref.at[pl.ds(0, RO)]
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

    def body(q_ref, k_ref, v_ref, len_ref, bt_ref, o_ref, lse_ref, scoped):
        smem, (k_full, v_full, q_full), (k_free, v_free), done = scoped
        q_smem, k_smem, v_smem, o_smem, lse_smem, xm_smem, xl_smem = smem
        sp = lax.axis_index("splits")
        h = lax.axis_index("heads")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        sk = jnp.minimum(jnp.maximum(len_ref[b], 0), S)
        # k_begin is a product with a constant, never a min() with the length: Mosaic GPU's
        # layout inference (jax 0.11) must prove every TMA slice start a multiple of the shared
        # memory tiling (8 rows), and it cannot through a loaded value
        k_begin = sp * chunk
        k_end = jnp.minimum(k_begin + chunk, sk)
        nsteps = jnp.maximum(lax.div(k_end - k_begin + (bn - 1), bn), 0)

        def consumer(cid):
            # two CTAs per SM share its 64K registers: 208 + 40 per thread pair (<= 128 each)
            plgpu.set_max_registers(232 if st.per_sm == 1 else 208, action="increase")
            if cid == 0:
                plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_full.at[0])
            plgpu.barrier_wait(q_full.at[0])
            red = plgpu.Layout.WGMMA.reduce(1)
            m = layout_cast(jnp.full((BM,), -jnp.inf, jnp.float32), red)
            l_ = layout_cast(jnp.full((BM,), 0.0, jnp.float32), red)
            acc = layout_cast(jnp.full((BM, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            r = iota(jnp.int32, (BM, bn), 0, layout=plgpu.Layout.WGMMA)
            c = iota(jnp.int32, (BM, bn), 1, layout=plgpu.Layout.WGMMA)
            # keys each row sees: causal (bottom-right) row r = i * G + g sees 0 .. sk-Sq+i
            if st.causal:
                lim = jnp.minimum(sk - Sq + lax.div(r, G) + 1, sk)
            else:
                lim = jnp.zeros_like(r) + sk
            lim = jnp.where(r < st.rows, lim, 0)

            def step(i, carry):
                acc, m, l_ = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_full.at[slot])

                def qk(s_ref):
                    plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return s_ref[...]

                if interpret is None:
                    s = pl.run_scoped(qk, plgpu.ACC((BM, bn), jnp.float32))
                else:  # the interpreter takes no transposed shared-memory operand
                    s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                refill = i + stages < nsteps  # the producer waits for this slot again

                @pl.when(refill)
                def _():
                    plgpu.barrier_arrive(k_free.at[slot])

                col = c + (k_begin + i * bn)
                s2 = jnp.where(col < lim, s * c2, -jnp.inf)
                m_new = jnp.maximum(m, s2.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp2(s2 - lax.broadcast_in_dim(m_use, s2.shape, [0]))
                alpha = jnp.exp2(m - m_use)
                l_ = l_ * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_full.at[slot])

                def pv(o_ref_):
                    plgpu.wgmma(o_ref_, p16, v_smem.at[slot])
                    return o_ref_[...]

                if interpret is None:
                    o_t = pl.run_scoped(pv, plgpu.ACC((BM, D), jnp.float32))
                else:
                    o_t = lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

                @pl.when(refill)
                def _():
                    plgpu.barrier_arrive(v_free.at[slot])

                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o_t
                return acc, m_new, l_

            # consumer cid takes tiles cid, cid + NC, ... (slot i % stages: stages % NC == 0, so
            # each slot, and each of its barriers' phases, belongs to one consumer)
            n_mine = jnp.maximum(lax.div(nsteps - cid + (NC - 1), NC), 0)
            acc, m, l_ = lax.fori_loop(0, n_mine, lambda j, cr: step(cid + NC * j, cr),
                                       (acc, m, l_))
            if NC > 1:
                if cid == 1:  # hand (m, l, acc) to consumer 0 and stop
                    xm_smem[...] = m
                    xl_smem[...] = l_
                    o_smem[...] = acc
                    plgpu.barrier_arrive(done.at[0])
                    return
                plgpu.barrier_wait(done.at[0])
                m1 = ld(xm_smem, red)
                l1 = ld(xl_smem, red)
                acc1 = ld(o_smem, plgpu.Layout.WGMMA)
                m_new = jnp.maximum(m, m1)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                a0, a1 = jnp.exp2(m - m_use), jnp.exp2(m1 - m_use)
                l_ = l_ * a0 + l1 * a1
                acc = (acc * lax.broadcast_in_dim(a0, acc.shape, [0])
                       + acc1 * lax.broadcast_in_dim(a1, acc.shape, [0]))
                m = m_new
            empty = l_ == 0.0
            inv = 1.0 / jnp.where(empty, 1.0, l_)
            o32 = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l_)))
                                      * LN2)
            if split:
                o_smem[...] = o32
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(rows_of(o_smem), o_ref.at[sp, b, h])
                plgpu.copy_smem_to_gmem(rows_of(lse_smem), lse_ref.at[sp, b, h])
            else:
                q_smem[...] = o32.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(rows_of(q_smem), o_ref.at[b, h])
                plgpu.copy_smem_to_gmem(rows_of(lse_smem), lse_ref.at[b, h])
            plgpu.wait_smem_to_gmem(0)

        for cid in range(NC):
            pl.when(wg == cid)(functools.partial(consumer, cid))

        @pl.when(wg == NC)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def src(i):
                """(gmem index, smem rows) of each copy of tile i."""
                t0 = k_begin + i * bn
                if not paged:
                    return [((b, pl.ds(t0, bn), h), None)]
                out = []
                for j in range(ncopy):
                    t = t0 + j * sub
                    pidx = jnp.minimum(lax.div(t, ps), max_pages - 1)
                    page = jnp.minimum(jnp.maximum(bt_ref[b, pidx], 0), num_pages - 1)
                    slot_rows = None if ncopy == 1 else pl.ds(j * sub, sub)
                    out.append(((page, pl.ds(lax.rem(t, ps), sub), h), slot_rows))
                return out

            def load(i, slot, refill=False, copies=None):
                copies = src(i) if copies is None else copies
                for ref, smem_, full, free in ((k_ref, k_smem, k_full, k_free),
                                               (v_ref, v_smem, v_full, v_free)):
                    if refill:
                        plgpu.barrier_wait(free.at[slot])
                    for rows, srows in copies:
                        dst = smem_.at[slot] if srows is None else smem_.at[slot, srows]
                        plgpu.copy_gmem_to_smem(ref.at[rows], dst, full.at[slot])

            # paged: the page ids of the first `stages` tiles loaded together, before the
            # conditional copies (inside each condition they were serialized: one table
            # round trip per tile before the ring filled; session 10). Indices are clamped,
            # so the loads of tiles past the split's end are harmless.
            first = [src(jnp.int32(s_)) if paged else None for s_ in range(stages)]
            for s_ in range(stages):
                pl.when(s_ < nsteps)(functools.partial(load, jnp.int32(s_), s_,
                                                       copies=first[s_]))

            def refill(i, _):
                load(i + stages, lax.rem(i, jnp.int32(stages)), True)

            lax.fori_loop(0, jnp.maximum(nsteps - stages, 0), refill, None)

    def entry(q_ref, k_ref, v_ref, len_ref, *rest):
        bt_ref = rest[0] if paged else None
        o_ref, lse_ref = rest[-2:]
        tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((BM, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bn, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bn, D), dtype, transforms=tr),
            plgpu.SMEM((BM, D) if split or NC > 1 else (8, 8), jnp.float32),
            plgpu.SMEM((BM,), jnp.float32),
            plgpu.SMEM((BM,) if NC > 1 else (8,), jnp.float32),  # consumer 1's m
            plgpu.SMEM((BM,) if NC > 1 else (8,), jnp.float32),  # and l
        )
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, len_ref, bt_ref, o_ref, lse_ref, scoped),
            smem,
            (
                plgpu.Barrier(num_arrivals=ncopy, num_barriers=stages),
                plgpu.Barrier(num_arrivals=ncopy, num_barriers=stages),
                plgpu.Barrier(num_barriers=1),
            ),
            (plgpu.Barrier(num_arrivals=1, num_barriers=stages),) * 2,
            plgpu.Barrier(num_barriers=1),
            collective_axes="wg",
        )

    if split:
        out_type = (out_struct((ns, B, Hkv, RO, D), jnp.float32, qp),
                    out_struct((ns, B, Hkv, RO), jnp.float32, qp))
    else:
        out_type = (out_struct((B, Hkv, RO, D), dtype, qp),
                    out_struct((B, Hkv, RO), jnp.float32, qp))
    kw = {} if interpret is None else {"interpret": interpret}
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(ns, Hkv, B),
        grid_names=("splits", "heads", "batch"),
        num_threads=NC + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(qp, k_cache, v_cache, lens.astype(jnp.int32),
      *((block_table.astype(jnp.int32),) if paged else ()))


def decode(q, k_cache, v_cache, seqlens_k, params, cores: int = 132, interpret=None,
           block_table=None, **force):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq) float32), as decode.decode for a call `reasons`
    accepts."""
    import jax.numpy as jnp

    from .decode import _merge

    B, Sq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    R = Sq * G
    if block_table is None:
        st = plan(B, Sq, Hq, Hkv, D, k_cache.shape[1], params, cores, **force)
    else:
        ps = k_cache.shape[1]
        st = plan(B, Sq, Hq, Hkv, D, block_table.shape[1] * ps, params, cores, page_size=ps,
                  **force)
    qp = q.reshape(B, Sq, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
    qp = jnp.pad(qp, [(0, 0), (0, 0), (0, ROWS - R), (0, 0)])
    o, lse = call(st, qp, k_cache, v_cache, seqlens_k, interpret, block_table)
    if st.num_splits > 1:
        o, lse = _merge(o, lse, q.dtype)
    o = o[:, :, :R].reshape(B, Hkv, Sq, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Sq, Hq, D)
    lse = lse[:, :, :R].reshape(B, Hkv, Sq, G).transpose(0, 1, 3, 2).reshape(B, Hq, Sq)
    return o, lse
