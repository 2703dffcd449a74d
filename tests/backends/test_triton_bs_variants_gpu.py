"""The block-sparse Triton kernels' GPU variants (session 9, issue 15), each judged against the
float64 reference by the conformance rule on a CUDA GPU (skipped elsewhere): the tile configs
with two programs per SM (FLASHMUX_TRITON_BS_FWD / _BWD_DQ / _BWD_DKDV = "m,n,warps,stages")
and the other opt-in variants of `_launch_bs` (FLASHMUX_TRITON_BS_*). Lengths on the 128 mask
block so the interior tiles take the tensor-descriptor path the H200 runs, plus one tail case.

    pytest tests/backends/test_triton_bs_variants_gpu.py -v
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
if HAS_TORCH:
    import torch

    CUDA = torch.cuda.is_available()
else:  # pragma: no cover
    CUDA = False

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and torch")

import flashmux  # noqa: E402
from flashmux import masks as M  # noqa: E402
from flashmux.reference import reference_backward, reference_forward  # noqa: E402

VARIANTS = {
    # session 9, call A (20:55): each passed; the candidates of call B below
    "fwd128x64r128": {"FLASHMUX_TRITON_BS_FWD": "128,64,8,2,128"},
    "bwd2sm": {"FLASHMUX_TRITON_BS_BWD_DQ": "128,32,8,3,128", "FLASHMUX_TRITON_BS_BWD_DKDV": "64,64,4,3"},
    "pre128x64s3": {"FLASHMUX_TRITON_BS_PRE": "1", "FLASHMUX_TRITON_BS_FWD": "128,64,8,3"},
    "ws": {"FLASHMUX_TRITON_BS_WS": "1"},
    # call B (21:40): the forward at two programs per SM, the backward preloaded
    "f2sm_prebwd": {"FLASHMUX_TRITON_BS_PRE": "dq,dkdv", "FLASHMUX_TRITON_BS_FWD": "128,64,8,2,128"},
    "pre_all_2sm": {"FLASHMUX_TRITON_BS_PRE": "1", "FLASHMUX_TRITON_BS_FWD": "128,64,8,2,128",
                    "FLASHMUX_TRITON_BS_BWD_DQ": "128,32,8,2,128",
                    "FLASHMUX_TRITON_BS_BWD_DKDV": "64,64,4,2"},
    "pre_f64": {"FLASHMUX_TRITON_BS_PRE": "1", "FLASHMUX_TRITON_BS_FWD": "64,64,4,2"},
    "f4sm_prebwd": {"FLASHMUX_TRITON_BS_PRE": "dq,dkdv", "FLASHMUX_TRITON_BS_FWD": "64,32,4,2"},
    "pre_bwd3": {"FLASHMUX_TRITON_BS_PRE": "1", "FLASHMUX_TRITON_BS_FWD": "128,64,8,2,128",
                 "FLASHMUX_TRITON_BS_BWD_DQ": "64,32,4,2", "FLASHMUX_TRITON_BS_BWD_DKDV": "32,64,4,2"},
    # session 10 (call s10a: LSE2, the dK/dV kernel's row statistics precomputed, passed and was
    # not faster; removed)
    # two backward programs per SM, one kernel at a time (sm_90 compile: dQ 64x64x4x2 191
    # registers, 97 KiB; dK/dV 32x64x4x3 253 registers, no spill, 81 KiB; 64x64x4x2 72 B spill)
    "dq64s2": {"FLASHMUX_TRITON_BS_BWD_DQ": "64,64,4,2"},
    "kv32s3": {"FLASHMUX_TRITON_BS_BWD_DKDV": "32,64,4,3"},
    "kv64s2": {"FLASHMUX_TRITON_BS_BWD_DKDV": "64,64,4,2"},
    # session 10, after call A: delta computed by the dQ kernel (no preprocess launch)
    "fuse_delta": {"FLASHMUX_TRITON_BS_FUSE_DELTA": "1"},
    "fuse_delta_kv64s2": {"FLASHMUX_TRITON_BS_FUSE_DELTA": "1",
                          "FLASHMUX_TRITON_BS_BWD_DKDV": "64,64,4,2"},
    # the defaults on a plain call (no ALiBi): since call s10b the dK/dV kernel at 64x64x4x2 on
    # the plain walk (the ALiBi cases above keep 64x128x8x3 preloaded)
    "default_plain": {"_plain": "1"},
    "fuse_delta_plain": {"FLASHMUX_TRITON_BS_FUSE_DELTA": "1", "_plain": "1"},
    "dq64_plainwalk": {"FLASHMUX_TRITON_BS_BWD_DQ": "64,64,4,2", "FLASHMUX_TRITON_BS_PRE": "0",
                       "_plain": "1"},
    # session 11: dQ fused into the dK/dV program (float32 atomics; bulk tensor reductions on
    # the descriptor path), no dQ kernel; sm_90 compiles (triton 3.6): 64x64x8x2 no spill 1/SM,
    # 32x64x4x2 48 B 2/SM, 64x32x4x2 no spill 2/SM, 64x64x4x2 136 B 1/SM
    "fdq8": {"FLASHMUX_TRITON_BS_FUSED_DQ": "1", "FLASHMUX_TRITON_BS_BWD_DKDV": "64,64,8,2",
             "_plain": "1"},
    "fdq32": {"FLASHMUX_TRITON_BS_FUSED_DQ": "1", "FLASHMUX_TRITON_BS_BWD_DKDV": "32,64,4,2",
              "_plain": "1"},
    "fdq6432": {"FLASHMUX_TRITON_BS_FUSED_DQ": "1", "FLASHMUX_TRITON_BS_BWD_DKDV": "64,32,4,2",
                "_plain": "1"},
    "fdq_default": {"FLASHMUX_TRITON_BS_FUSED_DQ": "1", "_plain": "1"},
    "fdq_alibi": {"FLASHMUX_TRITON_BS_FUSED_DQ": "1"},
    # session 11: the dK/dV and dQ programs in one launch (flex's layout; sm_90 compiles:
    # 64,128,128,64,8,3 24 B stack 162 KiB; 64,64,64,64,4,2 40 B 97 KiB 2/SM)
    "joint8": {"FLASHMUX_TRITON_BS_JOINT": "1", "_plain": "1"},
    "joint4": {"FLASHMUX_TRITON_BS_JOINT": "1", "FLASHMUX_TRITON_BS_JOINT_CFG": "64,64,64,64,4,2",
               "_plain": "1"},
    "joint_alibi": {"FLASHMUX_TRITON_BS_JOINT": "1"},
}


def _segments(s, n, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, s), n - 1, replace=False))
    return np.searchsorted(cuts, np.arange(s), side="right").astype(np.int32)


@pytest.mark.parametrize("s", [1024, 1000])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bs_variant_vs_float64(variant, s, monkeypatch):
    for k, v in VARIANTS[variant].items():
        if not k.startswith("_"):
            monkeypatch.setenv(k, v)
    plain = bool(VARIANTS[variant].get("_plain"))
    rng = np.random.default_rng(int(np.random.default_rng().integers(2**31)))
    b, hq, hkv, d = 2, 4, 2, 128
    seg = np.stack([_segments(s, 5, 1), _segments(s, 9, 2)])
    # full tiles (document interiors), partial tiles (diagonal, document edges, dilated keys)
    fn = M.or_(M.and_(M.causal(), M.document(seg)), M.dilated(0, 200))
    slopes = None if plain else rng.uniform(0.01, 0.2, (b, hq)).astype(np.float32)
    x64 = [rng.standard_normal(sh) for sh in ((b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d))]
    do64 = rng.standard_normal((b, s, hq, d))
    q, k, v = (torch.tensor(x, device="cuda").to(torch.bfloat16).requires_grad_(True) for x in x64)
    do = torch.tensor(do64, device="cuda").to(torch.bfloat16)
    bm = flashmux.create_block_mask(fn, b, None, s, s, like=q)
    ts = None if plain else torch.tensor(slopes, device="cuda")
    out = flashmux.attention(q, k, v, block_mask=bm, alibi_slopes=ts, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().cpu().numpy() for x in (q, k, v))
    d64 = do.double().cpu().numpy()
    ro, _ = reference_forward(q64, k64, v64, block_mask=fn, alibi_slopes=slopes)
    rg = reference_backward(d64, q64, k64, v64, block_mask=fn, alibi_slopes=slopes)
    # plain attention in bf16 with the same mask and bias: the conformance rule's yardstick
    allowed = torch.tensor(bm.to_dense().cpu().numpy(), device="cuda")
    qp, kp, vp = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    g = hq // hkv
    sc = torch.einsum("bqhd,bkhd->bhqk", qp, kp.repeat_interleave(g, 2)).float() / np.sqrt(d)
    i = torch.arange(s, device="cuda")
    if not plain:
        sc = sc - ts[:, :, None, None] * (i[:, None] - i[None, :]).abs()
    sc = sc.masked_fill(~allowed, float("-inf"))
    po = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1).to(torch.bfloat16),
                      vp.repeat_interleave(g, 2))
    pg = torch.autograd.grad(po, (qp, kp, vp), do)
    for name, o, r, p in zip(("out", "dq", "dk", "dv"), (out, *grads), (ro, *rg), (po, *pg)):
        o64, p64 = o.detach().double().cpu().numpy(), p.detach().double().cpu().numpy()
        err = float(np.abs(o64 - r).max())
        bound = 2 * float(np.abs(p64 - r).max()) + 1e-5
        assert err <= bound, f"{variant} S{s} {name}: error {err:.3g} > bound {bound:.3g}"
