"""Hopper forward through Pallas' Mosaic GPU lowering (plgpu): TMA, wgmma, warp specialization.

One CTA owns 2 * block_q query rows of one (batch, head): two consumer warpgroups take block_q
rows each, a third (producer) warpgroup streams K and V tiles with TMA into a ring of `stages`
shared-memory slots. Consumers wait on a slot's "full" barrier, run S = Q K^T on the tensor cores
(wgmma, accumulator in registers), the online softmax in base 2, then O += P V (P from registers),
and release the slot on its "free" barrier, which needs both consumers' arrivals before the producer
refills it. With `pingpong`, the two consumers hand the tensor cores back and forth through a
shared barrier so that one warpgroup's softmax overlaps the other's matmuls (FlashAttention-3).

Scope: float16/bfloat16, head_dim 64 or 128 (Dv == D), dense batches, no window except causal
with Sq == Sk, no softcap/dropout, Sq a multiple of 2 * block_q and Sk of block_kv. Everything
else goes to the Triton-lowering kernels. out and lse match the Triton forward, so its backward
kernels serve both.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class MosaicConfig:
    block_q: int = 64  # rows per consumer warpgroup (wgmma M = 64)
    block_kv: int = 128
    stages: int = 2
    pingpong: bool = True
    # GPU run C (NOTES.md): fma_softmax +1..11% over the run B kernel at D=128, on by default;
    # early_k_wait alone or with it within noise (+-3%), off.
    fma_softmax: bool = True  # scale the row max, not the tile: s*c - m becomes one FMA
    early_k_wait: bool = False  # wait for the next K tile while the PV wgmma runs


# Per head_dim defaults. D=64 streams 256-key tiles: session-4 run 1 (NOTES.md) measured them at
# +1..+6% over 128-key tiles and 1.00-1.06x attention_mgpu, except causal S=2048 (-4%: the
# diagonal's masked work grows with the tile): 128-key tiles there (causal Sk < 4096) and where
# Sk is not a multiple of 256.
CONFIGS: dict[int, MosaicConfig] = {64: MosaicConfig(block_kv=256), 128: MosaicConfig()}


def config_for(head_dim: int, seqlen_k: int, causal: bool = False) -> MosaicConfig:
    cfg = CONFIGS.get(head_dim, MosaicConfig())
    if cfg.block_kv > 128 and (seqlen_k % cfg.block_kv or (causal and seqlen_k < 4096)):
        cfg = dataclasses.replace(cfg, block_kv=128)
    return cfg


def available() -> bool:
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return all(hasattr(plgpu, n) for n in ("kernel", "wgmma", "Barrier", "SwizzleTransform"))
    except Exception:
        return False


def shared_reasons(q, k, v, params) -> list[str]:
    """What the Mosaic forward and backward both need: (B, S, H, D) arrays in fp16/bf16, head_dim
    64 or 128 (V's too), causal only with Sq == Sk, no window/softcap/dropout/varlen."""
    import jax.numpy as jnp

    out = []
    if q.ndim != 4:
        out.append("varlen")
    else:
        D = q.shape[-1]
        if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
            out.append("dtype")
        if D not in (64, 128) or v.shape[-1] != D:
            out.append("head_dim")
        if params.causal and q.shape[1] != k.shape[1]:
            out.append("causal with Sq != Sk")
    if params.has_window or params.softcap or params.dropout_p or params.varlen:
        out.append("window/softcap/dropout/varlen")
    return out


def supports(q, k, v, params, cfg: MosaicConfig) -> list[str]:
    """Reasons this problem can't take the Mosaic path (empty when it can)."""
    out = shared_reasons(q, k, v, params)
    if q.ndim == 4 and (q.shape[1] % (2 * cfg.block_q) or k.shape[1] % cfg.block_kv):
        out.append("seqlen not a block multiple")
    return out


def kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b, hk, bkv, k_free=None,
              v_free=None):
    """load(i, slot, refill=False): TMA copies of key block i's K and V tiles (rows i * bkv of
    batch b, KV head hk) into a slot, each signalling its `full` barrier. On a refill, K waits
    for k_free[slot] and V for v_free[slot] when given (the forward frees them apart)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def load(i, slot, refill=False):
        if refill and k_free is not None:
            plgpu.barrier_wait(k_free.at[slot])
        rows = (b, pl.ds(i * bkv, bkv), hk)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
        if refill and v_free is not None:
            plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

    return load


def produce(load, stages: int, total, wait=None, first=int):
    """The producer warpgroup's loop of the Mosaic GPU kernels (forward, dQ, dK/dV): steps
    0 .. stages-1 into their own slots (those below `total`), then step i + stages into slot
    i % stages once the consumers freed it: wait(slot) first when given, then
    load(i + stages, slot, True) (a loader may wait itself, as kv_loader's with k_free/v_free).
    `first` makes the first steps' index (e.g. jnp.int32)."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    for s_ in range(stages):
        pl.when(s_ < total)(functools.partial(load, first(s_), s_))

    def refill(i, _):
        slot = lax.rem(i, jnp.int32(stages))
        if wait is not None:
            wait(slot)
        load(i + stages, slot, True)

    lax.fori_loop(0, jnp.maximum(total - stages, 0), refill, None)


def forward(q, k, v, params, cfg: MosaicConfig | None = None, residual: bool = False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq) float32,
    and with residual=True out_residual (out's shape and dtype): float32 out - out."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cfg = cfg or config_for(D, Sk, bool(params.causal))
    G = Hq // Hkv
    bq, bkv = cfg.block_q, cfg.block_kv
    dtype = q.dtype
    causal = bool(params.causal)
    n_kv = Sk // bkv
    stages = max(1, min(cfg.stages, n_kv))
    c2 = float(params.scale) * LOG2E
    pingpong = cfg.pingpong
    fma, early = cfg.fma_softmax, cfg.early_k_wait

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, r_ref, scoped):
        smem, (k_full, v_full, q_full), (k_free, v_free), sched = scoped
        qo_smem, k_smem, v_smem, lse_smem, *r_smem = smem
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        wg = lax.axis_index("wg")
        cta_rows = 2 * bq
        if causal:  # steps the CTA's last row needs; the producer streams that many
            cta_steps = lax.div(tile * cta_rows + cta_rows + (bkv - 1), bkv)
        else:
            cta_steps = jnp.int32(n_kv)

        def sync():  # both consumers meet here (tensor-core hand-off)
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = tile * cta_rows + wg * bq
            my_q = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], my_q, q_full.at[wg])
            plgpu.barrier_wait(q_full.at[wg])
            if causal:
                steps = lax.div(row0 + bq + (bkv - 1), bkv)
                full_steps = lax.div(row0 + 1, bkv)  # blocks entirely at or below the diagonal
            else:
                steps = jnp.int32(n_kv)
                full_steps = steps
            red = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), red)
            l_ = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), red)
            acc = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            if pingpong:
                pl.when(wg == 1)(sync)
            # Python int when static: a concrete array closed over doesn't lower in Mosaic GPU.
            steps_w = steps if causal else n_kv
            if early:

                @pl.when(steps_w > 0 if causal else n_kv > 0)
                def _():
                    plgpu.barrier_wait(k_full.at[0])

            def step(i, carry, masked):
                acc, m, l_ = carry
                slot = lax.rem(i, jnp.int32(stages))
                if not early:
                    plgpu.barrier_wait(k_full.at[slot])

                def qk(s_ref):
                    plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                    if pingpong:
                        sync()
                    return s_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s2 = s if fma else s * c2
                if masked:
                    r = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                    c = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    s2 = jnp.where(c + i * bkv <= r + row0, s2, -jnp.inf)
                if fma:
                    m_new = jnp.maximum(m, s2.max(axis=1) * c2)
                    p = jnp.exp2(s2 * c2 - lax.broadcast_in_dim(m_new, s2.shape, [0]))
                else:
                    m_new = jnp.maximum(m, s2.max(axis=1))
                    p = jnp.exp2(s2 - lax.broadcast_in_dim(m_new, s2.shape, [0]))
                alpha = jnp.exp2(m - m_new)
                l_ = l_ * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_full.at[slot])
                if pingpong:
                    plgpu.barrier_wait(sched)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    if early:
                        nxt = i + 1

                        @pl.when(nxt < steps_w)
                        def _():
                            plgpu.barrier_wait(k_full.at[lax.rem(nxt, jnp.int32(stages))])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_

            carry = (acc, m, l_)
            carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
            if causal:
                carry = lax.fori_loop(
                    full_steps, steps, functools.partial(step, masked=True), carry
                )

                def drain(i, _):  # release the slots streamed for the other consumer's rows
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    if pingpong:
                        sync()
                        sync()

                lax.fori_loop(steps, cta_steps, drain, None)
            acc, m, l_ = carry
            if pingpong:
                pl.when(wg == 0)(sync)
            # Causal with Sq == Sk: every row sees at least key 0, so l > 0 here.
            inv = 1.0 / l_
            o32 = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            o16 = o32.astype(dtype)
            my_q[...] = o16
            if residual:  # the stored output's rounding error, for the backward's delta
                r_smem[0].at[wg][...] = (o32 - o16.astype(jnp.float32)).astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log2(l_)) * LN2
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
            load = kv_loader(k_ref, v_ref, k_smem, v_smem, k_full, v_full, b, hk, bkv,
                             k_free, v_free)
            produce(load, stages, cta_steps)

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref, *r_ref):
        tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, bq, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=tr),
            plgpu.SMEM((2, bq), jnp.float32),
        )
        if residual:  # one more (2, bq, D) tile: 32 KiB at D=128, within the 227 KiB budget
            smem = smem + (plgpu.SMEM((2, bq, D), dtype, transforms=tr),)
        r_out = r_ref[0] if residual else None
        pl.run_scoped(
            lambda *scoped: body(q_ref, k_ref, v_ref, o_ref, lse_ref, r_out, scoped),
            smem,
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    from ._compat import out_struct

    out_type = (out_struct((B, Sq, Hq, D), dtype, q), out_struct((B, Hq, Sq), jnp.float32, q))
    if residual:
        out_type = out_type + (out_struct((B, Sq, Hq, D), dtype, q),)
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(Hq, Sq // (2 * bq), B),
        grid_names=("heads", "tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v)
