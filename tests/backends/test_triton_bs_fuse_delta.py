"""The block-sparse backward's FUSE_DELTA variant (FLASHMUX_TRITON_BS_FUSE_DELTA=1, session 10,
issue 15): no preprocess launch; the dQ kernel computes and stores delta and runs before the dK/dV
kernel. CPU interpreter, fp16 with tensor descriptors forced (the H200's path), lengths on the
mask block, rows that see nothing (lse -inf) and an lse cotangent (folded into delta), judged
against the float64 reference by the conformance rule (the yardstick: the same call with the
preprocess kernel)."""

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


def test_fuse_delta_vs_float64(monkeypatch):
    from flashmux_triton import _launch_bs as LB

    if os.environ.get("FLASHMUX_TEST_SIZE") != "full":  # FUSE_DELTA stays off (s10c): CI time
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    env, switch = "FLASHMUX_TRITON_BS_FUSE_DELTA", "_fuse_delta"
    for kern in ("FWD", "BWD_DQ", "BWD_DKDV"):
        monkeypatch.setenv(f"FLASHMUX_TRITON_BS_{kern}", "32,32,4,1")
    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1")
    used = []
    orig = getattr(LB, switch)
    monkeypatch.setattr(LB, switch, lambda: (used.append(orig()), used[-1])[1])
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d, s = 1, 2, 16, 64

    def fn(b_, h_, qi, ki):  # causal, rows 0-7 see nothing; a full tile at (1, 0)
        return (qi >= 8) & (ki <= qi)

    q64, k64, v64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(4))
    dlse64 = rng.standard_normal((b, h, s))
    dlse64[:, :, :8] = 0.0  # (rows without keys: lse is -inf, its cotangent unused)
    q, k, v, do = (torch.tensor(x, dtype=torch.float16) for x in (q64, k64, v64, do64))
    dlse = torch.tensor(dlse64, dtype=torch.float32)
    bm = flashmux.create_block_mask(fn, None, None, s, s, block_size=32, like=q)

    def run():
        qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
        o, lse = flashmux.attention(qa, ka, va, block_mask=bm, return_lse=True, backend="triton")
        return (o, *torch.autograd.grad((o, lse), (qa, ka, va), (do, dlse)))

    monkeypatch.setenv(env, "1")
    res = run()
    assert used and all(used), f"the backward must take the {env} path"
    ref = (reference_forward(q64, k64, v64, block_mask=fn)[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, dlse=dlse64))
    monkeypatch.setenv(env, "0")
    plain = run()
    for name, got, p, r in zip(("out", "dq", "dk", "dv"), res, plain, ref):
        err = float(np.abs(got.detach().double().numpy() - r).max())
        bound = 2 * float(np.abs(p.detach().double().numpy() - r).max()) + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
