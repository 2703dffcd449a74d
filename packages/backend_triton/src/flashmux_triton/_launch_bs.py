"""Torch-side launchers of the block-sparse kernels (`_kernels_bs`), for calls with block_mask=
(padded batches only: the core declines block_mask with cu_seqlens)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from . import _kernels as K
from . import _kernels_bs as KB
from . import tuning as T
from ._launch import _last_contig, _Problem, _slopes, _tma_views, _tuning

_TMA_BROKEN: set = set()


def _tma(pb, k, v):
    """The dense forward's K/V tensor-descriptor views (`_launch._tma_views`: sm90+, head_dim
    >= 128 by default, FLASHMUX_TRITON_TMA) for the block-sparse forward and dQ kernels' tiles
    that need no sequence bound (every tile unless a length is off the mask block or the call
    has causal/window); FLASHMUX_TRITON_BS_TMA=0 turns it off here only. None: pointer loads."""
    if os.environ.get("FLASHMUX_TRITON_BS_TMA", "1") == "0" or pb.shape in _TMA_BROKEN:
        return None
    return _tma_views(pb, k, v)


def _tma_q(pb, q, do):
    """The same for the dK/dV kernel's Q and dO tiles: (rows, Hq * dim) views, or None."""
    gate = _tma(pb, q, do)  # the device/dtype/head-dim/env conditions (views rebuilt for Hq)
    if gate is None:
        return None
    views = []
    for x, d in ((q, pb.d), (do, pb.dv)):
        if (x.stride(-1) != 1 or x.stride(-2) != d or x.stride(1) != pb.hq * d
                or x.stride(0) != x.shape[1] * x.stride(1)):
            return None
        views.append((x, [x.shape[0] * x.shape[1], pb.hq * d], [x.stride(1), 1], d))
    return gate[0], views


def _merged():
    """FLASHMUX_TRITON_BS_LOOP=merged: walk a block's full and partial tiles in one loop (a
    tile's kind is a runtime branch around its bitmask). Off by default: on the H200 (session 8,
    18:25) it was slower wherever full tiles dominate (prefix:8192 fwd 5.53 ms vs 4.47 with one
    loop per kind, causal 2.98 vs 2.49) and faster only on the sparsest masks (doc:64 0.50 vs
    0.59, dilated 0.68 vs 0.75)."""
    return os.environ.get("FLASHMUX_TRITON_BS_LOOP", "two") == "merged"


def _descs(tma, k, v, bn):
    """(DESC_K, DESC_V) with (bn, head_dim) blocks, or K and V themselves (unused) without."""
    if tma is None:
        return k, v
    TD, views = tma
    return tuple(TD(x, shape, strides, [bn, d]) for x, shape, strides, d in views)


def _with_tma(pb, tma, go):
    """go(tma); a compiler without working descriptors falls back to pointer loads (once per
    problem shape, as the dense forward does)."""
    if tma is not None:
        try:
            return go(tma)
        except Exception:  # noqa: BLE001 - no working descriptors: pointer loads
            _TMA_BROKEN.add(pb.shape)
    return go(None)


def _mask_args(bm, hq):
    """Mask operands and their broadcast flags: (arrays..., mask_b, mask_h, Hm, nQ, nK)."""
    a = {n: x.contiguous() for n, x in zip(
        ("kind", "qnf", "qfi", "qnp", "qpi", "knf", "kfi", "knp", "kpi", "tile", "bits"),
        bm.arrays())}
    bmb, hm = a["kind"].shape[0], a["kind"].shape[1]
    if a["bits"].numel() == 0:  # no partial tile: a valid pointer all the same
        a["bits"] = torch.zeros(1, dtype=torch.int32, device=a["kind"].device)
    flags = (1 if bmb > 1 else 0, 1 if hm > 1 else 0, hm, bm.num_q_blocks, bm.num_kv_blocks)
    return a, flags


