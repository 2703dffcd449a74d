"""CPU tests of the CUDA backend's decode entry point: the ctypes mirror of FmxDecodeArgs against
flashmux_cuda.h, make_decode_args' checks, the split heuristic, the ctypes plumbing to
fmx_decode (a fake library built with cc), and the backend's decode declines. No GPU needed;
the real compile of csrc/decode/decode.cu for sm_80/sm_90 is in test_cuda_build.py
(test_real_compile_sm80_sm90 compiles every translation unit under csrc/).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cabi_layout import assert_layout

import flashmux_cuda
from flashmux.kvcache import DecodeParams
from flashmux.testing.decode import decode_spec
from flashmux_cuda import abi

HEADER = Path(flashmux_cuda.__file__).resolve().parents[2] / "csrc" / "flashmux_cuda.h"
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

FAKE_C = r"""
#include "flashmux_cuda.h"
static const char *msg = "";
int fmx_abi_version(void) { return FMX_ABI_VERSION; }
int fmx_attn_fwd(const FmxAttnArgs *a, void *s) { return 0; }
int fmx_attn_bwd(const FmxAttnArgs *a, void *s) { return 0; }
size_t fmx_attn_bwd_workspace_size(const FmxAttnArgs *a) { return 0; }
const char *fmx_last_error(void) { return msg; }
#ifdef WITH_DECODE
size_t fmx_decode_workspace_size(const FmxDecodeArgs *a) {
  return a->num_splits > 1 ? (size_t)a->num_splits * a->batch * a->heads_q * 4 : 0;
}
int fmx_decode(const FmxDecodeArgs *a, void *s) {
  if (a->page_size != 0 && a->page_size != 16) { msg = "bad page"; return FMX_ERR_UNSUPPORTED; }
  if (a->num_splits > 1 && a->workspace == 0) { msg = "no workspace"; return FMX_ERR_WORKSPACE; }
  return 0;
}
#endif
"""


@needs_cc
def test_ctypes_struct_matches_header(tmp_path):
    assert_layout(tmp_path, HEADER, abi.FmxDecodeArgs)


def _ref(name, shape, dtype="bfloat16", ptr=1 << 20):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return abi.ArrayRef(name, ptr, tuple(shape), tuple(reversed(strides)), dtype)


def _params(**kw):
    base = dict(
        scale=0.125,
        causal=False,
        window_left=None,
        window_right=None,
        softcap=None,
        alibi=False,
        num_splits=None,
        page_size=0,
        return_lse=False,
    )
    base.update(kw)
    return DecodeParams(**base)


def _problem(
    B=2, Sq=1, Hq=8, Hkv=2, D=128, S=64, paged=0, n_pages=20, max_pages=4, dtype="bfloat16"
):
    q = _ref("q", (B, Sq, Hq, D), dtype)
    out = _ref("out", (B, Sq, Hq, D), dtype)
    if paged:
        kc = _ref("k_cache", (n_pages, paged, Hkv, D), dtype)
        bt = _ref("block_table", (B, max_pages), "int32")
    else:
        kc = _ref("k_cache", (B, S, Hkv, D), dtype)
        bt = None
    return dict(
        q=q, k_cache=kc, v_cache=kc, out=out, lse_ptr=1 << 22, seqlens_ptr=1 << 23, block_table=bt
    )


def test_make_decode_args_contiguous_and_paged():
    a = abi.make_decode_args(**_problem(), params=_params(causal=True, window_left=7), num_splits=3)
    assert (a.batch, a.seqlen_q, a.heads_q, a.heads_kv, a.head_dim) == (2, 1, 8, 2, 128)
    assert (a.capacity, a.page_size, a.num_pages, a.max_pages) == (64, 0, 0, 0)
    assert list(a.k_stride) == [64 * 2 * 128, 2 * 128, 128]
    assert (a.window_left, a.window_right, a.num_splits) == (7, 0, 3)
    assert a.block_table is None and a.softcap == 0.0 and a.dtype == 1
    a = abi.make_decode_args(
        **_problem(paged=16),
        params=_params(page_size=16, softcap=30.0),
        num_splits=1,
        alibi_ptr=1 << 24,
        alibi_stride=8,
    )
    assert (a.capacity, a.page_size, a.num_pages, a.max_pages) == (64, 16, 20, 4)
    assert a.block_table_stride == 4 and a.alibi_stride == 8 and a.softcap == 30.0
    assert list(a.k_stride) == [16 * 2 * 128, 2 * 128, 128]
    assert (a.window_left, a.window_right) == (-1, -1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(dtype="float32"), abi.Unsupported, "dtype float32"),
        (dict(D=36), ValueError, "multiple of 8"),
        (dict(D=320), abi.Unsupported, "head_dim 320"),
        (dict(Hq=6, Hkv=4), ValueError, "not a multiple of Hkv"),
    ],
)
def test_make_decode_args_rejects(change, error, match):
    with pytest.raises(error, match=match):
        abi.make_decode_args(**_problem(**change), params=_params(), num_splits=1)


def test_make_decode_args_rejects_layouts():
    prob = _problem(paged=16)
    prob["block_table"] = _ref("block_table", (2, 4), "int64")
    with pytest.raises(ValueError, match="block_table: expected int32"):
        abi.make_decode_args(**prob, params=_params(page_size=16), num_splits=1)
    prob = _problem()
    prob["v_cache"] = _ref("v_cache", (2, 64, 2, 64))
    with pytest.raises(abi.Unsupported, match="head_dim_v 64 != head_dim 128"):
        abi.make_decode_args(**prob, params=_params(), num_splits=1)
    prob = _problem()
    prob["q"] = abi.ArrayRef("q", (1 << 20) + 8, (2, 1, 8, 128), (1024, 1024, 128, 1), "bfloat16")
    with pytest.raises(ValueError, match="16-byte aligned"):
        abi.make_decode_args(**prob, params=_params(), num_splits=1)
    with pytest.raises(ValueError, match="num_splits"):
        abi.make_decode_args(**_problem(), params=_params(), num_splits=0)


def test_split_heuristic():
    # B=8, Hkv=8, G=4, Sq=1: 64 programs; 132 SMs want ceil(528/64) = 9 splits
    assert abi.choose_splits(8, 8, 4, 131072, 132) == 9
    assert abi.choose_splits(8, 8, 4, 4096, 132) == 9
    assert abi.choose_splits(8, 8, 4, 1024, 132) == 4  # no split shorter than 256 keys
    assert abi.choose_splits(128, 8, 4, 131072, 132) == 1
    assert abi.choose_splits(1, 1, 1, 10**6, 132) == abi.MAX_SPLITS
    assert [abi.rows_per_program(r) for r in (1, 2, 3, 4, 5, 64)] == [1, 2, 4, 4, 8, 8]


def _fake(tmp_path, with_decode: bool) -> abi.Library:
    (tmp_path / "fake.c").write_text(FAKE_C)
    so = tmp_path / f"libfake{int(with_decode)}.so"
    cmd = ["cc", "-shared", "-fPIC", f"-I{HEADER.parent}", str(tmp_path / "fake.c"), "-o", str(so)]
    if with_decode:
        cmd.insert(1, "-DWITH_DECODE")
    subprocess.run(cmd, check=True)
    return abi.Library(so)


@needs_cc
def test_decode_plumbing_and_errors(tmp_path):
    lib = _fake(tmp_path, True)
    args = abi.make_decode_args(**_problem(paged=16), params=_params(page_size=16), num_splits=4)
    assert abi.decode_workspace_size(lib, args) == 4 * 2 * 8 * 4
    with pytest.raises(abi.KernelError, match="workspace: no workspace"):
        abi.decode(lib, args, 0)
    args.workspace, args.workspace_bytes = 1 << 25, 256
    abi.decode(lib, args, 0)
    args.page_size = 8
    with pytest.raises(abi.Unsupported, match="bad page"):
        abi.decode(lib, args, 0)
    old = _fake(tmp_path, False)
    with pytest.raises(abi.KernelError, match="no fmx_decode"):
        abi.decode(old, args, 0)


def _spec(**kw):
    return decode_spec(**{"kind": "torch", **kw})


def test_backend_decode_declines():
    be = flashmux_cuda.backend
    assert be.decode_reasons(_spec()) == []
    assert be.decode_reasons(_spec(paged=True, page_size=8, alibi=True, window=True)) == []
    assert be.decode_reasons(_spec(kind="jax", traced=True)) == []  # through the XLA FFI
    cpu = _spec(kind="jax", device_type="cpu", device_name="cpu", compute_capability=None)
    assert any("no CUDA device" in r for r in be.decode_reasons(cpu))
    assert any("multiple of 8" in r for r in be.decode_reasons(_spec(head_dim=36, head_dim_v=36)))
    assert any("head_dim_v" in r for r in be.decode_reasons(_spec(head_dim_v=64)))
    assert any("float32" in r for r in be.decode_reasons(_spec(dtype="float32")))
    assert any("require grad" in r for r in be.decode_reasons(_spec(requires_grad=True)))
    assert be.decode_splits(_spec(), _params(num_splits=5)) == 5
    assert "contiguous" in be.decode_kernel(_spec(), _params())


def test_torch_glue_needs_cuda_tensors():
    torch = pytest.importorskip("torch")
    from flashmux_cuda import torch_glue

    q = torch.zeros((1, 1, 4, 64), dtype=torch.bfloat16)
    kc = torch.zeros((1, 16, 2, 64), dtype=torch.bfloat16)
    lens = torch.zeros((1,), dtype=torch.int32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        torch_glue.decode(None, q, kc, kc, lens, None, None, _params())


@needs_cc
@pytest.mark.parametrize("paged", [False, True])
def test_jax_decode_shapes_at_trace_time(tmp_path, paged):
    """The JAX path traces on the CPU (ffi_call needs its target only when lowered): shapes,
    the workspace output sized by the library, and the shape checks at trace time."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from flashmux_cuda import jax_decode

    lib = _fake(tmp_path, True)
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((2, 3, 8, 64), bf)
    if paged:
        kc = jax.ShapeDtypeStruct((9, 16, 2, 64), bf)
        bt = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    else:
        kc, bt = jax.ShapeDtypeStruct((2, 64, 2, 64), bf), None
    lens = jax.ShapeDtypeStruct((2,), jnp.int32)
    sl = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    p = _params(causal=True, num_splits=3, page_size=16 if paged else 0, alibi=True)

    def f(q, kc, vc, lens, bt, sl):
        return jax_decode.decode(lib, q, kc, vc, lens, bt, sl, p)

    out, lse = jax.eval_shape(f, q, kc, kc, lens, bt, sl)
    assert out.shape == (2, 3, 8, 64) and out.dtype == bf
    assert lse.shape == (2, 8, 3) and lse.dtype == jnp.float32
    q36 = jax.ShapeDtypeStruct((2, 3, 8, 36), bf)
    k36 = jax.ShapeDtypeStruct(kc.shape[:-1] + (36,), bf)
    with pytest.raises(ValueError, match="multiple of 8"):
        jax.eval_shape(f, q36, k36, k36, lens, bt, sl)


def test_decode_sources_are_built():
    """csrc/decode/decode.cu is a translation unit of the kernel library (also under a
    FLASHMUX_CUDA_HEAD_DIMS subset) and decode_ffi.cc one of the JAX FFI library."""
    from flashmux_cuda import build as b

    cfg = b.BuildConfig(
        archs=("80", "90"),
        nvcc="nvcc",
        nvcc_version="x",
        src=b.source_dir(),
        cutlass_include=None,
        head_dims=(64,),
    )
    names = [p.relative_to(cfg.src).as_posix() for p in cfg.translation_units()]
    assert "decode/decode.cu" in names
    assert "decode_ffi.cc" in [p.name for p in b.jax_ffi_sources(cfg)]
