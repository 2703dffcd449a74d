"""GPU tests of the sm90 backward's session-11 variants (issue 12), chosen per call by
FLASHMUX_CUDA_SM90_BWD (bf16; csrc/sm90/bwdvar_hdim*.cu, full builds):

- "bulk": dQ through shared memory, added into the fp32 workspace with cp.reduce.async.bulk by a
  producer warp (only where seqlen_q % 8 == 0; else the default kernel runs);
- "pre": the next step's S^T GEMM issued before this step's dQ adds;
- "bulk+pre": both;
- "plain": session 10's kernel (red.global.add dQ); unset means "bulk" since session 12.

Each case runs through flashmux.attention (torch autograd, backend="cuda") with the variant set;
out, lse, dq, dk, dv are judged against the float64 reference with the suite's rule (error <= 2x
plain attention's in the same dtype + 1e-5, fresh random inputs). Compute capability 9.0 only.
The cases have several query blocks per key block and key blocks per query block (the prefetched
S^T crosses steps and GQA heads), tails, causal with rows without keys, windows, the lse gradient.
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

pytestmark = pytest.mark.gpu
_hopper = base._hopper

CASES = [
    dict(B=2, Sq=304, Sk=517, Hq=4, Hkv=2, D=64, causal=True),  # GQA, key tail, Sq % 8 == 0
    dict(B=1, Sq=300, Sk=517, Hq=4, Hkv=2, D=64, causal=True),  # Sq % 8 != 0 (bulk: default)
    dict(B=2, Sq=520, Sk=296, Hq=2, Hkv=2, D=128, causal=True),  # rows without keys
    dict(B=1, Sq=640, Sk=640, Hq=4, Hkv=1, D=128, causal=False),  # MQA, 10 query blocks
    dict(B=1, Sq=400, Sk=400, Hq=2, Hkv=2, D=128, causal=False, window=(90, 30)),
    dict(B=2, Sq=192, Sk=256, Hq=4, Hkv=4, D=64, causal=False, lse_grad=True),
    dict(B=1, Sq=136, Sk=70, Hq=3, Hkv=3, D=40, causal=False),  # head_dim padded to 64
    dict(B=1, Sq=264, Sk=1000, Hq=2, Hkv=2, D=112, causal=True),  # padded to 128
]
VARIANTS = ["bulk", "pre", "bulk+pre", "plain"]  # unset = bulk since session 12


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_vs_reference(case, variant, monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    monkeypatch.delenv("FLASHMUX_CUDA_BWD_FAMILY", raising=False)
    monkeypatch.setenv("FLASHMUX_CUDA_SM90_BWD", variant)
    c = dict(case)
    causal, window, lse_grad = c.pop("causal"), c.pop("window", None), c.pop("lse_grad", False)
    q, k, v, do = base._inputs(**c, dtype=torch.bfloat16, seed=23)
    scale = 1.0 / math.sqrt(c["D"])
    kw = dict(causal=causal, window=window, backend="cuda")
    ex = flashmux.explain(q, k, v, return_lse=True, **kw)
    assert ex.lowerings["backward"].startswith("sm90"), ex.lowerings
    torch.manual_seed(3)
    dlse, mine = base.autograd(q, k, v, do, lse_grad, **kw)
    npf = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    rkw = dict(causal=causal, window=window, scale=scale)
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), **rkw)
    r_grads = reference_backward(npf(do), npf(q), npf(k), npf(v), dlse=npf(dlse), **rkw)
    plain = base._plain_grads(q, k, v, do, dlse, causal, window, scale)
    for name, m, p, r in zip(
        ("out", "lse", "dq", "dk", "dv"), mine, plain, (r_out, r_lse, *r_grads)
    ):
        e_m, e_p = base._err(m, r), base._err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: {variant} {e_m:.3g} vs plain {e_p:.3g}"
