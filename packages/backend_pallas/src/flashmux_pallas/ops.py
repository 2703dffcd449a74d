"""Wrappers around the Pallas kernels: padding, varlen packing, block-size choice, lowering choice.

forward(q, k, v, cu_q, cu_k, params) -> (out, lse) and backward(...) -> (dq, dk, dv) take and
return jax arrays in flashmux's layouts and are traceable (jit, vmap, grad through the core's
custom_vjp). Varlen batches are gathered into a padded (B, max_seqlen, H, D) layout with the real
lengths passed to the kernels, and gathered back; dense batches are padded only when a length is
not a block multiple, and head_dim only when it is not a power of two.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace

from ._compat import varying
from .triton_kernels import LOG2E, Static, dkdv_call, dq_call, forward_call, slopes_operand


@dataclass(frozen=True)
class Blocks:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Config:
    """Tuning knobs of one call: forward, dK/dV and dQ kernels."""

    fwd: Blocks
    dkdv: Blocks
    dq: Blocks
    fast_exp: bool = True  # GPU only (interpret mode always uses jnp.exp2)
    fused_delta: bool = True  # delta computed inside the dQ kernel (which then runs first)
    one_loop: bool = False  # kernels: one all-masked loop instead of masked/unmasked/masked ranges
    scale_ds: bool = True  # backward: round dS * scale (as plain attention), not dS


# Defaults by (padded head_dim, causal) for the Triton lowering. D=64 and D=128 come from the
# per-kernel sweep of GPU run B (H100, jax 0.11.2, S=4096; NOTES.md), D=64 causal from run C's
# sweep at S=2048; the rest are estimates.
_C, _B = Config, Blocks
GPU_CONFIGS: dict[tuple[int, bool], Config] = {}
for _d, _cfg in {
    16: _C(_B(128, 64, 4, 3), _B(32, 128, 4, 3), _B(128, 32, 4, 3)),
    32: _C(_B(128, 64, 4, 3), _B(32, 128, 4, 3), _B(128, 32, 4, 3)),
    256: _C(_B(64, 32, 4, 2), _B(32, 32, 4, 2), _B(32, 32, 4, 2)),
}.items():
    GPU_CONFIGS[(_d, False)] = GPU_CONFIGS[(_d, True)] = _cfg
GPU_CONFIGS.update(
    {
        (64, False): _C(_B(128, 64, 4, 4), _B(32, 128, 4, 5), _B(128, 64, 8, 3)),
        (64, True): _C(_B(128, 64, 4, 3), _B(64, 64, 4, 3), _B(128, 64, 8, 3)),
        (128, False): _C(_B(64, 64, 4, 3), _B(32, 128, 8, 3), _B(128, 32, 8, 3)),
        (128, True): _C(_B(128, 64, 8, 3), _B(64, 128, 8, 2), _B(128, 32, 4, 3)),
    }
)
# Interpret mode (CPU): small blocks keep the emulation cheap and exercise multi-block loops.
INTERPRET_CONFIG = Config(Blocks(16, 16, 4, 1), Blocks(16, 16, 4, 1), Blocks(16, 16, 4, 1))

_override: list[Config] = []


@contextlib.contextmanager
def use_config(cfg: Config):
    """Force block sizes (tests and tuning); read at trace time."""
    _override.append(cfg)
    try:
        yield
    finally:
        _override.pop()


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def on_cpu(x) -> bool:
    """Whether the arrays live on the CPU (interpret mode). Under jit: the default backend."""
    import jax

    try:
        devs = x.devices()
        return all(d.platform == "cpu" for d in devs)
    except Exception:  # a tracer: no device yet
        return jax.default_backend() == "cpu"


# Hopper forward through Mosaic GPU: "auto" and "on" (sm90, head_dim 64 or 128: faster than the
# Triton lowering there, +9-32% at D=128 in run B, +6-24% at D=64 in session-4 run 1), "off"
# (never).
MOSAIC_MODE = os.environ.get("FLASHMUX_PALLAS_MOSAIC", "auto")


def _compute_capability() -> tuple[int, int] | None:
    import jax

    try:
        dev = jax.devices()[0]
        cc = getattr(dev, "compute_capability", None)
        if cc is None:
            return None
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return None


# Block masks and ALiBi on Hopper through Mosaic GPU (mosaic_masks.py: the dense Mosaic forward
# walking the listed key blocks; mosaic_masks_bwd.py, the backward, below; elsewhere the Triton
# lowering, blocksparse.py / triton_kernels.py). FLASHMUX_PALLAS_MASKS (block-mask calls) and FLASHMUX_PALLAS_ALIBI (dense
# ALiBi calls): "auto" (sm90 where MASKS_MOSAIC_AUTO / ALIBI_MOSAIC_AUTO say it measured faster
# than the Triton lowering), "mosaic" (sm90, every call mosaic_masks.reasons accepts), "triton".
MASKS_MODE = os.environ.get("FLASHMUX_PALLAS_MASKS", "auto")
ALIBI_MODE = os.environ.get("FLASHMUX_PALLAS_ALIBI", "auto")
# Block masks: measured on the H200 (session 12, B4 S8k H16 D128 bf16, one process): the Mosaic
# forward 1.41-1.65x and forward+backward 1.74-1.94x the Triton lowering's speed on causal,
# sliding:1024 and doc:8 (packages/backend_pallas/NOTES.md). Dense ALiBi (call s12b, same
# shape): forward 1.19x, forward+backward 1.10x the Triton lowering's speed.
MASKS_MOSAIC_AUTO = True
ALIBI_MOSAIC_AUTO = True
# Their backward on Mosaic GPU (mosaic_masks_bwd.py): FLASHMUX_PALLAS_MASKS_BWD = auto|mosaic|
# triton for both (auto: block-mask calls where MASKS_BWD_MOSAIC_AUTO says it measured faster,
# dense ALiBi calls where ALIBI_MOSAIC_AUTO does; both measured faster in session 12).
MASKS_BWD_MODE = os.environ.get("FLASHMUX_PALLAS_MASKS_BWD", "auto")
MASKS_BWD_MOSAIC_AUTO = True


def _mosaic_masks_scope(q, k, v, params, mbs: int) -> list[str]:
    """What both passes' Mosaic block-mask / ALiBi kernels need, whatever the mode: sm90 with
    Mosaic GPU, and the call inside mosaic_masks.reasons (mask block `mbs`, 0: dense ALiBi)."""
    from . import mosaic_kernels, mosaic_masks

    cc = _compute_capability()
    if cc is None or cc[0] != 9 or not mosaic_kernels.available():
        return ["Mosaic GPU kernels need sm90 (Hopper)"]
    return mosaic_masks.reasons(q, k, v, params, mbs or mosaic_masks.BLOCK)


def mosaic_masks_reasons(q, k, v, params) -> list[str]:
    """Why a block-mask or dense ALiBi forward does not take the Mosaic GPU kernel
    (mosaic_masks.py) on this device (empty when it does)."""
    mbs = getattr(params, "mask_block_size", 0)
    env, mode, auto = (("FLASHMUX_PALLAS_MASKS", MASKS_MODE, MASKS_MOSAIC_AUTO) if mbs
                       else ("FLASHMUX_PALLAS_ALIBI", ALIBI_MODE, ALIBI_MOSAIC_AUTO))
    if mode == "triton" or MOSAIC_MODE == "off":
        return [f"{env}={mode}" if mode == "triton" else "FLASHMUX_PALLAS_MOSAIC=off"]
    out = _mosaic_masks_scope(q, k, v, params, mbs)
    if not out and mode == "auto" and not auto:
        out.append(f"not measured faster than the Triton lowering ({env}=mosaic forces it)")
    return out


def mosaic_masks_bwd_reasons(q, k, v, params) -> list[str]:
    """Why a block-mask or ALiBi backward does not take mosaic_masks_bwd.py (empty when it
    does): the forward's scope (mosaic_masks.reasons) and FLASHMUX_PALLAS_MASKS_BWD."""
    if MASKS_BWD_MODE == "triton":
        return ["FLASHMUX_PALLAS_MASKS_BWD=triton"]
    mbs = getattr(params, "mask_block_size", 0)
    out = _mosaic_masks_scope(q, k, v, params, mbs)
    auto = MASKS_BWD_MOSAIC_AUTO if mbs else ALIBI_MOSAIC_AUTO
    if not out and MASKS_BWD_MODE == "auto" and not auto:
        out.append("not measured faster than the Triton lowering "
                   "(FLASHMUX_PALLAS_MASKS_BWD=mosaic forces it)")
    return out


