"""GPU tests of the CUDA backend's sm90 (Hopper wgmma/TMA) forward family and its selection.

Runs on compute capability 9.0 only (H100/H200); skipped elsewhere or when the backend is
unavailable. The conformance suite covers the math through the public API on whatever family
the library picks; these tests pin down which family runs (explain's lowerings, the
FLASHMUX_CUDA_FAMILY=sm80 override, the in-backend fallback) and judge out and lse of either
family against the float64 reference (error <= 2x plain attention's in the same dtype + 1e-5,
the suite's rule).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import flashmux
from flashmux.reference import reference_forward
from flashmux.testing.gpu import backend_gpu_reasons

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _hopper():
    why = backend_gpu_reasons("cuda", capability=(9, 0))
    if why:
        pytest.skip("cuda backend unavailable here: " + "; ".join(why))


def case_params(cases, fp16):
    """pytest params (case, dtype) for a list of case dicts: bfloat16 for every case, float16
    too for the case indices in `fp16`; ids name the dtype and the case's fields."""
    out = []
    for i, case in enumerate(cases):
        for dtype in ("bfloat16", "float16") if i in fp16 else ("bfloat16",):
            cid = "-".join(f"{k}{v}" for k, v in case.items())
            out.append(pytest.param(case, dtype, id=f"{dtype}-{cid}"))
    return out


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(shape, generator=g).to(dtype).cuda()
        for shape in ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D))
    ]


def _plain(q, k, v, causal, scale):
    """Scores in the input dtype, float32 softmax, P rounded to the input dtype."""
    hq, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v), lse


def _err(x, ref):
    x = x.detach().double().cpu().numpy()
    fin = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), fin):
        return math.inf
    return float(np.abs(x[fin] - ref[fin]).max()) if fin.any() else 0.0


CASES = [
    dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=64, causal=True),
    dict(B=1, Sq=256, Sk=256, Hq=8, Hkv=1, D=128, causal=False),
    dict(B=2, Sq=517, Sk=300, Hq=2, Hkv=2, D=128, causal=True),  # rows without keys
    dict(B=1, Sq=129, Sk=70, Hq=3, Hkv=3, D=40, causal=False),  # head_dim padded to 64
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("family", ["sm90", "sm80"])
def test_forward_vs_reference(case, dtype, family, monkeypatch):
    if family == "sm80":
        monkeypatch.setenv("FLASHMUX_CUDA_FAMILY", "sm80")
    else:
        monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    dt = getattr(torch, dtype)
    c = dict(case)
    causal = c.pop("causal")
    q, k, v = _inputs(**c, dtype=dt, seed=7)
    scale = 1.0 / math.sqrt(c["D"])
    ex = flashmux.explain(q, k, v, causal=causal, backend="cuda")
    assert ex.lowerings["forward"].startswith(family), ex.lowerings
    # the sm90 backward runs where the sm90 forward does (test_cuda_sm90_bwd_gpu.py judges it)
    assert ex.lowerings["backward"].startswith(family)
    out, lse = flashmux.attention(q, k, v, causal=causal, return_lse=True, backend="cuda")
    torch.cuda.synchronize()
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), causal=causal, scale=scale)
    p_out, p_lse = _plain(q, k, v, causal, scale)
    for name, mine, plain, ref in (("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)):
        e_m, e_p = _err(mine, ref), _err(plain, ref)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: {family} {e_m:.3g} vs plain {e_p:.3g}"


def test_lowerings_name_the_fallback(monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    q, k, v = _inputs(1, 64, 64, 2, 2, 128, torch.bfloat16, seed=1)
    assert flashmux.explain(q, k, v, backend="cuda").lowerings["forward"].startswith("sm90")
    capped = flashmux.explain(q, k, v, softcap=20.0, backend="cuda").lowerings["forward"]
    assert capped.startswith("sm80") and "softcap" in capped
    q96, k96, v96 = _inputs(1, 64, 64, 2, 2, 96, torch.bfloat16, seed=1)
    d96 = flashmux.explain(q96, k96, v96, backend="cuda").lowerings  # 96: sm90 since session 10
    assert d96["forward"].startswith("sm90") and d96["backward"].startswith("sm80"), d96
    monkeypatch.setenv("FLASHMUX_CUDA_FAMILY", "sm80")
    forced = flashmux.explain(q, k, v, backend="cuda").lowerings["forward"]
    assert forced.startswith("sm80") and "FLASHMUX_CUDA_FAMILY" in forced
