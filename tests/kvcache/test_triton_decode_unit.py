"""The Triton decode launcher's host side: split planning, the tuning table's fallbacks and
override, and the launch cache (a second step with new lengths reuses the plan and is still
right). Runs in the triton pass (FLASHMUX_TEST_BACKEND=triton; the interpreter on a CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tritonpass import triton_pass_torch  # tests/kvcache/tritonpass.py

torch = triton_pass_torch()

import flashmux  # noqa: E402
from flashmux import reference  # noqa: E402
from flashmux_triton import _decode  # noqa: E402
from flashmux_triton import tuning_decode as T  # noqa: E402


def test_plan_fills_the_machine_without_empty_splits():
    cfg = T.DecodeConfig(128, 4, 3, 2.0, 4)
    # B=8 x Hkv=8 = 64 programs on 132 SMs with one 136 KiB program each: 2 whole waves -> 4
    # splits of a 4k cache (32 blocks): 256 programs <= 264 (5 splits: 320, a third round)
    assert T.programs_per_sm(cfg, 128, 128, 2) == 1
    _, bm, mb, ns, split_len, _ = _decode.plan(8, 1, 32, 8, 128, 128, 4096, 0, "bfloat16", None,
                                              132, cfg)
    assert (bm, mb) == (16, 1) and ns == 4 and split_len % 128 == 0
    # 64-key blocks, 3 stages: ~72 KiB, 3 programs per SM -> 396 slots, 6 splits in one wave
    small = T.DecodeConfig(64, 4, 3, 1.0)
    assert T.programs_per_sm(small, 128, 128, 2) == 3
    assert _decode.plan(8, 1, 32, 8, 128, 128, 4096, 0, "bfloat16", None, 132, small)[3] == 6
    assert (ns - 1) * split_len < 4096 <= ns * split_len  # no split left empty
    # short caches are not split finer than min_blocks_per_split
    assert _decode.plan(1, 1, 8, 1, 128, 128, 512, 0, "bfloat16", None, 132, cfg)[3] == 1
    # forced, but never more splits than key blocks
    assert _decode.plan(1, 1, 8, 1, 128, 128, 512, 0, "bfloat16", 3, 132, cfg)[3] == 2
    assert _decode.plan(1, 1, 8, 1, 128, 128, 512, 0, "bfloat16", 100, 132, cfg)[3] == 4
    # packed rows: 8 heads per KV head x 16 rows = 128 rows in one program
    assert _decode.plan(2, 16, 16, 2, 128, 128, 4096, 0, "bfloat16", None, 132, cfg)[1:3] == (128, 1)
    # pages the key block divides take one lookup per block
    assert _decode.plan(2, 1, 8, 8, 128, 128, 4096, 256, "bfloat16", None, 132, cfg)[5]
    assert not _decode.plan(2, 1, 8, 8, 128, 128, 4096, 16, "bfloat16", None, 132, cfg)[5]


def test_tuning_fallbacks_and_override(monkeypatch):
    c = T.DecodeConfig(128, 4, 3)
    chain = []
    while c is not None:
        chain.append((c.block_n, c.num_stages))
        c = T.smaller(c)
    assert chain[:4] == [(128, 3), (128, 2), (128, 1), (64, 2)] and chain[-1][0] == 16
    monkeypatch.setenv("FLASHMUX_TRITON_DECODE", "block_n=64,waves=3")
    got = T.config_for(128, 128, "bfloat16", 0)
    assert (got.block_n, got.waves, got.num_warps) == (64, 3.0, 4)
    monkeypatch.setenv("FLASHMUX_TRITON_DECODE", "blocks=64")
    with pytest.raises(ValueError, match="blocks"):
        T.config_for(128, 128, "bfloat16", 0)


def test_launch_cache_reuses_the_plan_with_new_lengths():
    rng = np.random.default_rng(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 32)).astype(np.float32)).half().to(dev)
    kc = torch.from_numpy(rng.standard_normal((12, 16, 2, 32)).astype(np.float32)).half().to(dev)
    vc = torch.from_numpy(rng.standard_normal((12, 16, 2, 32)).astype(np.float32)).half().to(dev)
    table = torch.from_numpy(rng.permutation(12)[:8].reshape(2, 4).astype(np.int32)).to(dev)
    _decode._LAUNCHES.clear()
    for lens in ([64, 3], [17, 40], [0, 64]):
        lt = torch.tensor(lens, dtype=torch.int32, device=dev)
        out = flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lt, block_table=table,
                                              num_splits=3, backend="triton")
        ref = reference.attention_with_kvcache(
            q.float().cpu().numpy(), kc.float().cpu().numpy(), vc.float().cpu().numpy(),
            cache_seqlens=np.array(lens, np.int32), block_table=table.cpu().numpy())[0]
        assert np.abs(out.float().cpu().numpy() - ref).max() < 5e-3
    assert len(_decode._LAUNCHES) == 1


def test_append_kernel_is_used_and_clamps(monkeypatch):
    """The checked path (a first call; on a GPU the fast path would append inside the decode
    launch instead, tests/kvcache/test_decode_fused_append.py) appends with the Triton kernel."""
    from flashmux import kvcache

    monkeypatch.setattr(kvcache, "_fast_eligible", lambda q: False)
    calls = []
    real = _decode.append
    monkeypatch.setattr(_decode, "append", lambda *a: calls.append(1) or real(*a))
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" \
        else "cpu"
    rng = np.random.default_rng(7)

    def t(x, dt=torch.float16):
        return torch.from_numpy(np.asarray(x)).to(dev, dt)

    q = t(rng.standard_normal((2, 2, 4, 16)))
    kc, vc = t(rng.standard_normal((6, 8, 2, 16))), t(rng.standard_normal((6, 8, 2, 16)))
    table = t(np.array([[4, 1], [0, 5]]), torch.int32)
    kn, vn = t(rng.standard_normal((2, 2, 2, 16))), t(rng.standard_normal((2, 2, 2, 16)))
    before_k = kc.clone()
    lens = t([3, 9], torch.int32)
    flashmux.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, k=kn, v=vn, block_table=table,
                                    backend="triton")
    assert calls, "the triton backend's append kernel was not used"
    want = before_k.clone()
    want[4, 3], want[4, 4] = kn[0, 0], kn[0, 1]  # sequence 0: positions 3, 4 in page 4
    want[5, 1], want[5, 2] = kn[1, 0], kn[1, 1]  # sequence 1: positions 9, 10 in page 5
    torch.testing.assert_close(kc, want, rtol=0, atol=0)
    # the kernel itself clamps what the host cannot check (as on a GPU): positions past the
    # capacity land in the last slot, page ids outside the pool are clamped
    kc2 = before_k.clone()
    vc2 = vc.clone()
    bad_table = t(np.array([[4, 99], [-3, 5]]), torch.int32)
    _decode.append(kc2, vc2, kn, vn, t([15, 0], torch.int32), bad_table, 8)
    want = before_k.clone()
    want[5, 7] = kn[0, 1]  # 15 -> page 99 clamped to 5, slot 7; 16 clamped to 15 too (last wins)
    want[0, 0], want[0, 1] = kn[1, 0], kn[1, 1]  # page -3 clamped to 0
    changed = (kc2 != before_k).any(-1).any(-1)
    assert changed.sum() == 3 and changed[5, 7] and changed[0, 0] and changed[0, 1]
    torch.testing.assert_close(kc2[0, :2], want[0, :2], rtol=0, atol=0)


def test_declines_page_sizes_that_are_not_multiples_of_8():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.zeros(1, 1, 2, 16, dtype=torch.float16, device=dev)
    kc = torch.zeros(4, 12, 2, 16, dtype=torch.float16, device=dev)
    table = torch.zeros(1, 2, dtype=torch.int32, device=dev)
    lens = torch.zeros(1, dtype=torch.int32, device=dev)
    ex = flashmux.explain_kvcache(q, kc, kc, cache_seqlens=lens, block_table=table,
                                  backend="triton")
    assert ex.chosen is None and "page_size 12 is not a multiple of 8" in ex.reasons("triton")
    with pytest.raises(flashmux.NoBackendError, match="multiple of 8"):
        flashmux.attention_with_kvcache(q, kc, kc, cache_seqlens=lens, block_table=table,
                                        backend="triton")