def lowering(q, k, v, params, interpret: bool) -> str:
    """Which lowering runs this forward: "interpret", "mosaic_gpu" or "triton"."""
    if interpret:
        return "interpret"
    if getattr(params, "mask_block_size", 0) or getattr(params, "alibi", False):
        # block masks / ALiBi: mosaic_masks.py where chosen, else the Triton lowering
        return "triton" if mosaic_masks_reasons(q, k, v, params) else "mosaic_gpu"
    if MOSAIC_MODE == "off":
        return "triton"
    from . import mosaic_kernels

    cc = _compute_capability()
    if cc is None or cc[0] != 9 or not mosaic_kernels.available():
        return "triton"
    cfg = mosaic_kernels.config_for(q.shape[-1], k.shape[-3], bool(params.causal))
    if mosaic_kernels.supports(q, k, v, params, cfg):
        return "triton"
    return "mosaic_gpu"


# Hopper backward through Mosaic GPU (mosaic_backward.py): "auto" (sm90, where MOSAIC_BWD_AUTO
# lists the (head_dim, causal) pair: where it measured at least as fast as the Triton lowering),
# "on" (sm90, every problem mosaic_backward.supports), "off" (never).
MOSAIC_BWD_MODE = os.environ.get("FLASHMUX_PALLAS_MOSAIC_BWD", "auto")
# GPU runs F and G (NOTES.md): backward alone +22-33% at D=128, +0-8% at D=64 over Triton.
MOSAIC_BWD_AUTO: frozenset[tuple[int, bool]] = frozenset(
    {(64, False), (64, True), (128, False), (128, True)}
)


