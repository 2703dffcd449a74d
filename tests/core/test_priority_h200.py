"""The committed priority table is the one the committed H200 sweep produces (issue 14).

docs/data/h200-2026-11-30-priority-sweep.json holds two harness runs on the H200 (bf16, fwd and
fwd+bwd, causal and not): head_dim 64/128 from session 6 (S=4k; flashmux's triton, cuda, native and
pallas beside SDPA cuDNN and JAX cuDNN) and head_dim 256 from session 8's final call (torch S 2k-16k
with triton, cuda, native beside SDPA cuDNN and FlashAttention-2; JAX S=4k with pallas, cuda, native
beside JAX cuDNN), which replaced session 6's head_dim 256 rows. Regenerating from it must give the sm90 entry that
packages/core/src/flashmux/priority.json holds, and each class must put first a backend that was
correct and fastest (by the geometric mean over the class's points) in that run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from flashmux.bench.priority import regenerate, result_class

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "docs/data/h200-2026-11-30-priority-sweep.json"
TABLE = ROOT / "packages/core/src/flashmux/priority.json"


def test_committed_sm90_table_is_regenerated_from_the_h200_sweep(tmp_path):
    out = tmp_path / "priority.json"
    out.write_text(TABLE.read_text())
    regenerate(SWEEP, out)
    assert json.loads(out.read_text())["sm90"] == json.loads(TABLE.read_text())["sm90"]


def test_each_class_puts_the_fastest_correct_backend_first():
    data = json.loads(SWEEP.read_text())
    table = json.loads(TABLE.read_text())["sm90"]["classes"]
    # class -> framework -> backend -> [tflops over the class's points]
    best = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in data["results"]:
        if r.get("family") != "flashmux" or r.get("backend") in (None, "auto"):
            continue
        if r["status"] != "ok" or not r.get("tflops"):
            continue
        best[result_class(r)][r["framework"]][r["backend"]].append(r["tflops"])
    assert best, "the sweep has no flashmux results"
    checked = 0
    for cls, fws in best.items():
        for fw, by_backend in fws.items():
            means = {b: math.exp(sum(map(math.log, xs)) / len(xs)) for b, xs in by_backend.items()}
            top = max(means.values())
            first = table[cls][fw][0]
            assert first in means, f"{cls} {fw}: {first} first but not measured correct"
            assert means[first] >= 0.97 * top, f"{cls} {fw}: {first} {means[first]:.0f} < {top:.0f}"
            checked += 1
    assert checked >= 12
