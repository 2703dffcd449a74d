"""The decode judge: `flashmux.attention_with_kvcache` on one backend against the float64
reference (`flashmux.reference.attention_with_kvcache`), by the conformance rule

    error(backend) <= 2 * error(plain attention, same framework and precision) + 1e-5

for out and lse, on fresh random inputs (caches, new tokens, queries, shuffled block tables).
The caches after the call must equal the expected ones exactly: the new tokens written where
they belong, every other slot untouched. A failing draw is judged again on fresh draws
(flashmux.testing.judge.redraw).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

import flashmux
from flashmux import reference
from flashmux.reference import allowed_mask
from flashmux.testing.judge import (
    ATOL,
    Framework,
    default_device,
    format_report,
    max_err,
    plain_pv,
    plain_scores,
    plain_softmax,
    redraw,
)


@dataclass(frozen=True)
class KvCase:
    batch: int = 3
    seqlen_q: int = 1
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 32
    head_dim_v: int | None = None
    capacity: int = 96  # S_max, or max_pages * page_size
    page_size: int = 0  # 0: contiguous cache
    extra_pages: int = 5  # paged: pages no sequence uses (must stay untouched)
    snew: int = 1  # new tokens appended by the call
    lens: tuple = (-1, 0, 37)  # cache_seqlens per sequence; -1 = full after the append
    causal: bool = False
    window: tuple | None = None
    softcap: float | None = None
    alibi: str = ""  # "", "h": (Hq,), "bh": (B, Hq)
    num_splits: int | None = None
    scale: float | None = None
    dtype: str = "float16"
    transform: str = "eager"  # JAX: "eager" or "jit" (caches donated)

    @property
    def dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def id(self) -> str:
        parts = [self.dtype, f"b{self.batch}q{self.seqlen_q}new{self.snew}",
                 f"h{self.heads_q}x{self.heads_kv}d{self.head_dim}"]
        if self.head_dim_v is not None:
            parts.append(f"dv{self.head_dim_v}")
        parts.append(f"page{self.page_size}" if self.page_size else "contig")
        parts.append(f"cap{self.capacity}")
        parts.append("lens" + "_".join(map(str, self.lens)))
        for on, name in ((self.causal, "causal"), (self.transform != "eager", self.transform)):
            if on:
                parts.append(name)
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap}")
        if self.alibi:
            parts.append(f"alibi{self.alibi}")
        if self.num_splits is not None:
            parts.append(f"splits{self.num_splits}")
        return "-".join(parts)


def make_inputs(case: KvCase, rng):
    """float64 NumPy inputs: q, k_cache, v_cache, cache_seqlens, k, v, block_table, slopes."""
    b, hkv = case.batch, case.heads_kv
    lens = np.array([case.capacity - case.snew if n == -1 else n for n in case.lens[:b]]
                    + [0] * max(0, b - len(case.lens)), dtype=np.int32)
    q = rng.standard_normal((b, case.seqlen_q, case.heads_q, case.head_dim))
    table = None
    if case.page_size:
        max_pages = case.capacity // case.page_size
        num_pages = b * max_pages + case.extra_pages
        kc = rng.standard_normal((num_pages, case.page_size, hkv, case.head_dim))
        vc = rng.standard_normal((num_pages, case.page_size, hkv, case.dv))
        table = rng.permutation(num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    else:
        kc = rng.standard_normal((b, case.capacity, hkv, case.head_dim))
        vc = rng.standard_normal((b, case.capacity, hkv, case.dv))
    k = v = None
    if case.snew:
        k = rng.standard_normal((b, case.snew, hkv, case.head_dim))
        v = rng.standard_normal((b, case.snew, hkv, case.dv))
    slopes = None
    if case.alibi:
        shape = (case.heads_q,) if case.alibi == "h" else (b, case.heads_q)
        slopes = rng.uniform(0.02, 0.5, shape).astype(np.float32)
    return q, kc, vc, lens, k, v, table, slopes


def _plain_math(fw: Framework, q, ks, vs, slopes_b, case: KvCase):
    """Plain attention for one sequence in the framework and precision: q (Sq, Hq, D), ks/vs
    (n, Hkv, *) -> (out, lse) arrays of the framework. Scores in the input precision, float32
    softmax (flashmux.testing.judge's steps), plus the ALiBi bias."""
    sq, n = q.shape[0], ks.shape[0]
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    allowed = allowed_mask(sq, n, case.causal, case.window)
    dist = np.abs(np.arange(sq)[:, None] + (n - sq) - np.arange(n)[None, :]).astype(np.float32)
    xp = fw.t if fw.kind == "torch" else fw.jnp if fw.kind == "jax" else np
    lo = q.dtype
    s, v = plain_scores(xp, q, ks, vs, scale, "qhd,khd->hqk", 1, case.softcap)
    if fw.kind == "torch":
        t = fw.t
        if slopes_b is not None:
            s = s - t.from_numpy(np.asarray(slopes_b))[:, None, None].to(s.device) * t.from_numpy(dist).to(s.device)
        allowed = t.from_numpy(allowed).to(s.device)
    elif slopes_b is not None:
        s = s - xp.asarray(slopes_b)[:, None, None] * dist
    lse, p = plain_softmax(xp, s, allowed[None])
    return plain_pv(xp, "hqk,khd->qhd", p, v, lo), lse


def call(fw: Framework, case: KvCase, arrays, backend):
    """Run attention_with_kvcache; -> (out, lse, k_cache, v_cache) as float64 NumPy."""
    q, kc, vc, lens, k, v, table, slopes = arrays
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale,
              num_splits=case.num_splits, return_lse=True, backend=backend)
    if fw.kind == "jax" and case.transform == "jit":
        jax = fw.jax

        def f(q, kc, vc, lens, k, v, table, slopes):
            return flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                                   block_table=table, alibi_slopes=slopes, **kw)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CPU jax may not use donated buffers
            res = jax.jit(f, donate_argnums=(1, 2))(q, kc, vc, lens, k, v, table, slopes)
    else:
        res = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=k, v=v,
                                              block_table=table, alibi_slopes=slopes, **kw)
    if k is None:
        out, lse = res
        k2, v2 = kc, vc
    else:
        out, lse, k2, v2 = res
        if fw.kind in ("torch", "numpy"):
            assert k2 is kc and v2 is vc, "torch/NumPy caches must be updated in place"
    return tuple(fw.numpy(x) for x in (out, lse, k2, v2))


