"""Hopper backward through Pallas' Mosaic GPU lowering (plgpu): TMA, wgmma, warp specialization.

Two kernels, like the Triton-lowering backward (NOTES.md, "Variant 5"):

  dQ     grid (Hq, Sq / (2 * bq), B): two consumer warpgroups own bq query rows each (Q, dO, the
         row offsets and delta resident), a producer warpgroup streams K and V tiles of block_kv
         rows with TMA into a ring of `stages` slots. Per step: S = Q K^T and dP = dO V^T (wgmma,
         both operands in shared memory), P * scale = exp2(S * c2 - (lse2 - log2 scale)),
         dS * scale = P * scale * (dP - delta) rounded to the input dtype, dQ += dS K (dS from
         registers).
  dK/dV  grid (Hkv, Sk / (2 * bkv), B): two consumer warpgroups own bkv key rows each (K and V
         resident), the producer streams Q, dO tiles and the lse2 / delta rows of every query
         head of the group (GQA sums stay in registers) over the query blocks the mask allows.
         Per step, on transposed tiles (rows are keys): S^T = K Q^T, dP^T = V dO^T,
         dV += P^T dO, dK += (dS^T * scale) Q (P^T and dS^T from registers).

Every slot has one "full" barrier per streamed buffer and one "free" barrier that both
consumers arrive on when done with it; the producer waits on "free" before refilling. A consumer
that skips a step (causal: key rows no query of that block sees) still waits on the slot's
"full" barriers, since Mosaic tracks barrier phases per waiting thread.

Conventions shared with the Triton backward (so both pass SPEC's judging rule alike): delta =
rowsum(dO * (O + out_residual)) - dlse in float32; dS * scale is what gets rounded (plain
attention's autograd rounds at that point).

Scope: float16/bfloat16, head_dim 64 or 128 (Dv == D), dense batches, non-causal any lengths, or
causal with Sq == Sk; no window/softcap/dropout/varlen. Lengths are padded to the blocks here:
padded query rows carry lse2 = +inf (P = 0) and dO = 0, padded key columns are masked in dQ.

`interpret=True` runs the kernels under Mosaic GPU's CPU interpreter (jax >= 0.10, tests only):
the barrier protocol, TMA indexing, masks and math run as on the GPU, while the wgmmas become
plain matmuls and layout casts are dropped (the interpreter has neither register-operand wgmma
nor run_state).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .mosaic_kernels import kv_loader, produce, shared_reasons

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MosaicBwdConfig:
    block_q_dq: int = 64  # query rows per consumer warpgroup in dQ (wgmma M = 64)
    block_kv_dq: int = 64  # key rows per streamed step in dQ
    block_q_dkv: int = 64  # query rows per streamed step in dK/dV
    block_kv_dkv: int = 64  # key rows per consumer warpgroup in dK/dV
    stages: int = 2
    # delta = rowsum(dO * (O + r)) - dlse inside the dQ kernel (which runs first and writes it for
    # dK/dV) instead of an XLA pass over dO, O and r.
    fused_delta: bool = True
    # causal dQ: launch the query tiles that see the most keys first (shorter tail of the last
    # wave; dK/dV's natural order already starts with its heaviest key tiles)
    heavy_first: bool = True
    # fused delta: O and r get their own shared-memory tiles where they fit, so O, r, Q and dO
    # load at once instead of O, then r, then Q through Q's tile (three serial TMA latencies at
    # the start of every CTA)
    own_or_tiles: bool = True


def default_config(head_dim: int, causal: bool, seqlen_q: int = 0) -> MosaicBwdConfig:
    """Tiles by (head_dim, causal, length), from GPU runs F and G (NOTES.md, backward alone):
    dQ streams 128-key tiles except D=128 causal (64: 368 vs 351 TFLOP/s at S=2048); dK/dV
    streams 128-query tiles at D=64 (non-causal S=4096 389 vs 363, causal S=8192 362 vs 352)
    except causal S < 4096 (282 vs 288 at S=2048, within noise) and 64 at D=128 (registers)."""
    if head_dim == 128:  # own O/r tiles: -2..-4% here (session 4), +1..+4% at D=64
        return MosaicBwdConfig(block_kv_dq=64 if causal else 128, own_or_tiles=False)
    big = not causal or seqlen_q >= 4096
    return MosaicBwdConfig(block_q_dkv=128 if big else 64, block_kv_dq=128)


def supports(q, k, v, params, cfg: MosaicBwdConfig = MosaicBwdConfig()) -> list[str]:
    """Reasons this backward can't take the Mosaic path (empty when it can)."""
    out = shared_reasons(q, k, v, params)
    if q.ndim == 4 and 0 in (q.shape[0], q.shape[1], k.shape[1]):
        out.append("empty")
    if not float(params.scale) > 0:
        out.append("scale <= 0")
    return out


