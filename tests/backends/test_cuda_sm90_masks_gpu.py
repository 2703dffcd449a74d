"""ALiBi slopes and block masks in the CUDA backend's sm90 (Hopper wgmma/TMA) forward (issue 15,
session 11): the kExt kernels of csrc/sm90/fwd_extras_hdim{64,96,128}.cu.

GPU (compute capability 9.0; skipped elsewhere), judged against the float64 reference with the
suite's rule (error <= 2 x plain attention's error in the same dtype + 1e-5, out and lse; the
backward of these calls runs on the sm80 family and is judged too):
- each case first asserts that explain() names the sm90 forward (so that a test cannot pass on
  the sm80 kernels by accident) and the sm80 backward;
- ALiBi with (Hq,) and (B, Hq) slopes, Sq != Sk both ways, causal, GQA, head_dim 64/96/128, fp16
  and bf16, the lse gradient;
- block masks: each ready-made mask (causal, sliding window, document, prefix-LM, chunked,
  dilated), a custom lambda per head, lengths that are not multiples of 128, rows that see no
  key, causal/window on top, 256-key mask blocks (two kernel blocks per mask block), ALiBi on
  top; softcap + mask runs the sm80 forward (the sm90 family has no softcap) and is judged too;
- sm90 against sm80 (FLASHMUX_CUDA_SM90_EXT=0, read per call) on the same inputs;
- JAX (the XLA FFI handlers, under jit) against torch on the same inputs: the same kernels, so
  out and lse are equal.
CPU: the family rule for these calls (flashmux_cuda.family), tiny.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import flashmux
from flashmux import masks as M
from flashmux.spec import Params
from flashmux.testing.gpu import backend_gpu_reasons

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_alibi as alibi_base  # noqa: E402  (the ALiBi case runner and its judge)
import test_cuda_blockmask as bm_base  # noqa: E402  (the block-mask case runner and its judge)

from flashmux_cuda import family as fam  # noqa: E402

# ------------------------------------------------------------------------------------------
# CPU: which family runs these calls


KW = dict(families=255, varlen=False, softcap=None, head_dim=128, seqlen_k=1024, env="")


@pytest.mark.parametrize("what", [dict(alibi=True), dict(block_mask=True),
                                  dict(alibi=True, block_mask=True)])
def test_family_rule_for_alibi_and_block_masks(what, monkeypatch):
    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    for d, want in ((64, "sm90"), (40, "sm90"), (96, "sm90"), (128, "sm90"), (192, "sm80"),
                    (256, "sm80")):
        assert fam.forward_family((9, 0), **{**KW, **what, "head_dim": d})[0] == want, d
    # Dv != D: the larger head dim's kernels
    assert fam.forward_family((9, 0), **{**KW, **what, "head_dim": 64, "head_dim_v": 192})[0] == "sm80"
    got, why = fam.backward_family((9, 0), deterministic=False, bwd_env="", **{**KW, **what})
    assert got == "sm80" and "sm80 backward runs it" in why
    # a library built before session 11 (bit 7 clear) keeps them on sm80, saying rebuild
    got, why = fam.forward_family((9, 0), **{**KW, **what, "families": 127})
    assert got == "sm80" and "rebuild" in why
    monkeypatch.setenv(fam.SM90_EXT_ENV, "0")
    got, why = fam.forward_family((9, 0), **{**KW, **what})
    assert got == "sm80" and fam.SM90_EXT_ENV in why
    # plain calls are untouched by the switch
    assert fam.forward_family((9, 0), **KW)[0] == "sm90"


def test_lowerings_name_the_families(monkeypatch):
    import flashmux_cuda

    class Arr:
        shape = (2, 300, 4, 128)

    be = flashmux_cuda.CudaBackend(name="cuda-test", capabilities=flashmux_cuda.backend.capabilities)
    monkeypatch.setattr(fam, "device_capability", lambda x: (9, 0))
    for var in (fam.FAMILY_ENV, fam.BWD_FAMILY_ENV, fam.SM90_EXT_ENV):
        monkeypatch.delenv(var, raising=False)
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1, alibi=True, mask_block_size=128))
    if be._lib is not None and not int(be._lib.lib.fmx_families()) & fam.SM90_EXT_BIT:
        assert got["forward"].startswith("sm80") and "rebuild" in got["forward"]
    else:
        assert got["forward"].startswith("sm90"), got
    assert got["backward"].startswith("sm80") and "ALiBi and block masks" in got["backward"]


# ------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def hopper():
    why = backend_gpu_reasons("cuda", capability=(9, 0))
    if why:
        pytest.skip("cuda backend unavailable here: " + "; ".join(why))


def _assert_sm90_forward(c, alibi, block, like):
    """explain() for this case's shapes names the sm90 forward (or sm80 where expected)."""
    import torch

    dt = getattr(torch, c.get("dtype", "bfloat16"))
    b, sq, sk, hq, hkv, d = c.get("b", 1), c["sq"], c["sk"], c["hq"], c["hkv"], c["d"]
    q = torch.zeros((b, sq, hq, d), dtype=dt, device="cuda")
    k = torch.zeros((b, sk, hkv, d), dtype=dt, device="cuda")
    kw = dict(causal=c.get("causal", False), window=c.get("window"), softcap=c.get("softcap"))
    if alibi:
        kw["alibi_slopes"] = torch.ones((hq,), dtype=torch.float32, device="cuda")
    if block:
        kw["block_mask"] = flashmux.create_block_mask(lambda b_, h_, i, j: j <= i + sk, None, None,
                                                      sq, sk, block_size=c.get("block", 128),
                                                      like=q)
    ex = flashmux.explain(q, k, k, backend="cuda", **kw)
    fwd = (ex.lowerings or {}).get("forward", "")
    want = "sm80" if c.get("softcap") else "sm90"
    assert fwd.startswith(want), (want, ex.lowerings)
    assert (ex.lowerings or {}).get("backward", "").startswith("sm80"), ex.lowerings