@dataclass(frozen=True)
class _BsConfig(T.KernelConfig):
    """A block-sparse kernel's config with ptxas's register cap (0: none): 128 registers at 8
    warps lets two 256-thread programs share an SM (the sm_90 compile of the 128x64 forward:
    174 -> 128 registers, 56 B of spill, 97 KiB of shared memory)."""

    maxnreg: int = 0


def _opts(cfg):
    """Launch options of a config: warps, stages, and maxnreg when capped."""
    o = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if getattr(cfg, "maxnreg", 0):
        o["maxnreg"] = cfg.maxnreg
    return o


def _launch(pb, which, mbs, run, plain=True):
    """run(cfg, block_m, block_n) with the plain kernels' tiles for this shape class, capped at
    the mask block (kernel tiles divide it: both are powers of two); smaller tiles on
    shared-memory exhaustion. FLASHMUX_TRITON_BS_FWD / _BWD_DQ / _BWD_DKDV = "m,n,warps,stages"
    set one kernel's config (for sweeps on a GPU), with an optional fifth field, ptxas's
    register cap (maxnreg: "128,64,8,2,128")."""
    t = _tuning(pb)
    env = os.environ.get("FLASHMUX_TRITON_BS_" + which.upper())  # "block_m,block_n,warps,stages"
    if env:  # a tile config for the block-sparse kernel only (GPU sweeps; tuning.py untouched)
        t = T.with_config(t, which, _BsConfig(*(int(x) for x in env.split(","))))
    elif _bs_default(pb, which, plain) is not None:
        t = T.with_config(t, which, _bs_default(pb, which, plain))
    while True:
        cfg = getattr(t, which)
        try:
            return run(cfg, min(cfg.block_m, mbs), min(cfg.block_n, mbs))
        except triton.runtime.errors.OutOfResources:
            t = T.smaller(t, which)
            if t is None:
                raise


# The block-sparse kernels' own defaults where they differ from the dense kernels' (tuning.py),
# for the class the H200 measured: sm90+, 16-bit, head_dim 128 (call s9a, 2026-11-30 20:55,
# NOTES.md "Block-sparse kernels, session 9"), keyed by (preloaded walk?, kernel):
# - the forward at 128x64, 8 warps, ptxas capped at 128 registers: two programs per SM, so one
#   program's start and end (Q load, first K/V copies, O/lse store) hide behind the other's
#   MMAs: forward time on every mask of the sweep down (sliding:1024 0.793 -> 0.672 ms, doc:8
#   0.933 -> 0.776, causal 2.551 -> 2.312, prefix:8192 4.597 -> 4.320 ms);
# - the dQ and dK/dV kernels on the preloaded walk (PRE) with tuning.py's tiles, whose pipeline
#   then keeps 3 buffers: backward down on every mask (prefix:8192 15.9 -> 14.1 ms, causal
#   8.49 -> 7.49, doc:8 2.98 -> 2.72, sliding:1024 2.59 -> 2.51).
# Call s9b (21:38) timed the two together against session 8's kernels in one process (bf16 8k):
# fwd_bwd prefix:8192 20.28 -> 17.98 ms, causal 10.97 -> 10.03, doc:8 3.82 -> 3.49; faster than
# six other combinations in every cell. fp16 takes the same code (not timed).
# - session 10: the dK/dV kernel at 64x64, 4 warps, 2 stages, on the plain walk (255 registers
#   x 128 threads, 97 KiB: two programs per SM, one program's start and dK/dV stores hidden
#   behind the other's tiles): call s10a's profile, dK/dV kernel time sliding:1024 1445 -> 1237
#   us, doc:8 1605 -> 1392, prefix:8192 8945 -> 8016; call s10b (00:15, one process, bf16 8k
#   f+b ms, session 9's default -> this): prefix:8192 18.25 -> 16.73, causal 9.83 -> 9.28,
#   sliding:1024 3.20 -> 2.97, sliding:4096 7.69 -> 7.13, doc:8 3.48 -> 3.29, doc:64 2.35 ->
#   1.92, prefix:2048 10.21 -> 10.00, dilated 2.86 -> 2.74, chunked 2.34 -> 2.06 (sum -6.8%;
#   the same tiles on the preloaded walk: sum -4.9%, doc:64 +3%). Plain calls only (as the
#   forward's: ALiBi/softcap/dropout/window were not timed).
_BS_SM90_D128: dict = {
    (False, "fwd"): _BsConfig(128, 64, 8, 2, 128),
    # the same tiles when FLASHMUX_TRITON_BS_PRE turns the forward's preloaded walk on (97 KiB,
    # 2 buffers; tuning.py's 128x128x8x3 would need 228 KiB preloaded, over the limit)
    (True, "fwd"): _BsConfig(128, 64, 8, 2, 128),
    (True, "bwd_dkdv"): _BsConfig(64, 64, 4, 2),
    (False, "bwd_dkdv"): _BsConfig(64, 64, 4, 2),
}
_PRE_DEFAULT = "dq,dkdv"  # FLASHMUX_TRITON_BS_PRE's default for that class (else "0"), except
# the plain calls' dK/dV kernel (the 2/SM one, faster on the plain walk in call s10b)


