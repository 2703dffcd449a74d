"""Triton's block-sparse forward and dQ with K/V through tensor descriptors (TMA, the H200's
default at head_dim >= 128) and the scale folded into exp2: on the CPU interpreter (TMA forced
with FLASHMUX_TRITON_TMA=1), lengths on the mask block so every listed tile takes the
descriptor path, full and partial tiles in one merged walk (32-wide tiles, so the bitmask words are prefetched
outside the tile-kind branch), ALiBi on top. Judged against the float64 reference
by the conformance rule, and the descriptor path must actually have run (fp16: the descriptor
path is off for float32, which runs IEEE dots).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashmux  # noqa: E402
from flashmux import masks as M  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test (TMA forced on the CPU); the GPU runs the descriptor path by default",
)


def _plain(q, k, v, allowed, slopes):
    d = q.shape[-1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    sq, sk = s.shape[-2:]
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    s = s - slopes[None, :, None, None] * (i + sk - sq - j).abs()
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).to(v.dtype), v)


def test_block_sparse_tma_fold(monkeypatch):
    from flashmux_triton import _launch_bs as LB

    monkeypatch.setenv("FLASHMUX_TRITON_TMA", "1")
    for k in ("FWD", "BWD_DQ", "BWD_DKDV"):  # 32-wide tiles: the bitmask-word path everywhere
        monkeypatch.setenv("FLASHMUX_TRITON_BS_" + k, "32,32,4,1")
    used = []
    orig = LB._descs
    monkeypatch.setattr(LB, "_descs", lambda t, k, v, bn: (used.append(t is not None),
                                                          orig(t, k, v, bn))[1])
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, s, h, d = 1, 64, 2, 16
    q64, k64, v64, do64 = (rng.standard_normal((b, s, h, d)) for _ in range(4))
    seg = np.repeat(np.arange(4), 16)
    fn = M.or_(M.document(seg), M.prefix_lm(8))  # 1 full, 2 partial, 1 empty 32-tile
    sl = np.array([0.3, 0.05], np.float32)
    q, k, v, do = (torch.tensor(x, dtype=torch.float16) for x in (q64, k64, v64, do64))
    bm = flashmux.create_block_mask(fn, b, None, s, s, block_size=32, like=q)
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = flashmux.attention(qa, ka, va, block_mask=bm, alibi_slopes=torch.tensor(sl),
                             backend="triton")
    grads = torch.autograd.grad((out.float() * do.float()).sum(), (qa, ka, va))
    assert used == [True, True, True], "forward, dK/dV and dQ must take the descriptor path"
    ref = (reference_forward(q64, k64, v64, block_mask=fn, alibi_slopes=sl)[0],
           *reference_backward(do64, q64, k64, v64, block_mask=fn, alibi_slopes=sl))
    allowed = torch.tensor(np.asarray(fn(0, 0, np.arange(s)[:, None], np.arange(s)[None, :])))
    pa = [x.clone().requires_grad_(True) for x in (q, k, v)]
    pout = _plain(*pa, allowed, torch.tensor(sl))
    pgrads = torch.autograd.grad((pout.float() * do.float()).sum(), pa)
    for name, got, plain, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (pout, *pgrads), ref):
        err = np.abs(got.detach().double().numpy() - r).max()
        bound = 2 * np.abs(plain.detach().double().numpy() - r).max() + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
