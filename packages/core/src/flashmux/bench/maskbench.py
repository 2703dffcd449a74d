"""The `masks` sweep's masks: names, mask functions, densities and BlockMasks.

A masked Point carries `mask`, a spec string whose parameters are in tokens, e.g.
``causal``, ``sliding:1024``, ``doc:8`` (8 packed documents, causal), ``prefix:2048``,
``dilated:256:1024`` (causal band of 256 plus every 1024th key), ``chunked:1024`` (causal
inside 1024-token chunks). A spec may end in ``+alibi`` (ALiBi slopes on top, e.g.
``causal+alibi``); ``alibi`` alone is the dense call with ALiBi (the bar: ALiBi costs at most 10%
over the same call without it). `mask_fn_for` builds the `flashmux.masks` function for a problem's
lengths; `mask_stats` gives its tile density and allowed (i, j) pairs (the FLOP count) from a
NumPy BlockMask (no S x S array); `block_mask_for` builds and caches the BlockMask the timed
calls pass (built outside the timing, as a training loop would build it once per batch).
"""

from __future__ import annotations

import functools

import numpy as np

BLOCK = 128  # the mask's tile, as FlexAttention's default


def document_ids(seqlen: int, n_docs: int, seed: int = 0) -> np.ndarray:
    """Sorted segment ids (seqlen,) for n_docs documents of random lengths (at least 1 token)."""
    rng = np.random.default_rng(seed + 1000 * n_docs + seqlen)
    n_docs = max(1, min(n_docs, seqlen))
    cuts = np.sort(rng.choice(np.arange(1, seqlen), size=n_docs - 1, replace=False)) if n_docs > 1 else []
    return np.searchsorted(np.asarray(cuts, np.int64), np.arange(seqlen), side="right").astype(np.int32)


def split_spec(spec: str) -> tuple[str | None, bool]:
    """("causal+alibi") -> ("causal", True); "alibi" / "dense+alibi" -> (None, True)."""
    base, plus, mod = spec.partition("+")
    if plus and mod != "alibi":
        raise ValueError(f"mask spec {spec!r}: the only modifier is '+alibi', got '+{mod}'")
    alibi = bool(plus) or base == "alibi"
    return (None if base in ("alibi", "dense") else base), alibi


def alibi_slopes(heads: int) -> np.ndarray:
    """The ALiBi paper's slopes for `heads` heads: 2^(-8 (h + 1) / heads), float32 (H,)."""
    return (2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)).astype(np.float32)


def alibi_for(spec: str, heads: int) -> np.ndarray | None:
    """The slopes a spec passes as alibi_slopes= (None without '+alibi')."""
    return alibi_slopes(heads) if split_spec(spec)[1] else None


def score_bias(spec: str, heads: int, seqlen_q: int, seqlen_k: int) -> np.ndarray | None:
    """(H, Sq, Sk) float32 ALiBi term -slope_h |i + Sk - Sq - j| for plain attention (None
    without '+alibi'); flashmux adds it to the scaled scores before the mask."""
    sl = alibi_for(spec, heads)
    if sl is None:
        return None
    i, j = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
    return (-sl[:, None, None] * np.abs(i + (seqlen_k - seqlen_q) - j)[None]).astype(np.float32)


def mask_fn_for(spec: str, seqlen_q: int, seqlen_k: int):
    """The flashmux.masks function of a mask spec for these lengths (bottom-right causal);
    None for a spec without a mask (``alibi``)."""
    from .. import masks as M

    spec, _ = split_spec(spec)
    if spec is None:
        return None
    name, *args = spec.split(":")
    try:
        a = [int(x) for x in args]
    except ValueError:
        raise ValueError(f"mask spec {spec!r}: expected integer parameters, e.g. "
                         "causal, sliding:1024, doc:8, prefix:2048, dilated:256:1024, chunked:1024"
                         ) from None
    need = {"causal": 0, "sliding": 1, "doc": 1, "prefix": 1, "dilated": 2, "chunked": 1}
    if name in need and len(a) != need[name]:
        raise ValueError(f"mask spec {spec!r}: {name} takes {need[name]} parameter(s), got {len(a)}")
    causal = M.causal(seqlen_k - seqlen_q)
    if name == "causal":
        return causal
    if name == "sliding":  # causal sliding window of a[0] keys before the diagonal
        if seqlen_q != seqlen_k:
            raise ValueError(f"mask {spec!r}: the sweep's sliding window needs Sq == Sk")
        return M.sliding_window(a[0], 0)
    if name == "doc":
        return M.and_(causal, M.document(document_ids(max(seqlen_q, seqlen_k), a[0])))
    if name == "prefix":
        return M.prefix_lm(a[0])
    if name == "dilated":
        return M.and_(causal, M.dilated(a[0], a[1]))
    if name == "chunked":
        return M.and_(causal, M.chunked(a[0]))
    raise ValueError(f"unknown mask spec {spec!r}")


