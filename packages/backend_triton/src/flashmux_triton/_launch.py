"""Torch-side launchers for the Triton kernels (imported lazily: imports torch and triton)."""

from __future__ import annotations

import math
import os

import torch
import triton

from . import _kernels as K
from . import tuning as T


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _Problem:
    """Shapes, strides and kernel switches of one call, shared by forward and backward."""

    def __init__(self, q, k, v, cu_q, cu_k, params, dropout_seed=None):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch = cu_q.shape[0] - 1
            self.total_q, self.hq, self.d = q.shape
            self.total_k, self.hkv, _ = k.shape
            self.dv = v.shape[-1]
            mq, mk = params.max_seqlen_q, params.max_seqlen_k
            if not mq or not mk:
                lq = (cu_q[1:] - cu_q[:-1]).max().item() if self.batch else 0
                lk = (cu_k[1:] - cu_k[:-1]).max().item() if self.batch else 0
                mq, mk = mq or int(lq), mk or int(lk)
            self.seqlen_q, self.seqlen_k = int(mq), int(mk)
        else:
            self.batch, self.seqlen_q, self.hq, self.d = q.shape
            _, self.seqlen_k, self.hkv, _ = k.shape
            self.dv = v.shape[-1]
        self.group = self.hq // self.hkv
        self.block_d = _pow2(self.d)
        self.block_dv = _pow2(self.dv)
        self.ieee = q.dtype == torch.float32
        self.has_left = params.window_left is not None
        self.has_right = params.window_right is not None
        self.window_left = int(params.window_left or 0)
        self.window_right = int(params.window_right or 0)
        self.softcap = params.softcap is not None and params.softcap > 0
        if self.softcap:
            self.scale_a = params.scale / params.softcap
            self.scale_b = params.softcap * K.LOG2E
        else:
            self.scale_a = params.scale * K.LOG2E
            self.scale_b = 1.0
        # fold the score multiplier into exp2's FMA (needs a positive multiplier)
        self.fold = self.softcap or params.scale > 0
        self.dropout = params.dropout_p > 0.0
        self.p_drop = float(params.dropout_p)
        self.drop_scale = 1.0 / (1.0 - params.dropout_p) if self.dropout else 1.0
        self.seed = int(params.dropout_seed) & 0xFFFFFFFFFFFFFFFF if self.dropout else 0
        if self.seed >= 2**63:  # triton takes signed 64-bit ints; same bits
            self.seed -= 2**64
        if self.dropout and dropout_seed is not None:
            # a scalar integer tensor on q's device: the kernels get its pointer and load it
            # (_kernels._dropout_keep), so it is never read on the host and compiles nothing new
            self.seed = dropout_seed.reshape(1)
        self.causal = bool(params.causal)
        self.interpret = interpreting()
        cap = None
        if q.is_cuda:
            cap = torch.cuda.get_device_capability(q.device)
        self.capability = cap
        self.shape = T.ShapeClass(
            self.block_d, self.block_dv, "float32" if self.ieee else "16bit", self.causal
        )

    def lse_strides(self, lse):
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)

    @staticmethod
    def strides(x, varlen):
        if varlen:
            return 0, x.stride(0), x.stride(1)
        return x.stride(0), x.stride(1), x.stride(2)

    def flags(self):
        return dict(
            GROUP=self.group, HEAD_DIM=self.d, HEAD_DIM_V=self.dv,
            BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, VARLEN=self.varlen,
            HAS_LEFT=self.has_left, HAS_RIGHT=self.has_right, SOFTCAP=self.softcap,
            DROPOUT=self.dropout, IEEE=self.ieee,
        )


# Tuning chosen per shape class (and shrunk on out-of-resources), remembered per process.
_CHOSEN: dict = {}


def _tuning(pb: _Problem) -> T.Tuning:
    key = (pb.shape, pb.capability, pb.interpret)
    t = _CHOSEN.get(key)
    if t is None:
        t = T.default_tuning(pb.shape, pb.capability, pb.interpret)
        _CHOSEN[key] = t
    return t


def _launch(pb: _Problem, which: str, run):
    """Run `run(cfg)`; on shared-memory exhaustion fall back to smaller tiles and remember."""
    key = (pb.shape, pb.capability, pb.interpret)
    t = _tuning(pb)
    if T.autotune_enabled() and not pb.interpret:
        cfg = _autotuned(pb, which, run, T.config_of(t, which))
        return run(cfg)
    while True:
        try:
            return run(T.config_of(t, which))
        except triton.runtime.errors.OutOfResources:
            t2 = T.smaller(t, which)
            if t2 is None:
                raise
            t = t2
            _CHOSEN[key] = t


