"""Session 10's Triton decode variant `tma=1` (tuning_decode.DecodeConfig.tma): the unmasked
key blocks of a contiguous 16-bit cache through tensor descriptors. Judged against the float64
reference on random inputs (ragged lengths including 0, a length that is not a block multiple,
forced splits, Sq 2 with GQA), and equal to the pointer-load kernel. Triton pass; the
interpreter on a CPU (one small case with FLASHMUX_TEST_SIZE=full), everything on a GPU, where a CUDA graph of decode
steps with the descriptors is replayed with new lengths."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tritonpass import triton_pass_torch  # tests/kvcache/tritonpass.py

torch = triton_pass_torch()
pytest.importorskip("triton.tools.tensor_descriptor")

import graphs  # noqa: E402  (tests/kvcache/graphs.py)

from flashmux import reference  # noqa: E402
from flashmux.kvcache import DecodeParams  # noqa: E402
from flashmux_triton import _decode  # noqa: E402
from flashmux_triton import tuning_decode as T  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"


def _case(lens, sq, seed, d=32, cap=128, hq=4, hkv=2):
    rng = np.random.default_rng(seed)
    b = len(lens)
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    ref = reference.attention_with_kvcache(q, k, v, cache_seqlens=np.array(lens, np.int32),
                                           causal=True)[0]
    t = lambda x: torch.from_numpy(x).to(torch.bfloat16).to(DEV)  # noqa: E731
    return t(q), t(k), t(v), torch.tensor(lens, dtype=torch.int32, device=DEV), ref


def _params(ns):
    return DecodeParams(scale=32 ** -0.5, causal=True, window_left=None, window_right=0,
                        softcap=None, alibi=False, num_splits=ns, page_size=0, return_lse=False)


_CASES = [([128, 0, 77], 1, 2), ([100, 128], 2, 3), ([5, 128, 64], 1, None)]


# the interpreter (CI) runs none (a variant that did not win on the H200; CI time stays flat):
# FLASHMUX_TEST_SIZE=full runs the first case there
_FULL = os.environ.get("FLASHMUX_TEST_SIZE") == "full"


@pytest.mark.parametrize("lens,sq,ns", _CASES if GPU else _CASES[:1] if _FULL else [])
def test_tma_matches_reference_and_pointer_loads(lens, sq, ns):
    q, k, v, seqlens, ref = _case(lens, sq, seed=len(lens) + sq)
    cfg = T.DecodeConfig(32, 4, 2, 1.0, fused_merge=0, off32=1, tma=1)
    launch = _decode._launch_for(q, k, v, None, None, _params(ns), cfg)
    assert launch.tma, "the tma variant was not taken"
    out = _decode.decode(q, k, v, seqlens, None, None, _params(ns), config=cfg)[0]
    assert np.abs(out.float().cpu().numpy() - ref).max() < 2e-2
    plain = _decode.decode(q, k, v, seqlens, None, None, _params(ns),
                           config=T.DecodeConfig(32, 4, 2, 1.0, fused_merge=0, off32=1))[0]
    # same tiles, same order of the online softmax: only the load path differs
    assert torch.equal(out, plain)


def test_tma_is_refused_where_the_views_are_not_legal():
    q, k, v, _, _ = _case([128, 10], 1, seed=3)
    cfg = T.DecodeConfig(32, 4, 2, 1.0, tma=1)
    assert _decode._tma_ok(q, k, v, False, cfg)
    assert not _decode._tma_ok(q, k, v, True, cfg)  # paged
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) view of (B, H, S, D)
    assert not _decode._tma_ok(q, kt, kt, False, cfg)  # heads not adjacent in a row
    assert not _decode._tma_ok(q.float(), k.float(), v.float(), False, cfg)  # float32
    assert not _decode._tma_ok(q, k, v, False, T.DecodeConfig(32, 4, 2, 1.0))  # not asked
    assert "tma=1" in cfg.label()


@pytest.mark.skipif(not GPU, reason="CUDA graphs: GPU only")
def test_tma_in_a_cuda_graph():
    """Three decode steps (c32 + tma: merge kernel, PDL) captured in one graph and replayed with
    new lengths: equal to eager calls, judged against float64."""
    q, k, v, seqlens, _ = _case([128, 40, 100], 1, seed=11, d=64)
    cfg = T.DecodeConfig(128, 4, 3, 1.0, fused_merge=0, off32=1, pdl=1, tma=1)
    p = DecodeParams(scale=0.125, causal=True, window_left=None, window_right=0, softcap=None,
                     alibi=False, num_splits=2, page_size=0, return_lse=False)

    def step():
        return _decode.decode(q, k, v, seqlens, None, None, p, config=cfg)[0]

    ref = _case([77, 128, 1], 1, seed=11, d=64)[4]
    graphs.check_replay(step, seqlens, [77, 128, 1], ref, 2e-2)