def _measured_class(pb) -> bool:
    """The class the defaults above were measured on: sm90+, 16-bit, head_dim 128, on a GPU."""
    return (not pb.interpret and not pb.ieee and pb.capability is not None
            and pb.capability >= (9, 0) and pb.d == 128 and pb.dv == 128)


def _bs_default(pb, which, plain=True):
    """The block-sparse config of `which` for this problem from _BS_SM90_D128, or None. The
    forward's (capped at 128 registers) and the dK/dV kernel's only for plain calls (`plain`: no
    ALiBi, softcap, dropout, causal/window, lengths on the mask block): the sm_90 compile spills
    64-256 B with those at the forward's cap, and only plain calls were measured."""
    if not _measured_class(pb) or (which in ("fwd", "bwd_dkdv") and not plain):
        return None
    return _BS_SM90_D128.get((_pre(which.replace("bwd_", ""), pb, plain), which))


def _check_full(pb, mbs):
    return pb.has_left or pb.has_right or pb.seqlen_q % mbs != 0 or pb.seqlen_k % mbs != 0


def _common_flags(pb):
    return dict(
        GROUP=pb.group, HEAD_DIM=pb.d, HEAD_DIM_V=pb.dv, BLOCK_D=pb.block_d,
        BLOCK_DV=pb.block_dv, HAS_LEFT=pb.has_left, HAS_RIGHT=pb.has_right, SOFTCAP=pb.softcap,
        DROPOUT=pb.dropout, IEEE=pb.ieee,
    )


def forward(q, k, v, params, residual, alibi_slopes, bm, dropout_seed=None):
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    pb = _Problem(q, k, v, None, None, params, dropout_seed)
    out = torch.empty(q.shape[:-1] + (pb.dv,), dtype=q.dtype, device=q.device)
    lse = torch.empty((pb.batch, pb.hq, pb.seqlen_q), dtype=torch.float32, device=q.device)
    res = torch.empty_like(out) if residual and q.dtype != torch.float32 else None
    done = (out, lse, res) if residual else (out, lse)
    if pb.batch == 0 or pb.seqlen_q == 0:
        return done
    slopes, stride_sb = _slopes(pb, alibi_slopes, q)
    a, mflags = _mask_args(bm, pb.hq)
    mbs = bm.block_size

    def run(cfg, bm_, bn, tma):
        # FOLD (a positive multiplier): the scale goes into exp2's FMA, as in the plain forward
        grid = (triton.cdiv(pb.seqlen_q, bm_), pb.hq, pb.batch)
        _fwd(grid, q, k, v, out, lse, res, slopes, stride_sb, a, mflags, pb, cfg, bm_, bn, mbs,
             alibi_slopes is not None, tma)

    tma = _tma(pb, k, v)
    # the capped 2/SM forward for what was measured: no ALiBi/softcap/dropout, no causal/window,
    # lengths on the mask block (no bounds checks: CHECK_FULL off)
    plain = alibi_slopes is None and not (pb.softcap or pb.dropout or _check_full(pb, mbs))
    _with_tma(pb, tma, lambda t: _launch(pb, "fwd", mbs, lambda c, m, n: run(c, m, n, t), plain))
    return done