class _Ops:
    """The few operations whose GPU form the CPU interpreter lacks."""

    def __init__(self, interpret: bool):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        self.plgpu = plgpu
        self.interp = interpret

    def lc(self, x, layout):
        return x if self.interp else self.plgpu.layout_cast(x, layout)

    def zeros(self, shape):
        import jax.numpy as jnp

        return self.lc(jnp.zeros(shape, jnp.float32), self.plgpu.Layout.WGMMA)

    def iota(self, shape, dim):
        import jax.numpy as jnp
        from jax import lax

        if self.interp:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return self.plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.plgpu.Layout.WGMMA)

    def vec(self, ref, axis):
        """A float32 row vector from shared memory in the WGMMA layout reduced over `axis`."""
        if self.interp:
            return ref[...]
        layout = self.plgpu.Layout.WGMMA.reduce(axis)
        try:
            return self.plgpu.load(ref, layout=layout)
        except TypeError:  # a jax whose load takes the index positionally
            return self.plgpu.load(ref, (), layout=layout)

    def mm_t(self, shape, a_ref, b_ref):
        """a @ b^T, both in shared memory, float32 accumulator (fresh)."""
        import jax.numpy as jnp
        from jax import lax
        from jax.experimental import pallas as pl

        if self.interp:
            a, b = a_ref[...], b_ref[...]
            return lax.dot_general(
                a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )

        def f(acc):
            self.plgpu.wgmma(acc, a_ref, b_ref.transpose((1, 0)))
            return acc[...]

        return pl.run_scoped(f, self.plgpu.ACC(shape, jnp.float32))

    def tile(self, ref):
        """A 16-bit (rows, D) tile from swizzled shared memory, as float32 in the WGMMA layout."""
        import jax.numpy as jnp

        if self.interp:
            return ref[...].astype(jnp.float32)
        return self.plgpu.load(ref, layout=self.plgpu.Layout.WGMMA).astype(jnp.float32)

    def mm_t2(self, shape, ab1, ab2):
        """(a1 @ b1^T, a2 @ b2^T), shared-memory operands, issued together (one wait)."""
        from jax.experimental import pallas as pl

        if self.interp:
            return self.mm_t(shape, *ab1), self.mm_t(shape, *ab2)

        def f(refs):
            r1, r2 = refs
            self.plgpu.wgmma(r1, ab1[0], ab1[1].transpose((1, 0)))
            self.plgpu.wgmma(r2, ab2[0], ab2[1].transpose((1, 0)))

        z = self.zeros(shape)
        return pl.run_state(f)((self.plgpu.ACC.init(z), self.plgpu.ACC.init(z)))

    def mm_acc2(self, t1, t2):
        """(acc1 + a1 @ b1, acc2 + a2 @ b2) for t = (acc, a in registers, b_ref), one wait."""
        from jax.experimental import pallas as pl

        if self.interp:
            return self.mm_acc(*t1), self.mm_acc(*t2)

        def f(refs):
            r1, r2 = refs
            self.plgpu.wgmma(r1, t1[1], t1[2])
            self.plgpu.wgmma(r2, t2[1], t2[2])

        return pl.run_state(f)((self.plgpu.ACC.init(t1[0]), self.plgpu.ACC.init(t2[0])))

    def mm_acc(self, acc, a, b_ref):
        """acc + a @ b with a in registers (16-bit, WGMMA layout) and b in shared memory."""
        import jax.numpy as jnp
        from jax.experimental import pallas as pl

        if self.interp:
            return acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)

        def f(acc_ref):
            self.plgpu.wgmma(acc_ref, a, b_ref)

        return pl.run_state(f)(self.plgpu.ACC.init(acc))


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret import params as gp

    return gp.InterpretGPUParams(uninitialized_memory="zero")


