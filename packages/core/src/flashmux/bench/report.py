"""Markdown tables from a results JSON: TFLOP/s (GB/s for decode, MiB for memory) by sequence
length, one table per sweep x mode x (head_dim, causal, dtype), each flashmux implementation's
ratio to the best correct anchor of its own framework, what was skipped and why, and the checks.
"""

from __future__ import annotations

import math
from collections import defaultdict

MODE_TITLE = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
FW_ORDER = {"torch": 0, "jax": 1, "numpy": 2}


def fmt_x(x: int) -> str:
    if x >= 1024 and x % 1024 == 0:
        return f"{x // 1024}k"
    return str(x)


def fmt_num(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def metric_of(sweep: str) -> tuple[str, str]:
    """(record key, unit) shown for a sweep."""
    if sweep == "decode":
        return "gbps", "GB/s of K+V read"
    if sweep == "memory":
        return "peak_mem_mib", "MiB peak extra device memory, forward+backward"
    return "tflops", "TFLOP/s"


def value(rec: dict, key: str) -> float | None:
    if key == "peak_mem_mib":
        b = rec.get("peak_mem_bytes")
        return None if b is None else b / 2**20
    return rec.get(key)


def impl_sort_key(rec_or_id, fam=None, fw=None):
    if isinstance(rec_or_id, dict):
        fam, fw, name = rec_or_id["family"], rec_or_id["framework"], rec_or_id["impl"]
    else:
        name = rec_or_id
    return (FW_ORDER.get(fw, 9), 0 if fam == "flashmux" else 1, name)


def display_name(rec: dict) -> str:
    name = rec["impl"]
    pdt = rec["point"]["dtype"]
    if rec.get("dtype") and rec["dtype"] != pdt:
        name += f" ({rec['dtype']})"
    return name


def cell(rec: dict | None, key: str) -> str:
    if rec is None:
        return ""
    st = rec["status"]
    if st in ("ok", "wrong"):
        v = value(rec, key)
        s = fmt_num(v)
        return s + " ✗" if st == "wrong" else s
    return {"oom": "OOM", "budget": "⏱", "error": "err"}.get(st, "–")


def best_anchors(results: list[dict]) -> dict:
    """(sweep, mode, point label, framework) -> (best anchor record) among correct anchors."""
    best: dict = {}
    for r in results:
        if r["family"] != "anchor" or r["status"] != "ok" or r.get("tflops") is None:
            continue
        k = (r["sweep"], r["mode"], _pkey(r), r["framework"])
        if k not in best or r["tflops"] > best[k]["tflops"]:
            best[k] = r
    return best


def _pkey(r: dict) -> tuple:
    p = r["point"]
    return (
        p["group"],
        p["x"],
        p["batch"],
        p["seqlen_q"],
        p["seqlen_k"],
        p["heads_q"],
        p["heads_kv"],
    )


def ratios(results: list[dict]) -> list[dict]:
    """Each correct flashmux measurement against the best correct anchor of its framework."""
    best = best_anchors(results)
    out = []
    for r in results:
        if r["family"] != "flashmux" or r["status"] != "ok" or r.get("tflops") is None:
            continue
        b = best.get((r["sweep"], r["mode"], _pkey(r), r["framework"]))
        if b is None:
            continue
        out.append(
            {
                "impl": r["impl"],
                "framework": r["framework"],
                "sweep": r["sweep"],
                "mode": r["mode"],
                "group": r["point"]["group"],
                "x": r["point"]["x"],
                "ratio": r["tflops"] / b["tflops"],
                "anchor": b["impl"],
            }
        )
    return out


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def env_lines(env: dict, args: dict | None = None) -> list[str]:
    v = env.get("versions", {})
    dev = env.get("device_name", "?")
    cc = env.get("compute_capability")
    lines = [
        f"- device: **{dev}**"
        + (f" (sm{cc[0]}{cc[1]})" if cc else "")
        + (f", driver {env['driver']}" if env.get("driver") else "")
        + (f", CUDA {env['cuda_runtime']}" if env.get("cuda_runtime") else "")
        + (f", cuDNN {env['cudnn']}" if env.get("cudnn") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())),
        f"- date: {env.get('date', '?')}"
        + (f", commit {env['git_commit']}" if env.get("git_commit") else ""),
    ]
    if args and args.get("argv") is not None:
        lines.append("- command: `python -m flashmux bench " + " ".join(args["argv"]) + "`")
    for argv in (args or {}).get("merged") or []:
        if argv is not None:
            lines.append("- merged run: `python -m flashmux bench " + " ".join(argv) + "`")
    return lines