@functools.lru_cache(maxsize=64)
def mask_stats(spec: str, seqlen_q: int, seqlen_k: int) -> dict:
    """{'density': computed tiles / all tiles, 'pairs': allowed (i, j) pairs, 'elem_density'}."""
    from ..blockmask import create_block_mask

    if split_spec(spec)[0] is None:  # no mask (ALiBi alone): every tile, every pair
        return {"density": 1.0, "pairs": float(seqlen_q) * seqlen_k, "elem_density": 1.0}
    bm = create_block_mask(mask_fn_for(spec, seqlen_q, seqlen_k), None, None, seqlen_q, seqlen_k,
                           block_size=BLOCK)
    c = bm.counts()
    kind = bm.kind[0, 0]
    bs = BLOCK
    # allowed pairs: full tiles count their in-sequence elements, partial ones their bits
    rows = np.minimum(bs, seqlen_q - np.arange(kind.shape[0]) * bs)[:, None]
    cols = np.minimum(bs, seqlen_k - np.arange(kind.shape[1]) * bs)[None, :]
    pairs = float((rows * cols * (kind == 1)).sum())
    if bm.num_partial:
        pairs += float(np.unpackbits(bm.bits.view(np.uint8)).sum())
    return {"density": c["density"], "pairs": pairs,
            "elem_density": pairs / max(1.0, float(seqlen_q) * seqlen_k)}


_BM_CACHE: dict = {}


def block_mask_for(spec: str, seqlen_q: int, seqlen_k: int, like, key):
    """The BlockMask of a spec on like's framework and device, cached under `key` (None for a
    spec without a mask)."""
    from ..blockmask import create_block_mask

    if split_spec(spec)[0] is None:
        return None
    k = (spec, seqlen_q, seqlen_k, key)
    if k not in _BM_CACHE:
        if len(_BM_CACHE) > 32:
            _BM_CACHE.clear()
        _BM_CACHE[k] = create_block_mask(mask_fn_for(spec, seqlen_q, seqlen_k), None, None,
                                         seqlen_q, seqlen_k, block_size=BLOCK, like=like)
    return _BM_CACHE[k]


def sweep_masks(seqlen: int, quick: bool) -> list[str]:
    """The issue's masks: causal, sliding 1k and 4k, documents (8 and 64), prefix-LM, dilated,
    chunked (quick mode: the same shapes scaled to a short sequence)."""
    if quick:
        return ["causal", "sliding:32", "doc:4", "prefix:64", "dilated:16:64", "chunked:64"]
    return ["causal", "sliding:1024", "sliding:4096", "doc:8", "doc:64",
            f"prefix:{seqlen // 4}", "dilated:256:1024", "chunked:1024"]


# The lean default of the masks sweep on a GPU (issue 15's bar): flashmux's three GPU backends
# against FlexAttention (torch, same mask), cuDNN SDPA (the dense call) and XLA's
# jax.nn.dot_product_attention with the dense mask (JAX). --backends / --anchors widen it.
LEAN_BACKENDS = ("triton", "pallas", "cuda")
LEAN_ANCHORS = ("flex", "sdpa-cudnn", "jax-xla")


def dense_mask(spec: str, seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """(seqlen_q, seqlen_k) bool: the element mask, for plain attention on small check problems."""
    fn = mask_fn_for(spec, seqlen_q, seqlen_k)
    if fn is None:
        return np.ones((seqlen_q, seqlen_k), bool)
    z = np.zeros((1, 1), np.int64)
    got = fn(z, z, np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :])
    return np.broadcast_to(np.asarray(got, bool), (seqlen_q, seqlen_k))


