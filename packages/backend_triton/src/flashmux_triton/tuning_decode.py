"""Block sizes of the Triton decode (split-KV) kernel: a small table and the candidates a GPU
run times (`tests/kvcache/test_triton_decode_gpu.py` and the harness's decode sweep print
GB/s per candidate; the lead's H200 run picks the default).

Decode is bound by the bytes of the cache: wide key blocks (64-256 keys), enough splits to give
every SM about `waves` programs, 16-byte loads along head_dim (contiguous last dimension), 2-4
pipeline stages. `FLASHMUX_TRITON_DECODE="block_n=128,num_warps=4,num_stages=3,waves=2"`
overrides the table (any subset of the fields).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

MAX_BLOCK_M = 128  # packed query rows (heads of one KV head x Sq rows) per program
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 128  # keys per block
    num_warps: int = 4
    num_stages: int = 3
    waves: float = 2.0  # splits chosen so that programs ~ waves x SM count
    min_blocks_per_split: int = 4  # never split a sequence finer than this many key blocks

    def label(self) -> str:
        return (f"block_n={self.block_n},num_warps={self.num_warps},"
                f"num_stages={self.num_stages},waves={self.waves:g}")


# Candidates for the GPU run (the first is the 16-bit default until measured). Shared memory on
# sm90 (decode_aot.py): 128/4/3 136 KiB (one program per SM), 128/4/4 200 KiB, 64/4/3 70 KiB,
# 256/8/2 140 KiB, 128/4/2 72 KiB.
CANDIDATES = (
    DecodeConfig(128, 4, 3, 2.0),
    DecodeConfig(64, 4, 3, 2.0),
    DecodeConfig(128, 4, 4, 2.0),
    DecodeConfig(128, 8, 3, 2.0),
    DecodeConfig(256, 8, 2, 2.0),
    DecodeConfig(128, 4, 3, 4.0),
    DecodeConfig(64, 4, 4, 4.0),
    DecodeConfig(128, 4, 2, 1.0),
    # smaller tiles: ~70 KiB of shared memory, so 3 programs fit an SM (sm90 compile, decode_aot.py)
    DecodeConfig(64, 4, 3, 3.0),
    DecodeConfig(128, 4, 2, 3.0),
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


def config_for(head_dim: int, head_dim_v: int, dtype: str, page_size: int) -> DecodeConfig:
    """The default for a shape class. Wide blocks for 16-bit D <= 128; D = 256 and float32 use
    64-key blocks (registers). Not yet measured on a GPU (see NOTES.md)."""
    d = max(head_dim, head_dim_v)
    if dtype == "float32" or d > 128:
        cfg = DecodeConfig(64, 4, 2, 2.0)
    else:
        cfg = DecodeConfig(128, 4, 3, 2.0)
    return _override(cfg)