def _fwd(grid, q, k, v, out, lse, res, slopes, stride_sb, a, mflags, pb, cfg, bm_, bn, mbs, alibi,
         tma=None):
    pre = _pre("fwd", pb) and not _merged()
    KB.bs_fwd[grid](
        q, k, v, out, lse, out if res is None else res, slopes,
        a["qnf"], a["qfi"], a["qnp"], a["qpi"], a["tile"], a["bits"],
        _ptid(a) if pre else a["qpi"], *_descs(tma, k, v, bn),
        *pb.strides(q, False), *pb.strides(k, False), *pb.strides(v, False),
        *pb.strides(out, False), lse.stride(0), lse.stride(1), stride_sb,
        pb.seqlen_q, pb.seqlen_k, pb.window_left, pb.window_right,
        _scale_a(pb), pb.scale_b, pb.p_drop, pb.drop_scale, pb.seed, pb.hq, *mflags,
        BLOCK_M=bm_, BLOCK_N=bn, MBS=mbs, CHECK_FULL=_check_full(pb, mbs), **_common_flags(pb),
        RESID=res is not None, ALIBI=alibi, TMA=tma is not None, FOLD=pb.fold,
        MERGED=_merged(), WS=_ws(pb), PRE=pre,
        **_opts(cfg),
    )


def _pre(which="fwd", pb=None, plain=False):
    """Whether kernel `which` ("fwd", "dq", "dkdv") walks its lists preloaded
    (`_kernels_bs._bs_pre`): FLASHMUX_TRITON_BS_PRE = 1 (all three), 0 (none), or a comma list
    of kernels; unset: _PRE_DEFAULT for the measured class (`_measured_class`), none elsewhere.
    A preloaded kernel loads its lists' counts and first entries before its Q (K/V) tile and
    carries each walk's next entry: the sm_90 SASS without it shows ~3 dependent round trips
    before the first tile (Q, list index, K/V) and ~4 between the full and the partial walk
    (partial count, index, tile id, K/V + bitmask), and only 2 K/V buffers whatever
    num_stages says."""
    env = os.environ.get("FLASHMUX_TRITON_BS_PRE")
    if env is None:
        env = _PRE_DEFAULT if pb is not None and _measured_class(pb) else "0"
        if which == "dkdv" and plain:  # the plain calls' 2/SM dK/dV default: plain walk (s10b)
            return False
    if env in ("0", "1"):
        return env == "1"
    return which in env.split(",")


def _ptid(a):
    """Per-slot tile ids of the partial lists, (rows, n_kb) int32: ptid[r, t] = tile[r,
    qpi[r, t]] (slots past the count hold a clamped, unused value). Two small device ops per
    call, no host read; lets a walk load a partial tile's key block and bitmask id together."""
    qpi, tile = a["qpi"], a["tile"]
    nk = tile.shape[-1]
    flat = tile.reshape(-1, nk)
    idx = qpi.reshape(-1, qpi.shape[-1]).long().clamp_(0, nk - 1)
    return torch.gather(flat, 1, idx).reshape(qpi.shape).contiguous()


