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

Problem classes: the same ranking is also made per problem class (`flashmux.dispatch.problem_class`:
head_dim bucket, causal or not, training (modes with a backward) or inference, decode or prefill,
16-bit or float32), from the points of that class alone, and stored under the device class's
"classes" key:

    {"sm90": {"torch": [...], "classes": {"d128-causal-train-prefill-16bit": {"torch": [...]}}}}

The dispatcher looks the problem class up first and falls back to the device class's list.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def result_class(r: dict) -> str | None:
    """The problem class of one result record (see flashmux.dispatch.problem_class); None when
    the record does not say its shapes."""
    from ..dispatch import problem_class

    p = r.get("point") or {}
    if "head_dim" not in p or "mode" not in r:
        return None
    sq, sk = p.get("seqlen_q") or 0, p.get("seqlen_k") or 0
    if p.get("seqlens"):  # varlen: the longest sequence
        sq = sk = max(p["seqlens"])
    return problem_class(int(p["head_dim"]), bool(p.get("causal")), r["mode"] != "fwd", int(sq),
                         int(sk), r.get("dtype") or p.get("dtype", "bf16"))


def rank(
    results: list[dict], previous: dict | None = None, cls: str | None = None
) -> dict[str, list[str]]:
    """{framework: [backends, best first]} from the results (of problem class `cls` only, when
    given)."""
    previous = previous or {}
    rows = [
        r for r in results if r["family"] == "flashmux" and r.get("backend") not in (None, "auto")
    ]
    # attention_with_kvcache rows rank the decode dispatcher's table (regenerate's "decode"
    # entry), not attention's: cls "kvcache" selects them, every other ranking leaves them out
    want_kv = cls == "kvcache"
    rows = [r for r in rows if bool((r.get("point") or {}).get("kvcache")) == want_kv]
    if want_kv:
        cls = None
    if cls is not None:
        rows = [r for r in rows if result_class(r) == cls]
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
    results = data.get("results", [])
    prev = table.get(dev) or table.get("default") or {}
    prev_plain = {k: v for k, v in prev.items() if k != "classes"}
    new: dict = dict(rank(results, prev_plain))
    classes = sorted({c for r in results if r.get("family") == "flashmux"
                      and r.get("backend") not in (None, "auto")
                      and not (r.get("point") or {}).get("kvcache") and (c := result_class(r))})
    prev_classes = prev.get("classes") or {}
    by_class = {}
    for c in classes:
        ranked = rank(results, prev_classes.get(c) or prev_plain, c)
        if ranked:
            by_class[c] = ranked
    if by_class:
        new["classes"] = by_class
    table[dev] = new
    if "default" not in table:
        table["default"] = {k: v for k, v in new.items() if k != "classes"}
    # the decode (KV-cache) problem class: {"decode": {device class: {framework: [...]}}},
    # read by flashmux.kvcache.decode_order
    decode = table.get("decode") or {}
    ranked_kv = rank(results, decode.get(dev) or {}, "kvcache")
    if any(r.get("family") == "flashmux" and (r.get("point") or {}).get("kvcache")
           for r in results):
        decode[dev] = ranked_kv
        table["decode"] = decode
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table
