"""Block sizes, warps and pipeline stages per problem class, as data.

`TABLE` holds the checked-in defaults (tuned on an H100 80GB HBM3, triton 3.6, see NOTES.md), so
the first call is fast and nothing is autotuned in the hot path. Setting
FLASHMUX_TRITON_AUTOTUNE=1 benchmarks a few candidates once per (device, triton version, shape
class) and keeps the winner in an on-disk cache (FLASHMUX_TRITON_TUNE_CACHE, default
~/.cache/flashmux/triton-tune.json); later calls, and later processes, read the cache.

No triton or torch import at module level.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tuning:
    """One config per kernel of a problem class, and the class's kernel variants.

    bwd_dv / bwd_dk: the split backward's two programs (dV only, dK only; None: bwd_dkdv's
    config). dkdv: which dK/dV kernel this class runs by default, "joint" (one program, both
    accumulators) or "split" (a dV and a dK program); FLASHMUX_TRITON_DKDV overrides. ws:
    warp-specialize the forward's interior loop by default for this class (sm90+, compiled;
    FLASHMUX_TRITON_WS=0|1 overrides). bwd_tma: Q/dO tiles of the dK/dV programs through
    tensor descriptors (FLASHMUX_TRITON_BWD_TMA=0|1 overrides). dq: how dQ is computed by
    default, "kernel" (its own program per query block: recomputes S and dP, deterministic) or
    "atomic" (the dK/dV program, joint or the split's dK program, adds (scale*dS) K into a
    float32 buffer: 2 matmuls per block pair fewer, not bitwise repeatable, so never with
    deterministic=True); FLASHMUX_TRITON_BWD=fused|split overrides. bwd_fused / bwd_dkq: the
    configs of the joint program and of the split's dK program when they carry the atomic dQ
    (None: bwd_dkdv's / bwd_dk's). lpt: causal calls walk their grids heaviest blocks first
    (FLASHMUX_TRITON_LPT=0|1 overrides). gluon: which programs run as the Gluon warp-specialized
    kernels of _gluon.py on sm_90 by default ("fwd", "dkdv", "dq"; FLASHMUX_TRITON_GLUON,
    _GLUON_BWD, _GLUON_DQ = 0|1|force override)."""

    fwd: KernelConfig
    bwd_dkdv: KernelConfig
    bwd_dq: KernelConfig
    bwd_dv: KernelConfig | None = None
    bwd_dk: KernelConfig | None = None
    dkdv: str = "joint"
    ws: bool = False
    bwd_tma: bool = False
    dq: str = "kernel"
    bwd_fused: KernelConfig | None = None
    bwd_dkq: KernelConfig | None = None
    lpt: bool = False
    gluon: tuple = ()


KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "bwd_dv", "bwd_dk", "bwd_fused", "bwd_dkq")


def config_of(t: Tuning, which: str) -> KernelConfig:
    """The config of kernel `which` (one of KERNELS); the split programs and the fused joint
    program default to bwd_dkdv's, the split's dK program with the atomic dQ to bwd_dk's."""
    c = getattr(t, which)
    if c is None and which == "bwd_dkq":
        return config_of(t, "bwd_dk")
    return t.bwd_dkdv if c is None else c


@dataclass(frozen=True)
class ShapeClass:
    """What a config depends on. block_d/block_dv are the padded (power of two) head dims."""

    block_d: int
    block_dv: int
    dtype: str  # "16bit" | "float32"
    causal: bool


def _c(m, n, w, s):
    return KernelConfig(m, n, w, s)


# Defaults for sm90 (H100), 16-bit inputs. Key: (max(block_d, block_dv), causal).
# Measured on an H100 80GB HBM3 with triton 3.6 (gpu_check.py sweep, bf16, S=4096, B*S=16384,
# model dim 2048): each row is the fastest of 7-8 candidates per kernel; NOTES.md has the sweep.
# dK/dV holds K, V, dK, dV of one key block (BLOCK_N rows); dQ holds Q, dO, dQ (BLOCK_M rows).
# Gluon kernels (_gluon.py, sm_90 only; `Tuning.gluon`) where the H200 measured them faster
# (2026-12-01 00:15-00:23, call s10b, triton 3.6, bf16, B*S 16k, H*D 2048, S 4k fwd+bwd with
# per-kernel ms; all 39 Gluon GPU tests passed): causal dK/dV 1.57 -> 1.19 ms (d64) and 1.47 ->
# 0.99 ms (d128), dQ 0.89 -> 0.86 / 0.70 -> 0.67 ms, d128 non-causal dK/dV 1.96 -> 1.80 ms and
# dQ 1.21-1.33 -> 1.24 ms (whole f+b 0.82 -> 0.90x cuDNN); the d128 causal forward 461 -> 495
# (4k) and 536 -> 573 (16k) TFLOP/s. Elsewhere the Triton programs were as fast or faster
# (d64 non-causal dK/dV and dQ, the d64 and d128 non-causal forward at 4k): NOTES.md.
_D64 = Tuning(_c(128, 64, 4, 3), _c(64, 64, 4, 3), _c(64, 64, 4, 3))
_D64_CAUSAL = Tuning(_c(128, 64, 8, 3), _c(32, 64, 4, 3), _c(128, 64, 8, 3),
                     gluon=("dkdv", "dq"))