def _ptid_kv(a):
    """The same for the transposed (per key block) partial lists: ptid[c, t] = tile[., kpi[c,
    t], kb] for column c = (bhm, kb)."""
    kpi, tile = a["kpi"], a["tile"]
    nq = tile.shape[-2]
    flat = tile.transpose(-1, -2).reshape(-1, nq)
    idx = kpi.reshape(-1, kpi.shape[-1]).long().clamp_(0, nq - 1)
    return torch.gather(flat, 1, idx).reshape(kpi.shape).contiguous()


def _fuse_delta():
    """FLASHMUX_TRITON_BS_FUSE_DELTA=1: no preprocess launch; the dQ kernel computes its rows'
    delta (rowsum(dO * O) - dlse) from the dO tile it loads anyway plus O, stores it, and runs
    before the dK/dV kernel (call s10a: the preprocess is ~102 us of a sparse 8k f+b, ~3%).
    Off until the H200 measures it."""
    return os.environ.get("FLASHMUX_TRITON_BS_FUSE_DELTA", "0") == "1"


# The block-sparse backward's layout for the measured class (`_measured_class`), by call kind
# (plain: `plain` in `backward`): "split" (the dK/dV kernel, then the dQ kernel), "fused" (dQ
# in the dK/dV program, FLASHMUX_TRITON_BS_FUSED_DQ) or "joint" (one launch,
# FLASHMUX_TRITON_BS_JOINT). Elsewhere "split".
_BWD_LAYOUT = {True: "split", False: "split"}


def _bwd_layout(pb, params, plain) -> str:
    """The backward's layout: the env knobs (=1 on, =0 off) first, then `_BWD_LAYOUT`.

    "fused" (FLASHMUX_TRITON_BS_FUSED_DQ): dQ computed in the dK/dV program (dQ += (scale dS) K,
    float32 atomics into a zeroed buffer, then one copy into dq) instead of the dQ kernel: no dQ
    programs (their Q/dO/K/V loads and dQ stores) and 5 matmuls per tile instead of 7 (the dQ
    kernel recomputes S and dP), for the reductions' traffic and the float32 buffer (zero, add,
    copy). Not deterministic (atomic order): deterministic calls keep the dQ kernel.
    "joint" (FLASHMUX_TRITON_BS_JOINT): the two kernels' programs in one launch (`_joint_cfg`)."""
    fd = os.environ.get("FLASHMUX_TRITON_BS_FUSED_DQ", "auto")
    jo = os.environ.get("FLASHMUX_TRITON_BS_JOINT", "auto")
    if fd == "1" and not params.deterministic:
        return "fused"
    if jo == "1":
        return "joint"
    auto = _BWD_LAYOUT[bool(plain)] if _measured_class(pb) else "split"
    if (auto == "fused" and (fd == "0" or params.deterministic)) or (auto == "joint" and jo == "0"):
        return "split"
    return auto


_JOINT_CFG = "64,128,128,64,8,3"  # (m1, n1, m2, n2, warps, stages) of the joint launch


def _joint_cfg():
    """The joint launch's tiles (`bs_bwd_joint`, FlexAttention's backward layout), "m1,n1,m2,
    n2,warps,stages" from FLASHMUX_TRITON_BS_JOINT_CFG (default 64,128,128,64,8,3: flex's sm90
    d128 backward config, and our dK/dV/dQ tiles before session 10)."""
    env = os.environ.get("FLASHMUX_TRITON_BS_JOINT_CFG", _JOINT_CFG)
    return tuple(int(x) for x in env.split(","))


def _ws(pb):
    """FLASHMUX_TRITON_BS_WS=1: the forward's walks warp-specialized (Triton's automatic
    producer/consumer split, as the dense forward's interior loop at head_dim 128 on the H200);
    calls without causal/window and with lengths on the mask block only (CHECK_FULL off).
    Opt-in until the H200 measures it; not under the interpreter."""
    return os.environ.get("FLASHMUX_TRITON_BS_WS", "0") == "1" and not pb.interpret


