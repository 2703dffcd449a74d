"""The masks sweep's time budget, incremental results and --masks selection (CPU, quick mode).

The H200 run of 14:15 UTC (session 7) printed "18 problems x 20 implementations" and was killed
past its --time-budget with nothing written: these tests pin the three fixes (a watchdog that
ends an overrunning step and writes what was measured, results written after every measurement,
a narrower selection).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time

import pytest

from flashmux.bench import cli
from flashmux.bench.impls import ANCHORS
from flashmux.bench.maskbench import LEAN_ANCHORS, LEAN_BACKENDS, mask_fn_for
from flashmux.bench.shapes import SweepConfig, build_points

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_masks_option_selects_points():
    pts = build_points(SweepConfig(sweeps=["masks"], seqlens=[8192], masks=["dense", "doc:8"]))
    assert [p.mask for p in pts] == [None, "doc:8"]
    assert {p.seqlen_q for p in pts} == {8192}


@pytest.mark.parametrize("spec", ["doc", "sliding:1k", "dilated:256", "nosuch:3"])
def test_bad_mask_spec_is_refused_before_timing(spec, capsys):
    with pytest.raises(ValueError, match="mask spec"):
        mask_fn_for(spec, 256, 256)
    rc = cli.main(["bench", "--quick", "--sweep", "masks", "--masks", spec, "--out", "/nonexistent"])
    assert rc == 2
    assert spec in capsys.readouterr().err


def test_lean_default_names_are_known():
    assert set(LEAN_ANCHORS) <= set(ANCHORS)
    assert set(LEAN_BACKENDS) == {"triton", "pallas", "cuda"}


_OVERRUN = textwrap.dedent(
    """
    import sys, time
    from flashmux.bench import cli, runner

    real = runner.Runner.measure
    calls = []

    def measure(self, impl, point, modes, deadline):
        calls.append(impl.id)
        if len(calls) == 3:  # one step that never ends (a compile that hangs)
            time.sleep(120)
        return real(self, impl, point, modes, deadline)

    runner.Runner.measure = measure
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_overrunning_step_ends_the_run_and_keeps_what_was_measured(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _OVERRUN, "bench", "--quick", "--no-progress", "--sweep", "masks",
         "--frameworks", "torch", "--backends", "reference", "--anchors", "none",
         "--modes", "fwd", "--masks", "dense,causal,doc:4,chunked:64", "--time-budget", "8",
         "--out", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert wall < 60  # budget 8 s + grace, plus imports; never the 120 s sleep
    assert "time budget 8 s" in proc.stderr and "exceeded while running" in proc.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["partial"].startswith("stopped by the time budget in flashmux-reference[torch]")
    ok = [r for r in data["results"] if r["status"] == "ok"]
    # the two measurements before the hanging one were written, with their per-record lines
    assert {r["point"]["mask"] for r in ok} == {None, "causal"}, data["results"]
    assert "[bench] flashmux-reference[torch] S256 causal fwd: ok" in proc.stderr
    assert (out / "results.md").exists()


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_a_measurement_that_would_overrun_is_not_started(tmp_path):
    """Under a budget, an implementation whose last point took longer than what is left is
    recorded as 'budget' instead of being started (the rest of the run is not held up)."""
    from flashmux.bench import runner as R

    real = R.Runner.measure

    def measure(self, impl, point, modes, deadline):
        real(self, impl, point, modes, deadline)
        self.cost[impl.id] = 1e6  # pretend every point of this impl takes 11 days

    out = tmp_path / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(R.Runner, "measure", measure)
    try:
        rc = cli.main(["bench", "--quick", "--no-progress", "--sweep", "masks", "--frameworks",
                       "torch", "--backends", "reference", "--anchors", "none", "--modes", "fwd",
                       "--masks", "dense,causal", "--time-budget", "300", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    st = {r["point"]["mask"]: r for r in data["results"]}
    assert st[None]["status"] == "ok"
    assert st["causal"]["status"] == "budget" and "last point took" in st["causal"]["reason"]
    assert "partial" not in data


def test_alibi_specs():
    from flashmux.bench.maskbench import alibi_for, mask_stats, score_bias, split_spec

    assert split_spec("alibi") == (None, True) and split_spec("causal+alibi") == ("causal", True)
    assert split_spec("doc:8") == ("doc:8", False)
    with pytest.raises(ValueError, match="modifier"):
        split_spec("causal+softcap")
    assert alibi_for("causal", 4) is None
    sl = alibi_for("alibi", 4)
    assert sl.tolist() == [0.25, 0.0625, 0.015625, 0.00390625]
    b = score_bias("alibi", 4, 3, 5)  # Sq < Sk: bottom-right, the last query is at key 4
    assert b.shape == (4, 3, 5) and b[0, 2, 4] == 0 and b[0, 0, 0] == pytest.approx(-0.5)
    assert mask_stats("alibi", 300, 300)["density"] == 1.0
    assert mask_stats("causal+alibi", 300, 300) == mask_stats("causal", 300, 300)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_alibi_points_pass_slopes_and_are_checked(tmp_path):
    """The check judges flashmux with slopes against the float64 reference with slopes, and the
    plain-attention yardstick adds the same bias (its error stays at rounding level)."""
    out = tmp_path / "out"
    rc = cli.main(["bench", "--quick", "--no-progress", "--sweep", "masks", "--frameworks", "torch",
                   "--backends", "reference", "--anchors", "sdpa-math", "--modes", "fwd_bwd",
                   "--masks", "alibi,chunked:64+alibi", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    checks = [c for c in data["checks"] if c["impl"] == "flashmux-reference[torch]"]
    assert {c["point"]["mask"] for c in checks} == {"alibi", "chunked:64+alibi"}
    for c in checks:
        assert c["ok"], c
        assert max(c["plain_errors"].values()) < 1e-5, c  # the yardstick has the bias too
    anchor = [r for r in data["results"] if r["impl"] == "sdpa-math"]
    assert anchor and all(r["status"] == "unsupported" and "ALiBi" in r["reason"] for r in anchor)
    from flashmux.bench.impls import FlashmuxImpl
    from flashmux.bench.shapes import Point

    class Ctx:
        fws = {"torch": type("F", (), {"int32": staticmethod(lambda x: x),
                                       "from_numpy": staticmethod(lambda x, dt: x)})()}
        device = "cpu"

    p = Point("masks", 1, 256, 256, 2, 2, 32, False, "fp32", x=256, mask="alibi")
    kw = FlashmuxImpl("reference", "torch", None)._kwargs(p, Ctx())
    assert "block_mask" not in kw and kw["alibi_slopes"].shape == (2,)


def test_bar_tables_compute_the_issue_ratios():
    from flashmux.bench.maskbench import bar_tables

    def rec(impl, spec, ms, density=1.0, status="ok", fw="torch"):
        p = {"sweep": "masks", "seqlen_q": 8192, "head_dim": 128, "batch": 4, "heads_q": 16,
             "mask": spec, "mask_density": density}
        return {"impl": impl, "framework": fw, "sweep": "masks", "mode": "fwd", "dtype": "bf16",
                "point": p, "status": status, "ms": ms if status == "ok" else None}

    t = "flashmux-triton[torch]"
    md = bar_tables([
        rec(t, None, 10.0), rec("flex", None, 12.0),
        rec(t, "doc:64", 0.5, 0.04), rec("flex", "doc:64", 1.0, 0.04),
        rec(t, "alibi", 10.8), rec(t, "causal", 5.0, 0.5), rec("flex", "causal", None, 0.5, "budget"),
    ])
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "| 0.500 | 2.00x | 1.25 |" in lines["doc:64"]  # 1.0/0.5; 0.5 / (0.04 x 10)
    assert "| 10.800 |  | +8.0% |" in lines["alibi"]
    assert "| 1.000 |" in lines["doc:64"] and "budget" in lines["causal"]
    assert "| 10.000 | 1.20x |  |" in lines["dense"]
    # how flex was compiled is stated under the table (the record's "chosen", session 10)
    r = rec("flex", "doc:8", 1.0, 0.14)
    r.update(family="anchor", chosen="torch.compile(flex_attention, dynamic=False), "
             "IS_DIVISIBLE=True, kernel_options default, BlockMask 128x128: 1 full + 2 partial")
    md = bar_tables([rec(t, "doc:8", 0.9, 0.14), r])
    assert "torch.compile(flex_attention, dynamic=False), IS_DIVISIBLE=True" in md
    assert "BlockMask" not in md