def _autotuned(pb, which, run, default):
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    which_key = which
    ck = "|".join(
        str(x)
        for x in (dev, triton.__version__, which_key, pb.block_d, pb.block_dv, pb.shape.dtype,
                  pb.causal, pb.has_left or (pb.has_right and not pb.causal), pb.softcap,
                  pb.dropout, pb.group > 1, T.seq_bucket(max(pb.seqlen_q, pb.seqlen_k)))
    )
    cfg = T.CACHE.get(ck, which)
    if cfg is not None:
        return cfg
    cands = {"fwd": T.FWD_CANDIDATES, "bwd_dkdv": T.DKDV_CANDIDATES, "bwd_dq": T.DQ_CANDIDATES,
             "bwd_dv": T.DV_CANDIDATES, "bwd_dk": T.DK_CANDIDATES,
             "bwd_fused": T.FUSED_CANDIDATES, "bwd_dkq": T.DK_CANDIDATES}[which]
    best, best_t = default, float("inf")
    for c in [default] + [c for c in cands if c != default]:
        try:
            ms = triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - out of resources, compile failure: not a candidate
            continue
        if ms < best_t:
            best, best_t = c, ms
    T.CACHE.put(ck, which, best)
    return best


def tma_wanted(pb: _Problem) -> bool:
    """K/V tiles of the forward's interior blocks through Hopper tensor descriptors (TMA).
    FLASHMUX_TRITON_TMA=1 forces it on (also under the interpreter, for tests), =0 off; by
    default on for head_dim >= 128 on sm90+, where the H100 measured +4-15% forward, and off
    below (head_dim 64 measured -4 to -9%; NOTES.md, session 2)."""
    env = os.environ.get("FLASHMUX_TRITON_TMA", "auto")
    if env in ("0", "1"):
        return env == "1"
    return not pb.interpret and pb.d >= 128


_TMA_BROKEN: set = set()


_WS_BROKEN: set = set()


def ws_wanted(pb: _Problem) -> bool:
    """Triton's automatic warp specialization of the forward's interior loop (sm90+, compiled
    only, not the interpreter). FLASHMUX_TRITON_WS=1 forces it on, =0 off; by default the
    problem class's `Tuning.ws` decides (off in every class until the H200 measures a class
    correct and faster: packages/backend_triton/NOTES.md). A class whose WS compile failed once
    runs without it for the rest of the process."""
    env = os.environ.get("FLASHMUX_TRITON_WS", "auto")
    if env == "0" or pb.interpret or pb.capability is None or pb.capability < (9, 0):
        return False
    if env == "1":
        return True
    return _tuning(pb).ws and pb.shape not in _WS_BROKEN


def _alibi_ws() -> bool:
    """Whether an ALiBi forward keeps the class's warp specialization: not by default, since
    the H200 measured WS making the plain d128 forward 7% faster and the ALiBi one 5% slower
    (call s10a, 8k B4 H16 bf16: 4.335 ms without WS, 4.564 with; NOTES.md session 10).
    FLASHMUX_TRITON_ALIBI_WS=1 keeps it (A/B timing); FLASHMUX_TRITON_WS=1 forces it anyway."""
    return (os.environ.get("FLASHMUX_TRITON_ALIBI_WS", "0") == "1"
            or os.environ.get("FLASHMUX_TRITON_WS") == "1")


def _alibi_split() -> bool:
    """FLASHMUX_TRITON_ALIBI_SPLIT=1: the ALiBi forward walks the key blocks left of the
    diagonal, those that meet it and those right of it as separate loops (`_kernels._alibi_part`),
    so that off the diagonal the bias costs one add per score instead of two ops. Opt-in until
    the H200 measures it."""
    return os.environ.get("FLASHMUX_TRITON_ALIBI_SPLIT", "0") == "1"


def _alibi_fwd_cfg():
    """FLASHMUX_TRITON_ALIBI_FWD="block_m,block_n,warps,stages": the dense forward's tiles for
    ALiBi calls only (GPU sweeps of the ALiBi bar; unset: the class's tiles, as plain calls)."""
    env = os.environ.get("FLASHMUX_TRITON_ALIBI_FWD")
    return T.KernelConfig(*(int(x) for x in env.split(","))) if env else None