# head_dim 128 on the H200 (2026-11-30 18:22-18:31, triton 3.6, bf16, S=4096): warp-specialized
# forward loop 529 -> 541 (non-causal), 460 -> 475 TFLOP/s (causal), judged vs float64 on the
# H200 (causal and not); tensor-descriptor loads in the backward 394 -> 404 (non-causal), 303
# -> 315 (causal) whole-backward TFLOP/s (NOTES.md session 8)
_D128 = Tuning(_c(128, 128, 8, 3), _c(64, 128, 8, 3), _c(128, 64, 8, 3), ws=True, bwd_tma=True,
               gluon=("dkdv", "dq"))
# head_dim 256's split backward (a dV program and a dK program, 128-row key blocks, one fp32
# accumulator each), the default since the H200 measured it (2026-11-30 17:39, triton 3.6, bf16,
# S=4096 non-causal, NOTES.md session 8): dK/dV kernels 4.14 -> 2.70 ms, whole backward 231 ->
# 306 TFLOP/s; configs from its sweep (dV (64,128,8,2) 277 ~ (32,128,8,4) 277; dK (32,128,8,3)
# 306 > (32,128,8,2) 279); causal the same (18:31: backward 189 -> 224 at S 4k, 205 -> 245 at
# 8k; non-causal 8k 234 -> 314); descriptors in the backward lose here (306 -> 293), WS ~+0.7%
_D256 = Tuning(_c(128, 64, 8, 2), _c(64, 64, 8, 2), _c(128, 64, 8, 1),
               bwd_dv=_c(64, 128, 8, 2), bwd_dk=_c(32, 128, 8, 3), dkdv="split")
TABLE_SM90: dict[tuple[int, bool], Tuning] = {
    (16, False): _D64,
    (16, True): _D64_CAUSAL,
    (32, False): _D64,
    (32, True): _D64_CAUSAL,
    (64, False): _D64,
    (64, True): _D64_CAUSAL,
    (128, False): _D128,
    (128, True): replace(_D128, gluon=("fwd", "dkdv", "dq")),
    # head_dim 256: swept on the H200 (2026-11-30, triton 3.6, bf16, S=4096 non-causal, NOTES.md
    # session 7): fwd 422 -> 521 TFLOP/s, whole backward 142 -> 159 (dK/dV) and 159 -> 234 (dQ)
    # against the H100 defaults (64,32,4,2) / (32,64,8,2) / (64,32,8,2); causal takes the same
    (256, False): _D256,
    # causal: heaviest blocks first (H200 2026-11-30 21:38, S 4096 bf16: backward 224.7 -> 238.3
    # TFLOP/s, forward 449.8 both; bitwise equal to the plain order on the H200). d128 causal
    # measured no gain (313.4 -> 311.0), so only here
    (256, True): replace(_D256, lpt=True),
}

# Ampere-class shared memory (A100: 164 KiB) and smaller parts: shallower pipelines.
TABLE_SM80: dict[tuple[int, bool], Tuning] = {
    (16, False): Tuning(_c(128, 64, 4, 2), _c(32, 128, 4, 2), _c(128, 32, 4, 2)),
    (32, False): Tuning(_c(128, 64, 4, 2), _c(32, 128, 4, 2), _c(128, 32, 4, 2)),
    (64, False): Tuning(_c(128, 64, 4, 2), _c(32, 64, 4, 2), _c(64, 32, 4, 2)),
    (128, False): Tuning(_c(128, 32, 4, 2), _c(32, 64, 4, 2), _c(64, 32, 4, 2)),
    (256, False): Tuning(_c(64, 32, 4, 1), _c(16, 32, 4, 1), _c(32, 16, 4, 1)),
}
for (_d, _), _t in list(TABLE_SM80.items()):
    TABLE_SM80.setdefault((_d, True), _t)