def render(data: dict, plots: list[str] | None = None, heading_level: int = 1) -> str:
    h = "#" * heading_level
    results = data.get("results", [])
    env = data.get("env", {})
    L: list[str] = [f"{h} flashmux benchmark results", ""]
    L += env_lines(env, data.get("args"))
    if data.get("wall_s") is not None:
        L.append(f"- wall time: {data['wall_s']:.0f} s, {len(results)} measurements")
    L += [
        "",
        "TFLOP/s by the FlashAttention convention (forward 4·B·H·Sq·Sk·D, halved for causal; "
        "backward 2.5x, forward+backward 3.5x the forward). Median of many timed calls on "
        "rotated random inputs after warm-up. ✗ = failed the correctness check against the "
        "float64 reference (number kept, excluded from ratios); OOM = out of memory; "
        "– = not supported or not installed (see *Skipped*); ⏱ = time budget ran out.",
        "",
    ]
    rats = ratios(results)
    if rats:
        L += [
            f"{h}# flashmux against the best anchor of its framework",
            "",
            "Geometric mean over points of (flashmux TFLOP/s) / (best correct same-framework "
            "anchor's TFLOP/s at that point); min and max over points.",
            "",
            "| implementation | sweep | mode | geo-mean | min | max | points |",
            "|---|---|---|---|---|---|---|",
        ]
        agg = defaultdict(list)
        for r in rats:
            agg[(r["impl"], r["framework"], r["sweep"], r["mode"])].append(r["ratio"])
        for (impl, _fw, sw, mode), xs in sorted(
            agg.items(), key=lambda kv: (FW_ORDER.get(kv[0][1], 9), kv[0][0], kv[0][2], kv[0][3])
        ):
            L.append(
                f"| {impl} | {sw} | {mode} | {_geomean(xs):.2f}x | {min(xs):.2f}x | "
                f"{max(xs):.2f}x | {len(xs)} |"
            )
        L.append("")
    if plots:
        for p in plots:
            L += [f"![{p}]({p})", ""]
    by_sweep = defaultdict(list)
    for r in results:
        by_sweep[r["sweep"]].append(r)
    rat_idx = {(r["impl"], r["sweep"], r["mode"], r["group"], r["x"]): r for r in rats}
    for sweep, recs in by_sweep.items():
        key, unit = metric_of(sweep)
        L += [f"{h}# Sweep `{sweep}`", ""]
        modes = sorted({r["mode"] for r in recs}, key=["fwd", "bwd", "fwd_bwd"].index)
        groups = sorted({r["point"]["group"] for r in recs})
        for mode in modes:
            for g in groups:
                rs = [r for r in recs if r["mode"] == mode and r["point"]["group"] == g]
                if not rs:
                    continue
                xs = sorted({r["point"]["x"] for r in rs})
                ex = rs[0]["point"]
                desc = _group_desc(sweep, ex)
                title = "peak memory" if sweep == "memory" else MODE_TITLE[mode]
                L += [f"{h}## {title}, {desc} ({unit})", ""]
                L += _table(rs, xs, key, rat_idx, sweep, mode, g, with_ratio=sweep != "memory")
                if sweep != "memory":
                    L += ["<details><summary>milliseconds (median)</summary>", ""]
                    L += _table(rs, xs, "ms", {}, sweep, mode, g, with_ratio=False)
                    L += ["</details>", ""]
    L += _skipped(results)
    L += _checks(data.get("checks", []))
    if data.get("log"):
        L += [f"{h}# Log", "", "```"] + [s.rstrip() for s in data["log"][:30]] + ["```", ""]
    return "\n".join(L)


def _group_desc(sweep: str, p: dict) -> str:
    parts = []
    if sweep == "decode":
        parts.append(f"Sq={p['seqlen_q']}, B={p['batch']}")
    elif sweep in ("long", "memory"):
        parts.append(f"B={p['batch']}")
    elif sweep == "varlen":
        parts.append(f"mixed lengths, ~{sum(p['seqlens'] or [])} tokens")
    else:
        parts.append(f"B·S={p['batch'] * p['seqlen_q']}")
    h = (
        f"H={p['heads_q']}"
        if p["heads_q"] == p["heads_kv"]
        else f"Hq={p['heads_q']}, Hkv={p['heads_kv']}"
    )
    parts += [h, f"head_dim {p['head_dim']}", "causal" if p["causal"] else "non-causal", p["dtype"]]
    if p.get("kvcache"):  # attention_with_kvcache rows of the decode sweep
        page = p.get("page_size") or 0
        kv = f"attention_with_kvcache, {'paged (' + str(page) + '-token pages)' if page else 'contiguous'} cache"
        if p.get("kv_lens"):
            kv += f", ragged lengths (mean {sum(p['kv_lens']) / len(p['kv_lens']):.0f}; bytes actually read)"
        parts.append(kv)
    if p.get("mask"):  # masks sweep: the block mask and its densities
        dens = p.get("mask_density")
        el = p.get("mask_elem_density")
        parts.append(f"block mask {p['mask']}" + (
            f" (tile density {dens:.1%}, element density {el:.1%}; TFLOP/s count allowed pairs)"
            if dens is not None else ""))
    return ", ".join(parts)