def lpt_wanted(pb: _Problem) -> bool:
    """Heaviest blocks first (_kernels._pids): the forward's, dQ's and dK/dV's grids walked
    block index slowest, from the heavy end of a causal band. FLASHMUX_TRITON_LPT=1 forces it
    (any mask, also under the interpreter), =0 off; by default the class's `Tuning.lpt`, for
    causal calls only (off everywhere until the H200 measures it)."""
    env = os.environ.get("FLASHMUX_TRITON_LPT", "auto")
    if env in ("0", "1"):
        return env == "1"
    return not pb.interpret and pb.causal and _tuning(pb).lpt


DKDV_VARIANTS = ("joint", "split")


def dkdv_variant(pb: _Problem, fused: bool) -> str:
    """Which dK/dV kernel: "joint" (_kernels.attn_bwd_dkdv, both accumulators in one program),
    or "split" (attn_bwd_dkdv launched as a dV program and a dK program, ROLE 1/2, one
    accumulator each).
    FLASHMUX_TRITON_DKDV forces one; by default the problem class's `Tuning.dkdv`. Always
    "joint" with the fused (atomic dQ) backward, which needs dS in the joint program.
    Deterministic in every variant (no atomics)."""
    if fused:
        return "joint"
    env = os.environ.get("FLASHMUX_TRITON_DKDV", "auto")
    if env in DKDV_VARIANTS:
        return env
    if env != "auto":
        raise ValueError(f"FLASHMUX_TRITON_DKDV: expected one of {', '.join(DKDV_VARIANTS)} "
                         f"or auto, got {env!r}")
    return _tuning(pb).dkdv


def split_dkdv_wanted(pb: _Problem, fused: bool) -> bool:
    """True when the dK/dV side runs as two programs (split)."""
    return dkdv_variant(pb, fused) != "joint"


def fused_bwd_wanted(pb: _Problem | None = None, deterministic: bool = False) -> bool:
    """dQ by float32 atomics in the dK/dV program (the "fused" backward: 5 matmuls per block
    pair instead of 7; not bitwise repeatable, so never when deterministic).
    FLASHMUX_TRITON_BWD=fused forces it, =split forces the dQ program; by default the problem
    class's `Tuning.dq` ("atomic" or "kernel"; "kernel" everywhere until the H200 measures the
    atomic one faster: NOTES.md session 9)."""
    if deterministic:
        return False
    env = os.environ.get("FLASHMUX_TRITON_BWD", "auto")
    if env in ("fused", "split"):
        return env == "fused"
    if env != "auto":
        raise ValueError(f"FLASHMUX_TRITON_BWD: expected fused, split or auto, got {env!r}")
    return pb is not None and _tuning(pb).dq == "atomic"


_DQ_TMA_BROKEN: set = set()


def dq_tma_wanted(pb: _Problem) -> bool:
    """With the atomic dQ: each interior query block's (scale*dS) K added by one bulk tensor
    reduction (TMA cp.reduce.async.bulk.tensor, through a descriptor over the float32 dQ
    buffer) instead of per-element red.global atomics. FLASHMUX_TRITON_DQ_TMA=1 forces it
    (also under the interpreter, for tests), =0 off; by default on for 16-bit inputs with
    unpadded head dims on sm90+ (a compile failure turns it off for the class)."""
    env = os.environ.get("FLASHMUX_TRITON_DQ_TMA", "auto")
    if env in ("0", "1"):
        return env == "1" and not pb.ieee and pb.block_d == pb.d
    if pb.interpret or pb.capability is None or pb.capability < (9, 0):
        return False
    return not pb.ieee and pb.block_d == pb.d and pb.shape not in _DQ_TMA_BROKEN