def bar_tables(results: list[dict]) -> str:
    """Markdown tables of issue 15's bars from a masks sweep's records (results.json "results").

    Per (S, head_dim, mode): one row per mask with its tile density, then per implementation
    the median ms and, for flashmux, ``x anchor`` (the same-framework anchor's time / this one:
    FlexAttention for torch, jax-xla with the dense mask for JAX; >= 1.0 is the bar, 1.3 the
    goal) and ``/dens`` (time / (tile density x the same implementation's dense time): <= 1.25
    is the bar); on ``+alibi`` rows that column holds the overhead over the same call without
    ALiBi instead (<= +10% is the bar). Records that are not "ok" show their status.
    """
    rows: dict = {}
    impls: list[str] = []
    for r in results:
        p = r.get("point") or {}
        if r.get("sweep") != "masks" or p.get("sweep") != "masks":
            continue
        key = (p["seqlen_q"], p["head_dim"], p["batch"], p["heads_q"], r["dtype"], r["mode"])
        spec = p.get("mask") or "dense"
        rows.setdefault(key, {}).setdefault(spec, {"density": p.get("mask_density", 1.0)})
        rows[key][spec][r["impl"]] = r
        if r["status"] not in ("unsupported", "unavailable") and r["impl"] not in impls:
            impls.append(r["impl"])
    impls.sort(key=lambda i: (not i.startswith("flashmux"), i))
    anchor_of = {"torch": "flex", "jax": "jax-xla"}
    out = []
    for key in sorted(rows):
        s, d, b, h, dt, mode = key
        table = rows[key]
        shown = [i for i in impls if any(i in row for row in table.values())]
        out.append(f"#### {mode}, S={s}, B={b}, H={h}, head_dim {d}, {dt}\n")
        head = ["mask", "tile density"]
        for i in shown:
            head.append(f"{i} ms")
            if i.startswith("flashmux"):
                head += ["x anchor", "/dens or alibi"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))

        def ms(spec, impl):
            r = table.get(spec, {}).get(impl)
            return r["ms"] if r and r.get("status") == "ok" and r.get("ms") else None

        for spec in sorted(table, key=lambda x: (x != "dense", x.replace("+alibi", "~"), x)):
            row = table[spec]
            cells = [spec, f"{row['density']:.1%}"]
            base, alibi = split_spec(spec)
            for i in shown:
                r = row.get(i)
                t = ms(spec, i)
                if t is not None:
                    cells.append(f"{t:.3f}")
                elif r is None or r["status"] in ("unsupported", "unavailable"):
                    cells.append("–")
                else:
                    cells.append(r["status"])
                if not i.startswith("flashmux"):
                    continue
                fw = (r or {}).get("framework") or ("jax" if "[jax]" in i else "torch")
                ax = ms(spec, anchor_of.get(fw, ""))
                cells.append(f"{ax / t:.2f}x" if t and ax else "")
                if alibi:
                    plain = ms(base or "dense", i)
                    cells.append(f"{100 * (t / plain - 1):+.1f}%" if t and plain else "")
                else:
                    dn = ms("dense", i)
                    cells.append(f"{t / (row['density'] * dn):.2f}" if t and dn and base else "")
            out.append("| " + " | ".join(cells) + " |")
        # how the anchors were compiled (flex: dynamic or static shapes; the runner's "chosen")
        built = sorted({f"{i} compiled as: " + r["chosen"].split(", BlockMask")[0]
                        for row in table.values()
                        for i, r in row.items() if i != "density" and isinstance(r, dict)
                        and r.get("family") == "anchor" and r.get("chosen")})
        for b in built:
            out.append(f"\n{b}")
        out.append("")
    return "\n".join(out)


def density_points(results: list[dict]) -> dict:
    """{(S, mode): {impl: [(tile density, ms / that impl's dense ms, spec), ...]}} for the masks
    without ALiBi, from a masks sweep's records (the density bar's data: y <= 1.25 x)."""
    dense: dict = {}
    pts: dict = {}
    for r in results:
        p = r.get("point") or {}
        if r.get("sweep") != "masks" or r.get("status") != "ok" or not r.get("ms"):
            continue
        spec = p.get("mask") or "dense"
        base, alibi = split_spec(spec)
        if alibi:
            continue
        key = (p["seqlen_q"], r["mode"])
        if base is None:
            dense[key + (r["impl"],)] = r["ms"]
        else:
            pts.setdefault(key, {}).setdefault(r["impl"], []).append(
                (p.get("mask_density", 1.0), r["ms"], spec))
    out: dict = {}
    for key, by_impl in pts.items():
        for impl, rows in by_impl.items():
            d = dense.get(key + (impl,))
            if d:
                out.setdefault(key, {})[impl] = sorted((x, ms / d, sp) for x, ms, sp in rows)
    return out


def density_plot(results: list[dict], path: str) -> str | None:
    """PNG of time against tile density (time / the same implementation's dense time; log-log),
    one panel per (S, mode), with the ideal line (y = density) and the bar (y = 1.25 density).
    None when matplotlib is missing or no implementation has a dense time."""
    data = density_points(results)
    if not data:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted(data)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [0.01, 1.0]
        ax.plot(xs, xs, "k-", lw=1, label="ideal (time = density x dense)")
        ax.plot(xs, [1.25 * x for x in xs], "k--", lw=1, label="bar (1.25 x density x dense)")
        for impl, rows in sorted(data[key].items()):
            x, y, specs = zip(*rows)
            ax.plot(x, y, "o", label=impl)
            if impl.startswith("flashmux-triton"):
                for xi, yi, sp in rows:
                    ax.annotate(sp, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tile density (computed tiles / all tiles)")
        ax.set_ylabel("time / dense time")
        ax.set_title(f"S={key[0]}, {key[1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m flashmux.bench.maskbench RESULTS_JSON... [--plot PNG]
    import json
    import sys

    args = sys.argv[1:]
    plot = None
    if "--plot" in args:
        i = args.index("--plot")
        plot = args[i + 1]
        del args[i:i + 2]
    recs = []
    for path in args:
        with open(path) as f:
            recs += json.load(f)["results"]
    print(bar_tables(recs))
    if plot:
        print(f"density plot: {density_plot(recs, plot)}")