# The CPU interpreter: blocks small enough that tiny test shapes span several blocks (so the
# boundary/interior split is exercised), big enough to keep numpy busy rather than Python.
INTERPRETER = Tuning(_c(32, 16, 4, 1), _c(16, 32, 4, 1), _c(32, 16, 4, 1))


def _halve(c: KernelConfig) -> KernelConfig:
    return KernelConfig(max(16, c.block_m // 2), max(16, c.block_n // 2), c.num_warps, max(1, c.num_stages - 1))


def default_tuning(shape: ShapeClass, capability: tuple[int, int] | None, interpreter: bool) -> Tuning:
    if interpreter:
        return INTERPRETER
    d = max(16, shape.block_d, shape.block_dv)
    table = TABLE_SM90 if capability and capability >= (9, 0) else TABLE_SM80
    t = table[(d, shape.causal)]
    if shape.dtype == "float32":  # twice the bytes per tile: halve the tiles
        t = replace(t, **{w: _halve(config_of(t, w)) for w in KERNELS})
        t = replace(t, ws=False, bwd_tma=False, dq="kernel", gluon=())  # measured: 16-bit only
    return t


def smaller(t: Tuning, which: str) -> Tuning | None:
    """A fallback when a config runs out of shared memory: halve the named kernel's tiles."""
    c = config_of(t, which)
    h = _halve(c)
    if h == c:
        return None
    return replace(t, **{which: h})


def with_config(t: Tuning, which: str, cfg: KernelConfig) -> Tuning:
    """t with kernel `which`'s config replaced (the variants and other kernels kept)."""
    return replace(t, **{which: cfg})


# --------------------------------------------------------------------------------------------
# autotune cache (opt-in)
# --------------------------------------------------------------------------------------------

# The candidates that won or came close in the H100 sweep, plus small fallbacks.
FWD_CANDIDATES = [
    _c(128, 64, 4, 3), _c(128, 64, 8, 3), _c(128, 128, 8, 3), _c(64, 64, 4, 3),
    _c(128, 32, 4, 4), _c(64, 32, 4, 2),
]
DKDV_CANDIDATES = [
    _c(64, 128, 8, 3), _c(64, 64, 4, 3), _c(32, 64, 4, 3), _c(32, 128, 8, 3), _c(16, 64, 4, 2),
]
DQ_CANDIDATES = [
    _c(128, 64, 8, 3), _c(64, 64, 4, 3), _c(128, 32, 4, 3), _c(64, 32, 4, 3), _c(64, 16, 4, 2),
]
# the split backward's programs (one accumulator each: taller key blocks fit)
DV_CANDIDATES = [
    _c(64, 128, 8, 2), _c(32, 128, 8, 3), _c(64, 128, 8, 3), _c(64, 64, 4, 3), _c(32, 64, 4, 3),
]
# the joint program carrying the atomic dQ (sm_90 compile, d128: (64,64,8,3) 245 regs, no
# spill, 169 KiB; (64,128,8,3) spills 168 B; d64: (64,128,8,3) 228 regs, no spill)
FUSED_CANDIDATES = [
    _c(64, 64, 8, 3), _c(64, 128, 8, 3), _c(64, 128, 8, 2), _c(64, 64, 4, 3), _c(128, 64, 8, 2),
]
DK_CANDIDATES = [
    _c(32, 128, 8, 2), _c(64, 128, 8, 1), _c(64, 128, 8, 2), _c(64, 64, 4, 3), _c(32, 64, 4, 3),
]


def autotune_enabled() -> bool:
    return os.environ.get("FLASHMUX_TRITON_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    p = os.environ.get("FLASHMUX_TRITON_TUNE_CACHE")
    if p:
        return Path(p)
    return Path(os.path.expanduser("~/.cache/flashmux/triton-tune.json"))


class TuneCache:
    """JSON file: {key: {"fwd": {...}, ...}}; read once, rewritten atomically on each new entry."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(cache_path().read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str, kernel: str) -> KernelConfig | None:
        with self._lock:
            ent = self._load().get(key, {}).get(kernel)
        return KernelConfig(**ent) if ent else None

    def put(self, key: str, kernel: str, cfg: KernelConfig) -> None:
        with self._lock:
            data = self._load()
            data.setdefault(key, {})[kernel] = asdict(cfg)
            path = cache_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home only loses the cache, never the call


CACHE = TuneCache()


def seq_bucket(n: int) -> int:
    """Shape classes by sequence length: powers of two, capped, so the cache stays small."""
    b = 128
    while b < n and b < 16384:
        b *= 2
    return b
