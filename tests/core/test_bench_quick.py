"""The benchmark harness end to end in its CPU quick mode, so it cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from flashmux.bench import cli
from flashmux.bench.impls import Context, Impl
from flashmux.bench.priority import rank
from flashmux.bench.runner import Runner, RunOptions
from flashmux.bench.shapes import Point, SweepConfig, build_points, check_point

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--quick", "--no-progress", "--out", str(out), *extra])
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    return rc, data, md, out


def _assert_measured(data, impl):
    ok = [r for r in data["results"] if r["impl"] == impl and r["status"] == "ok"]
    assert ok, f"{impl}: nothing measured: " + repr(
        {r["status"]: r["reason"] for r in data["results"] if r["impl"] == impl}
    )
    for r in ok:
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["tflops"] > 0 and math.isfinite(r["tflops"])
        assert r["reps"] >= 1 and len(r["times_ms"]) == r["reps"]
        assert r["check"] is not None and r["check"]["ok"], r["check"]
    return ok


def test_quick_numpy_and_torch(tmp_path):
    fws = "torch,numpy" if HAS_TORCH else "numpy"
    anchors = "sdpa-math,standard" if HAS_TORCH else "none"
    rc, data, md, out = _run(tmp_path, "--frameworks", fws, "--anchors", anchors, "--seqlens", "32")
    assert rc == 0
    env = data["env"]
    assert env["date"] and env["versions"]["numpy"]
    # The flashmux reference backend and the dispatcher ran, and were checked.
    _assert_measured(data, "flashmux-reference[numpy]")
    _assert_measured(data, "flashmux-auto[numpy]")
    assert data["checks"] and all(c["ok"] for c in data["checks"]), data["checks"]
    assert {c["mode"] for c in data["checks"]} >= {"fwd"}
    # numpy has no autograd: fwd_bwd is reported as unsupported, never as a crash
    nb = [r for r in data["results"] if r["framework"] == "numpy" and r["mode"] == "fwd_bwd"]
    assert nb and all(r["status"] == "unsupported" for r in nb)
    if HAS_TORCH:
        for impl in ("flashmux-reference[torch]", "flashmux-auto[torch]", "sdpa-math", "standard"):
            recs = _assert_measured(data, impl)
            assert {r["mode"] for r in recs} == {"fwd", "fwd_bwd"}
        bwd_checks = [c for c in data["checks"] if c["mode"] == "bwd"]
        assert bwd_checks and all(set(c["errors"]) == {"out", "dq", "dk", "dv"} for c in bwd_checks)
        chosen = [r["chosen"] for r in data["results"] if r["impl"] == "flashmux-auto[torch]"]
        assert all(chosen), chosen
        assert "flashmux-reference[torch]" in md and "vs best torch anchor" in md
    assert "## Sweep `papers`" in md and "| implementation |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "papers.png").stat().st_size > 1000
    # The report can be re-rendered from the JSON alone.
    out2 = tmp_path / "again"
    assert (
        cli.main(["--report-from", str(out / "results.json"), "--out", str(out2), "--no-plots"])
        == 0
    )
    assert (out2 / "results.md").read_text().count("| implementation |") == md.count(
        "| implementation |"
    )


@pytest.mark.skipif(not HAS_JAX, reason="jax not installed")
def test_quick_jax(tmp_path):
    rc, data, md, _ = _run(
        tmp_path,
        "--frameworks",
        "jax",
        "--backends",
        "reference",
        "--anchors",
        "jax-xla,jax-cudnn",
        "--seqlens",
        "32",
        "--causal",
        "yes",
        "--no-plots",
        "--compile-threads",
        "2",
    )
    assert rc == 0
    for impl in ("flashmux-reference[jax]", "jax-xla"):
        recs = _assert_measured(data, impl)
        assert {r["mode"] for r in recs} == {"fwd", "fwd_bwd"}
    skipped = [r for r in data["results"] if r["impl"] == "jax-cudnn"]
    assert skipped and all(r["status"] == "unsupported" and r["reason"] for r in skipped)
    assert "jax-cudnn" in md  # listed under Skipped with its reason
    # the flashmux functions were compiled ahead in the thread pool, and then used
    assert any("compiled 3 of 3 functions ahead" in line for line in data["log"]), data["log"]
    assert not any("unused" in line for line in data["log"]), data["log"]


def test_sweeps_and_flops():
    p = Point("papers", 2, 1024, 1024, 16, 16, 128, False, "bf16", x=1024)
    assert p.flops_fwd == 4 * 2 * 16 * 1024 * 1024 * 128
    pc = Point("papers", 2, 1024, 1024, 16, 16, 128, True, "bf16", x=1024)
    assert pc.flops_fwd == p.flops_fwd / 2
    assert pc.flops("bwd") == 2.5 * pc.flops_fwd and pc.flops("fwd_bwd") == 3.5 * pc.flops_fwd
    # decode: bottom-right causal with Sq=1 sees every key
    d = Point("decode", 8, 1, 4096, 32, 8, 128, True, "bf16", x=4096)
    assert d.flops_fwd == 4 * 8 * 32 * 4096 * 128
    assert d.kv_bytes == 2 * 8 * 4096 * 8 * 128 * 2
    pts = build_points(SweepConfig(sweeps=["papers"]))
    assert {p.batch * p.seqlen_q for p in pts} == {16384}
    assert {p.heads_q * p.head_dim for p in pts} == {2048}
    assert {p.seqlen_q for p in pts} == {512, 1024, 2048, 4096, 8192, 16384}
    for sweep in ("gqa", "decode", "long", "varlen", "memory"):
        pts = build_points(SweepConfig(sweeps=[sweep]))
        assert pts, sweep
        for p in pts:
            c = check_point(p)
            assert c.heads_q // c.heads_kv == p.heads_q // p.heads_kv
            assert c.causal == p.causal and c.varlen == p.varlen
            assert (c.seqlen_q == c.seqlen_k) == (p.seqlen_q == p.seqlen_k)
    assert all(p.heads_q == 8 * p.heads_kv for p in build_points(SweepConfig(sweeps=["gqa"])))


class _WrongNumpy(Impl):
    """Plain attention, then scaled by 1.05: the check must catch it."""

    id = "wrong"
    framework = "numpy"

    def build(self, point, ctx):
        fw = ctx.fws["numpy"]

        def fn(q, k, v):
            return fw.plain(q, k, v, point, 1.0 / math.sqrt(point.head_dim)) * np.float32(1.05)

        return fn


def test_check_catches_a_wrong_answer():
    from flashmux.bench.frameworks import NumpyFW

    ctx = Context(device="cpu", capability=None, quick=True, fws={"numpy": NumpyFW("cpu")})
    runner = Runner(ctx, RunOptions(reps=2, warmup=1))
    p = Point("papers", 2, 32, 32, 2, 2, 16, True, "fp32", x=32)
    runner.measure(_WrongNumpy(), p, ["fwd"], None)
    (rec,) = runner.results
    assert rec["status"] == "wrong" and not rec["check"]["ok"]
    assert rec["check"]["errors"]["out"] > rec["check"]["tolerance"]["out"]


def _rec(backend, fw, tflops, x, status="ok"):
    return {
        "family": "flashmux",
        "backend": backend,
        "framework": fw,
        "status": status,
        "tflops": tflops,
        "sweep": "papers",
        "mode": "fwd",
        "point": {"group": "g", "x": x, "batch": 1},
    }


def test_priority_from_results(tmp_path):
    results = [
        _rec("triton", "torch", 300, 1),
        _rec("cuda", "torch", 400, 1),
        _rec("triton", "torch", 310, 2),
        _rec("cuda", "torch", 390, 2),
        _rec("reference", "torch", 5, 1),
        _rec("pallas", "jax", 200, 1),
        _rec("cuda", "jax", 100, 1, status="wrong"),
    ]
    t = rank(results, {"jax": ["cuda", "pallas", "reference"]})
    assert t["torch"] == ["cuda", "triton", "reference"]
    assert t["jax"] == ["pallas", "cuda", "reference"]
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"env": {"device_class": "sm90"}, "results": results}))
    dest = tmp_path / "priority.json"
    dest.write_text(json.dumps({"default": {"torch": ["triton", "reference"]}}))
    assert cli.main(["--priority-from", str(res), "--priority-out", str(dest)]) == 0
    table = json.loads(dest.read_text())
    assert table["sm90"]["torch"][0] == "cuda"
    assert table["default"] == {"torch": ["triton", "reference"]}  # kept


def test_bench_import_is_light():
    code = (
        "import sys, flashmux.bench.cli, flashmux.bench.runner, flashmux.bench.report\n"
        "heavy = [m for m in ('torch', 'jax', 'triton', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_docs_from_merged_results(tmp_path):
    from flashmux.bench.docs import merge, write_docs

    p = Point("papers", 1, 64, 64, 2, 2, 32, False, "bf16", x=64)
    recs = []
    for impl, fam, fw, tf in [
        ("flashmux-triton[torch]", "flashmux", "torch", 300.0),
        ("sdpa-flash", "anchor", "torch", 400.0),
    ]:
        recs.append(
            {
                "impl": impl,
                "family": fam,
                "framework": fw,
                "backend": None,
                "sweep": "papers",
                "mode": "fwd",
                "dtype": "bf16",
                "point": p.to_json(),
                "status": "ok",
                "reason": None,
                "ms": 1.0,
                "tflops": tf,
            }
        )
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(
        json.dumps(
            {
                "env": {"device_name": "X"},
                "args": {"argv": ["--sweep", "papers"]},
                "wall_s": 1,
                "results": recs[:1],
                "checks": [],
            }
        )
    )
    b.write_text(
        json.dumps(
            {
                "env": {},
                "args": {"argv": ["--anchors", "sdpa-flash"]},
                "wall_s": 2,
                "results": recs[1:],
                "checks": [],
            }
        )
    )
    data = merge([a, b])
    assert len(data["results"]) == 2 and data["wall_s"] == 3
    files = write_docs(data, tmp_path / "docs", note="test run")
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert files[0] == "benchmarks.md" and "> test run" in md
    assert "0.75x sdpa-flash" in md  # flashmux ratio to the best same-framework anchor


def test_jax_timing_blocks_once_per_group():
    """JAX calls are enqueued in groups and blocked on once per group: a block after every call
    would add the host round trip (~0.2 ms on the H100 machine) to every short call's time."""
    pytest.importorskip("jax")
    import time as _time

    from flashmux.bench.frameworks import JaxFW

    fw = JaxFW("cpu")
    counts = {"calls": 0, "blocks": 0}

    def call(i):
        counts["calls"] += 1
        _time.sleep(2e-4)  # a 0.2 ms "kernel"
        return i

    def block(x):
        counts["blocks"] += 1
        _time.sleep(2e-4)  # the host round trip
        return x

    fw.jax = type("J", (), {"block_until_ready": staticmethod(block)})
    times = fw.time(call, n_sets=3, warmup=1, reps=3, target_s=0.01, min_reps=1, max_reps=10)
    assert len(times) == 3
    timed_calls = counts["calls"] - 1 - 4  # warm-up and the estimate burst
    assert timed_calls >= 3 * 8  # groups of ~20 ms (>= 8 calls even if sleeps overshoot 2x)
    assert counts["blocks"] - 2 == 3  # one block per group