def backward_lowering(q, k, v, params, interpret: bool) -> str:
    """Which lowering runs this backward: "interpret", "mosaic_gpu" or "triton"."""
    if interpret:
        return "interpret"
    if getattr(params, "mask_block_size", 0) or getattr(params, "alibi", False):
        # block masks / ALiBi: mosaic_masks_bwd.py where chosen, else the Triton lowering
        return "triton" if mosaic_masks_bwd_reasons(q, k, v, params) else "mosaic_gpu"
    if MOSAIC_BWD_MODE == "off":
        return "triton"
    from . import mosaic_backward, mosaic_kernels

    cc = _compute_capability()
    if cc is None or cc[0] != 9 or not mosaic_kernels.available():
        return "triton"
    if mosaic_backward.supports(q, k, v, params):
        return "triton"
    if MOSAIC_BWD_MODE == "auto" and (q.shape[-1], bool(params.causal)) not in MOSAIC_BWD_AUTO:
        return "triton"
    return "mosaic_gpu"


def choose_config(dp: int, causal: bool, interpret: bool) -> Config:
    if _override:
        return _override[-1]
    if interpret:
        return INTERPRET_CONFIG
    return GPU_CONFIGS[(max(16, min(256, dp)), bool(causal))]


def _fit(bl: Blocks, sq: int, sk: int) -> Blocks:
    """Shrink blocks for short sequences (powers of two, at least 16 for the tensor cores)."""
    bm = min(bl.block_m, _next_pow2(max(sq, 16)))
    bn = min(bl.block_n, _next_pow2(max(sk, 16)))
    return replace(bl, block_m=bm, block_n=bn)


@dataclass(frozen=True)
class Plan:
    """Padded shapes and per-kernel static configs for one problem."""

    sqp: int
    skp: int
    dp: int
    dvp: int
    fwd: Static
    dkdv: Static
    dq: Static


