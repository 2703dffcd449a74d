"""The block-sparse backward's session-10 variants (issue 15): LSE2 (FLASHMUX_TRITON_BS_LSE2=1:
`bs_bwd_preprocess` writes delta and the lse in log2 units (-inf as +inf) and the dK/dV kernel
reads them unmasked where no length is off the mask block) and FUSE_DELTA
(FLASHMUX_TRITON_BS_FUSE_DELTA=1: no preprocess; the dQ kernel computes and stores delta and runs
before the dK/dV kernel). CPU interpreter, fp16 with tensor
descriptors forced (the H200's path), lengths on the mask block (the unmasked reads), rows that
see nothing (lse -inf) and an lse cotangent, judged against the float64 reference by the
conformance rule (the yardstick: the same call without LSE2)."""

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


@pytest.mark.parametrize("env, switch", [("FLASHMUX_TRITON_BS_LSE2", "_lse2"),
                                         ("FLASHMUX_TRITON_BS_FUSE_DELTA", "_fuse_delta")])
def test_backward_variant_vs_float64(monkeypatch, env, switch):
    """LSE2 (above) and FUSE_DELTA (the dQ kernel computes delta, before the dK/dV kernel)."""
    from flashmux_triton import _launch_bs as LB

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
