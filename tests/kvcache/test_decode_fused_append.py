"""The Triton decode launch that appends the new tokens itself (the torch fast path's runner,
FLASHMUX_TRITON_FUSED_APPEND=1) against the separate append kernel followed by the decode
launch (=0), in bfloat16 with short caches, where one key block holds cached and new keys.

Both must write the same cache bits and give the same outputs bit for bit: the fused launch
takes the cached keys of such a block from the cache and the new ones from k, v in one pass,
so its running maxima and its rounding of P to bfloat16 are those of the separate path. (The
first version processed that block twice, cached keys then new keys; on the H200 the outputs
differed by up to 3 bfloat16 ulps, deterministically: 53 of 32768 elements outside the
default tolerance, the same in two runs. The interpreter shows it too, so it is the order of
the arithmetic, not a race.) Both are also judged against the float64 reference.

Runs in the triton pass: TRITON_INTERPRET=1 on CPU tensors, else compiled on a GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND") != "triton":
    pytest.skip("runs in the triton pass only", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERP and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import flashmux  # noqa: E402
from flashmux import dispatch, kvcache  # noqa: E402

if dispatch.availability(dispatch.get_backend("triton")):
    pytest.skip("triton unavailable", allow_module_level=True)

from flashmux_triton import _decode  # noqa: E402

DEV = "cpu" if INTERP else "cuda"


@pytest.fixture
def fresh(monkeypatch):
    # the fast path (and so the runner) serves CPU tensors too, for the interpreter
    monkeypatch.setattr(kvcache, "_fast_eligible", lambda q: isinstance(q, torch.Tensor))
    # 128-key blocks (the 16-bit default) over 16-token pages: the block of the first new
    # token holds cached keys too; three stages as on the GPU
    monkeypatch.setenv("FLASHMUX_TRITON_DECODE", "block_n=128,num_stages=3")
    _decode.plan.cache_clear()
    yield monkeypatch
    kvcache._validated.clear()
    _decode._LAUNCHES.clear()
    _decode.plan.cache_clear()


@pytest.mark.parametrize("page, seed", [(16, 2), (16, 3), (0, 2)])
def test_fused_append_gives_the_bits_of_the_separate_append(fresh, page, seed):
    if seed == 3 and not torch.cuda.is_available() and \
            os.environ.get("FLASHMUX_TEST_SIZE") != "full":
        pytest.skip("interpreter (CI time): the second seed runs on a GPU or with "
                    "FLASHMUX_TEST_SIZE=full")
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, cap, snew = 4, 8, 2, 32, 512, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    q = rnd(b, 1, hq, d)
    if page:
        n = b * (cap // page) + 3
        kc0, vc0 = rnd(n, page, hkv, d), rnd(n, page, hkv, d)
        table = torch.randperm(n, generator=g)[: b * (cap // page)].reshape(b, -1).int()
    else:
        kc0, vc0, table = rnd(b, cap, hkv, d), rnd(b, cap, hkv, d), None
    k, v = rnd(b, snew, hkv, d), rnd(b, snew, hkv, d)
    # 20: cached and new keys in block 0; 126: the new keys cross into block 1; 300: a longer one
    lens = torch.tensor([20, 0, 126, 300], dtype=torch.int32)
    q, kc0, vc0, k, v, lens = (x.to(DEV) for x in (q, kc0, vc0, k, v, lens))
    table = None if table is None else table.to(DEV)
    res = {}
    for fused in ("1", "0"):
        fresh.setenv("FLASHMUX_TRITON_FUSED_APPEND", fused)
        kvcache._validated.clear()
        _decode._LAUNCHES.clear()
        for _ in range(2):  # the first call makes the step, the second replays it
            kc, vc = kc0.clone(), vc0.clone()
            out, lse, kc_r, _ = flashmux.attention_with_kvcache(
                q, kc, vc, cache_seqlens=lens, k=k, v=v, block_table=table, causal=True,
                return_lse=True, backend="triton")
            assert kc_r is kc
        run = next(iter(kvcache._validated.values())).runner
        assert run.fuse == (fused == "1") and run.launch.new == (fused == "1")
        res[fused] = (out, lse, kc, vc)

    def f64(x):
        return x.double().cpu().numpy()

    want = flashmux.attention_with_kvcache(
        f64(q), f64(kc0), f64(vc0), cache_seqlens=lens.cpu().numpy(), k=f64(k), v=f64(v),
        block_table=None if table is None else table.cpu().numpy(), causal=True,
        return_lse=True, backend="reference")
    for fused, (out, lse, kc, vc) in res.items():
        np.testing.assert_array_equal(f64(kc), want[2])  # every slot, bf16 values exactly
        np.testing.assert_array_equal(f64(vc), want[3])
        np.testing.assert_allclose(f64(out), want[0], atol=2e-2, rtol=0, err_msg=fused)
        np.testing.assert_allclose(f64(lse), want[1], atol=1e-4, rtol=1e-4, err_msg=fused)
    diff = (res["1"][0].float() - res["0"][0].float()).abs().max()
    assert torch.equal(res["1"][0], res["0"][0]), f"fused vs separate differ by {diff}"
    assert torch.equal(res["1"][1], res["0"][1])