def make_plan(sq, sk, d, dv, hq, hkv, dtype, params, interpret: bool) -> Plan:
    import jax.numpy as jnp

    dp, dvp = _next_pow2(max(d, 16)), _next_pow2(max(dv, 16))
    cfg = choose_config(max(dp, dvp), params.causal, interpret)
    fwd, dkdv, dq = (_fit(b, sq, sk) for b in (cfg.fwd, cfg.dkdv, cfg.dq))
    mq = max(fwd.block_m, dkdv.block_m, dq.block_m)
    mk = max(fwd.block_n, dkdv.block_n, dq.block_n)
    sqp, skp = _round_up(max(sq, 1), mq), _round_up(max(sk, 1), mk)
    base = dict(
        scale=float(params.scale),
        window_left=params.window_left,
        window_right=params.window_right,
        softcap=float(params.softcap) if params.softcap else None,
        dropout_p=float(params.dropout_p),
        dropout_seed=0,  # an operand (_seed below): a new seed compiles nothing
        varlen=bool(params.varlen),
        seqlen_q=sq,
        seqlen_k=sk,
        group=hq // hkv,
        interpret=interpret,
        f32=jnp.dtype(dtype) == jnp.float32,
        fast_exp=cfg.fast_exp and not interpret,
        one_loop=cfg.one_loop,
        scale_ds=cfg.scale_ds and float(params.scale) > 0,  # log2(scale) needs scale > 0
        alibi=bool(getattr(params, "alibi", False)),
    )
    fused = dict(fused_delta=cfg.fused_delta)

    def st(b: Blocks) -> Static:
        return Static(
            block_m=b.block_m,
            block_n=b.block_n,
            num_warps=b.num_warps,
            num_stages=b.num_stages,
            **base,
        )

    return Plan(sqp, skp, dp, dvp, st(fwd), st(dkdv), replace(st(dq), **fused))


def _pad(x, seq_to: int, dim_to: int | None, seq_axis: int = 1, value=0.0):
    import jax.numpy as jnp

    pads = [(0, 0)] * x.ndim
    if dim_to is not None:
        pads[-1] = (0, dim_to - x.shape[-1])
    pads[seq_axis] = (0, seq_to - x.shape[seq_axis])
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads, constant_values=value)


# ----------------------------------------------------------------------------- varlen packing


def _lengths(cu):
    import jax.numpy as jnp

    lens = (cu[1:] - cu[:-1]).astype(jnp.int32)
    return jnp.broadcast_to(lens[:, None], (lens.shape[0], 16))


def _to_padded(x, cu, m: int, fill=0.0):
    """Packed (T, ...) rows -> (B, m, ...), rows past each sequence's end set to fill."""
    import jax.numpy as jnp

    t = x.shape[0]
    s = jnp.arange(m, dtype=jnp.int32)
    idx = cu[:-1, None].astype(jnp.int32) + s[None, :]
    valid = s[None, :] < (cu[1:] - cu[:-1])[:, None]
    g = jnp.take(x, jnp.clip(idx, 0, max(t - 1, 0)), axis=0)
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.where(valid, g, jnp.asarray(fill, x.dtype))


def _row_index(cu, t: int):
    """For each packed row: (sequence, offset inside it)."""
    import jax.numpy as jnp

    rows = jnp.arange(t, dtype=jnp.int32)
    b = jnp.searchsorted(cu.astype(jnp.int32), rows, side="right").astype(jnp.int32) - 1
    b = jnp.clip(b, 0, cu.shape[0] - 2)
    return b, rows - cu[b].astype(jnp.int32)


def _to_packed(x, cu, t: int):
    """(B, m, ...) -> packed (t, ...)."""
    b, s = _row_index(cu, t)
    return x[b, s]


# ----------------------------------------------------------------------------- entry points


def _shapes(q, k, v, params):
    if params.varlen:
        sq = int(params.max_seqlen_q) or q.shape[0]
        sk = int(params.max_seqlen_k) or k.shape[0]
    else:
        sq, sk = q.shape[1], k.shape[1]
    return sq, sk, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]


