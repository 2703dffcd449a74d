"""The dispatcher's priority table, regenerated from a results JSON.

Format (read by the dispatcher from flashmux/priority.json; "default" is the fallback):

    {"sm90": {"torch": ["triton", "cuda", "reference"], "jax": ["pallas", "cuda", "reference"]},
     "default": {...}}

For each framework, the backends measured there are ranked by a score: the geometric mean, over
every (point, mode) where the backend ran and passed its correctness check, of its TFLOP/s
relative to the fastest flashmux backend at that point (1.0 = always fastest), weighted by its
coverage (0.5 + 0.5 x points it ran / points the best-covered backend ran), so a backend that
declines most problems ranks below one that serves them all about as fast. Backends that never
ran correctly keep their previous order after those that did; "reference" is always last.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def rank(results: list[dict], previous: dict | None = None) -> dict[str, list[str]]:
    previous = previous or {}
    rows = [
        r for r in results if r["family"] == "flashmux" and r.get("backend") not in (None, "auto")
    ]
    by_fw_point = defaultdict(dict)  # (fw, sweep, mode, point) -> backend -> tflops
    seen = defaultdict(set)
    for r in rows:
        seen[r["framework"]].add(r["backend"])
        if r["status"] != "ok" or not r.get("tflops"):
            continue
        p = r["point"]
        k = (r["framework"], r["sweep"], r["mode"], p["group"], p["x"], p["batch"])
        by_fw_point[k][r["backend"]] = r["tflops"]
    table: dict[str, list[str]] = {}
    frameworks = sorted(set(seen) | set(previous))
    for fw in frameworks:
        rel = defaultdict(list)
        for k, d in by_fw_point.items():
            if k[0] != fw or not d:
                continue
            top = max(d.values())
            for b, v in d.items():
                rel[b].append(v / top)
        max_pts = max((len(v) for v in rel.values()), default=0)
        scored = []
        for b, xs in rel.items():
            gm = math.exp(sum(math.log(x) for x in xs) / len(xs))
            coverage = len(xs) / max_pts if max_pts else 0
            scored.append((-(gm * (0.5 + 0.5 * coverage)), b))
        order = [b for _, b in sorted(scored)]
        prev = [b for b in previous.get(fw, []) if b not in order]
        rest = sorted(b for b in seen.get(fw, set()) if b not in order and b not in prev)
        full = order + prev + rest
        if "reference" in full:
            full.remove("reference")
        full.append("reference")
        table[fw] = full
    return table


def regenerate(results_path: str | Path, out_path: str | Path) -> dict:
    """Merge the ranking for the results' device class into out_path (kept: other classes)."""
    data = json.loads(Path(results_path).read_text())
    env = data.get("env", {})
    dev = env.get("device_class") or "default"
    out_path = Path(out_path)
    table = {}
    if out_path.exists():
        try:
            table = json.loads(out_path.read_text())
        except json.JSONDecodeError:
            table = {}
    new = rank(data.get("results", []), table.get(dev) or table.get("default"))
    table[dev] = new
    if "default" not in table:
        table["default"] = new
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table
