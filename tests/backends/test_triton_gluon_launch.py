"""The Triton launcher's fallbacks around optional compiled features (_launch._ran_or_dropped:
the backward's bulk dQ reductions and descriptors; the Gluon forward's `_GLUON_BROKEN`).

CPU (CI, milliseconds): the helper's contract with stand-in callables. GPU (sm_90, no
interpreter): a compile failure injected into the feature's launch costs the class the feature,
not the call: the result is still judged against the float64 reference (tk._run_case) and the
class is marked broken; the forced setting (=1 / =force) lets the error through.
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flashmux_triton import _launch  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not HOPPER or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="the sm_90 feature paths need an H100/H200 (no interpreter)")


def test_ran_or_dropped_contract(monkeypatch):
    monkeypatch.delenv("FLASHMUX_X", raising=False)
    calls, dropped, broken = [], [], set()

    def ok():
        calls.append("ok")

    def bad():
        calls.append("bad")
        raise RuntimeError("compile error")

    assert _launch._ran_or_dropped(ok, True, "FLASHMUX_X", broken, "c", lambda: dropped.append(1))
    assert not _launch._ran_or_dropped(ok, False, "FLASHMUX_X", broken, "c", dropped.clear)
    assert calls == ["ok"] and not broken
    assert not _launch._ran_or_dropped(bad, True, "FLASHMUX_X", broken, "c",
                                       lambda: dropped.append(2))
    assert broken == {"c"} and dropped == [2]

    def oor():
        raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    with pytest.raises(triton.runtime.errors.OutOfResources):
        _launch._ran_or_dropped(oor, True, "FLASHMUX_X", set(), "c", lambda: None)
    monkeypatch.setenv("FLASHMUX_X", "1")  # forced: not tried here, the caller's run raises
    calls.clear()
    assert not _launch._ran_or_dropped(bad, True, "FLASHMUX_X", broken, "d", lambda: None)
    assert calls == [] and "d" not in broken


class _Failing:
    """Stands in for a kernel: launches with `flag`=True raise like a compile error."""

    def __init__(self, real, flag):
        self.real, self.flag = real, flag

    def __getitem__(self, grid):
        def launch(*a, **kw):
            if kw.get(self.flag):
                raise RuntimeError(f"injected compile failure ({self.flag})")
            return self.real[grid](*a, **kw)

        return launch


@hopper_only
@pytest.mark.parametrize("feature", ["dq_tma", "bwd_tma"])
def test_backward_feature_failure_falls_back(feature, monkeypatch):
    import test_triton_kernels as tk

    K = _launch.K
    for name in ("_DQ_TMA_BROKEN", "_BWD_TMA_BROKEN"):
        monkeypatch.setattr(_launch, name, set())
    for env in ("FLASHMUX_TRITON_DQ_TMA", "FLASHMUX_TRITON_BWD_TMA"):
        monkeypatch.delenv(env, raising=False)
    for env in ("FLASHMUX_TRITON_GLUON_BWD", "FLASHMUX_TRITON_GLUON_DQ"):
        monkeypatch.setenv(env, "0")  # the Triton programs carry the features tested here
    if feature == "dq_tma":  # bulk dQ reductions: on by default with the atomic dQ on sm_90
        monkeypatch.setenv("FLASHMUX_TRITON_BWD", "fused")
        monkeypatch.setattr(K, "attn_bwd_dkdv", _Failing(K.attn_bwd_dkdv, "DQ_TMA"))
        broken = "_DQ_TMA_BROKEN"
    else:  # descriptors in the backward: on by the table for the 128 class on sm_90
        monkeypatch.setenv("FLASHMUX_TRITON_BWD", "split")
        monkeypatch.setattr(K, "attn_bwd_dq", _Failing(K.attn_bwd_dq, "TMA"))
        broken = "_BWD_TMA_BROKEN"
    tk._run_case(1, 256, 320, 2, 1, 128, 128, "bfloat16", {"causal": True})
    assert getattr(_launch, broken), f"{broken}: the injected failure was not seen"
    # forced on: the error is the caller's
    monkeypatch.setattr(_launch, broken, set())
    monkeypatch.setenv("FLASHMUX_TRITON_DQ_TMA" if feature == "dq_tma" else "FLASHMUX_TRITON_BWD_TMA",
                       "1")
    with pytest.raises(RuntimeError, match="injected"):
        tk._run_case(1, 256, 320, 2, 1, 128, 128, "bfloat16", {"causal": True})


@hopper_only
def test_gluon_failure_falls_back(monkeypatch):
    import test_triton_kernels as tk

    from flashmux_triton import _gluon

    monkeypatch.setattr(_launch, "_GLUON_BROKEN", set())

    def fail(*a, **kw):
        raise RuntimeError("injected Gluon compile failure")

    monkeypatch.setattr(_gluon, "forward", fail)
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON", "1")
    tk._run_case(1, 256, 256, 2, 2, 64, 64, "bfloat16", {"causal": True})
    assert _launch._GLUON_BROKEN
    monkeypatch.setattr(_launch, "_GLUON_BROKEN", set())
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON", "force")
    with pytest.raises(RuntimeError, match="injected"):
        tk._run_case(1, 256, 256, 2, 2, 64, 64, "bfloat16", {"causal": True})


def test_gluon_switches(monkeypatch):
    """FLASHMUX_TRITON_GLUON / _BWD / _DQ: 1 on, 0 off, unset the class's Tuning.gluon; never
    off sm_90, under the interpreter or for a class marked broken."""
    from dataclasses import replace

    from flashmux.spec import Params
    from flashmux_triton import tuning as T

    x = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    pb = _launch._Problem(x, x, x, None, None, Params(scale=0.1))
    pb.interpret, pb.capability = False, (9, 0)  # as on an H200
    key = (pb.shape, pb.capability, pb.interpret)
    t = T.default_tuning(pb.shape, (9, 0), False)
    envs = ("FLASHMUX_TRITON_GLUON", "FLASHMUX_TRITON_GLUON_BWD", "FLASHMUX_TRITON_GLUON_DQ")
    for env in envs:
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setitem(_launch._CHOSEN, key, replace(t, gluon=()))
    assert not any(_launch.gluon_wanted(pb, e) for e in envs)
    monkeypatch.setitem(_launch._CHOSEN, key, replace(t, gluon=("fwd", "dq")))
    assert [_launch.gluon_wanted(pb, e) for e in envs] == [True, False, True]
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON", "0")
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON_BWD", "1")
    assert [_launch.gluon_wanted(pb, e) for e in envs] == [False, True, True]
    monkeypatch.setattr(_launch, "_GLUON_BWD_BROKEN", {pb.shape})
    assert not _launch.gluon_wanted(pb, "FLASHMUX_TRITON_GLUON_BWD")
    pb.capability = (8, 0)
    assert not any(_launch.gluon_wanted(pb, e) for e in envs)
    # 32-bit classes never take Gluon by default
    assert T.default_tuning(T.ShapeClass(128, 128, "float32", False), (9, 0), False).gluon == ()


def test_lowerings_off_cuda_is_none():
    from flashmux.spec import Params
    from flashmux_triton import backend

    x = torch.zeros(1, 8, 2, 64)
    assert backend.lowerings(x, x, x, Params(scale=0.1)) is None


@hopper_only
def test_lowerings_name_the_gluon_kernels(monkeypatch):
    """explain()'s kernel family per pass follows Tuning.gluon and the switches."""
    from flashmux.spec import Params
    from flashmux_triton import backend

    for env in ("FLASHMUX_TRITON_GLUON", "FLASHMUX_TRITON_GLUON_BWD", "FLASHMUX_TRITON_GLUON_DQ",
                "FLASHMUX_TRITON_BWD"):
        monkeypatch.delenv(env, raising=False)
    x = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
    causal = Params(scale=0.1, causal=True, window_right=0)
    assert backend.lowerings(x, x, x, causal) == {"forward": "gluon", "backward": "gluon"}
    y = torch.zeros(1, 256, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert backend.lowerings(y, y, y, Params(scale=0.1)) == {"forward": "triton",
                                                             "backward": "triton"}
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON", "0")
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON_DQ", "0")
    assert backend.lowerings(x, x, x, causal) == {"forward": "triton",
                                                  "backward": "gluon dK/dV + triton dQ"}