def _scale_a(pb):
    # _Problem's scale_a is the pre-softcap multiplier (softcap) or scale * log2(e) (no softcap):
    # the backward kernels multiply by it; the forward folds it into exp2 when pb.fold
    return pb.scale_a


def backward(do, dlse, q, k, v, out, lse, params, out_residual, alibi_slopes, bm,
             dropout_seed=None):
    q, k, v, out, do = (_last_contig(x) for x in (q, k, v, out, do))
    pb = _Problem(q, k, v, None, None, params, dropout_seed)
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if pb.batch == 0 or pb.seqlen_q == 0 or pb.seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse_arg = dlse.to(torch.float32).contiguous() if has_dlse else lse
    has_res = out_residual is not None and out_residual.numel() > 0
    if has_res:
        out, out_residual = out.contiguous(), out_residual.contiguous()
    pre_m = 64 if not pb.interpret else 32
    fuse = _fuse_delta()  # the dQ kernel computes delta (no preprocess launch)
    if not fuse:
        K.attn_bwd_preprocess[(triton.cdiv(pb.seqlen_q, pre_m), pb.hq, pb.batch)](
            out, out_residual if has_res else out, do, dlse_arg, delta, q,
            *pb.strides(out, False), *pb.strides(do, False), lse.stride(0), lse.stride(1),
            pb.seqlen_q, HEAD_DIM_V=pb.dv, BLOCK_M=pre_m, BLOCK_DV=pb.block_dv, VARLEN=False,
            HAS_DLSE=has_dlse, HAS_RESID=has_res,
        )
    slopes, stride_sb = _slopes(pb, alibi_slopes, q)
    a, mflags = _mask_args(bm, pb.hq)
    mbs = bm.block_size
    common = (
        pb.seqlen_q, pb.seqlen_k, pb.window_left, pb.window_right,
        _scale_a(pb), pb.scale_b, float(params.scale), pb.p_drop, pb.drop_scale, pb.seed, pb.hq,
        *mflags,
    )
    flags = dict(MBS=mbs, CHECK_FULL=_check_full(pb, mbs), **_common_flags(pb),
                 ALIBI=alibi_slopes is not None)
    pre_dq = _pre("dq", pb) and not _merged()  # dQ's and dK/dV's walks as the forward's
    plain = alibi_slopes is None and not (pb.softcap or pb.dropout or _check_full(pb, mbs))
    pre_kv = _pre("dkdv", pb, plain) and not _merged()
    layout = "split" if fuse else _bwd_layout(pb, params, plain)
    fdq = layout == "fused"
    joint = _joint_cfg() if layout == "joint" else None
    dq_acc = torch.empty(q.shape, dtype=torch.float32, device=q.device) if fdq else None

    def fdq_args(bm_, tma):
        if not fdq:
            return {}
        from ._launch import _dqa_desc

        dq_acc.zero_()  # every launch starts over (a retry with smaller tiles too)
        desc = _dqa_desc(pb, dq_acc, bm_) if tma is not None else None
        return dict(DQA=dq_acc, stride_dqab=dq_acc.stride(0), stride_dqas=dq_acc.stride(1),
                    stride_dqah=dq_acc.stride(2), DESC_DQA=desc if desc is not None else dq_acc,
                    FUSED_DQ=True, DQ_TMA=desc is not None)

    def run_dkdv(cfg, bm_, bn, tma):
        fa = fdq_args(bm_, tma)
        KB.bs_bwd_dkdv[(triton.cdiv(pb.seqlen_k, bn), pb.hkv, pb.batch)](
            q, k, v, do, lse, delta, dk, dv, slopes,
            a["knf"], a["kfi"], a["knp"], a["kpi"], a["tile"], a["bits"],
            _ptid_kv(a) if pre_kv else a["kpi"], *_descs(tma, q, do, bm_),
            *pb.strides(q, False), *pb.strides(k, False), *pb.strides(v, False),
            *pb.strides(do, False), *pb.strides(dk, False), *pb.strides(dv, False),
            lse.stride(0), lse.stride(1), stride_sb, *common,
            BLOCK_M=bm_, BLOCK_N=bn, **flags, TMA=tma is not None, MERGED=_merged(), PRE=pre_kv,
            **fa, **_opts(cfg),
        )

    def run_dq(cfg, bm_, bn, tma):
        KB.bs_bwd_dq[(triton.cdiv(pb.seqlen_q, bm_), pb.hq, pb.batch)](
            q, k, v, do, lse, delta, dq, slopes,
            a["qnf"], a["qfi"], a["qnp"], a["qpi"], a["tile"], a["bits"],
            _ptid(a) if pre_dq else a["qpi"], *_descs(tma, k, v, bn),
            *pb.strides(q, False), *pb.strides(k, False), *pb.strides(v, False),
            *pb.strides(do, False), *pb.strides(dq, False),
            lse.stride(0), lse.stride(1), stride_sb, *common,
            BLOCK_M=bm_, BLOCK_N=bn, **flags, TMA=tma is not None, MERGED=_merged(), PRE=pre_dq,
            **fused, **_opts(cfg),
        )

    fused = {}
    if fuse:
        fused = dict(O=out, R=out_residual if has_res else out, DLSE=dlse_arg,
                     stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
                     FUSE_DELTA=True, HAS_DLSE=has_dlse, HAS_RESID=has_res)

    tq = _tma_q(pb, q, do)
    tma = _tma(pb, k, v)
    if joint is not None:  # one launch: dK/dV programs, then each head's dQ programs
        m1, n1, m2, n2, warps, stages = tuple(min(x, mbs) for x in joint[:4]) + tuple(joint[4:])

        def run_joint(t):
            tk, tqd = (None, None) if t is None else t
            n_kprog, n_qprog = triton.cdiv(pb.seqlen_k, n1), triton.cdiv(pb.seqlen_q, m2)
            KB.bs_bwd_joint[(n_kprog + pb.group * n_qprog, pb.hkv, pb.batch)](
                q, k, v, do, lse, delta, dq, dk, dv, slopes,
                a["qnf"], a["qfi"], a["qnp"], a["qpi"], a["knf"], a["kfi"], a["knp"], a["kpi"],
                a["tile"], a["bits"], _ptid(a) if pre_dq else a["qpi"],
                _ptid_kv(a) if pre_kv else a["kpi"], *_descs(tqd, q, do, m1),
                *_descs(tk, k, v, n2),
                *pb.strides(q, False), *pb.strides(k, False), *pb.strides(v, False),
                *pb.strides(do, False), *pb.strides(dq, False), *pb.strides(dk, False),
                *pb.strides(dv, False), lse.stride(0), lse.stride(1), stride_sb, *common,
                BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2, **flags,
                TMA=t is not None, PRE_Q=pre_dq, PRE_K=pre_kv,
                num_warps=warps, num_stages=stages,
            )

        both = None if (tma is None or tq is None) else (tma, tq)
        _with_tma(pb, both, run_joint)
        return dq, dk, dv
    if fuse:  # dQ first: it writes the delta the dK/dV kernel reads
        _with_tma(pb, tma, lambda t: _launch(pb, "bwd_dq", mbs, lambda c, m, n: run_dq(c, m, n, t)))
    _with_tma(pb, tq, lambda t: _launch(pb, "bwd_dkdv", mbs, lambda c, m, n: run_dkdv(c, m, n, t),
                                        plain))
    if fdq:
        dq.copy_(dq_acc)
        return dq, dk, dv
    if not fuse:
        _with_tma(pb, tma, lambda t: _launch(pb, "bwd_dq", mbs, lambda c, m, n: run_dq(c, m, n, t)))
    return dq, dk, dv
