"""Benchmark problems (`Point`) and the sweeps that list them.

A Point is one attention problem: shapes, mask and dtype. Modes (fwd, bwd, fwd_bwd) and
implementations are crossed with points by the runner. FLOPs follow the FlashAttention
convention: forward 4 * B * Hq * Sq * Sk * D, halved for causal (when Sq == Sk; for Sq != Sk the
exact fraction of allowed (i, j) pairs under bottom-right alignment); backward 2.5x forward;
forward+backward 3.5x forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
SWEEPS = ("papers", "gqa", "decode", "long", "varlen", "memory", "masks")

# Model dimension of the papers' sweep: H = MODEL_DIM / head_dim.
MODEL_DIM = 2048
TOKENS = 16 * 1024


@dataclass(frozen=True)
class Point:
    """One problem. Layout is BSHD (or packed THD with `seqlens` for varlen).

    `x` is the value on the sweep's horizontal axis (seqlen for most sweeps, Sk for decode,
    the longest sequence for varlen); `group` names the panel/table it belongs to.
    """

    sweep: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    dtype: str  # "bf16" | "fp16" | "fp32"
    seqlens: tuple[int, ...] | None = None  # varlen: per-sequence lengths (q and k alike)
    x: int = 0
    memory_only: bool = False
    # decode sweep, flashmux.attention_with_kvcache variants: k/v are the cache (B, Sk, Hkv, D),
    # seen as pages of `page_size` tokens when > 0 (in order: block table = arange), with
    # kv_lens (ragged cache_seqlens, one per sequence) when given, else every cache is full
    kvcache: bool = False
    page_size: int = 0
    kv_lens: tuple[int, ...] | None = None
    # masks sweep: a block mask given by a spec string (bench/maskbench.py), e.g. "doc:8"
    mask: str | None = None

    @property
    def varlen(self) -> bool:
        return self.seqlens is not None

    @property
    def total_q(self) -> int:
        return sum(self.seqlens) if self.varlen else self.batch * self.seqlen_q

    @property
    def total_k(self) -> int:
        if self.kv_lens is not None:  # ragged cache: the keys actually read
            return sum(self.kv_lens)
        return sum(self.seqlens) if self.varlen else self.batch * self.seqlen_k

    def allowed_pairs(self, sq: int, sk: int) -> float:
        """(i, j) pairs one head computes for one sequence, by the FlashAttention convention."""
        if not self.causal:
            return float(sq) * sk
        if sq == sk:
            return sq * sk / 2.0
        off = sk - sq  # bottom-right aligned: row i sees keys j <= i + off
        i = np.arange(sq, dtype=np.float64)
        return float(np.clip(i + off + 1, 0, sk).sum())

    @property
    def mask_stats(self) -> dict | None:
        """Tile density and allowed pairs of the point's block mask (None without one)."""
        if self.mask is None:
            return None
        from .maskbench import mask_stats

        return mask_stats(self.mask, self.seqlen_q, self.seqlen_k)

    @property
    def flops_fwd(self) -> float:
        if self.mask is not None:  # the allowed (i, j) pairs of the mask, exactly
            return 4.0 * self.heads_q * self.head_dim * self.batch * self.mask_stats["pairs"]
        lens = self.seqlens if self.varlen else [None] * self.batch
        total = 0.0
        for b, s in enumerate(lens):
            sq, sk = (s, s) if s is not None else (self.seqlen_q, self.seqlen_k)
            if self.kv_lens is not None:
                sk = self.kv_lens[b]
            total += self.allowed_pairs(sq, sk)
        return 4.0 * self.heads_q * self.head_dim * total

    def flops(self, mode: str) -> float:
        return self.flops_fwd * MODE_FLOP_FACTOR[mode]

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V read once (the floor of a decode step)."""
        return 2 * self.total_k * self.heads_kv * self.head_dim * ITEMSIZE[self.dtype]

    @property
    def group(self) -> str:
        g = f"hd{self.head_dim}-{'causal' if self.causal else 'noncausal'}-{self.dtype}"
        if self.sweep == "decode":
            g = f"sq{self.seqlen_q}-" + g
        if self.kvcache:
            g += "-kvcache-" + (f"page{self.page_size}" if self.page_size else "contig")
            g += "-mqa" if self.heads_kv == 1 else ""
            g += "-ragged" if self.kv_lens is not None else ""
        if self.mask is not None:
            g = f"mask-{self.mask.replace(':', '')}-" + g
        return g

    @property
    def label(self) -> str:
        if self.varlen:
            shape = f"varlen n={len(self.seqlens)} T={self.total_q} max={max(self.seqlens)}"
        else:
            shape = f"B{self.batch} Sq{self.seqlen_q} Sk{self.seqlen_k}"
        h = f"H{self.heads_q}" + (f"/{self.heads_kv}" if self.heads_kv != self.heads_q else "")
        kv = ""
        if self.kvcache:
            kv = " kvcache " + (f"page{self.page_size}" if self.page_size else "contig")
            kv += " ragged" if self.kv_lens is not None else ""
        if self.mask is not None:
            kv += f" mask {self.mask} (tile density {self.mask_stats['density']:.1%})"
        return f"{self.sweep} {shape} {h} D{self.head_dim} {'causal ' if self.causal else ''}{self.dtype}{kv}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["seqlens"] = list(self.seqlens) if self.seqlens else None
        d["kv_lens"] = list(self.kv_lens) if self.kv_lens else None
        d["flops_fwd"] = self.flops_fwd
        d["group"] = self.group
        if self.mask is not None:
            d["mask_density"] = self.mask_stats["density"]
            d["mask_elem_density"] = self.mask_stats["elem_density"]
        return d


@dataclass
class SweepConfig:
    """What the command line asked for; each sweep reads the parts that apply to it."""

    sweeps: list[str]
    head_dims: list[int] | None = None
    seqlens: list[int] | None = None
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    causal: str | None = None  # "both" | "yes" | "no" | None (the sweep's default)
    quick: bool = False
    kvcache_only: bool = False  # decode sweep: only the attention_with_kvcache rows
    # decode sweep's kvcache rows: only these page sizes (0 = contiguous) and query lengths;
    # kv_extras False drops the ragged and MQA rows (None / True: every row, the default)
    kv_pages: list[int] | None = None
    kv_sq: list[int] | None = None
    kv_extras: bool = True
    masks: list[str] | None = None  # masks sweep: these mask specs (and "dense"), not all


def _causals(opt: str | None, default: str) -> list[bool]:
    opt = opt or default
    return {"both": [False, True], "yes": [True], "no": [False]}[opt]


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 2
    return out


def varlen_lengths(max_len: int, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """Mixed lengths, uniform in [max_len/8, max_len], about `tokens` in all (always one of max_len)."""
    rng = np.random.default_rng(seed + max_len)
    lens = [max_len]
    while sum(lens) < tokens:
        lens.append(int(rng.integers(max(1, max_len // 8), max_len + 1)))
    if sum(lens) > tokens and len(lens) > 1:
        lens[-1] = max(1, lens[-1] - (sum(lens) - tokens))
    return tuple(lens)


def build_points(cfg: SweepConfig) -> list[Point]:
    pts: list[Point] = []
    q = cfg.quick
    for sweep in cfg.sweeps:
        for dt in cfg.dtypes:
            pts += _sweep_points(sweep, cfg, dt, q)
    return pts


def _sweep_points(sweep: str, cfg: SweepConfig, dt: str, quick: bool) -> list[Point]:
    pts: list[Point] = []
    if sweep in ("papers", "gqa"):
        hds = cfg.head_dims or ([32] if quick else [64, 128])
        seqs = cfg.seqlens or ([32, 64] if quick else _pow2_range(512, 16384))
        tokens = 128 if quick else TOKENS
        for hd in hds:
            for causal in _causals(cfg.causal, "both"):
                for s in seqs:
                    b = max(1, tokens // s)
                    if sweep == "papers":
                        hq = max(1, (64 if quick else MODEL_DIM) // hd)
                        hkv = hq
                    else:
                        hkv = 1 if quick else max(1, (MODEL_DIM // hd) // 8)
                        hq = 8 * hkv
                    pts.append(Point(sweep, b, s, s, hq, hkv, hd, causal, dt, x=s))
    elif sweep == "decode":
        hds = cfg.head_dims or ([32] if quick else [128])
        sks = cfg.seqlens or ([64, 256] if quick else [4096, 16384, 65536, 131072])
        b, hq, hkv = (2, 4, 1) if quick else (8, 32, 8)
        for sq in [] if cfg.kvcache_only else [1, 16] if quick else [1, 128]:
            for hd in hds:
                for causal in _causals(cfg.causal, "no"):
                    for sk in sks:
                        if sk >= sq:
                            pts.append(Point(sweep, b, sq, sk, hq, hkv, hd, causal, dt, x=sk))
        pts += _kvcache_points(cfg, dt, quick)
    elif sweep == "long":
        hds = cfg.head_dims or ([32] if quick else [128])
        seqs = cfg.seqlens or ([256, 512] if quick else [32768, 65536, 131072])
        h = 2 if quick else 16
        for hd in hds:
            for causal in _causals(cfg.causal, "yes"):
                for s in seqs:
                    pts.append(Point(sweep, 1, s, s, h, h, hd, causal, dt, x=s))
    elif sweep == "varlen":
        hds = cfg.head_dims or ([32] if quick else [128])
        maxes = cfg.seqlens or ([32, 64] if quick else [1024, 2048, 4096, 8192])
        tokens = 160 if quick else TOKENS
        h = 2 if quick else 16
        for hd in hds:
            for causal in _causals(cfg.causal, "both"):
                for m in maxes:
                    lens = varlen_lengths(m, tokens)
                    pts.append(
                        Point(sweep, len(lens), m, m, h, h, hd, causal, dt, seqlens=lens, x=m)
                    )
    elif sweep == "memory":
        hds = cfg.head_dims or ([32] if quick else [128])
        seqs = cfg.seqlens or ([64, 128] if quick else _pow2_range(1024, 65536))
        h = 2 if quick else 16
        for hd in hds:
            for causal in _causals(cfg.causal, "no"):
                for s in seqs:
                    pts.append(Point(sweep, 1, s, s, h, h, hd, causal, dt, x=s, memory_only=True))
    elif sweep == "masks":  # block masks (issue 15): B*S = 32k tokens, model dim 2048
        from .maskbench import mask_fn_for, sweep_masks

        hds = cfg.head_dims or ([32] if quick else [128])
        seqs = cfg.seqlens or ([256] if quick else [8192, 32768])
        for hd in hds:
            h = 2 if quick else max(1, MODEL_DIM // hd)
            for s in seqs:
                b = 1 if quick else max(1, 32768 // s)
                # the dense (unmasked) call: the "dense time" of the bar
                # time(mask) <= 1.25 x density x time(dense)
                specs = cfg.masks if cfg.masks is not None else ["dense", *sweep_masks(s, quick)]
                for m in specs:
                    if m != "dense":
                        mask_fn_for(m, s, s)  # an unknown spec fails here, before any timing
                    pts.append(Point(sweep, b, s, s, h, h, hd, False, dt, x=s,
                                     mask=None if m == "dense" else m))
    else:
        raise ValueError(f"unknown sweep {sweep!r} (expected one of {', '.join(SWEEPS)}, all)")
    return pts


def _kvcache_points(cfg: SweepConfig, dt: str, quick: bool) -> list[Point]:
    """The decode sweep's flashmux.attention_with_kvcache rows: contiguous and paged caches
    (16- and 64-token pages), Sq = 1 and 4 (speculative decoding), a ragged batch (cache lengths
    spread over [Sk/8, Sk]; bytes counted are those actually read) and MQA (Hkv = 1). Causal
    (bottom-right), as a decode step is."""
    hds = cfg.head_dims or ([32] if quick else [128])
    sks = cfg.seqlens or ([64, 256] if quick else [4096, 16384, 65536, 131072])
    b, hq, hkv = (2, 4, 1) if quick else (8, 32, 8)
    pages = (16, 64)
    pts: list[Point] = []
    for hd in hds:
        for sk in sks:
            def add(sq, page, heads_kv=hkv, lens=None):
                if cfg.kv_pages is not None and page not in cfg.kv_pages:
                    return
                if sk >= sq and (not page or sk % page == 0):
                    pts.append(Point("decode", b, sq, sk, hq, heads_kv, hd, True, dt, x=sk,
                                     kvcache=True, page_size=page, kv_lens=lens))
            for sq in cfg.kv_sq or (1, 4):
                for page in (0,) + pages:
                    add(sq, page)
            if not cfg.kv_extras:
                continue
            rng = np.random.default_rng(sk)
            ragged = tuple(int(n) for n in rng.integers(max(1, sk // 8), sk + 1, b))
            ragged = (sk,) + ragged[1:]
            add(1, 0, lens=ragged)
            add(1, 16, lens=ragged)
            if hkv > 1:
                add(1, 0, heads_kv=1)
                add(1, 16, heads_kv=1)
    return pts


DEFAULT_MODES = {
    "papers": ["fwd", "fwd_bwd"],
    "gqa": ["fwd", "fwd_bwd"],
    "decode": ["fwd"],
    "long": ["fwd", "fwd_bwd"],
    "varlen": ["fwd", "fwd_bwd"],
    "memory": ["fwd_bwd"],
    "masks": ["fwd", "fwd_bwd"],
}


def modes_for(point: Point, requested: list[str] | None) -> list[str]:
    """The memory sweep is always fwd_bwd; decode is inference (fwd) unless modes were named."""
    if point.memory_only:
        return ["fwd_bwd"]
    if requested:
        return list(requested)
    return DEFAULT_MODES[point.sweep]


def check_shape(point: Point) -> dict:
    """A small problem with the same configuration, for the correctness check against float64.

    Keeps dtype, head_dim, the GQA ratio, causal, Sq<Sk-ness and varlen; shrinks batch, heads and
    sequence lengths so the NumPy reference stays cheap. Lengths stay multiples of 128 where the
    original was (some kernels need block-aligned lengths).
    """
    ratio = point.heads_q // point.heads_kv
    hkv = min(point.heads_kv, 2)
    hq = hkv * ratio
    if point.varlen:
        base = [min(s, 256) for s in point.seqlens[:3]]
        # Mixed, not block-aligned lengths, as in the real batch.
        lens = tuple(max(1, s - (37 * i) % max(1, s // 2)) for i, s in enumerate(base))
        return dict(
            batch=len(lens),
            seqlen_q=max(lens),
            seqlen_k=max(lens),
            heads_q=hq,
            heads_kv=hkv,
            seqlens=lens,
        )
    if point.seqlen_q == point.seqlen_k:
        s = min(point.seqlen_q, 256)
        sq = sk = s
    else:
        sq = min(point.seqlen_q, 128)
        sk = min(point.seqlen_k, 512)
        sk = max(sk, sq)
    b = 2  # never 1: compilers specialize size-1 dims, which would cost a recompile
    return dict(batch=b, seqlen_q=sq, seqlen_k=sk, heads_q=hq, heads_kv=hkv, seqlens=None)


def check_point(point: Point) -> Point:
    c = check_shape(point)
    return Point(
        "check",
        c["batch"],
        c["seqlen_q"],
        c["seqlen_k"],
        c["heads_q"],
        c["heads_kv"],
        point.head_dim,
        point.causal,
        point.dtype,
        seqlens=c["seqlens"],
        x=c["seqlen_k"],
        kvcache=point.kvcache,
        page_size=point.page_size if c["seqlen_k"] % max(point.page_size, 1) == 0 else 0,
        mask=point.mask,
    )
