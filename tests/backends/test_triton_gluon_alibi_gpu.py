"""ALiBi in the Gluon dK/dV and dQ programs (flashmux_triton._gluon, ALIBI; taken by ALiBi
backwards by default since session 12; FLASHMUX_TRITON_GLUON_ALIBI=0 turns it off). GPU only
(sm_90, no interpreter: Gluon has none):
forward and backward through flashmux.attention(backend="triton"), the Gluon programs forced
(=force: a compile failure raises instead of falling back) and asserted to have run with the
slopes, judged against the float64 reference by the SPEC rule (error <= 2 x the error of plain
attention in the same precision + 1e-5). Cases: (Hq,) and (B, Hq) slopes, negative and zero
slopes, causal and not, Sq != Sk both ways (the diagonal offset enters the distance), GQA.
CPU: the SASS of the non-ALiBi programs is unchanged by the ALIBI path (checked once with
aot.py's hashes; not a test)."""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton.experimental.gluon")

import flashmux  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402
from flashmux_triton import _gluon  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.skipif(not HOPPER or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the Gluon programs need an sm_90 GPU (no interpreter)")

# (name, B, Sq, Sk, Hq, Hkv, D, causal, slopes shape); "_split": the forward's ALiBi split walk
# (FLASHMUX_TRITON_ALIBI_SPLIT=1: the bias off the diagonal as a key term + a row term)
CASES = [
    ("d128_bh", 2, 512, 512, 4, 4, 128, False, "bh"),
    ("d128_causal_h", 1, 512, 512, 4, 2, 128, True, "h"),
    ("d128_sq_lt_sk", 1, 256, 640, 2, 2, 128, False, "h"),
    ("d64_sq_gt_sk_causal", 2, 640, 256, 2, 1, 64, True, "bh"),
    ("d128_bh_split", 2, 1024, 1024, 4, 4, 128, False, "bh"),
    ("d128_sq_gt_sk_split", 1, 640, 384, 2, 2, 128, False, "h"),
]


def _plain(q, k, v, slopes, causal):
    """Attention in q's precision with float32 softmax, the bias on materialized scores."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() / d ** 0.5
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    sl = slopes if slopes.dim() == 2 else slopes[None].expand(b, h)
    s = s - sl[:, :, None, None] * (i + sk - sq - j).abs()
    if causal:
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gluon_alibi_backward(case, monkeypatch):
    _, b, sq, sk, hq, hkv, d, causal, shape = case
    for env in ("FLASHMUX_TRITON_GLUON_BWD", "FLASHMUX_TRITON_GLUON_DQ"):
        monkeypatch.setenv(env, "force")
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON_ALIBI", "1")
    monkeypatch.setenv("FLASHMUX_TRITON_ALIBI_SPLIT", "1" if case[0].endswith("_split") else "0")
    ran = []
    for name in ("backward_dkdv", "backward_dq"):
        real = getattr(_gluon, name)

        def spy(*a, _real=real, _name=name, **kw):
            slopes = inspect.signature(_real).bind(*a, **kw).arguments.get("slopes")
            ran.append((_name, slopes is not None))
            return _real(*a, **kw)
        monkeypatch.setattr(_gluon, name, spy)
    rng = np.random.default_rng(sq * 7 + sk)
    q64, do64 = (rng.standard_normal((b, sq, hq, d)) for _ in range(2))
    k64, v64 = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    sl = np.linspace(0.5, -0.125, hq).astype(np.float32)
    sl[1] = 0.0
    sl = sl if shape == "h" else np.stack([sl, sl[::-1] * 0.5] * b)[:b]
    dt = torch.bfloat16
    q, k, v, do = (torch.tensor(x, device="cuda").to(dt) for x in (q64, k64, v64, do64))
    q64, k64, v64, do64 = (x.float().cpu().double().numpy() for x in (q, k, v, do))
    slopes = torch.tensor(sl, device="cuda")
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = flashmux.attention(qa, ka, va, causal=causal, alibi_slopes=slopes, backend="triton")
    grads = torch.autograd.grad(out, (qa, ka, va), do)
    assert sorted(ran) == [("backward_dkdv", True), ("backward_dq", True)], ran
    ref_out, _ = reference_forward(q64, k64, v64, causal=causal, alibi_slopes=sl)
    ref_grads = reference_backward(do64, q64, k64, v64, causal=causal, alibi_slopes=sl)
    pa = [x.clone().requires_grad_(True) for x in (q, k, v)]
    pout = _plain(*pa, slopes, causal)
    pgrads = torch.autograd.grad(pout, pa, do)
    for name, got, plain, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (pout, *pgrads),
                                     (ref_out, *ref_grads)):
        got = got.detach().float().cpu().double().numpy()
        assert np.isfinite(got).all(), name
        err = np.abs(got - ref).max()
        bound = 2 * np.abs(plain.detach().float().cpu().double().numpy() - ref).max() + 1e-5
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
