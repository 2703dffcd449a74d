"""The decode (KV-cache) plot of docs/benchmarks.md: GB/s of K and V read once against the cache
length, for torch SDPA cuDNN, flashmux Triton (contiguous and paged caches), flashmux Pallas,
JAX cuDNN and the in-run HBM read ceiling, on the issue-13 problem (B 8, Hq 32, Hkv 8,
head_dim 128, bf16, Sq 1, full caches).

Two steps, so the committed figure always comes from a committed results file:

    # 1. the text output of benchmarks/decode_variants.py runs (later files win on a tie)
    python -m flashmux.bench.decodeplot --from-logs t.txt pallas.txt --json docs/data/decode.json
    # 2. the figure from the results file
    python -m flashmux.bench.decodeplot --json docs/data/decode.json --plot docs/img/decode.png

Rows kept from a log: Sq 1, the issue's shape (from the log's header line), uniform lengths (a
--ragged run's header says so), the default configuration at automatic splits (`default`,
`auto`); the read ceiling is the fastest Triton read-only kernel of the run at that length.
"""

from __future__ import annotations

import argparse
import json
import re

SHAPE = {"B": 8, "Hq": 32, "Hkv": 8, "D": 128}
NOMINAL_HBM_GBS = 4800  # H200 data sheet

# (impl, cache) -> series name, in legend order
SERIES = (
    ("torch SDPA cuDNN", "sdpa-cudnn", "contig"),
    ("flashmux Triton, contiguous", "flashmux-triton", "contig"),
    ("flashmux Triton, 16-token pages", "flashmux-triton", "page16"),
    ("flashmux Triton, 64-token pages", "flashmux-triton", "page64"),
    ("JAX cuDNN", "jax-cudnn", "contig"),
    ("flashmux Pallas, contiguous", "flashmux-pallas", "contig"),
    ("flashmux Pallas, 16-token pages", "flashmux-pallas", "page16"),
    ("flashmux Pallas, 64-token pages", "flashmux-pallas", "page64"),
)
CEILING = "HBM read ceiling (Triton read kernel)"
_HEADER = re.compile(r"^#\s*(?P<device>.*?)\s+(?P<backend>triton|pallas|cuda)\s+B=(?P<B>\d+)\s+"
                     r"Hq=(?P<Hq>\d+)\s+Hkv=(?P<Hkv>\d+)\s+D=(?P<D>\d+)\s+(?P<dtype>\w+)")


def parse_log(text: str, source: str = "") -> list[dict]:
    """Points {series, sk, gbps, us, device, source} from one decode_variants output."""
    points: list[dict] = []
    keep, device = False, ""
    for line in text.splitlines():
        m = _HEADER.match(line.strip())
        if m:
            shape = {k: int(m.group(k)) for k in SHAPE}
            keep = (shape == SHAPE and m.group("dtype") == "bfloat16"
                    and "ragged" not in line)
            device = m.group("device")
            continue
        if not keep or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not cells[0].isdigit():
            continue
        sq, sk, cache, impl, splits, config, us, gbs = cells
        try:
            us_f, gbs_f = float(us), float(gbs)
        except ValueError:  # WRONG, an exception, "-": not a timing
            continue
        if sq != "1":
            continue
        name = None
        if impl.startswith("ceiling (read"):
            name = CEILING
        elif impl.startswith("flashmux-") and (splits, config) != ("auto", "default"):
            continue
        else:
            name = next((n for n, i, c in SERIES if i == impl and c == cache), None)
        if name:
            points.append({"series": name, "sk": int(sk), "gbps": gbs_f, "us": us_f,
                           "device": device, "source": source})
    return points


def merge(points: list[dict]) -> list[dict]:
    """One point per (series, sk): the last one (a later run), except the ceiling: the fastest
    read kernel of the last run that timed any at that length."""
    out: dict[tuple, dict] = {}
    for p in points:
        key = (p["series"], p["sk"])
        old = out.get(key)
        if (old is not None and p["series"] == CEILING and old["source"] == p["source"]
                and old["gbps"] >= p["gbps"]):
            continue
        out[key] = p
    names = [s[0] for s in SERIES] + [CEILING]
    return sorted(out.values(), key=lambda p: (names.index(p["series"]), p["sk"]))


def plot(results: dict, path: str) -> str | None:
    """Write the figure; None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = results.get("points", [])
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {CEILING: dict(color="k", ls="--", marker="x")}
    for name in [s[0] for s in SERIES] + [CEILING]:
        ser = sorted((p["sk"], p["gbps"]) for p in pts if p["series"] == name)
        if not ser:
            continue
        xs, ys = zip(*ser)
        kw = styles.get(name, dict(marker="o" if "contiguous" in name or "cuDNN" in name else "s",
                                   ls="-" if "flashmux" in name else ":"))
        ax.plot(xs, ys, label=name, **kw)
    ax.axhline(NOMINAL_HBM_GBS, color="grey", lw=0.8)
    ax.text(min(p["sk"] for p in pts), NOMINAL_HBM_GBS, " H200 nominal HBM 4.8 TB/s",
            va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    sks = sorted({p["sk"] for p in pts})
    ax.set_xticks(sks)
    ax.set_xticklabels([f"{s // 1024}k" for s in sks])
    ax.set_xlabel("cache length Sk (keys per sequence)")
    ax.set_ylabel("GB/s of K and V read once")
    ax.set_ylim(bottom=0, top=NOMINAL_HBM_GBS * 1.08)
    ax.set_title(results.get("title", "decode"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-logs", nargs="*", default=[],
                    help="decode_variants.py outputs (text) to read, in time order")
    ap.add_argument("--json", required=True,
                    help="results file: written from --from-logs, else read")
    ap.add_argument("--title", default="")
    ap.add_argument("--note", default="", help="kept in the results file (where, when, how)")
    ap.add_argument("--plot", help="PNG to write")
    args = ap.parse_args(argv)
    if args.from_logs:
        pts = []
        for f in args.from_logs:
            with open(f) as fh:
                pts += parse_log(fh.read(), source=f)
        pts = merge(pts)
        dev = next((p["device"] for p in pts), "")
        title = args.title or (f"decode on {dev}: B 8, Hq 32, Hkv 8, head_dim 128, bf16, Sq 1 "
                               "(graph- / jit-timed)")
        results = {"title": title, "note": args.note, "shape": SHAPE, "points": pts}
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
            fh.write("\n")
        print(f"{len(pts)} points -> {args.json}")
    else:
        with open(args.json) as fh:
            results = json.load(fh)
    if args.plot:
        print(plot(results, args.plot) or "no plot (matplotlib missing or no points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