def _table(rs, xs, key, rat_idx, sweep, mode, group, with_ratio):
    head_x = "Sk" if sweep == "decode" else ("max len" if sweep == "varlen" else "S")
    L = [
        "| implementation | " + " | ".join(f"{head_x}={fmt_x(x)}" for x in xs) + " |",
        "|---|" + "---|" * len(xs),
    ]
    by_impl = defaultdict(dict)
    names = {}
    for r in rs:
        by_impl[r["impl"]][r["point"]["x"]] = r
        names[r["impl"]] = r
    rows = sorted(by_impl, key=lambda i: impl_sort_key(names[i]))
    shown = 0
    for impl in rows:
        cells = [cell(by_impl[impl].get(x), key) for x in xs]
        if all(c in ("–", "") for c in cells):
            continue  # wholly unsupported here: listed under Skipped
        shown += 1
        nm = display_name(names[impl])
        if names[impl]["family"] == "flashmux":
            nm = f"**{nm}**"
        L.append(f"| {nm} | " + " | ".join(cells) + " |")
        if with_ratio and names[impl]["family"] == "flashmux":
            rc = []
            for x in xs:
                r = rat_idx.get((impl, sweep, mode, group, x))
                rc.append(f"{r['ratio']:.2f}x {r['anchor']}" if r else "")
            if any(rc):
                L.append(
                    f"| ↳ vs best {names[impl]['framework']} anchor | " + " | ".join(rc) + " |"
                )
    if not shown:
        L.append("| (nothing ran) |" + " |" * len(xs))
    L.append("")
    return L


def _skipped(results):
    agg = defaultdict(int)
    for r in results:
        if r["status"] in ("ok", "wrong"):
            continue
        agg[(r["impl"], r["status"], r["reason"] or "")] += 1
    if not agg:
        return []
    L = [
        "## Skipped and failed",
        "",
        "| implementation | status | reason | measurements |",
        "|---|---|---|---|",
    ]
    for (impl, st, reason), n in sorted(agg.items()):
        reason = reason.replace("|", "\\|")
        if len(reason) > 200:
            reason = reason[:197] + "..."
        L.append(f"| {impl} | {st} | {reason} | {n} |")
    L.append("")
    return L


def _checks(checks):
    if not checks:
        return []
    n_ok = sum(1 for c in checks if c.get("ok"))
    L = [
        "## Correctness checks",
        "",
        f"{n_ok} of {len(checks)} checks passed. Each implementation is checked on a small "
        "problem with the same dtype, head_dim, GQA ratio, causal mask and layout as the timed "
        "one, against the float64 NumPy reference; the yardstick is plain attention "
        "(materialized scores, float32 softmax) in the same framework and precision. flashmux "
        "backends are held to the SPEC rule (error <= 2x plain + 1e-5); anchors to a sanity "
        "bound (4x + 1e-4).",
        "",
        "<details><summary>all checks</summary>",
        "",
        "| implementation | mode | problem | max error (out, dq, dk, dv) | plain attention | ok |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        p = c["point"]
        prob = (
            f"B{p['batch']} Sq{p['seqlen_q']} Sk{p['seqlen_k']} H{p['heads_q']}/"
            f"{p['heads_kv']} D{p['head_dim']}{' causal' if p['causal'] else ''}"
            f"{' varlen' if p.get('seqlens') else ''} {c.get('dtype', p['dtype'])}"
        )
        errs = c.get("errors") or {}
        base = c.get("plain_errors") or {}
        e = ", ".join(f"{v:.2e}" for v in errs.values()) if errs else (c.get("reason") or "")
        b = ", ".join("-" if v is None else f"{v:.2e}" for v in base.values()) if base else ""
        e = e.replace("|", "\\|")[:160]
        L.append(
            f"| {c['impl']} | {c['mode']} | {prob} | {e} | {b} | "
            f"{'yes' if c.get('ok') else 'NO (' + c.get('status', '') + ')'} |"
        )
    L += ["", "</details>", ""]
    return L
