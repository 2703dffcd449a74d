"""The block-sparse backward in one launch (FLASHMUX_TRITON_BS_JOINT=1, session 11, issue 15):
`bs_bwd_joint` runs the dK/dV programs and each query head's dQ programs of a (KV head, batch)
in one grid, as FlexAttention's backward does. CPU interpreter, judged against the float64
reference by the conformance rule (yardstick: the same call with the two kernels): fp16 with
tensor descriptors forced and lengths on the mask block (the H200's path), and a GQA call with a
sequence tail; rows that see nothing and an lse cotangent in both. The two-kernel path must not
run (spied)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashmux  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test; tests/backends/test_triton_bs_variants_gpu.py runs it on a GPU",
)


@pytest.mark.parametrize("s,hkv,tma", [(64, 2, True), (60, 1, False)], ids=["tma", "tail_gqa"])
def test_joint_vs_float64(monkeypatch, s, hkv, tma):
    from flashmux_triton import _kernels_bs as KB

    if tma and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    for kern in ("FWD", "BWD_DQ", "BWD_DKDV"):
        monkeypatch.setenv(f"FLASHMUX_TRITON_BS_{kern}", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_BS_JOINT_CFG", "16,32,32,16,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1" if tma else "0")
    launched = []
    for name in ("bs_bwd_dq", "bs_bwd_dkdv", "bs_bwd_joint"):
        real = getattr(KB, name)

        class _Spy:
            def __getitem__(self, grid, _real=real, _name=name):
                launched.append(_name)
                return _real[grid]
        monkeypatch.setattr(KB, name, _Spy())
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d = 1, 2, 16

    def fn(b_, h_, qi, ki):  # causal, rows 0-7 see nothing; a full tile at (1, 0)
        return (qi >= 8) & (ki <= qi)

    q64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(2))
    k64, v64 = (rng.standard_normal((b, s, hkv, d)) for _ in range(2))
    dlse64 = rng.standard_normal((b, h, s))
    dlse64[:, :, :8] = 0.0  # (rows without keys: lse is -inf, its cotangent unused)
    q, k, v, do = (torch.tensor(x, dtype=torch.float16) for x in (q64, k64, v64, do64))
    dlse = torch.tensor(dlse64, dtype=torch.float32)
    bm = flashmux.create_block_mask(fn, None, None, s, s, block_size=32, like=q)

    def run():
        qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
        o, lse = flashmux.attention(qa, ka, va, block_mask=bm, return_lse=True, backend="triton")
        return (o, *torch.autograd.grad((o, lse), (qa, ka, va), (do, dlse)))

    monkeypatch.setenv("FLASHMUX_TRITON_BS_JOINT", "1")
    res = run()
    assert launched == ["bs_bwd_joint"], launched
    ref = (reference_forward(q64, k64, v64, block_mask=fn)[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, dlse=dlse64))
    monkeypatch.setenv("FLASHMUX_TRITON_BS_JOINT", "0")
    plain = run()
    for name, got, p, r in zip(("out", "dq", "dk", "dv"), res, plain, ref):
        err = float(np.abs(got.detach().double().numpy() - r).max())
        bound = 2 * float(np.abs(p.detach().double().numpy() - r).max()) + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
