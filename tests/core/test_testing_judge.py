"""flashmux.testing: the judge module the conformance suite and the backends' tools share, and
the GPU tools' case list."""

from dataclasses import replace

import numpy as np
import pytest

import flashmux
from flashmux.testing import gpu_cases, judge

SMALL = judge.Case(batch=1, seqlen_q=9, seqlen_k=12, heads_q=2, heads_kv=1, head_dim=8,
                   dtype="float32", causal=True)


def _spoil(monkeypatch):
    real = flashmux.attention

    def attention(*a, **kw):
        out, lse = real(*a, **kw)
        return out * 1.01, lse

    monkeypatch.setattr(flashmux, "attention", attention)


def test_gpu_case_list():
    cs = gpu_cases.gpu_cases()
    assert len(cs) == 2 * len(gpu_cases.BASE)
    assert len({c.id() for c in cs}) == len(cs)  # ids name cases uniquely
    assert {c.dtype for c in cs} == {"float16", "bfloat16"}
    assert all(c.transform == "jit" for c in gpu_cases.gpu_cases(transform="jit"))
    # every feature appears at least once
    assert any(c.seqlens for c in cs) and any(c.dropout_p for c in cs)
    assert any(c.window for c in cs) and any(c.softcap for c in cs) and any(c.lse_grad for c in cs)
    assert any(c.head_dim_v for c in cs) and any(c.heads_q != c.heads_kv for c in cs)


def test_check_passes_fails_and_declines(monkeypatch):
    lines = []
    log = lambda *a: lines.append(" ".join(map(str, a)))  # noqa: E731
    cases = [SMALL, replace(SMALL, seqlens=((5, 7), (4, 5)), batch=1)]
    assert gpu_cases.check(cases, "reference", "numpy", log=log) == 0
    assert all(x.startswith("PASS") for x in lines)

    _spoil(monkeypatch)
    lines.clear()
    rows: list = []
    assert gpu_cases.check(cases, "reference", "numpy", log=log, results=rows) == 2
    assert all(x.startswith("FAIL") for x in lines) and all(r["verdict"] == "FAIL" for r in rows)
    assert "redrawn 2x: failed again" in lines[0]

    monkeypatch.setattr(judge, "measure", lambda *a, **k: "reference declines: a reason")
    lines.clear()
    assert gpu_cases.check(cases, "reference", "numpy", log=log) == 0
    assert lines[0].startswith("DECLINED")
    assert gpu_cases.check(cases, "reference", "numpy", log=log, decline_ok=False) == 2


def test_measure_reports_error_and_bound():
    rep = judge.measure(SMALL, "reference", "numpy", seed=3)
    assert set(rep) == {"out", "lse"}  # NumPy: no gradients
    assert judge.passed(rep)
    assert all(0 <= e <= b for e, b in rep.values())
    assert not judge.passed({"out": (float("nan"), 1.0)})


def test_jax_transforms():
    pytest.importorskip("jax")
    for t in ("jit", "vmap"):
        rep = judge.measure(replace(SMALL, transform=t, seqlens=((5, 7), (4, 5))),
                            "reference", "jax", seed=1)
        assert set(rep) == {"out", "lse", "dq", "dk", "dv"} and judge.passed(rep), (t, rep)
    with pytest.raises(ValueError, match="transform"):
        judge.measure(replace(SMALL, transform="pmap"), "reference", "jax", seed=1)


def test_redraw_rule():
    draws = iter([2.0, 0.5, 0.5])
    with pytest.warns(UserWarning, match="one draw out of bound"):
        ok, got = judge.redraw(lambda s: {"out": (next(draws), 1.0)}, 7)
    assert ok and len(got) == 3 and len({s for s, _ in got}) == 3
    draws = iter([2.0, 2.0, 0.5])
    ok, got = judge.redraw(lambda s: {"out": (next(draws), 1.0)}, 7)
    assert not ok and len(got) == 3  # every redraw runs, for the report


def test_harness_reexports_the_judge():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
    import harness

    assert harness.Case is judge.Case and harness.run_case is judge.run_case
    assert np.isinf(judge.max_err([np.nan], [0.0]))
