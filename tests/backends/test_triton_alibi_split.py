"""ALiBi's split walk in the dense Triton forward (FLASHMUX_TRITON_ALIBI_SPLIT=1, session 11):
key blocks wholly left or right of the diagonal take the bias as a key term (one add per score)
plus a row term in the softmax's row max (`_kernels._alibi_part`, `_softmax_pv`'s RT), the
blocks meeting the diagonal and the masked boundaries the generic path. CPU interpreter (its
32x16 tiles give every part several blocks), float32 against the float64 reference by the
conformance rule (yardstick: float32 attention with the bias on materialized scores): Sq < Sk
and Sq > Sk (the diagonal offset moves the parts), (B, H) slopes with negative and zero slopes,
softcap (the key term divided by softcap's multiplier) with causal on top."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashmux  # noqa: E402
from flashmux.reference import reference_forward  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter test",
)


def _plain(q, k, v, slopes, softcap, causal):
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    s = s - slopes[:, :, None, None] * (i + sk - sq - j).abs()
    if causal:
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), v)


@pytest.mark.parametrize("sq,sk,softcap,causal", [(70, 130, None, False), (130, 70, 5.0, True)])
def test_alibi_split_vs_float64(monkeypatch, sq, sk, softcap, causal):
    if causal and os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("the full tier's case (CI time): FLASHMUX_TEST_SIZE=full")
    monkeypatch.setenv("FLASHMUX_TRITON_ALIBI_SPLIT", "1")
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, h, d = 2, 3, 16
    q64, k64, v64 = (rng.standard_normal(s) for s in ((b, sq, h, d), (b, sk, h, d), (b, sk, h, d)))
    sl = np.array([[0.5, -0.25, 0.0], [0.0, 0.125, 0.75]], np.float32)
    q, k, v = (torch.tensor(x, dtype=torch.float32) for x in (q64, k64, v64))
    out = flashmux.attention(q, k, v, alibi_slopes=torch.tensor(sl), softcap=softcap,
                             causal=causal, backend="triton")
    ref, _ = reference_forward(q64, k64, v64, alibi_slopes=sl, softcap=softcap, causal=causal)
    plain = _plain(q, k, v, torch.tensor(sl), softcap, causal)
    err = float(np.abs(out.double().numpy() - ref).max())
    bound = 2 * float(np.abs(plain.double().numpy() - ref).max()) + 1e-5
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g}"