def _dqa_desc(pb: _Problem, dq_acc, block_m: int):
    """A (rows, heads*dim) float32 descriptor over the dQ buffer (rows of query i of sequence
    b: b*Sq + i, or the packed row), block [block_m, dim]; None without descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # triton >= 3.4
    except ImportError:
        return None
    rows = dq_acc.shape[0] if pb.varlen else dq_acc.shape[0] * dq_acc.shape[1]
    return TensorDescriptor(dq_acc, [rows, pb.hq * pb.d], [pb.hq * pb.d, 1], [block_m, pb.d])


def _desc_views(pb: _Problem, x16, y16, heads: int, wanted: bool):
    """(TensorDescriptor, [(x, shape, strides, d), (y, ...)]): (rows, heads*dim) 2-D views of two
    tensors whose last dims are pb.d and pb.dv, or None when not wanted, float32, padded head
    dims, a layout without contiguous heads, or no descriptors on this device/triton."""
    if not wanted or pb.ieee or pb.block_d != pb.d or pb.block_dv != pb.dv:
        return None
    if not pb.interpret and (pb.capability is None or pb.capability < (9, 0)):
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # triton >= 3.4
    except ImportError:
        return None
    views = []
    for x, d in ((x16, pb.d), (y16, pb.dv)):
        if x.stride(-1) != 1 or x.stride(-2) != d:
            return None
        rows = x.shape[0] if pb.varlen else x.shape[0] * x.shape[1]
        row_stride = x.stride(0) if pb.varlen else x.stride(1)
        if not pb.varlen and x.stride(0) != x.shape[1] * row_stride:
            return None
        if (row_stride * x.element_size()) % 16 or x.data_ptr() % 16:
            return None
        views.append((x, [rows, heads * d], [row_stride, 1], d))
    return TensorDescriptor, views


def _tma_views(pb: _Problem, k, v):
    """The forward's K/V descriptor views (`_desc_views`), when `tma_wanted`."""
    return _desc_views(pb, k, v, pb.hkv, tma_wanted(pb))


_BWD_TMA_BROKEN: set = set()


def bwd_tma_wanted(pb: _Problem) -> bool:
    """Q and dO tiles of the dK/dV programs' interior query blocks, and K and V tiles of the dQ
    program's interior key blocks, through tensor descriptors:
    FLASHMUX_TRITON_BWD_TMA=1 (also under the interpreter, for tests); the class's
    `Tuning.bwd_tma` by default (off everywhere until the H200 measures it)."""
    env = os.environ.get("FLASHMUX_TRITON_BWD_TMA", "auto")
    if env in ("0", "1"):
        return env == "1"
    return not pb.interpret and _tuning(pb).bwd_tma


def _bwd_tma_views(pb: _Problem, q, do, heads=None):
    """The backward's descriptor views (`_desc_views`) of Q and dO for the dK/dV programs (or of
    K and V for the dQ program, heads=pb.hkv), when `bwd_tma_wanted`."""
    return _desc_views(pb, q, do, heads or pb.hq, bwd_tma_wanted(pb))


def _slopes(pb: _Problem, alibi_slopes, like):
    """(pointer, batch stride) of float32 ALiBi slopes (Hq,) or (B, Hq); a dummy without."""
    if alibi_slopes is None:
        return like, 0
    sl = alibi_slopes.to(torch.float32).contiguous()
    return sl, (sl.shape[-1] if sl.dim() == 2 else 0)


_GLUON_BROKEN: set = set()


def gluon_wanted(pb: _Problem, env_name: str = "FLASHMUX_TRITON_GLUON") -> bool:
    """The Gluon warp-specialized kernels (_gluon.py, sm_90 only): FLASHMUX_TRITON_GLUON the
    forward, FLASHMUX_TRITON_GLUON_BWD the dK/dV program, FLASHMUX_TRITON_GLUON_DQ the dQ
    program: 1 on, 0 off, unset: the class's `Tuning.gluon`. A class whose Gluon compile fails
    once runs the Triton kernel from then on (=force lets the error through)."""
    env = os.environ.get(env_name, "auto")
    part, broken = {"FLASHMUX_TRITON_GLUON": ("fwd", _GLUON_BROKEN),
                    "FLASHMUX_TRITON_GLUON_BWD": ("dkdv", _GLUON_BWD_BROKEN),
                    "FLASHMUX_TRITON_GLUON_DQ": ("dq", _GLUON_DQ_BROKEN)}[env_name]
    if pb.interpret or pb.capability is None or pb.capability[0] != 9 or pb.shape in broken:
        return False
    if env in ("0", "1", "force"):
        return env != "0"
    return part in _tuning(pb).gluon


_GLUON_BWD_BROKEN: set = set()
_GLUON_DQ_BROKEN: set = set()


def _gluon_ran(pb: _Problem, env: str, broken: set, run) -> bool:
    """run() one Gluon kernel: True when it ran. A failure (a compiler without working Gluon)
    marks this class in `broken`, so it runs the Triton program from then on, and gives False;
    with `env`=force the error goes through instead."""
    try:
        run()
    except Exception:  # noqa: BLE001 - a compiler without working Gluon: the Triton kernel
        if os.environ.get(env) == "force":
            raise
        broken.add(pb.shape)
        return False
    return True


