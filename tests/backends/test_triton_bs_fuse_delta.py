"""The block-sparse backward's FUSE_DELTA variant (FLASHMUX_TRITON_BS_FUSE_DELTA=1, session 10,
issue 15): no preprocess launch; the dQ kernel computes and stores delta and runs before the dK/dV
kernel. CPU interpreter, fp16 with tensor descriptors forced (the H200's path), lengths on the
mask block, rows that see nothing (lse -inf) and an lse cotangent (folded into delta), judged
against the float64 reference by the conformance rule (the yardstick: the same call with the
preprocess kernel)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from bs_switch_case import switch_vs_float64  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test; tests/backends/test_triton_bs_variants_gpu.py runs it on a GPU",
)


def test_fuse_delta_vs_float64(monkeypatch):
    from flashmux_triton import _launch_bs as LB

    if os.environ.get("FLASHMUX_TEST_SIZE") != "full":  # FUSE_DELTA stays off (s10c): CI time
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    env, switch = "FLASHMUX_TRITON_BS_FUSE_DELTA", "_fuse_delta"
    used = []
    orig = getattr(LB, switch)
    monkeypatch.setattr(LB, switch, lambda: (used.append(orig()), used[-1])[1])

    def took_it():
        assert used and all(used), f"the backward must take the {env} path"
    switch_vs_float64(monkeypatch, env, after_on=took_it)