def forward(
    q,
    k,
    v,
    cu_q,
    cu_k,
    params,
    *,
    residual: bool = False,
    interpret: bool | None = None,
    alibi_slopes=None,
    dropout_seed=None,
    block_mask=None,
):
    """-> (out, lse), or (out, lse, out_residual) with residual=True: out_residual has out's shape
    and dtype and holds float32 out - out (zeros for float32 inputs), for the backward's delta.
    alibi_slopes: float32 (Hq,) or (B, Hq) (params.alibi), Triton lowering only.
    dropout_seed: a scalar integer array (traced or not) in place of params.dropout_seed."""
    import jax.numpy as jnp

    if interpret is None:
        interpret = on_cpu(q)
    # float32 outputs are stored exactly: their residual is zero, no kernel output needed.
    want = residual and jnp.dtype(q.dtype) != jnp.dtype(jnp.float32)
    low = lowering(q, k, v, params, interpret)
    if low == "mosaic_gpu" and (block_mask is not None or getattr(params, "alibi", False)):
        from . import blocksparse, mosaic_masks  # block masks / ALiBi on Mosaic GPU

        if block_mask is not None:
            blocksparse.check_mask(block_mask, q, k, params)
        res = mosaic_masks.forward(q, k, v, params, block_mask=block_mask,
                                   alibi_slopes=alibi_slopes, residual=want)
    elif block_mask is not None:  # block-sparse kernels (blocksparse.py)
        from . import blocksparse

        res = blocksparse.forward(q, k, v, params, residual=want, interpret=interpret,
                                  alibi_slopes=alibi_slopes, block_mask=block_mask,
                                  dropout_seed=dropout_seed)
    elif low == "mosaic_gpu":
        from . import mosaic_kernels

        res = mosaic_kernels.forward(q, k, v, params, residual=want)
    else:
        res = _forward_triton(q, k, v, cu_q, cu_k, params, want, interpret, alibi_slopes,
                              dropout_seed)
    if residual and not want:
        return (*res, jnp.zeros_like(res[0]))
    return res


def _slopes(alibi_slopes, q, cu_q, params, plan: Plan):
    """The kernels' (B, Hq, 16) slopes operand, or None without ALiBi."""
    if not plan.fwd.alibi:
        return None
    if alibi_slopes is None:
        raise ValueError("params.alibi is set but no alibi_slopes were passed")
    batch = cu_q.shape[0] - 1 if params.varlen else q.shape[0]
    return slopes_operand(alibi_slopes, batch, q.shape[-2])


def _seed(params, dropout_seed):
    """The kernels' (1, 16) int32 seed operand with dropout (the array seed, else the int)."""
    if not params.dropout_p:
        return None
    from .dropout import seed_operand

    return seed_operand(params.dropout_seed if dropout_seed is None else dropout_seed)


def _forward_triton(q, k, v, cu_q, cu_k, params, residual: bool, interpret: bool, alibi_slopes,
                    dropout_seed=None):
    import jax.numpy as jnp

    sq, sk, hq, hkv, d, dv = _shapes(q, k, v, params)
    plan = make_plan(sq, sk, d, dv, hq, hkv, q.dtype, params, interpret)
    slopes = _slopes(alibi_slopes, q, cu_q, params, plan)
    seed = _seed(params, dropout_seed)
    lq = lk = None
    if params.varlen:
        tq = q.shape[0]
        lq, lk = _lengths(cu_q), _lengths(cu_k)
        q, k, v = _to_padded(q, cu_q, sq), _to_padded(k, cu_k, sk), _to_padded(v, cu_k, sk)
    qp = _pad(q, plan.sqp, plan.dp)
    kp = _pad(k, plan.skp, plan.dp)
    vp = _pad(v, plan.skp, plan.dvp)
    outs = forward_call(qp, kp, vp, lq, lk, replace(plan.fwd, residual=residual), slopes, seed)
    out, lse = outs[0][:, :sq, :, :dv], outs[1][:, :, :sq]
    res = [outs[2][:, :sq, :, :dv]] if residual else []
    if params.varlen:
        out = _to_packed(out, cu_q, tq)
        res = [_to_packed(r, cu_q, tq) for r in res]
        b, s = _row_index(cu_q, tq)
        lse = jnp.transpose(lse[b, :, s])  # (Hq, Tq)
    return (out, lse, *res)