def _judged(run, c):
    from flashmux.testing.judge import format_report, redraw

    seed = int(np.random.default_rng().integers(0, 2**31))
    ok, draws = redraw(lambda s: run(c, s), seed)
    assert ok, "\n".join(f"seed {s}:\n  {format_report(r)}" for s, r in draws)


ALIBI_CASES = [
    dict(b=2, sq=300, sk=700, hq=4, hkv=2, d=128, causal=True, slopes="h", dtype="bfloat16"),
    dict(b=2, sq=700, sk=300, hq=4, hkv=1, d=64, slopes="bh", dtype="float16", lse_grad=True),
    dict(b=1, sq=513, sk=513, hq=2, hkv=2, d=128, slopes="bh", dtype="float16"),
    dict(b=1, sq=333, sk=444, hq=4, hkv=2, d=96, causal=True, slopes="h", dtype="bfloat16"),
    dict(b=1, sq=200, sk=900, hq=2, hkv=2, d=64, window=(100, 30), slopes="h", dtype="bfloat16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("c", ALIBI_CASES, ids=[alibi_base._case_id(c) for c in ALIBI_CASES])
def test_sm90_alibi_against_reference(c, hopper, monkeypatch):
    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    _assert_sm90_forward(c, True, False, None)
    _judged(alibi_base._torch_case, c)


def _mask_fn(c, rng):
    """The block-mask cases' mask functions (test_cuda_blockmask's, plus this file's)."""
    sq, sk = c["sq"], c["sk"]
    m = c["mask"]
    if m == "causal":
        return M.causal(sk - sq)
    if m == "sliding":
        return M.sliding_window(150, 0)
    if m == "document":
        seg = np.sort(rng.integers(0, 5, (c["b"], max(sq, sk))), axis=1)
        return M.document(seg)
    if m == "late_rows":  # rows i < 200 see no key: lse -inf, out 0
        return lambda b, h, i, j: (j < i - 200) | ((j % 97 == 3) & (i >= 200))
    if m == "custom_per_head":
        return lambda b, h, i, j: ((i // 11 + j // 13 + h) % 4 != 0) | (j == i)
    return _ORIG_MASK_FN(c, rng)


_ORIG_MASK_FN = bm_base._mask_fn

MASK_CASES = [
    dict(name="causal_d128", b=2, sq=1000, sk=1000, hq=4, hkv=2, d=128, mask="causal"),
    dict(name="causal_sq_ne_sk_d64_fp16", b=1, sq=300, sk=777, hq=2, hkv=2, d=64, mask="causal",
         dtype="float16"),
    dict(name="sliding_d128", b=1, sq=900, sk=900, hq=2, hkv=1, d=128, mask="sliding"),
    dict(name="document_d64_gqa", b=2, sq=700, sk=700, hq=8, hkv=2, d=64, mask="document"),
    dict(name="doc_causal_alibi_bh_d128", b=2, sq=650, sk=650, hq=4, hkv=2, d=128,
         mask="doc_causal", slopes="bh", lse_grad=True),
    dict(name="prefix_d128_fp16", b=1, sq=640, sk=640, hq=2, hkv=2, d=128, mask="prefix",
         dtype="float16"),
    dict(name="chunked_d96", b=1, sq=513, sk=513, hq=2, hkv=2, d=96, mask="chunked"),
    dict(name="dilated_causal_d64_alibi_h", b=2, sq=300, sk=700, hq=2, hkv=2, d=64,
         mask="dilated", causal=True, slopes="h"),
    dict(name="custom_per_head_block256_window_d128", b=1, sq=600, sk=900, hq=4, hkv=2, d=128,
         mask="custom_per_head", mask_heads=True, block=256, window=(300, 40)),
    dict(name="rows_without_keys_d64", b=1, sq=500, sk=400, hq=2, hkv=2, d=64,
         mask="late_rows", lse_grad=True),
    dict(name="softcap_doc_causal_d128_sm80", b=1, sq=400, sk=400, hq=2, hkv=2, d=128,
         mask="doc_causal", softcap=20.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("c", MASK_CASES, ids=[c["name"] for c in MASK_CASES])
def test_sm90_block_mask_against_reference(c, hopper, monkeypatch):
    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    monkeypatch.setattr(bm_base, "_mask_fn", _mask_fn)
    _assert_sm90_forward(c, bool(c.get("slopes")), True, None)
    _judged(bm_base._measure, {**c, "grad": c.get("grad", True)})


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_sm90_and_sm80_agree(d, hopper, monkeypatch):
    """The same block-masked ALiBi forward on the sm90 kernels and (FLASHMUX_CUDA_SM90_EXT=0) on
    the sm80 ones: out within a few bf16 ulps of each other, lse within float32 rounding."""
    import torch

    B, S, Hq, Hkv = 2, 900, 4, 2
    g = torch.Generator(device="cpu").manual_seed(d)
    q, k, v = (torch.randn(s, generator=g).to(torch.bfloat16).cuda()
               for s in ((B, S, Hq, d), (B, S, Hkv, d), (B, S, Hkv, d)))
    seg = np.sort(np.random.default_rng(d).integers(0, 4, (B, S)), axis=1)
    bm = flashmux.create_block_mask(M.and_(M.causal(), M.document(seg)), B, None, S, S, like=q)
    sl = torch.rand(B, Hq, device="cuda") * 0.2
    res = []
    for env in ("1", "0"):
        monkeypatch.setenv(fam.SM90_EXT_ENV, env)
        res.append(flashmux.attention(q, k, v, block_mask=bm, alibi_slopes=sl, backend="cuda",
                                      return_lse=True))
    (o9, l9), (o8, l8) = res
    assert torch.isfinite(o9).all()
    torch.testing.assert_close(o9.float(), o8.float(), rtol=0, atol=2**-5)
    torch.testing.assert_close(l9, l8, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_sm90_jax_matches_torch(hopper, monkeypatch):
    """The JAX FFI path (jit) runs the same sm90 kExt forward as torch on the same inputs (block
    mask + ALiBi, and ALiBi alone): out and lse are equal."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import torch

    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip("JAX has no GPU here")
    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    rng = np.random.default_rng()
    B, S, Hq, Hkv, D = 2, 700, 4, 2, 128
    x = [rng.standard_normal(s).astype(np.float32)
         for s in ((B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D))]
    sl = rng.uniform(0.01, 0.2, (B, Hq)).astype(np.float32)
    seg = np.sort(rng.integers(0, 5, (B, S)), axis=1)
    fn = M.and_(M.causal(), M.document(seg))
    jx = [jnp.asarray(a, jnp.bfloat16) for a in x]
    tx = [torch.tensor(a, dtype=torch.bfloat16, device="cuda") for a in x]
    bm_j = flashmux.create_block_mask(fn, B, None, S, S, like=jx[0])
    bm_t = flashmux.create_block_mask(fn, B, None, S, S, like=tx[0])
    for use_mask in (True, False):
        def f(q, k, v, s, bm, use_mask=use_mask):
            return flashmux.attention(q, k, v, alibi_slopes=s, block_mask=bm if use_mask else None,
                                      causal=not use_mask, backend="cuda", return_lse=True)

        jo, jl = jax.jit(f)(*jx, jnp.asarray(sl), bm_j)
        to, tl = f(*tx, torch.tensor(sl, device="cuda"), bm_t)
        np.testing.assert_array_equal(np.asarray(jo.astype(jnp.float32)), to.float().cpu().numpy())
        np.testing.assert_array_equal(np.asarray(jl), tl.cpu().numpy())


@pytest.mark.gpu
def test_sm90_block_mask_skips_empty_tiles(hopper, monkeypatch):
    """NaN keys/values in a key block no query may see never reach the sm90 forward's output
    (the producer loads the listed blocks only), with and without ALiBi."""
    import torch

    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    b, s, h, d = 1, 640, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    k[:, 256:384] = float("nan")
    v[:, 256:384] = float("nan")
    fn = M.and_(M.causal(), lambda b_, h_, i, j: (j < 256) | (j >= 384))
    bm = flashmux.create_block_mask(fn, None, None, s, s, block_size=128, like=q)
    for sl in (None, torch.full((h,), 0.05, device="cuda")):
        out = flashmux.attention(q, k, v, block_mask=bm, alibi_slopes=sl, backend="cuda")
        assert torch.isfinite(out).all()


PERSIST_ENV = "FLASHMUX_CUDA_SM90_EXT_PERSIST"  # read per call by fwd_extras_hdim128.cu (bf16)
PERSIST_CASES = [c for c in MASK_CASES if c["d"] == 128 and c.get("dtype", "bfloat16") == "bfloat16"
                 and not c.get("softcap")]


@pytest.mark.gpu
@pytest.mark.parametrize("c", PERSIST_CASES, ids=[c["name"] for c in PERSIST_CASES])
def test_sm90_ext_persistent_against_reference(c, hopper, monkeypatch):
    """The opt-in persistent kExt forward (bf16 head_dim 128): the same cases vs float64."""
    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    monkeypatch.setenv(PERSIST_ENV, "1")
    monkeypatch.setattr(bm_base, "_mask_fn", _mask_fn)
    _judged(bm_base._measure, {**c, "grad": False})


@pytest.mark.gpu
def test_sm90_ext_persistent_matches_tile_kernel(hopper, monkeypatch):
    """Persistent and one-CTA-per-tile kExt forwards compute each tile in the same order: out and
    lse agree to float32 rounding (block mask + ALiBi, ALiBi + causal, rows without keys)."""
    import torch

    monkeypatch.delenv(fam.SM90_EXT_ENV, raising=False)
    B, S, Hq, Hkv, D = 2, 1300, 8, 2, 128
    q, k, v = (torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)
               for h in (Hq, Hkv, Hkv))
    seg = np.sort(np.random.default_rng().integers(0, 6, (B, S)), axis=1)
    bm = flashmux.create_block_mask(M.and_(M.causal(), M.document(seg)), B, None, S, S, like=q)
    late = flashmux.create_block_mask(lambda b, h, i, j: j < i - 300, None, None, S, S, like=q)
    sl = torch.rand(B, Hq, device="cuda") * 0.2
    for kw in (dict(block_mask=bm, alibi_slopes=sl), dict(causal=True, alibi_slopes=sl[0]),
               dict(block_mask=late)):
        res = []
        for env in ("0", "1"):
            monkeypatch.setenv(PERSIST_ENV, env)
            res.append(flashmux.attention(q, k, v, backend="cuda", return_lse=True, **kw))
        (o0, l0), (o1, l1) = res
        torch.testing.assert_close(o1.float(), o0.float(), rtol=0, atol=2**-7)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
