"""The judge itself: a backend out of bound fails; a lone failing draw is redrawn and warned about."""

from __future__ import annotations

import harness
import pytest
from harness import Case, run_case

CASE = Case(seqlen_q=20, seqlen_k=24, heads_q=2, heads_kv=2, head_dim=16, dtype="float16")


def _perturbed(monkeypatch, draws_to_spoil):
    """flashmux.attention whose output is off by 1% on the given (0-based) calls."""
    real = harness.flashmux.attention
    calls = []

    def attention(*a, **kw):
        out, lse = real(*a, **kw)
        if len(calls) in draws_to_spoil:
            out = (out.astype("float32") * 1.01).astype(out.dtype)
        calls.append(1)
        return out, lse

    monkeypatch.setattr(harness.flashmux, "attention", attention)
    return calls


def test_a_backend_out_of_bound_fails_every_draw(monkeypatch):
    calls = _perturbed(monkeypatch, draws_to_spoil=range(100))
    with pytest.raises(AssertionError, match=r"failed on \['out'\][\s\S]*2 of 2 fresh redraws failed"):
        run_case(CASE, "reference", "numpy")
    assert len(calls) == 1 + harness.REDRAWS


def test_one_failing_draw_is_redrawn_and_warned(monkeypatch):
    calls = _perturbed(monkeypatch, draws_to_spoil={0})
    with pytest.warns(UserWarning, match="one draw out of bound"):
        assert run_case(CASE, "reference", "numpy") is None
    assert len(calls) == 1 + harness.REDRAWS


def test_a_backend_within_bound_passes_on_one_draw(monkeypatch):
    calls = _perturbed(monkeypatch, draws_to_spoil=())
    assert run_case(CASE, "reference", "numpy") is None
    assert len(calls) == 1
