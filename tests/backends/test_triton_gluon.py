"""The Gluon warp-specialized forward for Hopper (flashmux_triton._gluon, FLASHMUX_TRITON_GLUON).

CPU (CI, tiny): the module imports without a GPU and `reasons` declines what it cannot compute,
with a sentence. GPU (sm_90 only, FLASHMUX_TRITON_GLUON=force): forward (with the output's
rounding residual, as autograd asks) and the Triton backward on its output, judged against the
float64 reference by the SPEC rule (tk._run_case); each case asserts the Gluon kernel ran.
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton.experimental.gluon")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flashmux.spec import Params  # noqa: E402
from flashmux_triton import _gluon  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not HOPPER or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="the Gluon forward needs an sm_90 GPU (no interpreter)")


def test_reasons_decline_with_a_sentence():
    x = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    p = Params(scale=0.1)
    assert _gluon.reasons(x, x, x, p, (9, 0), False) is None
    assert "sm_90" in _gluon.reasons(x, x, x, p, (8, 0), False)
    assert "varlen" in _gluon.reasons(x, x, x, p, (9, 0), True)
    assert "float16" in _gluon.reasons(x.float(), x.float(), x.float(), p, (9, 0), False)
    y = torch.zeros(1, 256, 2, 96, dtype=torch.bfloat16)
    assert "head_dim" in _gluon.reasons(y, y, y, p, (9, 0), False)
    assert "softcap" in _gluon.reasons(x, x, x, Params(scale=0.1, softcap=5.0), (9, 0), False)
    short = torch.zeros(1, 200, 2, 128, dtype=torch.bfloat16)
    assert "multiple of 128" in _gluon.reasons(x, short, short, p, (9, 0), False)
    assert "contiguous heads" in _gluon.reasons(x.transpose(1, 2), x, x, p, (9, 0), False)


# (B, Sq, Sk, Hq, Hkv, D, dtype, causal, cfg or None)
GPU_CASES = [
    ("d128_gqa", 2, 1024, 1024, 4, 2, 128, "bfloat16", False, None),
    ("d128_causal", 1, 1024, 1024, 4, 4, 128, "bfloat16", True, None),
    ("d64_causal_sq_lt_sk_tail", 2, 300, 768, 2, 1, 64, "float16", True, None),
    ("d64_causal_sq_gt_sk_empty_rows", 1, 1000, 512, 2, 2, 64, "bfloat16", True, None),
    ("d64_noncausal_short", 3, 77, 256, 2, 2, 64, "bfloat16", False, None),
    ("d128_causal_pingpong", 1, 1024, 1024, 2, 2, 128, "bfloat16", True, "64,128,2,1"),
    ("d128_noncausal_pingpong", 1, 520, 1024, 2, 1, 128, "float16", False, "64,128,2,1"),
    ("d64_causal_bn64", 1, 700, 704, 2, 2, 64, "bfloat16", True, "64,64,4,0"),
    ("d128_causal_overlap", 1, 1024, 1024, 2, 2, 128, "bfloat16", True, "64,128,2,0,1"),
    ("d128_gqa_overlap", 2, 520, 1024, 4, 2, 128, "float16", False, "64,128,2,0,1"),
    ("d64_causal_sq_gt_sk_overlap", 1, 1000, 512, 2, 2, 64, "bfloat16", True, "64,128,3,0,1"),
    ("d64_causal_sq_lt_sk_overlap", 2, 300, 768, 2, 1, 64, "float16", True, "64,64,3,0,1"),
    ("d128_causal_overlap_pingpong", 1, 1024, 1024, 2, 2, 128, "bfloat16", True, "64,128,2,1,1"),
    # a warpgroup half with no key at all (n_mine = 0) still takes its turns
    ("d64_causal_sq_gt_sk_overlap_pingpong", 1, 1000, 512, 2, 2, 64, "bfloat16", True,
     "64,128,3,1,1"),
    ("d128_gqa_overlap_pingpong", 2, 520, 1024, 4, 2, 128, "float16", False, "64,128,2,1,1"),
    # persistent (6th field 1; 5 programs: many tiles each, counters across tiles) and one
    # program per tile (2)
    ("d128_causal_persist_pingpong", 2, 1024, 1024, 2, 2, 128, "bfloat16", True, "64,128,2,1,1,1"),
    ("d64_causal_sq_gt_sk_persist", 2, 1000, 512, 3, 1, 64, "float16", True, "64,128,3,1,1,1"),
    ("d128_gqa_persist", 2, 520, 1024, 4, 2, 128, "bfloat16", False, "64,128,2,0,1,1"),
    ("d64_causal_sq_lt_sk_tiles", 2, 300, 768, 2, 1, 64, "float16", True, "64,64,3,1,1,2"),
]


@hopper_only
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gluon_forward_judged(case, monkeypatch):
    import test_triton_kernels as tk

    _, B, Sq, Sk, Hq, Hkv, D, dtype, causal, cfg = case
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON", "force")
    if cfg:
        monkeypatch.setenv("FLASHMUX_TRITON_GLUON_CFG", cfg)
    monkeypatch.setenv("FLASHMUX_TRITON_GLUON_PROGRAMS", "5")
    calls = []
    real = _gluon.forward

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(_gluon, "forward", counted)
    out, lse = tk._run_case(B, Sq, Sk, Hq, Hkv, D, D, dtype, {"causal": causal})[:2]
    assert calls, "the Gluon forward did not run"
    assert torch.isfinite(out).all()
    if causal and Sq > Sk:  # rows above the diagonal have no key: lse -inf, out 0
        assert torch.isneginf(lse[:, :, : Sq - Sk]).all()
        assert (out[:, : Sq - Sk] == 0).all()


# (B, Sq, Sk, Hq, Hkv, D, dtype, causal, parts, cfg or None): parts = Gluon programs forced
# ("dkdv": FLASHMUX_TRITON_GLUON_BWD, "dq": FLASHMUX_TRITON_GLUON_DQ); cfg for the first part
GPU_BWD_CASES = [
    ("d128_causal_gqa", 1, 1024, 1024, 4, 2, 128, "bfloat16", True, ("dkdv",), None),
    ("d128_noncausal_sk_tail", 2, 512, 1000, 2, 2, 128, "float16", False, ("dkdv",), None),
    ("d64_causal_sq_lt_sk", 1, 640, 1024, 2, 1, 64, "bfloat16", True, ("dkdv",), None),
    ("d64_causal_sq_gt_sk", 2, 1024, 512, 2, 2, 64, "float16", True, ("dkdv",), None),
    ("d128_causal_bm32", 1, 768, 768, 2, 2, 128, "bfloat16", True, ("dkdv",), "32,64,2"),
    ("d64_noncausal_stages3", 1, 512, 768, 4, 1, 64, "bfloat16", False, ("dkdv",), "64,64,3"),
    ("dq_d128_causal_gqa", 1, 1024, 1024, 4, 2, 128, "bfloat16", True, ("dq",), None),
    ("dq_d64_causal_sq_gt_sk_tail", 2, 1000, 512, 2, 2, 64, "float16", True, ("dq",), None),
    ("dq_d128_noncausal_sq_lt_sk", 1, 300, 768, 2, 1, 128, "bfloat16", False, ("dq",), None),
    ("dq_d128_bn128", 1, 512, 1024, 2, 2, 128, "bfloat16", True, ("dq",), "64,128,2"),
    ("dq_d128_causal_overlap", 1, 1024, 1024, 4, 2, 128, "bfloat16", True, ("dq",), "64,64,2,1"),
    ("dq_d64_causal_sq_gt_sk_overlap", 2, 1000, 512, 2, 2, 64, "float16", True, ("dq",),
     "64,64,3,1"),
    ("all_d128_causal", 2, 1024, 1024, 2, 2, 128, "bfloat16", True, ("fwd", "dkdv", "dq"), None),
    ("all_d64_noncausal_gqa", 1, 1024, 1024, 4, 1, 64, "float16", False, ("fwd", "dkdv", "dq"),
     None),
]
_PARTS = {"fwd": ("FLASHMUX_TRITON_GLUON", "forward"),
          "dkdv": ("FLASHMUX_TRITON_GLUON_BWD", "backward_dkdv"),
          "dq": ("FLASHMUX_TRITON_GLUON_DQ", "backward_dq")}


@hopper_only
@pytest.mark.parametrize("case", GPU_BWD_CASES, ids=[c[0] for c in GPU_BWD_CASES])
def test_gluon_backward_judged(case, monkeypatch):
    """The Gluon dK/dV and/or dQ programs (=force), the rest Triton: out, lse, dq, dk, dv
    judged vs float64; each forced Gluon program must have run."""
    import test_triton_kernels as tk

    _, B, Sq, Sk, Hq, Hkv, D, dtype, causal, parts, cfg = case
    for env, _ in _PARTS.values():
        monkeypatch.delenv(env, raising=False)
    calls = {}
    for part in parts:
        env, fn = _PARTS[part]
        monkeypatch.setenv(env, "force")
        real = getattr(_gluon, fn)

        def counted(*a, _real=real, _part=part, **kw):
            calls[_part] = calls.get(_part, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(_gluon, fn, counted)
    if cfg:
        part = [p for p in parts if p != "fwd"][0]
        monkeypatch.setenv({"dkdv": "FLASHMUX_TRITON_GLUON_BWD_CFG",
                            "dq": "FLASHMUX_TRITON_GLUON_DQ_CFG"}[part], cfg)
    tk._run_case(B, Sq, Sk, Hq, Hkv, D, D, dtype, {"causal": causal})
    assert set(calls) == set(parts), f"Gluon programs that ran: {calls}, forced: {parts}"
