"""The block-sparse backward's fused dQ (FLASHMUX_TRITON_BS_FUSED_DQ=1, session 11, issue 15):
the dK/dV program adds (scale dS) K into a float32 dQ buffer by atomics and no dQ kernel runs.
CPU interpreter, judged against the float64 reference by the conformance rule (yardstick: the
same call with the dQ kernel): fp16 with tensor descriptors forced and lengths on the mask block
(the H200's path: one descriptor reduction per tile, which the interpreter emulates by a
load-add-store), and a GQA call with a sequence tail (per-element atomics under the row mask),
both with rows that see nothing and an lse cotangent."""

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
def test_fused_dq_vs_float64(monkeypatch, s, hkv, tma):
    from flashmux_triton import _kernels_bs as KB
    from flashmux_triton import _launch as L

    if not tma and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    for kern in ("FWD", "BWD_DQ", "BWD_DKDV"):
        monkeypatch.setenv(f"FLASHMUX_TRITON_BS_{kern}", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1" if tma else "0")
    descs, dq_runs = [], []
    real_desc, real_dq = L._dqa_desc, KB.bs_bwd_dq
    monkeypatch.setattr(L, "_dqa_desc", lambda *a: (descs.append(1), real_desc(*a))[1])

    class _DqSpy:
        def __getitem__(self, grid):
            dq_runs.append(grid)
            return real_dq[grid]
    monkeypatch.setattr(KB, "bs_bwd_dq", _DqSpy())
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

    monkeypatch.setenv("FLASHMUX_TRITON_BS_FUSED_DQ", "1")
    res = run()
    assert not dq_runs, "the fused backward must not launch the dQ kernel"
    assert bool(descs) == tma, "descriptor reductions exactly when descriptors are on"
    ref = (reference_forward(q64, k64, v64, block_mask=fn)[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, dlse=dlse64))
    monkeypatch.setenv("FLASHMUX_TRITON_BS_FUSED_DQ", "0")
    plain = run()
    assert dq_runs, "the yardstick runs the dQ kernel"
    for name, got, p, r in zip(("out", "dq", "dk", "dv"), res, plain, ref):
        err = float(np.abs(got.detach().double().numpy() - r).max())
        bound = 2 * float(np.abs(p.detach().double().numpy() - r).max()) + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