def _gluon_alibi() -> bool:
    """ALiBi backwards take the Gluon dK/dV and dQ programs (their ALIBI path) where the class
    runs them for plain calls (default since session 12: on the H200, B4 S8k H16 D128 bf16,
    ALiBi forward+backward cost +6.3% over the plain call with them, +15.6% with the Triton
    programs); FLASHMUX_TRITON_GLUON_ALIBI=0 keeps the Triton programs."""
    return os.environ.get("FLASHMUX_TRITON_GLUON_ALIBI", "1") != "0"


def _gluon_dq(pb: _Problem, q, k, v, do, lse, delta, dq, params, slopes=None, stride_sb=0) -> bool:
    """The Gluon dQ program (FLASHMUX_TRITON_GLUON_DQ) when it takes the call; False when it
    declines or fails to compile (then the Triton dQ program runs)."""
    from . import _gluon

    if _gluon.dq_reasons(q, k, v, do, params, pb.capability, pb.varlen) is not None:
        return False
    return _gluon_ran(pb, "FLASHMUX_TRITON_GLUON_DQ", _GLUON_DQ_BROKEN, lambda: _gluon.backward_dq(
        q, k, v, do, lse, delta, dq, pb.seqlen_q, pb.seqlen_k, _gluon.causal_of(params),
        params.scale, slopes, stride_sb))


def _gluon_bwd_ok(pb: _Problem, q, k, v, do, params) -> bool:
    from . import _gluon

    return _gluon.bwd_reasons(q, k, v, do, params, pb.capability, pb.varlen) is None


def _gluon_dkdv(pb: _Problem, q, k, v, do, lse, delta, dk, dv, params, slopes=None,
                stride_sb=0) -> bool:
    """The Gluon dK/dV program; False when it fails to compile (then the Triton one runs)."""
    from . import _gluon

    return _gluon_ran(pb, "FLASHMUX_TRITON_GLUON_BWD", _GLUON_BWD_BROKEN, lambda: _gluon.backward_dkdv(
        q, k, v, do, lse, delta, dk, dv, pb.seqlen_q, pb.seqlen_k, _gluon.causal_of(params),
        params.scale, slopes, stride_sb))


def _gluon_forward(pb: _Problem, q, k, v, params, out, lse, res) -> bool:
    """Run the Gluon forward when it takes this call; False when it declines or fails to
    compile (the caller then runs the Triton kernel)."""
    from . import _gluon

    if _gluon.reasons(q, k, v, params, pb.capability, pb.varlen) is not None:
        return False
    return _gluon_ran(pb, "FLASHMUX_TRITON_GLUON", _GLUON_BROKEN, lambda: _gluon.forward(
        q, k, v, out, lse, res, pb.seqlen_q, pb.seqlen_k, _gluon.causal_of(params), params.scale))


