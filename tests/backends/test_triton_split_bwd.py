"""The Triton backend's split backward (a dV program and a dK program per key block,
FLASHMUX_TRITON_DKDV=split) and the per-class switches of the tuning
table (dkdv, ws).

On the CPU (TRITON_INTERPRET=1, tiny shapes): the split variant is judged against the float64
reference by the SPEC rule (2 x plain low-precision attention + 1e-5); "split", with the same
tiles as the joint program (the interpreter's table), is bitwise equal to it: the same
arithmetic, only in two programs. On a GPU (no interpreter): the head_dim 192/256 classes at a size with many key
blocks, with the table's own configs (128-row key blocks), and the warp-specialized forward of
head_dim 128, judged the same way.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the case runner (reference, plain, judge); importing it switches the interpreter on without a
# GPU and skips without torch or triton
import test_triton_kernels as tk  # noqa: E402
from test_triton_kernels import INTERP, gpu_only, torch  # noqa: E402

from flashmux.spec import Params  # noqa: E402
from flashmux_triton import _launch, backend  # noqa: E402
from flashmux_triton import tuning as T  # noqa: E402


@pytest.fixture(params=["split"])
def split(request, monkeypatch):
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", request.param)
    return request.param


# ------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes
# ------------------------------------------------------------------------------------------

def test_split_equals_joint_and_reference(monkeypatch):
    """GQA, causal with Sq < Sk, softcap, dropout, the lse gradient: judged, and (interpreter,
    same tiles) bitwise equal to the joint program."""
    case = (1, 21, 38, 2, 1, 24, 24, "bfloat16", {"causal": True, "softcap": 5.0})
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", "joint")
    joint = tk._run_case(*case, dropout_p=0.2)
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", "split")
    got = tk._run_case(*case, dropout_p=0.2)
    if INTERP:
        for name, a, b in zip(("dq", "dk", "dv"), joint[2:5], got[2:5]):
            assert torch.equal(a, b), name


@pytest.mark.skipif(INTERP and os.environ.get("FLASHMUX_TEST_SIZE") != "full",
                    reason="CI time: the full tier (nox -s full) and GPUs run it")
def test_split_varlen_dropout_window_dv_differs(split):
    """Varlen with an empty sequence, dropout, a two-sided window, Dv != D: the dV program
    (no V, no delta) and the dK program draw the same dropout mask as the forward."""
    tk._run_case(0, 0, 0, 2, 1, 32, 16, "float16", {"window": (6, 3)},
                 varlen_lens=([19, 0, 14], [22, 3, 20]), dropout_p=0.2)


def test_table_switches_and_env(monkeypatch):
    """dkdv / ws come from the class's Tuning unless the environment forces them; the
    split programs' configs default to the joint one's; smaller() and float32 halving keep the
    variants."""
    t = T.TABLE_SM90[(256, False)]
    assert T.config_of(t, "bwd_dv").block_n == 128 and T.config_of(t, "bwd_dk").block_n == 128
    t64 = T.TABLE_SM90[(64, False)]
    assert T.config_of(t64, "bwd_dk") == t64.bwd_dkdv
    s = T.smaller(T.with_config(t, "dkdv", "split"), "bwd_dk")
    assert s.dkdv == "split" and s.bwd_dk.block_n == 64 and s.bwd_dv == t.bwd_dv
    f32 = T.default_tuning(T.ShapeClass(256, 256, "float32", False), (9, 0), False)
    assert f32.bwd_dk.block_n == 64 and f32.bwd_dkdv.block_n == 32

    x = torch.zeros(1, 8, 2, 256, dtype=torch.bfloat16)
    pb = _launch._Problem(x, x, x, None, None, tk._params(256))
    pb.interpret, pb.capability = False, (9, 0)  # as on an H200
    key = (pb.shape, pb.capability, pb.interpret)
    assert t.dkdv == "split"  # the table's d256 default; the class entry below overrides it
    monkeypatch.setitem(_launch._CHOSEN, key, T.with_config(t, "dkdv", "joint"))
    monkeypatch.delenv("FLASHMUX_TRITON_DKDV", raising=False)
    monkeypatch.delenv("FLASHMUX_TRITON_WS", raising=False)
    assert _launch.dkdv_variant(pb, fused=False) == "joint"
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", "split")
    assert _launch.dkdv_variant(pb, fused=False) == "split"
    assert _launch.dkdv_variant(pb, fused=True) == "joint"  # the atomic dQ needs the joint dS
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", "split_t")  # removed in session 9
    with pytest.raises(ValueError, match="FLASHMUX_TRITON_DKDV"):
        _launch.dkdv_variant(pb, fused=False)
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", "joint")
    assert not _launch.ws_wanted(pb)
    monkeypatch.setitem(_launch._CHOSEN, key, T.with_config(t, "ws", True))
    assert _launch.ws_wanted(pb)
    monkeypatch.setenv("FLASHMUX_TRITON_WS", "0")
    assert not _launch.ws_wanted(pb)
    pb.capability = (8, 0)
    monkeypatch.setenv("FLASHMUX_TRITON_WS", "1")
    assert not _launch.ws_wanted(pb)  # never below sm90


def test_table_tma_falls_back_when_descriptors_fail(monkeypatch):
    """Tensor descriptors turned on by the table (not forced by the environment): a kernel that
    fails with them is rerun without, the class remembers it, and the gradients are right."""
    from flashmux_triton import _kernels as K

    monkeypatch.delenv("FLASHMUX_TRITON_BWD_TMA", raising=False)
    monkeypatch.setattr(_launch, "bwd_tma_wanted", lambda pb: True)
    monkeypatch.setattr(_launch, "_BWD_TMA_BROKEN", set())
    orig = K.attn_bwd_dq.run

    def run(*a, **kw):
        if kw.get("TMA"):
            raise RuntimeError("no descriptors here")
        return orig(*a, **kw)

    monkeypatch.setattr(K.attn_bwd_dq, "run", run)
    tk._run_case(1, 20, 24, 2, 1, 16, 16, "float16", {"causal": True})
    assert len(_launch._BWD_TMA_BROKEN) == 1


# ------------------------------------------------------------------------------------------
# GPU: head_dim 192 / 256 with the table's configs, and the warp-specialized forward
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERP and os.environ.get("FLASHMUX_TEST_SIZE") != "full",
                    reason="CI time: the full tier (nox -s full) and GPUs run it")
@pytest.mark.parametrize("variant,d", [("joint", 64), ("split", 64), ("joint", 128)])
def test_bwd_tma_is_the_pointer_path(monkeypatch, variant, d):
    """FLASHMUX_TRITON_BWD_TMA=1: the dK/dV programs' interior Q/dO tiles and the dQ
    program's interior K/V tiles through tensor descriptors give the same gradients as pointer
    loads (bitwise in the interpreter), varlen
    too (rows of the (rows, heads*dim) view start at each sequence's offset)."""
    monkeypatch.setenv("FLASHMUX_TRITON_DKDV", variant)
    case = (1, 300 if not INTERP else 50, 280 if not INTERP else 45, 2, 1, d, d, "bfloat16",
            {"causal": True})
    monkeypatch.setenv("FLASHMUX_TRITON_BWD_TMA", "0")
    a = tk._run_case(*case)
    monkeypatch.setenv("FLASHMUX_TRITON_BWD_TMA", "1")
    b = tk._run_case(*case)
    if INTERP:  # on a GPU both are judged; the shared-memory layouts may differ
        for name, x, y in zip(("dq", "dk", "dv"), a[2:5], b[2:5]):
            assert torch.equal(x, y), name
    tk._run_case(0, 0, 0, 4, 2, d, d, "float16", {"causal": True},
                 varlen_lens=([17, 0, 40, 9], [23, 5, 33, 9]))


@gpu_only
@pytest.mark.parametrize("variant", ["auto", "joint", "split", "split+tma"])
@pytest.mark.parametrize("d,causal,dtype", [(256, False, "bfloat16"), (256, True, "float16"),
                                            (192, True, "bfloat16"), (192, False, "float16")])
def test_gpu_hdim_192_256_backward(monkeypatch, variant, d, causal, dtype):
    if variant == "auto":  # the tuning table's choice for the class (split at d192/d256 on sm90)
        monkeypatch.delenv("FLASHMUX_TRITON_DKDV", raising=False)
        monkeypatch.delenv("FLASHMUX_TRITON_BWD_TMA", raising=False)
    else:
        monkeypatch.setenv("FLASHMUX_TRITON_DKDV", variant.split("+")[0])
        monkeypatch.setenv("FLASHMUX_TRITON_BWD_TMA", "1" if variant.endswith("+tma") else "0")
    # lengths off the 128-row blocks; GQA 2:1; Sq < Sk (bottom-right causal)
    tk._run_case(2, 1000, 1111, 4, 2, d, d, dtype, {"causal": causal})


@gpu_only
def test_gpu_split_gqa_window_softcap_dropout(split):
    tk._run_case(1, 777, 900, 4, 1, 256, 256, "bfloat16", {"window": (300, 40), "softcap": 20.0},
                 dropout_p=0.1)


@gpu_only
def test_gpu_split_deterministic_large(split):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 1500, 4, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 1500, 2, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, 1500, 2, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    p = Params(scale=0.0625, causal=True, window_right=0, deterministic=True)
    out, lse = backend.forward(q, k, v, None, None, p)
    do = torch.randn_like(out)
    g1 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    g2 = backend.backward(do, None, q, k, v, out, lse, None, None, p)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@gpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_warp_specialized_forward(monkeypatch, d, causal):
    """FLASHMUX_TRITON_WS=1 (forced: a compile failure raises here instead of falling back):
    forward and backward judged against float64, lengths off the blocks."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("warp specialization: sm90+")
    monkeypatch.setenv("FLASHMUX_TRITON_WS", "1")
    tk._run_case(2, 1000, 1000, 4, 4, d, d, "bfloat16", {"causal": causal})
    tk._run_case(1, 2048, 2048, 2, 1, d, d, "float16", {"causal": causal})