def backward(
    do,
    dlse,
    q,
    k,
    v,
    out,
    lse,
    cu_q,
    cu_k,
    params,
    *,
    out_residual=None,
    interpret: bool | None = None,
    alibi_slopes=None,
    dropout_seed=None,
    block_mask=None,
):
    import jax.numpy as jnp

    if interpret is None:
        interpret = on_cpu(q)
    if out_residual is not None and jnp.dtype(q.dtype) == jnp.dtype(jnp.float32):
        out_residual = None  # float32 outputs are exact: the residual is zeros
    low = backward_lowering(q, k, v, params, interpret)
    if low == "mosaic_gpu" and (block_mask is not None or getattr(params, "alibi", False)):
        from . import blocksparse, mosaic_masks_bwd  # block masks / ALiBi on Mosaic GPU

        if block_mask is not None:
            blocksparse.check_mask(block_mask, q, k, params)
        return mosaic_masks_bwd.backward(do, dlse, q, k, v, out, lse, params,
                                         block_mask=block_mask, out_residual=out_residual,
                                         alibi_slopes=alibi_slopes)
    if block_mask is not None:  # block-sparse kernels (blocksparse.py)
        from . import blocksparse

        return blocksparse.backward(do, dlse, q, k, v, out, lse, params,
                                    out_residual=out_residual, interpret=interpret,
                                    alibi_slopes=alibi_slopes, block_mask=block_mask,
                                    dropout_seed=dropout_seed)
    if low == "mosaic_gpu":
        from . import mosaic_backward

        return mosaic_backward.backward(
            do, dlse, q, k, v, out, lse, params, out_residual=out_residual, interpret=interpret
        )
    sq, sk, hq, hkv, d, dv = _shapes(q, k, v, params)
    plan = make_plan(sq, sk, d, dv, hq, hkv, q.dtype, params, interpret)
    slopes = _slopes(alibi_slopes, q, cu_q, params, plan)
    seed = _seed(params, dropout_seed)
    do = do.astype(q.dtype)
    # Interpret mode inside shard_map: the interpreter's grid loop starts every output unvarying
    # and rejects the dQ kernel's delta output (computed straight from varying input blocks).
    if plan.dq.fused_delta and not (interpret and varying(q)):
        return _backward_fused(
            do, dlse, q, k, v, out, lse, cu_q, cu_k, params, out_residual, plan, slopes, seed
        )
    # delta_i = rowsum(dO * O) - dlse_i: the softmax backward's row term (dlse folds in here).
    # O is the float32 output when the forward saved its rounding error (out_residual): on rows
    # that see few keys the rounded O's error in delta would exceed plain attention's.
    o32 = out.astype(jnp.float32)
    if out_residual is not None:
        o32 = o32 + out_residual.astype(jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o32, axis=-1)  # (.., S, Hq)
    delta = jnp.moveaxis(delta, -1, -2)  # (B, Hq, Sq) or (Hq, Tq)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    # lse in base 2; rows with no allowed key (lse = -inf) get +inf so that p = exp2(s - lse) = 0.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).astype(jnp.float32)
    lq = lk = None
    if params.varlen:
        tq, tk = q.shape[0], k.shape[0]
        lq, lk = _lengths(cu_q), _lengths(cu_k)
        q, do = _to_padded(q, cu_q, sq), _to_padded(do, cu_q, sq)
        k, v = _to_padded(k, cu_k, sk), _to_padded(v, cu_k, sk)
        lse2 = jnp.moveaxis(_to_padded(lse2.T, cu_q, sq, fill=jnp.inf), -1, -2)  # (B, Hq, sq)
        delta = jnp.moveaxis(_to_padded(delta.T, cu_q, sq), -1, -2)
    qp, dop = _pad(q, plan.sqp, plan.dp), _pad(do, plan.sqp, plan.dvp)
    kp, vp = _pad(k, plan.skp, plan.dp), _pad(v, plan.skp, plan.dvp)
    lse2 = _pad(lse2, plan.sqp, None, seq_axis=2, value=jnp.inf)
    delta = _pad(delta, plan.sqp, None, seq_axis=2)
    dk, dvv = dkdv_call(qp, kp, vp, dop, lse2, delta, lq, lk, plan.dkdv, slopes, seed)
    dq = dq_call(
        qp,
        kp,
        vp,
        dop,
        _dq_lse2(lse2, plan),
        delta,
        lq,
        lk,
        replace(plan.dq, fused_delta=False),
        slopes=slopes,
        seed=seed,
    )
    dq, dk, dvv = dq[:, :sq, :, :d], dk[:, :sk, :, :d], dvv[:, :sk, :, :dv]
    if params.varlen:
        dq, dk, dvv = _to_packed(dq, cu_q, tq), _to_packed(dk, cu_k, tk), _to_packed(dvv, cu_k, tk)
    return dq, dk, dvv