def _kernel(body, out_type, grid, names, interpret, scratch):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kw = {}
    if interpret:
        kw["interpret"] = _interpret_params()
    else:
        kw["compiler_params"] = plgpu.CompilerParams(approx_math=True)
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=names,
        num_threads=3,
        thread_name="wg",
        scratch_types=scratch,
        **kw,
    )


# ----------------------------------------------------------------------------- dQ


def _dq(q, k, v, do, lse2q, delta, sk, causal, c2, cfg, interpret, out=None, r=None, dlse=None):
    """q/do (B, Sqp, Hq, D), k/v (B, Skp, Hkv, D), lse2q (B, Hq, Sqp) f32 -> dq; with
    cfg.fused_delta, delta is None, out (and r, dlse when given) come in and it returns
    (dq, delta)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, Sqp, Hq, D = q.shape
    Skp, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bkv = cfg.block_q_dq, cfg.block_kv_dq
    n_kv = Skp // bkv
    stages = max(1, min(cfg.stages, n_kv))
    dtype = q.dtype
    ops = _Ops(interpret)
    tail = sk % bkv != 0  # non-causal: the last key block holds padded keys
    n_full = sk // bkv
    fused = cfg.fused_delta
    has_r, has_dlse = fused and r is not None, fused and dlse is not None
    tile_bytes = 2 * bq * D * jnp.dtype(dtype).itemsize  # one (2, bq, D) buffer
    # O and r tiles of their own where shared memory allows (D=128 with 128-key tiles doesn't)
    own = fused and cfg.own_or_tiles and (
        (2 + 1 + has_r) * tile_bytes + 2 * stages * bkv * D * jnp.dtype(dtype).itemsize
        <= 200 * 1024
    )

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref = refs[:5]
        i = 5
        if fused:
            o_ref, i = refs[i], i + 1
            r_ref, i = (refs[i], i + 1) if has_r else (None, i)
            dlse_ref, i = (refs[i], i + 1) if has_dlse else (None, i)
            dl_ref = None
        else:
            dl_ref, i = refs[i], i + 1
        dq_ref, i = refs[i], i + 1
        dl_out = None
        if fused:
            dl_out, i = refs[i], i + 1
        smem, bars, xsmem, xbars = refs[i:]
        q_smem, do_smem, k_smem, v_smem, lse_smem, dl_smem = smem
        q_full, do_full, lse_full, dl_full, k_full, v_full, free = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        if causal and cfg.heavy_first:
            tile = (Sqp // (2 * bq) - 1) - tile
        wg = lax.axis_index("wg")
        cta_rows = 2 * bq
        if causal:
            cta_steps = lax.div(tile * cta_rows + cta_rows + (bkv - 1), bkv)
        else:
            cta_steps = n_kv

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = tile * cta_rows + wg * bq
            rows = (b, pl.ds(row0, bq), h)
            vrows = (b, h, pl.ds(row0, bq))
            my_q, my_do = q_smem.at[wg], do_smem.at[wg]
            plgpu.copy_gmem_to_smem(do_ref.at[rows], my_do, do_full.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[vrows], lse_smem.at[wg], lse_full.at[wg])
            if fused:
                dlse_smem, *or_smem = xsmem
                dlse_full, *or_full = xbars
                if own:  # O, r and Q load at once, each into a tile of its own
                    o_s = or_smem[0].at[wg]
                    plgpu.copy_gmem_to_smem(o_ref.at[rows], o_s, or_full[0].at[wg])
                    if has_r:
                        r_s = or_smem[1].at[wg]
                        plgpu.copy_gmem_to_smem(r_ref.at[rows], r_s, or_full[1].at[wg])
                    plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, q_full.at[wg])
                else:
                    # O, then r, then Q go through my_q's buffer (one barrier, three phases):
                    # no extra shared memory (D=128 with 128-key K/V tiles is at the limit).
                    o_s = r_s = my_q
                    plgpu.copy_gmem_to_smem(o_ref.at[rows], my_q, q_full.at[wg])
                if has_dlse:
                    plgpu.copy_gmem_to_smem(dlse_ref.at[vrows], dlse_smem.at[wg], dlse_full.at[wg])
                plgpu.barrier_wait(or_full[0].at[wg] if own else q_full.at[wg])
                o32 = ops.tile(o_s)
                if has_r:
                    if not own:
                        plgpu.commit_smem()  # every thread has read O before r overwrites it
                        plgpu.copy_gmem_to_smem(r_ref.at[rows], my_q, q_full.at[wg])
                    plgpu.barrier_wait(or_full[1].at[wg] if own else q_full.at[wg])
                    o32 = o32 + ops.tile(r_s)
                plgpu.barrier_wait(do_full.at[wg])
                dl = (ops.tile(my_do) * o32).sum(axis=1)
                if has_dlse:
                    plgpu.barrier_wait(dlse_full.at[wg])
                    dl = dl - ops.vec(dlse_smem.at[wg], 1)
                dl_smem.at[wg][...] = dl
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dl_smem.at[wg], dl_out.at[vrows])
                if not own:
                    plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, q_full.at[wg])
            else:
                plgpu.copy_gmem_to_smem(q_ref.at[rows], my_q, q_full.at[wg])
                plgpu.copy_gmem_to_smem(dl_ref.at[vrows], dl_smem.at[wg], dl_full.at[wg])
                plgpu.barrier_wait(dl_full.at[wg])
                dl = ops.vec(dl_smem.at[wg], 1)
                plgpu.barrier_wait(do_full.at[wg])
            plgpu.barrier_wait(lse_full.at[wg])
            lse = ops.vec(lse_smem.at[wg], 1)
            plgpu.barrier_wait(q_full.at[wg])
            if causal:
                steps = lax.div(row0 + bq + (bkv - 1), bkv)
                full_steps = lax.div(row0 + 1, bkv)
            else:
                steps = n_kv
                full_steps = n_full if tail else n_kv

            def step(i, dq, masked):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_wait(v_full.at[slot])
                s, dp = ops.mm_t2((bq, bkv), (my_q, k_smem.at[slot]), (my_do, v_smem.at[slot]))
                p = jnp.exp2(s * c2 - lax.broadcast_in_dim(lse, s.shape, [0]))  # p * scale
                if masked:
                    r_ = ops.iota((bq, bkv), 0) + row0
                    c_ = ops.iota((bq, bkv), 1) + i * bkv
                    ok = (c_ <= r_) if causal else (c_ < sk)
                    p = jnp.where(ok, p, 0.0)
                ds = p * (dp - lax.broadcast_in_dim(dl, dp.shape, [0]))
                dq = ops.mm_acc(dq, ds.astype(dtype), k_smem.at[slot])
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = ops.zeros((bq, D))
            dq = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), dq)
            if causal or tail:
                dq = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), dq)
            if causal:

                def drain(i, _):  # slots streamed for the other consumer's rows
                    plgpu.barrier_arrive(free.at[lax.rem(i, jnp.int32(stages))])

                lax.fori_loop(steps, cta_steps, drain, None)
            my_q[...] = dq.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            hk = lax.div(h, jnp.int32(G))
            load = kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b, hk, bkv)
            produce(load, stages, cta_steps, lambda slot: plgpu.barrier_wait(free.at[slot]))

    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    xsmem = (plgpu.SMEM((2, bq) if has_dlse else (1,), jnp.float32),)
    xbars = (plgpu.Barrier(num_barriers=2),)
    if own:
        n_or = 1 + has_r
        xsmem += tuple(plgpu.SMEM((2, bq, D), dtype, transforms=tr) for _ in range(n_or))
        xbars += tuple(plgpu.Barrier(num_barriers=2) for _ in range(n_or))
    scratch = (
        (
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((2, bq), jnp.float32),
        ),
        (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ),
        xsmem,
        xbars,
    )
    args = [q, k, v, do, lse2q]
    out_type = out_struct(q.shape, dtype, q)
    if fused:
        args += [out] + ([r] if has_r else []) + ([dlse] if has_dlse else [])
        out_type = (out_type, out_struct((B, Hq, Sqp), jnp.float32, q))
    else:
        args.append(delta)
    return _kernel(
        body,
        out_type,
        (Hq, Sqp // (2 * bq), B),
        ("heads", "tiles", "batch"),
        interpret,
        scratch,
    )(*args)


# ----------------------------------------------------------------------------- dK, dV


def _dkdv(q, k, v, do, lse2, delta, causal: bool, c2: float, scale: float, cfg, interpret):
    """-> dk, dv (k's shape). Causal assumes Sq == Sk (padded alike)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from ._compat import out_struct

    B, Sqp, Hq, D = q.shape
    Skp, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bkv = cfg.block_q_dkv, cfg.block_kv_dkv
    nq = Sqp // bq
    dtype = q.dtype
    ops = _Ops(interpret)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, smem, bars):
        k_smem, v_smem, q_smem, do_smem, lse_smem, dl_smem = smem
        k_full, v_full, q_full, do_full, lse_full, dl_full, free = bars
        b = lax.axis_index("batch")
        hk = lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        wg = lax.axis_index("wg")
        cta_k0 = tile * (2 * bkv)
        lo = lax.div(cta_k0, bq) if causal else 0  # first query block any key of the CTA sees
        per_head = nq - lo  # steps streamed per query head
        stages = cfg.stages  # the ring never runs dry: per_head >= 1 for every CTA

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k0 = cta_k0 + wg * bkv
            rows = (b, pl.ds(k0, bkv), hk)
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[rows], my_k, k_full.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], my_v, v_full.at[wg])
            plgpu.barrier_wait(k_full.at[wg])
            plgpu.barrier_wait(v_full.at[wg])
            if causal:
                my_lo = lax.div(k0, bq)  # query blocks before it see none of these keys
                my_full = jnp.minimum(lax.div(k0 + bkv - 1 + bq - 1, bq), nq)
            else:
                my_lo = my_full = 0

            def wait_all(slot):
                plgpu.barrier_wait(q_full.at[slot])
                plgpu.barrier_wait(do_full.at[slot])
                plgpu.barrier_wait(lse_full.at[slot])
                plgpu.barrier_wait(dl_full.at[slot])

            def head(g, carry):
                base = g * per_head - lo  # step index of query block qb: base + qb

                def skip(qb, _):
                    slot = lax.rem(base + qb, jnp.int32(stages))
                    wait_all(slot)
                    plgpu.barrier_arrive(free.at[slot])

                def step(qb, carry, masked):
                    dk, dv = carry
                    slot = lax.rem(base + qb, jnp.int32(stages))
                    plgpu.barrier_wait(q_full.at[slot])
                    plgpu.barrier_wait(do_full.at[slot])
                    st, dpt = ops.mm_t2(
                        (bkv, bq), (my_k, q_smem.at[slot]), (my_v, do_smem.at[slot])
                    )
                    plgpu.barrier_wait(lse_full.at[slot])
                    lse = ops.vec(lse_smem.at[slot], 0)
                    pt = jnp.exp2(st * c2 - lax.broadcast_in_dim(lse, st.shape, [1]))
                    if masked:
                        kr = ops.iota((bkv, bq), 0) + k0
                        qr = ops.iota((bkv, bq), 1) + qb * bq
                        pt = jnp.where(qr >= kr, pt, 0.0)
                    plgpu.barrier_wait(dl_full.at[slot])
                    dl = ops.vec(dl_smem.at[slot], 0)
                    dst = pt * (dpt - lax.broadcast_in_dim(dl, dpt.shape, [1])) * scale
                    dk, dv = ops.mm_acc2(
                        (dk, dst.astype(dtype), q_smem.at[slot]),
                        (dv, pt.astype(dtype), do_smem.at[slot]),
                    )
                    plgpu.barrier_arrive(free.at[slot])
                    return dk, dv

                if causal:
                    lax.fori_loop(lo, my_lo, skip, None)
                    carry = lax.fori_loop(
                        my_lo, my_full, functools.partial(step, masked=True), carry
                    )
                    return lax.fori_loop(my_full, nq, functools.partial(step, masked=False), carry)
                return lax.fori_loop(0, nq, functools.partial(step, masked=False), carry)

            carry = (ops.zeros((bkv, D)), ops.zeros((bkv, D)))
            if G == 1:
                dk, dv = head(0, carry)
            else:
                dk, dv = lax.fori_loop(0, G, head, carry)
            my_k[...] = dk.astype(dtype)
            my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_k, dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(my_v, dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            total = G * per_head

            def load(t, slot, refill=False):
                g = lax.div(t, per_head)
                qb = t - g * per_head + lo
                hq = hk * G + g
                rows = (b, pl.ds(qb * bq, bq), hq)
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_full.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_full.at[slot])
                vr = (b, hq, pl.ds(qb * bq, bq))
                plgpu.copy_gmem_to_smem(lse_ref.at[vr], lse_smem.at[slot], lse_full.at[slot])
                plgpu.copy_gmem_to_smem(dl_ref.at[vr], dl_smem.at[slot], dl_full.at[slot])

            produce(load, stages, total, lambda slot: plgpu.barrier_wait(free.at[slot]),
                    jnp.int32)

    stages = cfg.stages
    tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        (
            plgpu.SMEM((2, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
        ),
        (
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        ),
    )
    return _kernel(
        body,
        (out_struct(k.shape, dtype, q), out_struct(v.shape, dtype, q)),
        (Hkv, Skp // (2 * bkv), B),
        ("heads", "tiles", "batch"),
        interpret,
        scratch,
    )(q, k, v, do, lse2, delta)


# ----------------------------------------------------------------------------- entry point


def _lcm(a, b):
    return a * b // math.gcd(a, b)


def backward(
    do,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    params,
    out_residual=None,
    cfg: MosaicBwdConfig | None = None,
    interpret: bool = False,
):
    """dq, dk, dv for dense q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); see supports()."""
    import jax.numpy as jnp

    B, Sq, Hq, D = q.shape
    if cfg is None:
        cfg = default_config(D, bool(params.causal), Sq)
    Sk = k.shape[1]
    causal = bool(params.causal)
    scale = float(params.scale)
    dtype = q.dtype
    do = do.astype(dtype)
    # delta = rowsum(dO * O32) - dlse, O32 = out + out_residual (the float32 output); with
    # cfg.fused_delta the dQ kernel computes it from its resident tiles.
    delta = None
    if not cfg.fused_delta:
        o32 = out.astype(jnp.float32)
        if out_residual is not None:
            o32 = o32 + out_residual.astype(jnp.float32)
        delta = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o32, axis=-1), -1, -2)
        if dlse is not None:
            delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).astype(jnp.float32)
    mq = _lcm(2 * cfg.block_q_dq, cfg.block_q_dkv)
    mk = _lcm(2 * cfg.block_kv_dkv, cfg.block_kv_dq)
    if causal:  # one padded length for both, so the causal mask is the same diagonal
        mq = mk = _lcm(mq, mk)
    sqp, skp = -(-Sq // mq) * mq, -(-Sk // mk) * mk

    def pad(x, n, axis, value=0.0):
        if x.shape[axis] == n:
            return x
        pads = [(0, 0)] * x.ndim
        pads[axis] = (0, n - x.shape[axis])
        return jnp.pad(x, pads, constant_values=value)

    qp, dop = pad(q, sqp, 1), pad(do, sqp, 1)
    kp, vp = pad(k, skp, 1), pad(v, skp, 1)
    lse2 = pad(lse2, sqp, 2, jnp.inf)
    c2 = scale * LOG2E
    # dQ: exp2(s * c2 - (lse2 - log2 scale)) = p * scale, so dS comes out scaled
    lse2q = lse2 - math.log2(scale)
    if cfg.fused_delta:
        rp = None if out_residual is None else pad(out_residual.astype(dtype), sqp, 1)
        dl = None if dlse is None else pad(dlse.astype(jnp.float32), sqp, 2)
        dq, delta = _dq(
            qp,
            kp,
            vp,
            dop,
            lse2q,
            None,
            Sk,
            causal,
            c2,
            cfg,
            interpret,
            out=pad(out.astype(dtype), sqp, 1),
            r=rp,
            dlse=dl,
        )
    else:
        delta = pad(delta, sqp, 2)
        dq = _dq(qp, kp, vp, dop, lse2q, delta, Sk, causal, c2, cfg, interpret)
    dk, dv = _dkdv(qp, kp, vp, dop, lse2, delta, causal, c2, scale, cfg, interpret)
    return dq[:, :Sq], dk[:, :Sk], dv[:, :Sk]
