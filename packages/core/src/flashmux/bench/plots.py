"""PNG plots in the style of the FlashAttention README: grouped bars of TFLOP/s by sequence
length, one panel per (head_dim, causal), one figure per sweep (rows: modes); peak memory by
sequence length on a log scale. One file per sweep keeps a run's output to a handful of files.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .report import MODE_TITLE, display_name, fmt_num, fmt_x, impl_sort_key, metric_of, value


def _colors(impls_sorted: list[tuple[str, str]]):
    """Strong colors for flashmux, muted ones for anchors; stable across panels."""
    import matplotlib

    strong = matplotlib.colormaps["tab10"].colors
    muted = matplotlib.colormaps["tab20"].colors
    muted = [muted[i] for i in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 0, 2, 4, 6, 8)]
    out, si, mi = {}, 0, 0
    for name, fam in impls_sorted:
        if fam == "flashmux":
            out[name] = strong[si % len(strong)]
            si += 1
        else:
            out[name] = muted[mi % len(muted)]
            mi += 1
    return out


def _title_device(env: dict) -> str:
    return env.get("device_name") or env.get("device_type", "")


def plot_all(data: dict, out_dir, max_files: int = 6) -> list[str]:
    """Write one PNG per sweep into out_dir; returns the file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except Exception:
        return []
    results = [r for r in data.get("results", []) if r["status"] in ("ok", "wrong")]
    by_sweep = defaultdict(list)
    for r in results:
        by_sweep[r["sweep"]].append(r)
    files = []
    for sweep, recs in by_sweep.items():
        if len(files) >= max_files:
            break
        key, unit = metric_of(sweep)
        recs = [r for r in recs if value(r, key) is not None]
        if not recs:
            continue
        name = f"{sweep}.png"
        if sweep == "memory":
            _memory_figure(recs, data.get("env", {}), out_dir / name)
        else:
            _bars_figure(sweep, recs, key, unit, data.get("env", {}), out_dir / name)
        files.append(name)
    return files


def _bars_figure(sweep, recs, key, unit, env, path):
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in recs}, key=["fwd", "bwd", "fwd_bwd"].index)
    groups = sorted({r["point"]["group"] for r in recs})
    impls = sorted(
        {(display_name(r), r["family"], r["framework"]) for r in recs},
        key=lambda t: impl_sort_key(t[0], t[1], t[2]),
    )
    colors = _colors([(n, f) for n, f, _ in impls])
    ncol, nrow = len(groups), len(modes)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(max(6.0, 5.2 * ncol), 3.9 * nrow + 0.9), squeeze=False
    )
    for i, mode in enumerate(modes):
        for j, g in enumerate(groups):
            ax = axes[i][j]
            rs = [r for r in recs if r["mode"] == mode and r["point"]["group"] == g]
            xs = sorted({r["point"]["x"] for r in rs})
            names = [n for n, _, _ in impls if any(display_name(r) == n for r in rs)]
            nb = max(1, len(names))
            width = 0.85 / nb
            for b, n in enumerate(names):
                vals = []
                for x in xs:
                    m = [r for r in rs if display_name(r) == n and r["point"]["x"] == x]
                    vals.append(value(m[0], key) if m else 0.0)
                pos = [xi + (b - (nb - 1) / 2) * width for xi in range(len(xs))]
                bars = ax.bar(
                    pos,
                    vals,
                    width,
                    color=colors[n],
                    label=n,
                    edgecolor="black" if n.startswith("flashmux") else "none",
                    linewidth=0.4,
                )
                if nb <= 10:
                    for rect, v in zip(bars, vals):
                        if v:
                            ax.annotate(
                                fmt_num(v),
                                (rect.get_x() + rect.get_width() / 2, v),
                                ha="center",
                                va="bottom",
                                fontsize=5.5,
                                rotation=90,
                                xytext=(0, 1),
                                textcoords="offset points",
                            )
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([fmt_x(x) for x in xs])
            ex = rs[0]["point"] if rs else {}
            causal = "causal" if ex.get("causal") else "non-causal"
            extra = f"Sq={ex.get('seqlen_q')}, " if sweep == "decode" else ""
            ax.set_title(
                f"{MODE_TITLE[mode]}: {extra}head_dim {ex.get('head_dim')}, {causal}", fontsize=9
            )
            ax.set_xlabel("Sk" if sweep == "decode" else "sequence length", fontsize=8)
            ax.set_ylabel(unit.split(" of ")[0], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            if ax.get_ylim()[1] > 0:
                ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    handles, labels = [], []
    for ax in axes.flat:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(hnd)
                labels.append(lab)
    fig.legend(
        handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False
    )
    dt = recs[0]["point"]["dtype"]
    fig.suptitle(f"flashmux bench `{sweep}` ({dt}) on {_title_device(env)}", fontsize=11)
    rows_legend = math.ceil(len(labels) / 6)
    fig.tight_layout(rect=(0, 0.035 * rows_legend + 0.02, 1, 0.96))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _memory_figure(recs, env, path):
    import matplotlib.pyplot as plt

    groups = sorted({r["point"]["group"] for r in recs})
    impls = sorted(
        {(display_name(r), r["family"], r["framework"]) for r in recs},
        key=lambda t: impl_sort_key(t[0], t[1], t[2]),
    )
    colors = _colors([(n, f) for n, f, _ in impls])
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.6), squeeze=False)
    for j, g in enumerate(groups):
        ax = axes[0][j]
        rs = [r for r in recs if r["point"]["group"] == g]
        for n, fam, _ in impls:
            pts = sorted(
                (r["point"]["x"], r["peak_mem_bytes"] / 2**20) for r in rs if display_name(r) == n
            )
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=n,
                color=colors[n],
                linewidth=2.2 if fam == "flashmux" else 1.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({r["point"]["x"] for r in rs})
        ax.set_xticks(xs)
        ax.set_xticklabels([fmt_x(x) for x in xs])
        ex = rs[0]["point"]
        ax.set_title(
            f"peak extra memory, forward+backward: B={ex['batch']}, H={ex['heads_q']}, "
            f"head_dim {ex['head_dim']}",
            fontsize=9,
        )
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("MiB (log)", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"flashmux bench `memory` on {_title_device(env)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
