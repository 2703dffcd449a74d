"""The block-sparse backward in one launch (FLASHMUX_TRITON_BS_JOINT=1, session 11, issue 15):
`bs_bwd_joint` runs the dK/dV programs and each query head's dQ programs of a (KV head, batch)
in one grid, as FlexAttention's backward does. CPU interpreter, judged against the float64
reference by the conformance rule (yardstick: the same call with the two kernels): fp16 with
tensor descriptors forced and lengths on the mask block (the H200's path), and a GQA call with a
sequence tail; rows that see nothing and an lse cotangent in both. The two-kernel path must not
run (spied)."""

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
def test_joint_vs_float64(monkeypatch, s, hkv, tma):
    from flashmux_triton import _kernels_bs as KB

    if tma and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_JOINT_CFG", "16,32,32,16,4,1")
    launched = []
    for name in ("bs_bwd_dq", "bs_bwd_dkdv", "bs_bwd_joint"):
        real = getattr(KB, name)

        class _Spy:
            def __getitem__(self, grid, _real=real, _name=name):
                launched.append(_name)
                return _real[grid]
        monkeypatch.setattr(KB, name, _Spy())

    def one_launch():
        assert launched == ["bs_bwd_joint"], launched
    switch_vs_float64(monkeypatch, "FLASHMUX_TRITON_BS_JOINT", s=s, hkv=hkv, tma=tma,
                      after_on=one_launch)
