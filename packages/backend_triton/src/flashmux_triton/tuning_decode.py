"""Block sizes of the Triton decode (split-KV) kernel: a small table and the candidates a GPU
run times (`tests/kvcache/test_triton_decode_gpu.py` and the harness's decode sweep print
GB/s per candidate; the lead's H200 run picks the default).

Decode is bound by the bytes of the cache: wide key blocks (64-256 keys), enough splits to give
every SM `waves` full rounds of programs (whole waves: the number of programs that fit the GPU at
once is SMs x programs per SM, from the config's shared memory), 16-byte loads along head_dim
(contiguous last dimension), 2-4 pipeline stages, the lse merge fused into the split kernel (the
last program of a group merges). `FLASHMUX_TRITON_DECODE="block_n=128,num_warps=4,num_stages=3,
waves=2,fused_merge=1,occupancy=0"` overrides the table (any subset of the fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

MAX_BLOCK_M = 128  # packed query rows (heads of one KV head x Sq rows) per program
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 128  # keys per block
    num_warps: int = 4
    num_stages: int = 3
    waves: float = 2.0  # splits: programs <= waves x (SMs x programs per SM), whole waves
    min_blocks_per_split: int = 4  # never split a sequence finer than this many key blocks
    fused_merge: int = 1  # 1: the last split program merges (one launch); 0: a merge kernel
    occupancy: int = 0  # programs per SM; 0: estimated from shared memory (programs_per_sm)
    # session 8 variants (NOTES.md): 1: int32 key-row offsets where the cache's element offsets
    # fit in 31 bits (half the per-tile address arithmetic; int64 otherwise, decided per call)
    off32: int = 0
    # paged caches: 1: the next block's page ids loaded one iteration ahead by hand; 0: looked
    # up in the loop, left to Triton's pipeliner (which stages an index load ahead of the loads
    # that use it)
    page_prefetch: int = 1
    # contiguous caches on a compiled GPU: L2-prefetch this many leading key blocks of a split
    # before its length is loaded (the first K/V loads wait for that length)
    l2_prefetch: int = 0
    # paged caches with a per-row page gather (pages smaller than the key block): 1 loads the
    # page ids twice, as a row for K^T and a column for V, each in its operand's layout
    page_dual: int = 0
    # with pages dividing the key block: 1 builds those ids from the block's page ids loaded
    # as scalars (BLOCK_N / page_size of them) and spread by select (implies page_dual)
    page_select: int = 0
    # sm90+: launch with programmatic dependent launch (the prologue and the L2 prefetch
    # overlap the previous kernel's tail; reads wait in the kernel, griddepcontrol.wait)
    pdl: int = 0
    # 1: length-balanced splits for ragged batches: the keys of all sequences cut into chunks
    # of one size from the device lengths, each sequence getting as many programs as its
    # length needs (launches without an append and without a forced num_splits)
    balanced: int = 0
    # session 10: 1 loads the unmasked key blocks of a contiguous 16-bit cache through Hopper
    # tensor descriptors (TMA; sm90+, unpadded head dims, heads contiguous in the cache), one
    # copy per tile instead of ~32 16-byte loads per thread
    tma: int = 0
    # the merge kernel (fused_merge=0): 1 lets the next PDL launch start from the merge kernel
    # (griddepcontrol.launch_dependents after its wait; without it the next step's decode
    # kernel launches only when the merge grid ends); its warps per program
    merge_trigger: int = 0
    merge_warps: int = 4
    # with pdl: 1 lets the next kernel (merge or next step) launch right after the decode
    # kernel's wait, not after its key loop
    pdl_early: int = 0

    def label(self) -> str:
        """block_n .. occupancy always (min_blocks_per_split never), then each later variant
        field (off32 onwards, in declaration order) where it differs from its default."""
        names = [f.name for f in fields(self)]
        extra = "".join(f",{f.name}={getattr(self, f.name)}"
                        for f in fields(self)[names.index("off32"):]
                        if getattr(self, f.name) != f.default)
        return (f"block_n={self.block_n},num_warps={self.num_warps},"
                f"num_stages={self.num_stages},waves={self.waves:g},"
                f"fused_merge={self.fused_merge},occupancy={self.occupancy}{extra}")


SMEM_PER_SM = 227 * 1024  # sm90 / sm80 (A100: 163 KiB; a smaller GPU shrinks the config)


def programs_per_sm(cfg: DecodeConfig, head_dim: int, head_dim_v: int, itemsize: int) -> int:
    """How many programs of this config share an SM: the K/V tiles of num_stages - 1 buffers
    (the pipeliner's count, aot.py decode: 128 keys x 3 stages = 136 KiB at D = 128) plus ~8 KiB,
    capped at 4 (4 warps) / 2 (8 warps) for registers."""
    if cfg.occupancy:
        return cfg.occupancy
    stages = max(1, cfg.num_stages - 1)
    smem = stages * cfg.block_n * (head_dim + head_dim_v) * itemsize + 8 * 1024
    cap = 4 if cfg.num_warps <= 4 else 2
    return max(1, min(cap, SMEM_PER_SM // smem))


# Candidates for the GPU run (c1 and c3 are the 16-bit defaults since the H200 run of session 7,
# config_for). Shared memory on
# sm90 (aot.py decode): 128/4/3 136 KiB (one program per SM), 128/4/4 200 KiB, 64/4/3 70 KiB,
# 256/8/2 140 KiB, 128/4/2 72 KiB. Session 6: waves are whole waves of the programs that fit
# (SMs x programs_per_sm); c2 is c0 with the separate merge kernel (what the fused merge saves).
CANDIDATES = (
    DecodeConfig(128, 4, 3, 2.0),
    DecodeConfig(128, 4, 3, 1.0),
    DecodeConfig(128, 4, 3, 2.0, fused_merge=0),
    DecodeConfig(64, 4, 3, 1.0),
    DecodeConfig(64, 4, 3, 2.0),
    DecodeConfig(128, 4, 2, 1.0),
    DecodeConfig(128, 4, 2, 2.0),
    DecodeConfig(128, 8, 3, 1.0),
    DecodeConfig(256, 8, 2, 1.0),
    DecodeConfig(64, 4, 4, 1.0),
    DecodeConfig(128, 4, 4, 1.0),
    DecodeConfig(64, 8, 3, 1.0),
    # session 8 (4k and small pages, NOTES.md "Decode, session 8"): c12-c13 int32 offsets,
    # c14-c16 the pipeliner's own page lookup, c17 64-key blocks with c1's bytes in flight,
    # c18 c1 with the merge kernel (what the in-kernel merge saves at one wave)
    DecodeConfig(128, 4, 3, 1.0, off32=1),
    DecodeConfig(64, 4, 3, 1.0, off32=1),
    DecodeConfig(128, 4, 3, 1.0, page_prefetch=0),
    DecodeConfig(64, 4, 3, 1.0, page_prefetch=0),
    DecodeConfig(128, 4, 3, 1.0, off32=1, page_prefetch=0),
    DecodeConfig(64, 4, 5, 1.0),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0),
    # c19-c20: c1 / c12 with the first two key blocks of each split L2-prefetched
    DecodeConfig(128, 4, 3, 1.0, l2_prefetch=2),
    DecodeConfig(128, 4, 3, 1.0, off32=1, l2_prefetch=2),
    # c21-c23: per-row page ids loaded once per operand (c1, c12, c3 with page_dual)
    DecodeConfig(128, 4, 3, 1.0, page_dual=1),
    DecodeConfig(128, 4, 3, 1.0, off32=1, page_dual=1),
    DecodeConfig(64, 4, 3, 1.0, page_dual=1),
    # c24-c25: the block's page ids as scalar loads spread by select (c1, c12 with page_select)
    DecodeConfig(128, 4, 3, 1.0, page_select=1),
    DecodeConfig(128, 4, 3, 1.0, off32=1, page_select=1),
    # c26-c27: programmatic dependent launch (c1; c19 with its L2 prefetch before the wait)
    DecodeConfig(128, 4, 3, 1.0, pdl=1),
    DecodeConfig(128, 4, 3, 1.0, l2_prefetch=2, pdl=1),
    # c28-c29: length-balanced splits (c1; c3 for small pages)
    DecodeConfig(128, 4, 3, 1.0, balanced=1),
    DecodeConfig(64, 4, 3, 1.0, balanced=1),
    # c30-c35, from the 17:40 H200 call (4k: the merge kernel beat the in-kernel merge, c18 37.9
    # vs c1 38.8 us; int32 offsets fixed the paged kernels' spills, c12 pages16 42.8 vs c1
    # 50.9): merge kernel + off32, with page_select, with PDL (the merge kernel PDL-launched
    # too), and c25 + PDL; c35 64-key blocks with both
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, page_select=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1),
    DecodeConfig(128, 4, 3, 1.0, off32=1, page_select=1, pdl=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, page_select=1, pdl=1),
    DecodeConfig(64, 4, 3, 1.0, fused_merge=0, off32=1),
    # c36-c40, session 9 (the 4k gap, NOTES.md "Decode, session 9"): c32 (the default) with
    # 8 warps; 64-key blocks x 4 stages (2 programs per SM, 4 splits); 128 keys x 2 stages (3
    # per SM, 6 splits); two waves (4 splits); 64-key blocks x 3 stages (3 per SM, 6 splits)
    DecodeConfig(128, 8, 3, 1.0, fused_merge=0, off32=1, pdl=1),
    DecodeConfig(64, 4, 4, 1.0, fused_merge=0, off32=1, pdl=1),
    DecodeConfig(128, 4, 2, 1.0, fused_merge=0, off32=1, pdl=1),
    DecodeConfig(128, 4, 3, 2.0, fused_merge=0, off32=1, pdl=1),
    DecodeConfig(64, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1),
    # c41-c42: c32 with an L2 prefetch of each split's first 2 / 1 key blocks issued before
    # griddepcontrol.wait (under PDL it overlaps the previous kernel's tail; without PDL it
    # lost, c19)
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, l2_prefetch=2),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, l2_prefetch=1),
    # c43-c45, session 10 (the 4k gap; NOTES.md "Decode, session 10"): c32 with the unmasked
    # blocks of a contiguous cache through tensor descriptors (TMA), at 3 stages (136 KiB, one
    # program per SM), 4 stages (205 KiB: 3 tiles in flight) and 64-key x 4 stages (104 KiB,
    # two programs per SM, 4 splits)
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, tma=1),
    DecodeConfig(128, 4, 4, 1.0, fused_merge=0, off32=1, pdl=1, tma=1),
    DecodeConfig(64, 4, 4, 1.0, fused_merge=0, off32=1, pdl=1, tma=1),
    # c46-c47: one launch per step (the last split program merges, ticket counters that reset
    # themselves; under CUDA-graph capture they come from a pre-zeroed pool, so no memset node
    # precedes the launch as in session 8's graph timings of c1/c25/c33): c32 and c43 fused
    DecodeConfig(128, 4, 3, 1.0, fused_merge=1, off32=1, pdl=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=1, off32=1, pdl=1, tma=1),
    # c48-c49 (after call s10a: c32 0.991x SDPA at 4k, c46 0.993x): c32 whose merge kernel
    # lets the next step's decode kernel launch early (PDL trigger), with 4 / 1 warps per merge
    # program
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, merge_trigger=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, merge_trigger=1, merge_warps=1),
    # c50-c51: c48 and c46 whose decode kernel lets its dependent launch right after its wait
    DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, merge_trigger=1, pdl_early=1),
    DecodeConfig(128, 4, 3, 1.0, fused_merge=1, off32=1, pdl=1, pdl_early=1),
)


def parse(text: str, base: DecodeConfig | None = None) -> DecodeConfig:
    """'block_n=128,num_warps=4,...' -> DecodeConfig; unnamed fields keep `base`'s values."""
    kw = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in DecodeConfig.__dataclass_fields__:
            raise ValueError(f"FLASHMUX_TRITON_DECODE: unknown field {name!r} in {text!r}")
        kw[name] = float(val) if name == "waves" else int(val)
    return replace(base or DecodeConfig(), **kw)


def _override(cfg: DecodeConfig) -> DecodeConfig:
    env = os.environ.get("FLASHMUX_TRITON_DECODE", "").strip()
    return parse(env, cfg) if env else cfg


def smaller(cfg: DecodeConfig) -> DecodeConfig | None:
    """The next config to try after running out of shared memory: fewer stages, then narrower
    key blocks; None when nothing smaller is left."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_n > 16:
        return replace(cfg, block_n=cfg.block_n // 2, num_stages=2)
    return None


def config_for(head_dim: int, head_dim_v: int, dtype: str, page_size: int,
               capacity: int = 0) -> DecodeConfig:
    """The default for a shape class. D = 256 and float32 use 64-key blocks (registers). 16-bit
    D <= 128 (contiguous and paged alike): 128-key blocks, 3 stages, one wave, splits of at least
    2 blocks, the merge kernel (fused_merge=0), int32 row offsets and programmatic dependent
    launch on sm90+ (c32). From the H200 (2026-11-30, B8 Hq32 Hkv8 D128 bf16 Sq1, CUDA-graph
    timed, NOTES.md "Decode, session 8"): at 4k c32 37.7 us contiguous / 39.4 16-token pages /
    38.4 64-token pages (18:25 call), against c30 (no PDL) 38.5 / 40.4 (with page_select) /
    39.0 and session 7's c1 / c3 38.8 / 44.1 / 43.4 (17:40 call); page_select (c34) lost to the
    plain per-row gather at 16-token pages once offsets were int32 (40.1 vs 39.4)."""
    d = max(head_dim, head_dim_v)
    if dtype == "float32" or d > 128:
        cfg = DecodeConfig(64, 4, 2, 2.0)
    else:
        # session 10 (c49): c32 whose merge kernel lets the next step's decode kernel launch
        # early (PDL trigger) with 1-warp merge programs: H200 call s10b, 4k, 9 interleaved
        # rounds: 37.3 us vs SDPA cuDNN 37.6 (1.008x paired, 0.995-1.012), c32 38.0 (0.991x)
        cfg = DecodeConfig(128, 4, 3, 1.0, 2, fused_merge=0, off32=1, pdl=1, merge_trigger=1,
                           merge_warps=1)
    return _override(cfg)
