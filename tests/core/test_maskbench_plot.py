"""maskbench's density data and plot (time against tile density) from masks-sweep records."""

from __future__ import annotations

import pytest

from flashmux.bench.maskbench import density_plot, density_points


def _rec(impl, mask, ms, density=1.0, mode="fwd", status="ok"):
    point = {"sweep": "masks", "seqlen_q": 8192, "head_dim": 128, "batch": 4, "heads_q": 16,
             "mask": mask, "mask_density": density}
    return {"sweep": "masks", "impl": impl, "mode": mode, "status": status, "ms": ms,
            "dtype": "bf16", "point": point}


RECS = [
    _rec("flashmux-triton[torch]", None, 4.0),
    _rec("flashmux-triton[torch]", "causal", 2.5, 0.5),
    _rec("flashmux-triton[torch]", "doc:8", 1.0, 0.14),
    _rec("flashmux-triton[torch]", "alibi", 4.2),  # ALiBi rows are not density points
    _rec("flashmux-triton[torch]", "sliding:1024", None, 0.13, status="budget"),
    _rec("flex", "causal", 3.0, 0.5),  # no dense time for flex: left out
]


def test_density_points_normalize_by_own_dense_time():
    pts = density_points(RECS)
    assert list(pts) == [(8192, "fwd")]
    assert pts[(8192, "fwd")] == {
        "flashmux-triton[torch]": [(0.14, 0.25, "doc:8"), (0.5, 0.625, "causal")]}


def test_density_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = density_plot(RECS, str(tmp_path / "d.png"))
    assert path and (tmp_path / "d.png").stat().st_size > 1000
    assert density_plot(RECS[-1:], str(tmp_path / "e.png")) is None
