"""GPU tests of the CUDA backend's sm90 forward at head_dim 65..96 (issue 12, session 10).

csrc/sm90/fwd_hdim96.cu: the 96 instantiation with 64-byte swizzled rows (96 is not a multiple
of the 128-byte swizzle's 64 elements); before, 65..96 ran the sm80 forward. The backward there
stays the sm80 one (explain's lowerings say so). Compute capability 9.0 only; skipped elsewhere.
out and lse (and, through torch autograd, dq, dk, dv) are judged against the float64 reference
with the suite's rule: error <= 2x plain attention's in the same dtype + 1e-5, fresh random
inputs; also with the persistent forward (FLASHMUX_CUDA_SM90_FWD=persist), bitwise equal to the
default.
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
import test_cuda_sm90_bwd_gpu as bwd  # noqa: E402  (skip fixture, plain grads, autograd, error)
from test_cuda_sm90_gpu import case_params  # noqa: E402  (params: dtype per case)

pytestmark = pytest.mark.gpu
_hopper = bwd._hopper

CASES = [
    dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=96, causal=True),  # tails, GQA
    dict(B=1, Sq=256, Sk=256, Hq=8, Hkv=1, D=96, causal=False),  # MQA
    dict(B=2, Sq=517, Sk=300, Hq=2, Hkv=2, D=80, causal=True),  # rows without keys, pads to 96
    dict(B=1, Sq=129, Sk=70, Hq=3, Hkv=3, D=72, causal=False),  # pads to 96
    dict(B=1, Sq=400, Sk=400, Hq=2, Hkv=2, D=96, causal=False, window=(90, 30)),
    dict(B=2, Sq=1000, Sk=1000, Hq=20, Hkv=4, D=96, causal=True),  # 320 tiles
]
FP16 = {0, 2}


@pytest.mark.parametrize("case, dtype", case_params(CASES, FP16))
def test_hd96_forward_backward_vs_reference(case, dtype, monkeypatch):
    for var in (
        "FLASHMUX_CUDA_FAMILY",
        "FLASHMUX_CUDA_BWD_FAMILY",
        "FLASHMUX_CUDA_SM90_PAD96",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLASHMUX_CUDA_SM90_FWD", "tile")  # the default's other schedule below
    c = dict(case)
    causal, window = c.pop("causal"), c.pop("window", None)
    q, k, v, do = bwd._inputs(**c, dtype=getattr(torch, dtype), seed=13)
    scale = 1.0 / math.sqrt(c["D"])
    kw = dict(causal=causal, window=window, backend="cuda")
    ex = flashmux.explain(q, k, v, return_lse=True, **kw)
    assert ex.lowerings["forward"].startswith("sm90"), ex.lowerings
    assert ex.lowerings["backward"].startswith("sm80"), ex.lowerings
    _, mine = bwd.autograd(q, k, v, do, False, **kw)
    npf = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    rkw = dict(causal=causal, window=window, scale=scale)
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), **rkw)
    r_grads = reference_backward(npf(do), npf(q), npf(k), npf(v), **rkw)
    plain = bwd._plain_grads(q, k, v, do, None, causal, window, scale)
    for name, m, p, r in zip(
        ("out", "lse", "dq", "dk", "dv"), mine, plain, (r_out, r_lse, *r_grads)
    ):
        e_m, e_p = bwd._err(m, r), bwd._err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: sm90 hd96 {e_m:.3g} vs plain {e_p:.3g}"
    if dtype != "bfloat16":  # the persistent kernel is bf16 only
        return
    # the persistent forward on the same instantiation: the same bits
    monkeypatch.setenv("FLASHMUX_CUDA_SM90_FWD", "persist")
    out_p, lse_p = flashmux.attention(q, k, v, return_lse=True, **kw)
    torch.cuda.synchronize()
    assert torch.equal(out_p, mine[0]) and torch.equal(lse_p, mine[1])