def _dq_lse2(lse2, plan: Plan):
    """The dQ kernel's row offsets: with scale_ds, exp2(s2 - (lse2 - log2(scale))) = p * scale."""
    return lse2 - math.log2(plan.dq.scale) if plan.dq.scale_ds else lse2


def _backward_fused(do, dlse, q, k, v, out, lse, cu_q, cu_k, params, r, plan: Plan, slopes=None,
                    seed=None):
    """dQ first (it computes delta from O, r, dO and dlse), then dK/dV."""
    import jax.numpy as jnp

    sq, sk, hq, hkv, d, dv = _shapes(q, k, v, params)
    # lse in base 2 (a pass over lse only); rows with no allowed key get +inf so p = 0.
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E).astype(jnp.float32)
    dlse = None if dlse is None else dlse.astype(jnp.float32)
    lq = lk = None
    if params.varlen:
        tq, tk = q.shape[0], k.shape[0]
        lq, lk = _lengths(cu_q), _lengths(cu_k)
        q, do, out = (_to_padded(x, cu_q, sq) for x in (q, do, out))
        r = None if r is None else _to_padded(r, cu_q, sq)
        k, v = _to_padded(k, cu_k, sk), _to_padded(v, cu_k, sk)
        lse2 = jnp.moveaxis(_to_padded(lse2.T, cu_q, sq, fill=jnp.inf), -1, -2)  # (B, Hq, sq)
        if dlse is not None:
            dlse = jnp.moveaxis(_to_padded(dlse.T, cu_q, sq), -1, -2)
    qp, dop = _pad(q, plan.sqp, plan.dp), _pad(do, plan.sqp, plan.dvp)
    kp, vp = _pad(k, plan.skp, plan.dp), _pad(v, plan.skp, plan.dvp)
    op = _pad(out, plan.sqp, plan.dvp)
    rp = None if r is None else _pad(r, plan.sqp, plan.dvp)
    lse2 = _pad(lse2, plan.sqp, None, seq_axis=2, value=jnp.inf)
    dlse = None if dlse is None else _pad(dlse, plan.sqp, None, seq_axis=2)
    st = replace(plan.dq, has_r=rp is not None, has_dlse=dlse is not None)
    dq, delta = dq_call(
        qp,
        kp,
        vp,
        dop,
        _dq_lse2(lse2, plan),
        None,
        lq,
        lk,
        st,
        out=op,
        r=rp,
        dlse=dlse,
        slopes=slopes,
        seed=seed,
    )
    dk, dvv = dkdv_call(qp, kp, vp, dop, lse2, delta, lq, lk, plan.dkdv, slopes, seed)
    dq, dk, dvv = dq[:, :sq, :, :d], dk[:, :sk, :, :d], dvv[:, :sk, :, :dv]
    if params.varlen:
        dq, dk, dvv = _to_packed(dq, cu_q, tq), _to_packed(dk, cu_k, tk), _to_packed(dvv, cu_k, tk)
    return dq, dk, dvv
