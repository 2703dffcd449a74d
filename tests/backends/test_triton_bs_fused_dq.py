"""The block-sparse backward's fused dQ (FLASHMUX_TRITON_BS_FUSED_DQ=1, session 11, issue 15):
the dK/dV program adds (scale dS) K into a float32 dQ buffer by atomics and no dQ kernel runs.
CPU interpreter, judged against the float64 reference by the conformance rule (yardstick: the
same call with the dQ kernel): fp16 with tensor descriptors forced and lengths on the mask block
(the H200's path: one descriptor reduction per tile, which the interpreter emulates by a
load-add-store), and a GQA call with a sequence tail (per-element atomics under the row mask),
both with rows that see nothing and an lse cotangent."""

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


@pytest.mark.parametrize("s,hkv,tma", [(64, 2, True), (60, 1, False)], ids=["tma", "tail_gqa"])
def test_fused_dq_vs_float64(monkeypatch, s, hkv, tma):
    from flashmux_triton import _kernels_bs as KB
    from flashmux_triton import _launch as L

    if not tma and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    descs, dq_runs = [], []
    real_desc, real_dq = L._dqa_desc, KB.bs_bwd_dq
    monkeypatch.setattr(L, "_dqa_desc", lambda *a: (descs.append(1), real_desc(*a))[1])

    class _DqSpy:
        def __getitem__(self, grid):
            dq_runs.append(grid)
            return real_dq[grid]
    monkeypatch.setattr(KB, "bs_bwd_dq", _DqSpy())

    def fused():
        assert not dq_runs, "the fused backward must not launch the dQ kernel"
        assert bool(descs) == tma, "descriptor reductions exactly when descriptors are on"

    def yardstick():
        assert dq_runs, "the yardstick runs the dQ kernel"
    switch_vs_float64(monkeypatch, "FLASHMUX_TRITON_BS_FUSED_DQ", s=s, hkv=hkv, tma=tma,
                      after_on=fused, after_off=yardstick)
