"""flashmux.bench.decodeplot: which decode_variants rows become plot points (CPU, no GPU)."""

from __future__ import annotations

import json
import os

import pytest

from flashmux.bench import decodeplot as dp

if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass", allow_module_level=True)

LOG = """# NVIDIA H200 triton B=8 Hq=32 Hkv=8 D=128 bfloat16; GB/s of K+V read once
| Sq | Sk | cache | impl | splits | config | us | GB/s |
|---|---|---|---|---|---|---|---|
| 1 | 4096 | contig | sdpa-cudnn | - | - | 37.2 | 3612 |
| 1 | 4096 | contig | ceiling (sum of K, V) | - | - | 46.4 | 2890 |
| 1 | 4096 | contig | ceiling (read 4096x8w 4/SM) | - | - | 33.0 | 4067 |
| 1 | 4096 | contig | ceiling (read 2048x4w 8/SM) | - | - | 32.5 | 4127 |
| 1 | 4096 | contig | flashmux-triton | auto | default | 38.4 | 3498 |
| 1 | 4096 | contig | flashmux-triton | auto | c36 block_n=128 | 37.0 | 3600 |
| 1 | 4096 | contig | flashmux-triton | 3 | default | 41.0 | 3300 |
| 1 | 4096 | page16 | flashmux-triton | auto | default | - | WRONG (3.1e-01) |
| 4 | 4096 | contig | flashmux-triton | auto | default | 39.0 | 3400 |
# NVIDIA H200 triton B=8 Hq=32 Hkv=1 D=128 bfloat16; GB/s of K+V read once
| 1 | 4096 | contig | flashmux-triton | auto | default | 20.0 | 800 |
# NVIDIA H200 triton B=8 Hq=32 Hkv=8 D=128 bfloat16; GB/s of K+V read once; ragged cache_seqlens
| 1 | 32768 | contig | flashmux-triton | auto | default | 180.0 | 3000 |
# NVIDIA H200 (jax 0.11.2) pallas B=8 Hq=32 Hkv=8 D=128 bfloat16; GB/s of K+V read once
| 1 | 32768 | contig | jax-cudnn | - | - | 270.3 | 3972 |
| 1 | 32768 | contig | flashmux-pallas | auto | default | 260.0 | 4100 |
| 1 | 32768 | page16 | flashmux-pallas | auto | default | 300.0 | 3600 |
"""


def test_only_the_default_uniform_issue_shape_rows_are_kept():
    pts = dp.merge(dp.parse_log(LOG, "a"))
    got = {(p["series"], p["sk"]): p["gbps"] for p in pts}
    assert got == {
        ("torch SDPA cuDNN", 4096): 3612.0,
        ("flashmux Triton, contiguous", 4096): 3498.0,
        (dp.CEILING, 4096): 4127.0,  # the fastest read kernel, not the sum
        ("JAX cuDNN", 32768): 3972.0,
        ("flashmux Pallas, contiguous", 32768): 4100.0,
        ("flashmux Pallas, 16-token pages", 32768): 3600.0,
    }
    assert {p["device"] for p in pts} == {"NVIDIA H200", "NVIDIA H200 (jax 0.11.2)"}


def test_a_later_run_replaces_an_earlier_one(tmp_path):
    later = LOG.splitlines()[0] + "\n| 1 | 4096 | contig | flashmux-triton | auto | default | 37.0 | 3627 |\n"
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(LOG)
    b.write_text(later)
    out = tmp_path / "d.json"
    dp.main(["--from-logs", str(a), str(b), "--json", str(out)])
    got = {(p["series"], p["sk"]): p["gbps"] for p in json.loads(out.read_text())["points"]}
    assert got[("flashmux Triton, contiguous", 4096)] == 3627.0
    assert got[("torch SDPA cuDNN", 4096)] == 3612.0


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"title": "t", "points": dp.merge(dp.parse_log(LOG, "a"))}
    path = dp.plot(res, str(tmp_path / "d.png"))
    assert path and (tmp_path / "d.png").stat().st_size > 1000


def test_the_committed_results_file_holds_every_series():
    """docs/data's decode results (the figure in docs/benchmarks.md is drawn from it)."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "docs" / "data" / "h200-2026-11-30-decode.json"
    res = json.loads(path.read_text())
    names = {p["series"] for p in res["points"]}
    assert {n for n, _, _ in dp.SERIES if "Pallas, 1" not in n and "Pallas, 6" not in n} <= names
    assert dp.CEILING in names and all(p["gbps"] > 0 for p in res["points"])
