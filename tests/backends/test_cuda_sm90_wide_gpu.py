"""GPU tests of the sm90 forward at head_dim 129..256 (instantiations 192 and 256; issue 12, session 8).

Compute capability 9.0 only; skipped elsewhere. The sm90 forward takes head_dim 129..256 and the
sm80 backward follows it (there is no sm90 backward at those head dims): explain's lowerings
say so, and out / lse of both families are judged against the float64 reference with the rule
of test_cuda_sm90_gpu.py (error <= 2x plain attention's in the same dtype + 1e-5).
"""

from __future__ import annotations

import math
import os
import sys

import pytest

import flashmux
from flashmux.reference import reference_forward

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_sm90_gpu as base  # noqa: E402  (skip fixture, inputs, plain attention, error)

pytestmark = pytest.mark.gpu
_hopper = base._hopper  # the module's skip: no cuda backend on compute capability 9.0

CASES = [
    dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=256, causal=True),
    dict(B=1, Sq=517, Sk=300, Hq=2, Hkv=2, D=256, causal=True),  # rows without keys
    dict(B=1, Sq=200, Sk=333, Hq=8, Hkv=1, D=224, causal=False),  # pads to 256, MQA
    dict(B=2, Sq=256, Sk=256, Hq=4, Hkv=4, D=192, causal=False),
    dict(B=1, Sq=130, Sk=260, Hq=4, Hkv=2, D=160, causal=True),  # pads to 192
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("family", ["sm90", "sm80"])
def test_wide_forward_vs_reference(case, dtype, family, monkeypatch):
    if family == "sm80":
        monkeypatch.setenv("FLASHMUX_CUDA_FAMILY", "sm80")
    else:
        monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    monkeypatch.delenv("FMX_TUNE_SM90", raising=False)
    dt = getattr(torch, dtype)
    c = dict(case)
    causal = c.pop("causal")
    q, k, v = base._inputs(**c, dtype=dt, seed=11)
    scale = 1.0 / math.sqrt(c["D"])
    ex = flashmux.explain(q, k, v, causal=causal, backend="cuda")
    assert ex.lowerings["forward"].startswith(family), ex.lowerings
    back = ex.lowerings["backward"]
    assert back.startswith("sm80") and (family == "sm80" or "head_dim" in back), back
    out, lse = flashmux.attention(q, k, v, causal=causal, return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), causal=causal, scale=scale)
    p_out, p_lse = base._plain(q, k, v, causal, scale)
    for name, mine, plain, ref in (("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)):
        e_m, e_p = base._err(mine, ref), base._err(plain, ref)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: {family} {e_m:.3g} vs plain {e_p:.3g}"
