"""The float64 ground truth agrees with an independent computation: torch autograd on plain
float64 attention (materialized, masks applied with -inf)."""

import numpy as np
import pytest

from flashmux.reference import allowed_mask, reference_backward, reference_forward

torch = pytest.importorskip("torch")


def _torch_plain(q, k, v, causal, window, softcap, scale, keep, p_drop):
    hq, hkv = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, 2)
    vv = v.repeat_interleave(hq // hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    ok = torch.from_numpy(allowed_mask(q.shape[1], k.shape[1], causal, window))
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    if p_drop:
        p = p * torch.from_numpy(keep) / (1 - p_drop)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


@pytest.mark.parametrize(
    "causal,window,softcap,p_drop",
    [(False, None, None, 0.0), (True, None, None, 0.0), (False, (3, 5), None, 0.0),
     (True, (4, None), 2.5, 0.0), (False, None, None, 0.25)],
)
def test_reference_matches_torch_autograd(causal, window, softcap, p_drop):
    rng = np.random.default_rng()
    b, sq, sk, hq, hkv, d, dv = 2, 9, 14, 4, 2, 6, 5
    q, k, v = rng.standard_normal((b, sq, hq, d)), rng.standard_normal((b, sk, hkv, d)), rng.standard_normal((b, sk, hkv, dv))
    keep = rng.random((b, hq, sq, sk)) >= p_drop
    do = rng.standard_normal((b, sq, hq, dv))
    dlse = rng.standard_normal((b, hq, sq))
    kw = dict(causal=causal, window=window, softcap=softcap, scale=0.4, dropout_p=p_drop, keep_mask=keep)
    out, lse = reference_forward(q, k, v, **kw)
    dq, dk, dv_ = reference_backward(do, q, k, v, dlse=dlse, **kw)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tout, tlse = _torch_plain(tq, tk, tv, causal, window, softcap, 0.4, keep, p_drop)
    (tout * torch.from_numpy(do)).sum().add((tlse * torch.from_numpy(dlse)).sum()).backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(lse, tlse.detach().numpy(), atol=1e-12)
    for a, t in zip((dq, dk, dv_), (tq, tk, tv)):
        np.testing.assert_allclose(a, t.grad.numpy(), atol=1e-10)


def test_fully_masked_rows_are_zero_and_minus_inf():
    rng = np.random.default_rng()
    q, k, v = rng.standard_normal((1, 8, 2, 4)), rng.standard_normal((1, 3, 2, 4)), rng.standard_normal((1, 3, 2, 4))
    out, lse = reference_forward(q, k, v, causal=True)  # off = -5: rows 0..4 see nothing
    assert np.all(out[0, :5] == 0) and np.all(np.isneginf(lse[0, :, :5]))
    assert np.all(np.isfinite(lse[0, :, 5:]))
    dq, dk, dv = reference_backward(np.ones_like(out), q, k, v, causal=True)
    assert np.all(dq[0, :5] == 0) and np.isfinite(dq).all()


def test_varlen_equals_per_sequence_padded():
    rng = np.random.default_rng()
    lens = [(3, 5), (0, 2), (4, 0), (6, 6)]
    cu_q = np.cumsum([0] + [a for a, _ in lens]).astype(np.int32)
    cu_k = np.cumsum([0] + [b for _, b in lens]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], 2, 4))
    k = rng.standard_normal((cu_k[-1], 2, 4))
    v = rng.standard_normal((cu_k[-1], 2, 4))
    out, lse = reference_forward(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (2, cu_q[-1])
    for i, (lq, _lk) in enumerate(lens):
        if lq == 0:
            continue
        qs = q[cu_q[i]:cu_q[i + 1]][None]
        ks, vs = k[cu_k[i]:cu_k[i + 1]][None], v[cu_k[i]:cu_k[i + 1]][None]
        o1, l1 = reference_forward(qs, ks, vs, causal=True)
        np.testing.assert_allclose(out[cu_q[i]:cu_q[i + 1]], o1[0])
        np.testing.assert_array_equal(lse[:, cu_q[i]:cu_q[i + 1]], l1[0])
