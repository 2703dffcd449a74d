"""GPU test: the CUDA backend's sm90 forward and backward past 2^31 elements (issue 12).

Two calls through flashmux.attention (torch autograd, backend="cuda", bf16, head_dim 128), each
with one tensor of more than 2^31 elements, so that every row offset computed in 32 bits would
wrap:
- K and V of (1, 2^20 + 77, 16, 128) (2.1e9 elements each), 128 queries, causal: the forward's
  K/V TMA coordinates and the backward's dK/dV stores; every key block adds into the same 128
  dQ rows.
- Q, dO, out, dQ of (1, 2^20 + 77, 16, 128) (Sq not a multiple of 8 or 64), 192 keys: the
  forward's O/lse stores, the backward's lse2/dsum rows and its fp32 dQ workspace (8.6 GB, its
  8-row blocks indexed past 2^31 floats) and the convert kernel.
Judged on the last head (the largest offsets) against attention in float64 on the GPU (torch,
autograd) with the suite's rule: error <= 2x plain attention's (bf16 inputs, float32 softmax)
+ 1e-5; rows without a finite lse must agree. Needs ~45 GB of device memory; compute capability
9.0 only (explain() must name sm90 for both passes). About 10-20 s on an H200.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

import flashmux

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_sm90_bwd_gpu as base  # noqa: E402  (skip fixture, plain grads)

pytestmark = pytest.mark.gpu
_hopper = base._hopper

BIG = (1 << 20) + 77
H, D = 16, 128


def _f64_head(q, k, v, do, causal, scale):
    """out, lse, dq, dk, dv of one head ((S, D) tensors) in float64."""
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    s = (q @ k.T) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ v
    (out * do.double()).sum().backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _err(a, ref):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(a), fin), "finite pattern differs"
    return (a.double()[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


@pytest.mark.parametrize("which", ["kv", "q"])
def test_past_2_31_elements(which, monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    monkeypatch.delenv("FLASHMUX_CUDA_BWD_FAMILY", raising=False)
    monkeypatch.delenv("FLASHMUX_CUDA_SM90_BWD", raising=False)
    free, _ = torch.cuda.mem_get_info()
    if free < 48 << 30:
        pytest.skip(f"needs ~48 GB of free device memory, {free >> 30} GB free")
    sq, sk, causal = (128, BIG, True) if which == "kv" else (BIG, 192, False)
    g = torch.Generator(device="cuda").manual_seed(7)
    bf = torch.bfloat16
    q = torch.randn((1, sq, H, D), generator=g, device="cuda", dtype=bf)
    k = torch.randn((1, sk, H, D), generator=g, device="cuda", dtype=bf)
    v = torch.randn((1, sk, H, D), generator=g, device="cuda", dtype=bf)
    do = torch.randn((1, sq, H, D), generator=g, device="cuda", dtype=bf)
    big = k if which == "kv" else q
    assert big.numel() > 2**31
    kw = dict(causal=causal, backend="cuda")
    ex = flashmux.explain(q, k, v, return_lse=True, **kw)
    assert ex.lowerings["forward"].startswith("sm90"), ex.lowerings
    assert ex.lowerings["backward"].startswith("sm90"), ex.lowerings
    _, (out, lse, dq, dk, dv) = base.autograd(q, k, v, do, False, **kw)
    h = H - 1
    scale = 1.0 / math.sqrt(D)
    one = lambda t: t[:, :, h : h + 1].contiguous()  # noqa: E731  (1, S, 1, D)
    ref = _f64_head(q[0, :, h], k[0, :, h], v[0, :, h], do[0, :, h], causal, scale)
    plain = base._plain_grads(one(q), one(k), one(v), one(do), None, causal, None, scale)
    mine = (out[0, :, h], lse[0, h], dq[0, :, h], dk[0, :, h], dv[0, :, h])
    plain = (plain[0][0, :, 0], plain[1][0, 0], *(t[0, :, 0] for t in plain[2:]))
    for name, m, p, r in zip(("out", "lse", "dq", "dk", "dv"), mine, plain, ref):
        e_m, e_p = _err(m, r), _err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{which} {name}: sm90 {e_m:.3g} vs plain {e_p:.3g}"