def forward(q, k, v, cu_q, cu_k, params, residual=False, alibi_slopes=None, block_mask=None,
            dropout_seed=None):
    """(out, lse), or (out, lse, out_residual) with ``residual``: the float32 output's rounding
    error in out's dtype and layout (None for float32 inputs, whose output is not rounded).
    alibi_slopes: float32 (Hq,) or (B, Hq); block_mask: a flashmux BlockMask (_launch_bs)."""
    if block_mask is not None:
        from . import _launch_bs

        return _launch_bs.forward(q, k, v, params, residual, alibi_slopes, block_mask,
                                  dropout_seed)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    pb = _Problem(q, k, v, cu_q, cu_k, params, dropout_seed)
    slopes, stride_sb = _slopes(pb, alibi_slopes, q)
    out = torch.empty(q.shape[:-1] + (pb.dv,), dtype=q.dtype, device=q.device)
    if pb.varlen:
        lse = torch.empty((pb.hq, pb.total_q), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((pb.batch, pb.hq, pb.seqlen_q), dtype=torch.float32, device=q.device)
    res = torch.empty_like(out) if residual and q.dtype != torch.float32 else None
    done = (out, lse, res) if residual else (out, lse)
    if pb.batch == 0 or pb.seqlen_q == 0:
        if res is not None:
            res.zero_()
        return done
    if (alibi_slopes is None and gluon_wanted(pb)
            and _gluon_forward(pb, q, k, v, params, out, lse, res)):
        return done
    cu_q_arg = cu_q if pb.varlen else q  # unused pointer when not varlen
    cu_k_arg = cu_k if pb.varlen else q
    tma = _tma_views(pb, k, v) if pb.shape not in _TMA_BROKEN else None
    ws = ws_wanted(pb) and (alibi_slopes is None or _alibi_ws())
    lpt = dict(LPT=True) if lpt_wanted(pb) else {}
    acfg = _alibi_fwd_cfg() if alibi_slopes is not None else None
    split = dict(ALIBI_SPLIT=True) if alibi_slopes is not None and _alibi_split() else {}

    def launch_fwd(go):  # the class's tiles (with the launcher's fallbacks), or ALiBi's own
        return go(acfg) if acfg is not None else _launch(pb, "fwd", go)

    def run(cfg: T.KernelConfig, tma=tma, ws=ws):
        grid = (triton.cdiv(pb.seqlen_q, cfg.block_m), pb.hq, pb.batch)
        if tma is not None:
            TD, views = tma
            desc_k, desc_v = (TD(x, shape, strides, [cfg.block_n, d]) for x, shape, strides, d in views)
        else:
            desc_k, desc_v = k, v  # unused
        K.attn_fwd[grid](
            q, k, v, out, lse, out if res is None else res, cu_q_arg, cu_k_arg, desc_k, desc_v,
            *pb.strides(q, pb.varlen), *pb.strides(k, pb.varlen), *pb.strides(v, pb.varlen),
            *pb.strides(out, pb.varlen), *pb.lse_strides(lse),
            pb.seqlen_q, pb.seqlen_k, pb.window_left, pb.window_right,
            pb.scale_a, pb.scale_b, pb.p_drop, pb.drop_scale, pb.seed, pb.hq, slopes, stride_sb,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **pb.flags(), FOLD=pb.fold,
            TMA=tma is not None, RESID=res is not None, ALIBI=alibi_slopes is not None,
            WS=ws, **lpt, **split,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    if ws and os.environ.get("FLASHMUX_TRITON_WS") != "1":
        # on by the tuning table: a compiler that fails on it (triton 3.6 did at head_dim 64)
        # costs this class its WS, not the call; FLASHMUX_TRITON_WS=1 lets the error through
        try:
            launch_fwd(run)
            return done
        except triton.runtime.errors.OutOfResources:
            raise
        except Exception:  # noqa: BLE001 - a compile failure of the specialized loop
            _WS_BROKEN.add(pb.shape)
            ws = False
    if tma is not None:
        try:
            launch_fwd(lambda cfg: run(cfg, tma, ws))
            return done
        except Exception:  # noqa: BLE001 - a compiler without working descriptors: plain path
            _TMA_BROKEN.add(pb.shape)
    launch_fwd(lambda cfg: run(cfg, None, ws))
    return done


def backward(do, dlse, q, k, v, out, lse, cu_q, cu_k, params, out_residual=None,
             alibi_slopes=None, block_mask=None, dropout_seed=None):
    if block_mask is not None:
        from . import _launch_bs

        return _launch_bs.backward(do, dlse, q, k, v, out, lse, params, out_residual,
                                   alibi_slopes, block_mask, dropout_seed)
    q, k, v, out, do = (_last_contig(x) for x in (q, k, v, out, do))
    pb = _Problem(q, k, v, cu_q, cu_k, params, dropout_seed)
    slopes, stride_sb = _slopes(pb, alibi_slopes, q)
    alibi = dict(ALIBI=True) if alibi_slopes is not None else {}
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if pb.batch == 0 or pb.seqlen_q == 0 or pb.seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    dlse_arg = dlse.to(torch.float32).contiguous() if has_dlse else lse
    cu_q_arg = cu_q if pb.varlen else q
    cu_k_arg = cu_k if pb.varlen else q
    lse_str = pb.lse_strides(lse)

    pre_m = 64 if not pb.interpret else 32
    grid = (triton.cdiv(pb.seqlen_q, pre_m), pb.hq, pb.batch)
    has_res = out_residual is not None and out_residual.numel() > 0
    if has_res:  # the residual must share out's strides (the preprocess indexes both alike)
        out, out_residual = out.contiguous(), out_residual.contiguous()
    K.attn_bwd_preprocess[grid](
        out, out_residual if has_res else out, do, dlse_arg, delta, cu_q_arg,
        *pb.strides(out, pb.varlen), *pb.strides(do, pb.varlen), *lse_str, pb.seqlen_q,
        HEAD_DIM_V=pb.dv, BLOCK_M=pre_m, BLOCK_DV=pb.block_dv, VARLEN=pb.varlen,
        HAS_DLSE=has_dlse, HAS_RESID=has_res,
    )
    common = (
        pb.seqlen_q, pb.seqlen_k, pb.window_left, pb.window_right,
        pb.scale_a, pb.scale_b, float(params.scale), pb.p_drop, pb.drop_scale, pb.seed, pb.hq,
        slopes, stride_sb,
    )

    # Fused (opt-in, nondeterministic): dQ accumulated by the dK/dV kernel with float32 atomics.
    fused = fused_bwd_wanted(pb, params.deterministic)
    variant = dkdv_variant(pb, fused)
    dq_tma = fused and dq_tma_wanted(pb)
    lpt = dict(LPT=True) if lpt_wanted(pb) else {}
    # Q/dO of the dK/dV programs' interior query blocks through tensor descriptors (opt-in)
    btma = None
    if pb.shape not in _BWD_TMA_BROKEN:
        btma = _bwd_tma_views(pb, q, do)
    tma_flag = dict(TMA=True) if btma is not None else {}

    def descs(cfg: T.KernelConfig):
        if btma is None:
            return q, do  # unused
        TD, views = btma
        return tuple(TD(x, shape, strides, [cfg.block_m, d]) for x, shape, strides, d in views)
    # the atomic dQ's float32 buffer: contiguous, q's shape (the descriptor view needs it)
    dq_acc = torch.empty(q.shape, dtype=torch.float32, device=q.device) if fused else dq

    def run_dkdv(cfg: T.KernelConfig):
        grid = (triton.cdiv(pb.seqlen_k, cfg.block_n), pb.hkv, pb.batch)
        dqa_desc = None
        if fused:
            dq_acc.zero_()  # every launch starts over (a retry with smaller tiles too)
            if dq_tma:
                dqa_desc = _dqa_desc(pb, dq_acc, cfg.block_m)
        K.attn_bwd_dkdv[grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q_arg, cu_k_arg, *descs(cfg),
            *pb.strides(q, pb.varlen), *pb.strides(k, pb.varlen), *pb.strides(v, pb.varlen),
            *pb.strides(do, pb.varlen), *pb.strides(dk, pb.varlen), *pb.strides(dv, pb.varlen),
            *pb.strides(dq_acc, pb.varlen), *lse_str, *common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **pb.flags(), FUSED_DQ=fused, **alibi,
            **tma_flag, **(dict(DESC_DQA=dqa_desc, DQ_TMA=True) if dqa_desc is not None else {}),
            **lpt, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    # the dQ program's K/V (same switch)
    ktma = _bwd_tma_views(pb, k, v, heads=pb.hkv) if pb.shape not in _BWD_TMA_BROKEN else None

    def run_dq(cfg: T.KernelConfig):
        grid = (triton.cdiv(pb.seqlen_q, cfg.block_m), pb.hq, pb.batch)
        if ktma is None:
            kv_descs = (k, v)  # unused
        else:
            TD, views = ktma
            kv_descs = tuple(TD(x, shape, strides, [cfg.block_n, d]) for x, shape, strides, d in views)
        K.attn_bwd_dq[grid](
            q, k, v, do, lse, delta, dq, cu_q_arg, cu_k_arg, *kv_descs,
            *pb.strides(q, pb.varlen), *pb.strides(k, pb.varlen), *pb.strides(v, pb.varlen),
            *pb.strides(do, pb.varlen), *pb.strides(dq, pb.varlen),
            *lse_str, *common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **pb.flags(), **alibi,
            **(dict(TMA=True) if ktma is not None else {}), **lpt,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    kern = K.attn_bwd_dkdv

    def run_role(role: int):
        def run_one(cfg: T.KernelConfig):
            grid = (triton.cdiv(pb.seqlen_k, cfg.block_n), pb.hkv, pb.batch)
            kern[grid](
                q, k, v, do, lse, delta, dk, dv, dq, cu_q_arg, cu_k_arg, *descs(cfg),
                *pb.strides(q, pb.varlen), *pb.strides(k, pb.varlen), *pb.strides(v, pb.varlen),
                *pb.strides(do, pb.varlen), *pb.strides(dk, pb.varlen), *pb.strides(dv, pb.varlen),
                *pb.strides(dq, pb.varlen), *lse_str, *common,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **pb.flags(), FUSED_DQ=False, **alibi,
                ROLE=role, **tma_flag, **lpt, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return run_one

    gl_alibi = alibi_slopes is None or _gluon_alibi()  # ALiBi: the Gluon programs' ALIBI path
    gl_slopes = None if alibi_slopes is None else (slopes, stride_sb)
    gluon_dkdv = (not fused and gl_alibi and gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_BWD")
                  and _gluon_bwd_ok(pb, q, k, v, do, params))

    gluon_dq = (not fused and gl_alibi and dq.stride() == q.stride()
                and gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_DQ"))

    def run_all():
        if gluon_dkdv and _gluon_dkdv(pb, q, k, v, do, lse, delta, dk, dv, params,
                                      *(gl_slopes or ())):
            pass  # the Gluon dK/dV program ran (FLASHMUX_TRITON_GLUON_BWD)
        elif variant != "joint":
            _launch(pb, "bwd_dv", run_role(1))
            _launch(pb, "bwd_dk", run_role(2))
        else:
            _launch(pb, "bwd_fused" if fused else "bwd_dkdv", run_dkdv)
        if fused:
            dq.copy_(dq_acc)
        elif not (gluon_dq and _gluon_dq(pb, q, k, v, do, lse, delta, dq, params,
                                         *(gl_slopes or ()))):
            _launch(pb, "bwd_dq", run_dq)

    def drop_dq_tma():
        nonlocal dq_tma
        dq_tma = False

    def drop_bwd_tma():
        nonlocal btma, ktma, tma_flag
        btma = ktma = None
        tma_flag = {}

    # on by default / by the tuning table: a compiler without descriptor reductions (or without
    # working descriptors) costs this class the feature, not the call (every kernel rewrites its
    # whole output, so a rerun is safe)
    if _ran_or_dropped(run_all, dq_tma, "FLASHMUX_TRITON_DQ_TMA", _DQ_TMA_BROKEN, pb.shape,
                       drop_dq_tma):
        return dq, dk, dv
    if _ran_or_dropped(run_all, btma is not None or ktma is not None, "FLASHMUX_TRITON_BWD_TMA",
                       _BWD_TMA_BROKEN, pb.shape, drop_bwd_tma):
        return dq, dk, dv
    run_all()
    return dq, dk, dv


def _ran_or_dropped(run_all, on: bool, env: str, broken: set, shape, drop) -> bool:
    """True when `run_all()` ran with an optional feature that is `on`. A compile error other
    than running out of resources marks `shape` in `broken` and calls `drop()` (the caller's
    closures then see the feature off; it runs again without it): False. With `env`=1 the
    feature is forced and nothing is tried here (the caller's own run lets the error through)."""
    if not on or os.environ.get(env) == "1":
        return False
    try:
        run_all()
        return True
    except triton.runtime.errors.OutOfResources:
        raise
    except Exception:  # noqa: BLE001 - a compile failure of the optional feature
        broken.add(shape)
        drop()
        return False


def lowerings(q, k, v, params) -> dict[str, str] | None:
    """The kernel family each pass takes on these torch CUDA tensors (explain): "gluon" for
    the warp-specialized kernels of _gluon.py, "triton" for _kernels.py; the backward names
    its two parts ("gluon dK/dV + triton dQ"). None off CUDA (one family there)."""
    if not getattr(q, "is_cuda", False):
        return None
    if (params.varlen or getattr(params, "alibi", False)
            or getattr(params, "mask_block_size", 0)):
        return {"forward": "triton", "backward": "triton"}
    pb = _Problem(q, k, v, None, None, params)
    if not (gluon_wanted(pb) or gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_BWD")
            or gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_DQ")):
        return {"forward": "triton", "backward": "triton"}
    from . import _gluon

    cap = pb.capability
    fwd = gluon_wanted(pb) and _gluon.reasons(q, k, v, params, cap, False) is None
    fused = fused_bwd_wanted(pb, params.deterministic)
    dkdv = (not fused and gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_BWD")
            and _gluon.bwd_reasons(q, k, v, q, params, cap, False) is None)
    dq = (not fused and gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_DQ")
          and _gluon.dq_reasons(q, k, v, q, params, cap, False) is None)
    name = {True: "gluon", False: "triton"}
    bwd = name[dkdv] if dkdv == dq else f"{name[dkdv]} dK/dV + {name[dq]} dQ"
    return {"forward": name[fwd], "backward": bwd}


def dropout_keep_mask(seed, dropout_p, batch, heads, seqlen_q, seqlen_k, like):
    out = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=like.device)
    if out.numel() == 0:
        return out.bool()
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    if seed >= 2**63:
        seed -= 2**64
    bm, bn = (32, 32) if interpreting() else (64, 64)
    grid = (triton.cdiv(seqlen_q, bm), heads, batch)
    K.dropout_mask_kernel[grid](out, seqlen_q, seqlen_k, heads, float(dropout_p), seed, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
