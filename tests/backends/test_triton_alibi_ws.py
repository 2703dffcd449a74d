"""The dense Triton forward drops warp specialization for ALiBi calls (`_launch._alibi_ws`):
the H200 measured WS speeding the plain d128 forward and slowing the ALiBi one (NOTES.md,
session 10/11). CPU (milliseconds): the forward launcher, with the class's WS forced on and the
kernel replaced by a recorder, launches the plain call with WS and the ALiBi call without it,
unless FLASHMUX_TRITON_ALIBI_WS=1. The kernels' numerics with ALiBi are judged against float64
in test_triton_alibi_fold.py (and on the GPU there)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from flashmux_triton import _launch  # noqa: E402


class _Recorder:
    def __init__(self):
        self.ws = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.ws.append(kw["WS"])


def _params(alibi=False):
    from flashmux.spec import Params

    return Params(scale=0.125, alibi=alibi)


@pytest.mark.parametrize("keep", [False, True])
def test_alibi_forward_without_ws(monkeypatch, keep):
    rec = _Recorder()
    monkeypatch.setattr(_launch, "ws_wanted", lambda pb: True)
    monkeypatch.setattr(_launch, "gluon_wanted", lambda pb, *a: False)
    monkeypatch.setattr(_launch, "_tma_views", lambda *a: None)
    monkeypatch.setattr(_launch.K, "attn_fwd", rec)
    monkeypatch.delenv("FLASHMUX_TRITON_WS", raising=False)
    if keep:
        monkeypatch.setenv("FLASHMUX_TRITON_ALIBI_WS", "1")
    else:
        monkeypatch.delenv("FLASHMUX_TRITON_ALIBI_WS", raising=False)
    q = torch.randn(1, 16, 2, 64)
    k, v = torch.randn(1, 16, 2, 64), torch.randn(1, 16, 2, 64)
    slopes = torch.tensor([0.5, 0.25])
    _launch.forward(q, k, v, None, None, _params())
    _launch.forward(q, k, v, None, None, _params(True), alibi_slopes=slopes)
    assert rec.ws == [True, keep]
