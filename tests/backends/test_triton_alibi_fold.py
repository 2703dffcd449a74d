"""Triton's dense forward with ALiBi: the bias folded into the exponent's FMA (scores left
unscaled, bias divided by the multiplier) and distances in float from each tile's first key
(flashmux_triton._kernels._alibi_rc). Checked on the CPU interpreter against the float64
reference for what the fold could get wrong: keys on both sides of the diagonal (no causal),
Sq != Sk both ways (negative and positive diagonal offset), negative and zero slopes, softcap
(the multiplier is then the softcap's), and the gradients (the backward's own ALiBi path).

Rule as in the conformance suite: error <= 2 * error(plain float32 attention) + 1e-5.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashmux  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on the CPU needs TRITON_INTERPRET=1",
)

CASES = [  # (seqlen_q, seqlen_k, softcap, slopes shape)
    (37, 70, None, "bh"),
    (70, 37, 5.0, "h"),
]


def _plain(q, k, v, slopes, softcap):
    """float32 attention with the bias on materialized scores (the yardstick)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    sl = slopes if slopes.dim() == 2 else slopes[None].expand(b, h)
    s = s - sl[:, :, None, None] * (i + sk - sq - j).abs()
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("sq,sk,softcap,shape", CASES)
def test_alibi_dense_fold(sq, sk, softcap, shape):
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d = 1, 3, 16
    q64, k64, v64, do64 = (rng.standard_normal(s) for s in
                           ((b, sq, h, d), (b, sk, h, d), (b, sk, h, d), (b, sq, h, d)))
    sl = np.array([0.5, -0.25, 0.0], np.float32)
    sl = sl if shape == "h" else np.stack([sl[::-1]] * b)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, do = (torch.tensor(x, dtype=torch.float32, device=dev) for x in (q64, k64, v64, do64))
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    kw = dict(softcap=softcap)
    out = flashmux.attention(qa, ka, va, alibi_slopes=torch.tensor(sl, device=dev),
                             backend="triton", **kw)
    grads = torch.autograd.grad((out * do).sum(), (qa, ka, va))
    ref_out, _ = reference_forward(q64, k64, v64, alibi_slopes=sl, **kw)
    ref_grads = reference_backward(do64, q64, k64, v64, alibi_slopes=sl, **kw)

    pa = [x.cpu().clone().requires_grad_(True) for x in (q, k, v)]
    pout = _plain(*pa, torch.tensor(sl), softcap)
    pgrads = torch.autograd.grad((pout * do.cpu()).sum(), pa)
    for name, got, plain, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (pout, *pgrads),
                                     (ref_out, *ref_grads)):
        err = np.abs(got.detach().cpu().double().numpy() - ref).max()
        bound = 2 * np.abs(plain.detach().double().numpy() - ref).max() + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
