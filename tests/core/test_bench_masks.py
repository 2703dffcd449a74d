"""The benchmark's masks sweep (bench/maskbench.py) in CPU quick mode, and its mask bookkeeping."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from flashmux.bench import cli
from flashmux.bench.maskbench import dense_mask, mask_stats, sweep_masks
from flashmux.bench.shapes import Point, SweepConfig, build_points, check_point

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("spec", sweep_masks(256, True) + ["sliding:100", "doc:7"])
def test_mask_stats_match_the_dense_mask(spec):
    st = mask_stats(spec, 300, 300)
    ok = dense_mask(spec, 300, 300)
    assert st["pairs"] == ok.sum()
    tiles = np.zeros((384, 384), bool)
    tiles[:300, :300] = ok
    nonempty = tiles.reshape(3, 128, 3, 128).any((1, 3)).mean()
    assert st["density"] == pytest.approx(nonempty)


def test_masks_sweep_points():
    pts = build_points(SweepConfig(sweeps=["masks"]))
    masks = {p.mask for p in pts}
    assert None in masks  # the dense call, for the density bar
    assert {"causal", "sliding:1024", "sliding:4096", "doc:8", "doc:64", "dilated:256:1024",
            "chunked:1024"} <= masks
    assert {p.seqlen_q for p in pts} == {8192, 32768} and {p.head_dim for p in pts} == {128}
    p = next(p for p in pts if p.mask == "causal" and p.seqlen_q == 8192)
    causal = Point("papers", p.batch, 8192, 8192, p.heads_q, p.heads_kv, 128, True, "bf16")
    assert p.flops_fwd == pytest.approx(causal.flops_fwd, rel=2e-4)  # exact pairs vs S^2/2
    assert check_point(p).mask == "causal"


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_quick_masks_sweep_runs_and_checks(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--quick", "--no-progress", "--sweep", "masks", "--frameworks", "torch",
                   "--backends", "reference", "--anchors", "none", "--modes", "fwd",
                   "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["point"]["mask"] for r in ok} == set(sweep_masks(256, True)) | {None}
    assert data["checks"] and all(c["ok"] for c in data["checks"]), data["checks"]
    assert "block mask doc:4 (tile density" in (out / "results.md").read_text()
