"""CPU tests of the sm90 GPU tooling (issue 12): scripts/gpu.py's sm90 stage on the build stage's
library (--sm90-lib plain, no second build) and sm90_check.py's sweep narrowing
(FMX_BENCH_DIMS / FMX_BENCH_SEQS). Dry runs only: nothing is built or launched."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry(tmp_path, *args):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu.py"),
            "sm90",
            "--dry-run",
            "--out",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_sm90_stage_plain_library_skips_the_tuning_build(tmp_path):
    out = _dry(tmp_path, "--sm90-lib", "plain", "--sm90", "benchbwd", "--sm90-bwd-variants", "0")
    assert "sm90_benchbwd" in out and "FMX_BWD_VARIANTS=0" in out
    assert "sm90_build" not in out and "sm90_facts" not in out
    assert "FMX_SM90_TUNING" not in out


def test_sm90_stage_default_builds_the_tuning_library(tmp_path):
    out = _dry(tmp_path, "--sm90", "benchbwd")
    assert "sm90_build" in out and "-DFMX_SM90_TUNING" in out and "sm90_facts" in out


def test_bench_sweep_narrowing(monkeypatch):
    pytest.importorskip("torch")
    tools = ROOT / "packages" / "backend_cuda" / "tools"
    monkeypatch.syspath_prepend(str(tools))
    spec = importlib.util.spec_from_file_location("sm90_check_under_test", tools / "sm90_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("FMX_BENCH_DIMS", raising=False)
    monkeypatch.delenv("FMX_BENCH_SEQS", raising=False)
    assert mod._sweep((64, 128), (2048, 4096)) == ((64, 128), (2048, 4096))
    monkeypatch.setenv("FMX_BENCH_DIMS", "128")
    monkeypatch.setenv("FMX_BENCH_SEQS", "2048,8192")
    assert mod._sweep((64, 128), (2048, 4096)) == ((128,), (2048, 8192))
