"""GPU tests of the CUDA backend's persistent sm90 forward (issue 12, session 10).

FLASHMUX_CUDA_SM90_FWD=persist (read per call; =tile: the one-CTA-per-tile kernel) runs
csrc/sm90/fwd_persist.cuh at head_dim <= 128: one CTA per SM looping over tiles (heaviest query
blocks first), the tile decoded by the producer and handed over through shared memory, O stored
through shared memory with TMA.
Compute capability 9.0 only; skipped elsewhere. out and lse are judged against the float64
reference with the suite's rule (error <= 2x plain attention's in the same dtype + 1e-5) on fresh
random inputs, and must equal the one-CTA-per-tile kernel's bit for bit (same arithmetic, same
order: only the schedule and the store path differ). Several cases have more tiles than SMs, so
CTAs run several tiles and the Q / tile rings, the ping-pong turns and the TMA stores cross tile
boundaries.
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
_hopper = base._hopper
ENV = "FLASHMUX_CUDA_SM90_FWD"

CASES = [
    dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=64, causal=True),  # tails, GQA
    dict(B=1, Sq=256, Sk=256, Hq=8, Hkv=1, D=128, causal=False),  # MQA
    dict(B=2, Sq=517, Sk=300, Hq=2, Hkv=2, D=128, causal=True),  # rows without keys
    dict(B=1, Sq=129, Sk=70, Hq=3, Hkv=3, D=40, causal=False),  # head_dim padded to 64
    dict(B=2, Sq=1100, Sk=1100, Hq=16, Hkv=4, D=128, causal=True),  # 288 tiles: > 1 per CTA
    dict(B=3, Sq=640, Sk=900, Hq=24, Hkv=8, D=64, causal=False, window=(100, 30)),  # 360 tiles
    dict(B=1, Sq=1000, Sk=1000, Hq=40, Hkv=40, D=112, causal=True),  # 320 tiles, padded 128
]
FP16: set[int] = set()  # the persistent kernel is bf16 only (fp16 calls run the tile kernel)


def _forward(q, k, v, causal, window, monkeypatch, persist):
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    # forced either way (the unset default may be either schedule, per head dim and mask)
    monkeypatch.setenv(ENV, "persist" if persist else "tile")
    out, lse = flashmux.attention(
        q, k, v, causal=causal, window=window, return_lse=True, backend="cuda"
    )
    torch.cuda.synchronize()
    return out, lse


@pytest.mark.parametrize("case, dtype", base.case_params(CASES, FP16))
def test_persistent_forward_vs_reference(case, dtype, monkeypatch):
    c = dict(case)
    causal, window = c.pop("causal"), c.pop("window", None)
    q, k, v = base._inputs(**c, dtype=getattr(torch, dtype), seed=31)
    ex = flashmux.explain(q, k, v, causal=causal, window=window, backend="cuda")
    assert ex.lowerings["forward"].startswith("sm90"), ex.lowerings
    out0, lse0 = _forward(q, k, v, causal, window, monkeypatch, persist=False)
    # a NaN-filled block of out's size, freed: the caching allocator hands it to the next call's
    # output, so every element the persistent kernel does not store stays NaN
    torch.full_like(out0, float("nan"))
    out, lse = _forward(q, k, v, causal, window, monkeypatch, persist=True)
    scale = 1.0 / math.sqrt(c["D"])
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(
        npf(q), npf(k), npf(v), causal=causal, window=window, scale=scale
    )
    if window is None:
        p_out, p_lse = base._plain(q, k, v, causal, scale)
        for name, mine, plain, ref in (("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)):
            e_m, e_p = base._err(mine, ref), base._err(plain, ref)
            assert e_m <= 2 * e_p + 1e-5, f"{name}: persistent {e_m:.3g} vs plain {e_p:.3g}"
    else:  # (base._plain has no windows) bf16 rounding of |out| < 4, float32 lse
        assert base._err(out, r_out) < 2e-2 and base._err(lse, r_lse) < 1e-3
    # the same arithmetic in the same order as the one-CTA-per-tile kernel (judged above and by
    # test_cuda_sm90_gpu.py, windows included): equal bit for bit, NaN-free
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out, out0), (out.float() - out0.float()).abs().max()
    assert torch.equal(lse, lse0), (lse - lse0).abs().max()


def test_persistent_forward_dv_ne_d(monkeypatch):
    """Dv != D (128 / 64) on the 128 instantiation: the TMA store writes Dv columns only."""
    g = torch.Generator(device="cpu").manual_seed(3)
    B, S, Hq, Hkv = 2, 700, 8, 2
    q = torch.randn((B, S, Hq, 128), generator=g).to(torch.bfloat16).cuda()
    k = torch.randn((B, S, Hkv, 128), generator=g).to(torch.bfloat16).cuda()
    v = torch.randn((B, S, Hkv, 64), generator=g).to(torch.bfloat16).cuda()
    out0, lse0 = _forward(q, k, v, True, None, monkeypatch, persist=False)
    out, lse = _forward(q, k, v, True, None, monkeypatch, persist=True)
    assert out.shape == (B, S, Hq, 64)
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, _ = reference_forward(npf(q), npf(k), npf(v), causal=True, scale=1 / math.sqrt(128))
    err = float(abs(out.double().cpu().numpy() - r_out).max())
    assert err < 2e-2, err  # bf16 output rounding of values |o| < 4
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


# bf16 hd64 with 192-key blocks (fwd_hdim64.cu): the default where seqlen_k >= 8192 (tune ""),
# forced at any length by FMX_TUNE_SM90=5 (one CTA per tile; NOTES.md session 10).
VARIANT_CASES = [
    ("5", False, dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=64, causal=True)),
    ("5", False, dict(B=1, Sq=129, Sk=70, Hq=3, Hkv=3, D=40, causal=False)),
    ("", False, dict(B=1, Sq=300, Sk=8300, Hq=2, Hkv=1, D=64, causal=True)),  # the default path
    ("", False, dict(B=1, Sq=257, Sk=8200, Hq=2, Hkv=2, D=48, causal=False)),
]


@pytest.mark.parametrize(
    "tune, persist, case",
    VARIANT_CASES,
    ids=lambda x: (
        x
        if isinstance(x, str)
        else "-".join(f"{k}{v}" for k, v in x.items())
        if isinstance(x, dict)
        else str(x)
    ),
)
def test_tile_variants_vs_reference(tune, persist, case, monkeypatch):
    c = dict(case)
    causal = c.pop("causal")
    q, k, v = base._inputs(**c, dtype=torch.bfloat16, seed=37)
    if tune:
        monkeypatch.setenv("FMX_TUNE_SM90", tune)
    else:
        monkeypatch.delenv("FMX_TUNE_SM90", raising=False)
    out0, _ = _forward(q, k, v, causal, None, monkeypatch, persist=False)
    torch.full_like(out0, float("nan"))  # a NaN block for the next output (see above)
    out, lse = _forward(q, k, v, causal, None, monkeypatch, persist=persist)
    scale = 1.0 / math.sqrt(c["D"])
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), causal=causal, scale=scale)
    p_out, p_lse = base._plain(q, k, v, causal, scale)
    for name, mine, plain, ref in (("out", out, p_out, r_out), ("lse", lse, p_lse, r_lse)):
        e_m, e_p = base._err(mine, ref), base._err(plain, ref)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: variant {tune} {e_m:.3g} vs plain {e_p:.3g}"
    if not tune:  # the 192-key default differs from the forced 128-key kernel (=0) in bits
        monkeypatch.setenv("FMX_TUNE_SM90", "0")
        out128, _ = _forward(q, k, v, causal, None, monkeypatch, persist=False)
        e_128 = base._err(out128, r_out)
        assert e_128 <= 2 * base._err(p_out, r_out) + 1e-5
        assert not torch.equal(out128, out), "the 192-key default did not run"
