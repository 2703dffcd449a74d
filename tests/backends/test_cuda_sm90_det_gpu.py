"""GPU tests of the CUDA backend's deterministic sm90 backward (issue 12, session 10).

deterministic=True runs the sm90 backward's kDet kernels (csrc/sm90/bwd_kernel.cuh): the key
blocks add their dQ into each (query block, head) of the fp32 workspace in key-block order (a
workspace counter per (batch, head, 64-row block) passes the turn on), so dQ is the same bit
for bit from run to run. Compute capability 9.0 only; skipped elsewhere. out, lse, dq, dk, dv
are judged against the float64 reference with the suite's rule (error <= 2x plain attention's in
the same dtype + 1e-5, fresh random inputs); three runs must agree bitwise. The shapes have many
key blocks per query block (up to 24) and more CTAs than SMs, so that a reduction order that is
not fixed would show.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

import flashmux
from flashmux.reference import reference_backward, reference_forward

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_sm90_bwd_gpu as base  # noqa: E402  (skip fixture, inputs, plain grads, autograd)
from test_cuda_sm90_gpu import case_params  # noqa: E402  (params: dtype per case)

pytestmark = pytest.mark.gpu
_hopper = base._hopper

CASES = [
    dict(B=1, Sq=333, Sk=3000, Hq=4, Hkv=2, D=128, causal=True),  # 24 key blocks, tails, GQA
    dict(B=2, Sq=256, Sk=2048, Hq=8, Hkv=8, D=64, causal=False),  # 16 key blocks, 256 CTAs
    dict(B=1, Sq=700, Sk=900, Hq=2, Hkv=1, D=128, causal=False, window=(150, 40)),  # n_lo > 0
    dict(B=2, Sq=517, Sk=300, Hq=2, Hkv=2, D=64, causal=True, lse_grad=True),  # rows w/o keys
    dict(B=1, Sq=129, Sk=1000, Hq=3, Hkv=3, D=40, causal=False),  # padded head dim
]
FP16 = {0, 1}


@pytest.mark.parametrize("case, dtype", case_params(CASES, FP16))
def test_deterministic_backward_vs_reference_and_repeat(case, dtype, monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    monkeypatch.delenv("FLASHMUX_CUDA_BWD_FAMILY", raising=False)
    c = dict(case)
    causal, window, lse_grad = c.pop("causal"), c.pop("window", None), c.pop("lse_grad", False)
    q, k, v, do = base._inputs(**c, dtype=getattr(torch, dtype), seed=41)
    scale = 1.0 / math.sqrt(c["D"])
    kw = dict(causal=causal, window=window, backend="cuda", deterministic=True)
    ex = flashmux.explain(q, k, v, return_lse=True, **kw)
    assert ex.lowerings["forward"].startswith("sm90"), ex.lowerings
    assert ex.lowerings["backward"].startswith("sm90"), ex.lowerings
    torch.manual_seed(5)  # the same dlse in every run
    dlse, mine = base.autograd(q, k, v, do, lse_grad, **kw)
    for _ in range(2):
        torch.manual_seed(5)
        _, again = base.autograd(q, k, v, do, lse_grad, **kw)
        for name, a, b in zip(("dq", "dk", "dv"), mine[2:], again[2:]):
            assert torch.equal(a, b), f"{name} differs between runs: {(a - b).abs().max()}"
    npf = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    rkw = dict(causal=causal, window=window, scale=scale)
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), **rkw)
    r_grads = reference_backward(npf(do), npf(q), npf(k), npf(v), dlse=npf(dlse), **rkw)
    plain = base._plain_grads(q, k, v, do, dlse, causal, window, scale)
    for name, m, p, r in zip(
        ("out", "lse", "dq", "dk", "dv"), mine, plain, (r_out, r_lse, *r_grads)
    ):
        e_m, e_p = base._err(m, r), base._err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: deterministic sm90 {e_m:.3g} vs plain {e_p:.3g}"