def measure(case: KvCase, backend: str, kind: str, seed: int, device: str | None = None):
    """One draw -> {name: (error, bound)}, or a str: the backend's reasons for declining."""
    fw = Framework(kind, device or default_device(kind))
    rng = np.random.default_rng(seed)
    q64, kc64, vc64, lens, k64, v64, table, slopes = make_inputs(case, rng)
    dt = case.dtype
    q, kc, vc = (fw.array(x, dt) for x in (q64, kc64, vc64))
    k = None if k64 is None else fw.array(k64, dt)
    v = None if v64 is None else fw.array(v64, dt)
    lens_a = fw.array(lens)
    table_a = None if table is None else fw.array(table)
    slopes_a = None if slopes is None else fw.array(slopes)
    # the reference sees exactly the rounded inputs
    q64, kc64, vc64 = (fw.numpy(x) for x in (q, kc, vc))
    k64 = None if k is None else fw.numpy(k)
    v64 = None if v is None else fw.numpy(v)
    arrays = (q, kc, vc, lens_a, k, v, table_a, slopes_a)

    ex = flashmux.explain_kvcache(q, kc, vc, cache_seqlens=lens_a, k=k, v=v, block_table=table_a,
                                  alibi_slopes=slopes_a, causal=case.causal, window=case.window,
                                  softcap=case.softcap, num_splits=case.num_splits,
                                  backend=backend)
    if ex.chosen != backend and ex.note is None:
        return f"{backend} declines: " + "; ".join(ex.reasons(backend))

    fw.poison_allocator()
    out, lse, k2, v2 = call(fw, case, arrays, backend)
    ref_out, ref_lse, ref_k, ref_v = reference.attention_with_kvcache(
        q64, kc64, vc64, cache_seqlens=lens, k=k64, v=v64, block_table=table,
        causal=case.causal, scale=case.scale, window=case.window, softcap=case.softcap,
        alibi_slopes=slopes,
    )
    # plain attention per sequence on the gathered (rounded) keys
    seqs = []
    for b in range(case.batch):
        n = int(lens[b]) + case.snew
        pos = np.arange(n)
        idx = (table[b, pos // case.page_size], pos % case.page_size) if table is not None else (b, pos)
        sb = None
        if slopes is not None:
            sb = slopes if slopes.ndim == 1 else slopes[b]
        seqs.append((fw.array(q64[b], dt), fw.array(ref_k[idx], dt), fw.array(ref_v[idx], dt), sb))
    if kind == "jax":  # one compile for the whole batch (eager JAX compiles every op)
        outs = fw.jax.jit(lambda xs: [_plain_math(fw, *x, case) for x in xs])(seqs)
    else:
        outs = [_plain_math(fw, *x, case) for x in seqs]
    p_out = np.stack([fw.numpy(o) for o, _ in outs])
    p_lse = np.stack([fw.numpy(lse) for _, lse in outs])
    return {
        "out": (max_err(out, ref_out), 2 * max_err(p_out, ref_out) + ATOL),
        "lse": (max_err(lse, ref_lse), 2 * max_err(p_lse, ref_lse) + ATOL),
        "caches (exact)": (max(max_err(k2, ref_k), max_err(v2, ref_v)), 0.0),
    }


def run_case(case: KvCase, backend: str, kind: str, seed: int, device: str | None = None):
    """Judge one case (with the redraw rule); None, or the reason the backend declines it."""
    first = measure(case, backend, kind, seed, device)
    if isinstance(first, str):
        return first

    def draw(s):
        return first if s == seed else measure(case, backend, kind, s, device)

    ok, draws = redraw(draw, seed)
    if not ok:
        lines = [f"{backend} {kind} {case.id()} failed:"]
        for s, rep in draws:
            lines.append(f" seed {s}:\n  " + format_report(rep))
        raise AssertionError("\n".join(lines))
    return None


def with_(case: KvCase, **kw) -> KvCase:
    return replace(case, **kw)
