"""CPU tests of the CUDA backend's build system, C ABI mirror and argument checks.

No GPU needed. The build-system tests drive ninja with a fake nvcc (a shell script); one test
compiles the real kernel sources with nvcc for sm_80 and sm_90 (skipped where nvcc, ninja or the
CUTLASS headers are missing).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cabi_layout import assert_layout

import flashmux_cuda
from flashmux.spec import Params
from flashmux_cuda import abi
from flashmux_cuda import build as b

HEADER = Path(flashmux_cuda.__file__).resolve().parents[2] / "csrc" / "flashmux_cuda.h"
needs_ninja = pytest.mark.skipif(b.find_ninja() is None, reason="ninja not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FLASHMUX_CACHE_DIR", str(d))
    return d


def _src(tmp_path, files=None) -> Path:
    src = tmp_path / "csrc"
    (src / "jax_ffi").mkdir(parents=True)
    files = files or {"fwd_hdim64.cu": "// a\n", "fwd_hdim128.cu": "// b\n", "api.cu": "// c\n"}
    for name, text in files.items():
        (src / name).write_text(text)
    (src / "common.cuh").write_text("// header\n")
    (src / "jax_ffi" / "ffi.cc").write_text("// jax handler\n")
    return src


def _cfg(src, **kw) -> b.BuildConfig:
    base = dict(
        archs=("80",), nvcc="nvcc", nvcc_version="release 13.0", src=src, cutlass_include=None
    )
    base.update(kw)
    return b.BuildConfig(**base)


FAKE_NVCC = """#!/bin/sh
# fake nvcc: records each invocation (start/end) in $FAKE_NVCC_LOG, writes its -o / -MF files
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 99.9, V99.9.0"; exit 0; fi
out=""; mf=""; in=""; prev=""
for a in "$@"; do
  case "$prev" in -o) out="$a";; -MF) mf="$a";; esac
  case "$a" in *.cu|*.cc) in="$a";; esac
  prev="$a"
done
echo "start $$ $out" >> "$FAKE_NVCC_LOG"
sleep ${FAKE_NVCC_SLEEP:-0}
if [ -n "$FAKE_NVCC_FAIL" ]; then echo "error: fake failure in $in" >&2; exit 1; fi
[ -n "$mf" ] && echo "$out: $in" > "$mf"
mkdir -p "$(dirname "$out")"; echo obj > "$out"
echo "end $$ $out" >> "$FAKE_NVCC_LOG"
"""


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    path = tmp_path / "bin" / "nvcc"
    path.parent.mkdir()
    path.write_text(FAKE_NVCC)
    path.chmod(0o755)
    log = tmp_path / "nvcc.log"
    monkeypatch.setenv("FLASHMUX_NVCC", str(path))
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))
    b._nvcc_version_cache.clear()
    return path, log


# ------------------------------------------------------------------------------------------
# import hygiene


def test_import_imports_no_framework():
    code = (
        "import sys, flashmux, flashmux_cuda, flashmux_cuda.build, flashmux_cuda.abi\n"
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------
# cache key


def test_cache_key_changes_with_sources_flags_archs_and_nvcc(tmp_path):
    src = _src(tmp_path)
    k0 = _cfg(src).key()
    assert _cfg(src).key() == k0  # deterministic
    assert _cfg(src, archs=("80", "90")).key() != k0
    assert _cfg(src, extra_flags=("-lineinfo",)).key() != k0
    assert _cfg(src, nvcc_version="release 13.1").key() != k0
    assert _cfg(src, head_dims=(64,)).key() != k0
    assert _cfg(src, cutlass_version="4.3.0").key() != k0
    assert _cfg(src, jobs=7).key() == k0  # parallelism doesn't change the binary
    (src / "common.cuh").write_text("// header, edited\n")
    k1 = _cfg(src).key()
    assert k1 != k0
    (src / "api.cu").write_text("// c, edited\n")
    assert _cfg(src).key() != k1
    (src / "nvcc_flags.txt").write_text("--use_fast_math  # kernel-requested\n")
    assert "--use_fast_math" in _cfg(src).flags()
    # The JAX handler is a separate library: editing it leaves the kernel key alone.
    k2 = _cfg(src).key()
    (src / "jax_ffi" / "ffi.cc").write_text("// edited\n")
    assert _cfg(src).key() == k2


def test_key_ignores_checkout_location(tmp_path):
    a = _src(tmp_path / "a")
    c = _src(tmp_path / "c")
    assert _cfg(a).key() == _cfg(c).key()


def test_parse_archs():
    assert b.parse_archs("80;90") == ("80", "90")
    assert b.parse_archs("9.0, 8.0 8.6") == ("80", "86", "90")
    assert b.parse_archs("sm_90a") == ("90a",)
    assert b.parse_archs("100;90") == ("90", "100")
    with pytest.raises(ValueError, match="arch"):
        b.parse_archs("hopper")
    assert b.gencode_flags(("80", "90a")) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]


def test_archs_from_env(monkeypatch):
    monkeypatch.setenv("FLASHMUX_CUDA_ARCHS", "90;80")
    assert b.default_archs() == ("80", "90")


def test_archs_without_device_or_env(monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_ARCHS", raising=False)
    monkeypatch.setattr(b, "detect_devices", lambda: [])
    with pytest.raises(b.BuildError, match="no CUDA device"):
        b.default_archs()
    monkeypatch.setattr(b, "detect_devices", lambda: [(8, 6), (9, 0)])
    assert b.default_archs() == ("86", "90")


def test_build_ninja_contents(tmp_path):
    src = _src(tmp_path)
    cfg = _cfg(src, archs=("80", "90"), head_dims=(64,))
    out = tmp_path / "out"
    out.mkdir()
    text = b.write_build_ninja(cfg, out).read_text()
    assert "-gencode=arch=compute_80,code=sm_80" in text
    assert "-gencode=arch=compute_90,code=sm_90" in text
    for flag in ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DFMX_HEAD_DIM_64=1"):
        assert flag in text
    assert "fwd_hdim64.cu" in text and "api.cu" in text
    assert "fwd_hdim128.cu" not in text  # filtered by head_dims
    assert "ffi.cc" not in text  # the JAX handler is not part of the kernel library
    assert "libflashmux_cuda.so" in text


def test_sm90_sources_build_for_sm90a_only(tmp_path):
    files = {
        "api.cu": "// c\n",
        "sm80/fwd_hdim64.cu": "// a\n",
        "sm90/fwd_hdim64.cu": "// h\n",
        "sm90/fwd_hdim128.cu": "// h\n",
    }
    src = tmp_path / "csrc"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    cfg = _cfg(src, archs=("80", "90"))
    assert "-DFMX_HAS_SM90" in cfg.flags()
    text = b.write_build_ninja(cfg, out).read_text()
    lines = text.splitlines()
    # each "build obj: nvcc src" line is followed by "  desc = <rel>" and its own overrides
    blocks = {ln.split(" = ", 1)[1]: i for i, ln in enumerate(lines) if ln.startswith("  desc = ")}
    assert set(blocks) == set(files)
    for name, i in blocks.items():
        override = [ln for ln in lines[i + 1 : i + 2] if ln.startswith("  gencode")]
        if name.startswith("sm90/"):
            assert override == ["  gencode = -gencode=arch=compute_90a,code=sm_90a"], name
        else:
            assert override == [], name  # the arch list: sm_80 and sm_90
    assert len([n for n in blocks if n.startswith("sm90/")]) == 2
    # head-dim filter applies to the sm90 family too
    assert [
        p.name
        for p in _cfg(src, archs=("90",), head_dims=(64,)).translation_units()
        if "sm90" in p.parts
    ] == ["fwd_hdim64.cu"]
    # Without a 9.x arch the family is left out (and the API file doesn't reference it)
    cfg80 = _cfg(src, archs=("80", "86"))
    assert "-DFMX_HAS_SM90" not in cfg80.flags()
    assert all("sm90" not in p.parts for p in cfg80.translation_units())
    assert cfg80.key() != _cfg(src, archs=("80", "90a")).key()
    assert b.has_sm90(("90a",)) and b.has_sm90(("80", "90")) and not b.has_sm90(("80", "100"))


def test_forward_family_selection():
    from flashmux_cuda import family as fam

    kw = dict(families=3, varlen=False, softcap=None, head_dim=128, seqlen_k=10, env="")
    assert fam.forward_family((9, 0), **kw) == ("sm90", None)
    assert fam.forward_family((9, 0), **{**kw, "head_dim": 40})[0] == "sm90"  # pads to 64
    assert fam.forward_family((8, 0), **kw)[0] == "sm80"
    assert fam.forward_family((10, 0), **kw)[0] == "sm80"  # sm_90a code runs on 9.0 only
    assert fam.forward_family(None, **kw)[0] == "sm80"
    for change, why in [
        (dict(env="sm80"), "FLASHMUX_CUDA_FAMILY=sm80"),
        (dict(families=1), "without a 9.x arch"),
        (dict(varlen=True), "varlen"),
        (dict(softcap=30.0), "softcap"),
        (dict(head_dim=96), "head_dim 96 (rebuild)"),  # families=3: no bit 6 (session 10)
        (dict(head_dim=256), "head_dim 192/256 (rebuild)"),  # families=3: no bit 3
        (dict(head_dim=264), "head_dim"),
        (dict(seqlen_k=0), "no keys"),
    ]:
        family, reason = fam.forward_family((9, 0), **{**kw, **change})
        assert family == "sm80" and why in reason, (change, reason)
    assert [d for d in range(8, 257, 8) if fam.sm90_fwd_head_dim(d)] == list(range(8, 257, 8))
    assert fam.forward_family((9, 0), **{**kw, "families": 127, "head_dim": 80})[0] == "sm90"
    assert fam.forward_family((9, 0), **{**kw, "families": 15, "head_dim": 200})[0] == "sm90"
    assert fam.describe("sm90", None).startswith("sm90")
    assert "varlen" in fam.describe("sm80", "sm90 forward lacks varlen")


def test_forward_family_env(monkeypatch):
    from flashmux_cuda import family as fam

    kw = dict(families=None, varlen=False, softcap=None, head_dim=64, seqlen_k=10)
    monkeypatch.setenv("FLASHMUX_CUDA_FAMILY", "sm80")
    assert fam.forward_family((9, 0), **kw)[0] == "sm80"
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY")
    assert fam.forward_family((9, 0), **kw)[0] == "sm90"


def test_family_rule_matches_the_c_side():
    """family.py mirrors csrc/sm90/sm90_api.h and the API file's use_sm90_fwd: same head dims,
    same env name, same exclusions."""
    src = b.source_dir()
    api = (src / "sm90" / "sm90_api.h").read_text()
    assert "if (d <= 64) return 64;" in api and "if (d <= 128) return 128;" in api
    assert (
        "if (d <= 96) return sm90_pad96() ? 128 : 96;" in api
    )  # 65..96 (the mirror test runs both)
    for word in ("varlen", "softcap", "head_dim", "empty keys"):
        assert f'return "{word}"' in api
    top = (src / "flashmux_cuda_api.cu").read_text()
    assert 'std::getenv("FLASHMUX_CUDA_FAMILY")' in top and "if (cc != 90) return false;" in top


def test_lowerings_names_the_family(monkeypatch):
    from flashmux_cuda import family as fam

    class Arr:
        shape = (2, 300, 4, 128)

    be = _backend()
    monkeypatch.setattr(fam, "device_capability", lambda x: (9, 0))
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1))
    assert got["forward"].startswith("sm90") and got["backward"].startswith("sm90")
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1, softcap=5.0))
    assert got["forward"].startswith("sm80") and "softcap" in got["forward"]
    monkeypatch.setattr(fam, "device_capability", lambda x: (8, 0))
    assert be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1))["forward"].startswith("sm80")


# ------------------------------------------------------------------------------------------
# build runs, lock, failures (fake nvcc driven by the real ninja)


@needs_ninja
def test_build_and_cache_hit(tmp_path, cache, fake_nvcc, monkeypatch):
    _, log = fake_nvcc
    monkeypatch.setenv("FLASHMUX_CUDA_SRC", str(_src(tmp_path)))
    monkeypatch.setenv("FLASHMUX_CUDA_ARCHS", "80")
    cfg = b.BuildConfig.from_env()
    assert cfg.nvcc_version.startswith("Cuda compilation tools, release 99.9")
    lib = b.build(cfg, quiet=True)
    assert lib.is_file() and lib.parent.parent == cache / "cuda"
    assert (lib.parent / "build.log").is_file()
    n = log.read_text().count("start")
    assert n == 4  # three .cu and one link
    assert b.build(b.BuildConfig.from_env(), quiet=True) == lib  # cache hit: nothing runs
    assert log.read_text().count("start") == n


@needs_ninja
def test_lock_serializes_concurrent_builders(tmp_path, cache, fake_nvcc):
    _, log = fake_nvcc
    src = _src(tmp_path, {"one.cu": "// one\n"})
    env = dict(
        os.environ,
        FLASHMUX_CUDA_SRC=str(src),
        FLASHMUX_CUDA_ARCHS="80",
        FAKE_NVCC_SLEEP="1",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    code = "import flashmux_cuda.build as b; print(b.build(quiet=True))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and Path(outs[0]).is_file()
    events = log.read_text().split("\n")
    events = [e for e in events if e]
    # One build only (compile + link), and its steps never interleave with another builder's.
    assert [e.split()[0] for e in events] == ["start", "end", "start", "end"], events


def test_file_lock_excludes_second_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with b.file_lock(lock):
        with pytest.raises(b.BuildError, match="timed out"):
            with b.file_lock(lock, timeout=0.3):
                pass
    with b.file_lock(lock, timeout=1):
        pass


def _backend():
    """A fresh backend object (availability is cached per object)."""
    return flashmux_cuda.CudaBackend(
        name="cuda-test", capabilities=flashmux_cuda.backend.capabilities
    )


def test_missing_nvcc_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHMUX_CUDA_LIB", raising=False)
    monkeypatch.setenv("FLASHMUX_NVCC", str(tmp_path / "no" / "nvcc"))
    reasons = _backend().availability()
    assert reasons and reasons[0].startswith("nvcc not found")


def test_no_device_is_a_reason(monkeypatch, fake_nvcc):
    monkeypatch.delenv("FLASHMUX_CUDA_LIB", raising=False)
    monkeypatch.setattr(b, "detect_devices", lambda: [])
    assert _backend().availability() == ["no CUDA device"]


@needs_ninja
def test_failed_build_is_a_reason_with_log(tmp_path, cache, fake_nvcc, monkeypatch):
    monkeypatch.delenv("FLASHMUX_CUDA_LIB", raising=False)
    monkeypatch.setenv("FLASHMUX_CUDA_SRC", str(_src(tmp_path)))
    monkeypatch.setenv("FAKE_NVCC_FAIL", "1")
    monkeypatch.setattr(b, "detect_devices", lambda: [(8, 0)])
    be = _backend()
    (reason,) = be.availability()
    assert reason.startswith("build failed, log: ")
    log = Path(reason.split("log: ", 1)[1])
    assert log.is_file() and "fake failure" in log.read_text()
    with pytest.raises(RuntimeError, match="unavailable: build failed"):
        be.lib  # noqa: B018


def test_no_sources_is_a_build_error(tmp_path, cache):
    src = tmp_path / "empty"
    src.mkdir()
    with pytest.raises(b.BuildError, match="no .cu sources"):
        b.build(_cfg(src), quiet=True)


# ------------------------------------------------------------------------------------------
# The ctypes mirror against the C header, and the library wrapper (a fake library built with cc)

FAKE_LIB_C = r"""
#include "flashmux_cuda.h"
static const char *msg = "";
int fmx_abi_version(void) { return ABI; }
int fmx_attn_fwd(const FmxAttnArgs *a, void *s) {
  if (a->head_dim == 64) return 0;
  msg = "no kernel for this head_dim"; return FMX_ERR_UNSUPPORTED;
}
int fmx_attn_bwd(const FmxAttnArgs *a, void *s) { msg = "boom"; return FMX_ERR_CUDA; }
size_t fmx_attn_bwd_workspace_size(const FmxAttnArgs *a) {
  return (size_t)a->heads_q * a->total_q * 4;
}
const char *fmx_last_error(void) { return msg; }
"""

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@needs_cc
def test_ctypes_struct_matches_header(tmp_path):
    rows = assert_layout(tmp_path, HEADER, abi.FmxAttnArgs,
                         'printf("abi %d\\n", FMX_ABI_VERSION);')
    assert rows["abi"] == abi.ABI_VERSION


def _fake_lib(tmp_path, version=abi.ABI_VERSION) -> Path:
    (tmp_path / "fake.c").write_text(FAKE_LIB_C)
    so = tmp_path / f"libfake{version}.so"
    subprocess.run(
        [
            "cc",
            "-shared",
            "-fPIC",
            f"-DABI={version}",
            f"-I{HEADER.parent}",
            str(tmp_path / "fake.c"),
            "-o",
            str(so),
        ],
        check=True,
    )
    return so


@needs_cc
def test_library_wrapper_reports_errors(tmp_path):
    lib = abi.Library(_fake_lib(tmp_path))
    args = abi.FmxAttnArgs()
    args.head_dim, args.heads_q, args.total_q = 64, 2, 10
    lib.forward(args, 0)
    assert lib.workspace_size(args) == 80
    args.head_dim = 96
    with pytest.raises(abi.Unsupported, match="no kernel for this head_dim"):
        lib.forward(args, 0)
    with pytest.raises(abi.KernelError, match="CUDA error: boom"):
        lib.backward(args, 0)


@needs_cc
def test_library_abi_version_checked(tmp_path):
    with pytest.raises(abi.KernelError, match="ABI version 99"):
        abi.Library(_fake_lib(tmp_path, version=99))


@needs_cc
def test_prebuilt_library_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMUX_CUDA_LIB", str(_fake_lib(tmp_path)))
    monkeypatch.setattr(b, "detect_devices", lambda: [(9, 0)])
    be = _backend()
    assert be.availability() == []
    assert be.info()["library"].endswith(".so")


# ------------------------------------------------------------------------------------------
# argument checks before any launch


def _rows(name, shape, dtype="bfloat16", ptr=1 << 20, strides=None):
    if strides is None:
        strides, acc = [], 1
        for n in reversed(shape):
            strides.append(acc)
            acc *= n
        strides = tuple(reversed(strides))
    return abi.ArrayRef(name, ptr, tuple(shape), tuple(strides), dtype)


def _problem(B=2, Sq=5, Sk=7, Hq=4, Hkv=2, D=64, Dv=None, **kw):
    Dv = D if Dv is None else Dv
    return dict(
        q=_rows("q", (B, Sq, Hq, D), **kw),
        k=_rows("k", (B, Sk, Hkv, D), **kw),
        v=_rows("v", (B, Sk, Hkv, Dv), **kw),
        out=_rows("out", (B, Sq, Hq, Dv), **kw),
        lse_ptr=1 << 21,
    )


P = Params(scale=0.125)


def test_make_args_fills_struct():
    p = Params(scale=0.5, causal=True, window_left=3, window_right=None, softcap=30.0)
    a = abi.make_args(**_problem(), params=p)
    assert (a.batch, a.seqlen_q, a.seqlen_k, a.total_q, a.total_k) == (2, 5, 7, 10, 14)
    assert (a.heads_q, a.heads_kv, a.head_dim, a.head_dim_v) == (4, 2, 64, 64)
    assert list(a.q_stride) == [5 * 4 * 64, 4 * 64, 64]
    assert (a.window_left, a.window_right, a.causal) == (3, 0, 1)
    assert a.scale == 0.5 and a.softcap == 30.0 and a.dtype == 1
    assert a.cu_seqlens_q is None and a.dlse is None
    a = abi.make_args(**_problem(), params=P)
    assert (a.window_left, a.window_right, a.causal, a.softcap) == (-1, -1, 0, 0.0)


def test_make_args_varlen():
    p = Params(scale=1.0, varlen=True, max_seqlen_q=6, max_seqlen_k=0)
    a = abi.make_args(
        q=_rows("q", (11, 4, 64)),
        k=_rows("k", (13, 1, 64)),
        v=_rows("v", (13, 1, 64)),
        out=_rows("out", (11, 4, 64)),
        lse_ptr=16,
        params=p,
        cu_seqlens_q=1024,
        cu_seqlens_k=2048,
        batch=3,
    )
    assert (a.batch, a.seqlen_q, a.seqlen_k, a.total_q, a.total_k) == (3, 6, 13, 11, 13)
    assert list(a.q_stride) == [0, 256, 64] and a.cu_seqlens_q == 1024
    with pytest.raises(ValueError, match="cu_seqlens"):
        abi.make_args(
            q=_rows("q", (11, 4, 64)),
            k=_rows("k", (13, 1, 64)),
            v=_rows("v", (13, 1, 64)),
            out=_rows("out", (11, 4, 64)),
            lse_ptr=16,
            params=p,
        )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(Dv=264), abi.Unsupported, "head_dim_v 264 > 256"),
        (dict(Dv=36), ValueError, "multiple of 8"),
        (dict(D=320), abi.Unsupported, "head_dim 320 > 256"),
        (dict(D=36), ValueError, "multiple of 8"),
        (dict(Hq=3, Hkv=2), ValueError, "not a multiple of Hkv"),
        (dict(dtype="float32"), abi.Unsupported, "dtype float32"),
        (dict(ptr=(1 << 20) + 2), ValueError, "16-byte aligned"),
    ],
)
def test_make_args_rejects(change, error, match):
    with pytest.raises(error, match=match):
        abi.make_args(**_problem(**change), params=P)


def test_make_args_rejects_strides():
    prob = _problem()
    q = prob["q"]
    prob["q"] = abi.ArrayRef("q", q.ptr, q.shape, (q.strides[0], q.strides[1], 1, 4), q.dtype)
    with pytest.raises(ValueError, match="q: the last .* must be contiguous"):
        abi.make_args(**prob, params=P)
    prob = _problem()
    k = prob["k"]
    prob["k"] = abi.ArrayRef("k", k.ptr, k.shape, (k.strides[0], 129, 64, 1), k.dtype)
    with pytest.raises(ValueError, match="k: stride 129 .* not a multiple of 8"):
        abi.make_args(**prob, params=P)
    prob = _problem(dtype="float16")
    prob["v"] = _rows("v", prob["v"].shape, dtype="bfloat16")
    with pytest.raises(ValueError, match="v: dtype bfloat16 differs"):
        abi.make_args(**prob, params=P)


def test_make_args_rejects_dropout():
    with pytest.raises(abi.Unsupported, match="dropout not implemented in CUDA kernels"):
        abi.make_args(**_problem(), params=Params(scale=1.0, dropout_p=0.1))


@pytest.mark.parametrize("scale", [0.0, -0.25])
def test_make_args_declines_nonpositive_scale_without_softcap(scale):
    with pytest.raises(abi.Unsupported, match=r"scale <= 0"):
        abi.make_args(**_problem(), params=Params(scale=scale))
    a = abi.make_args(**_problem(), params=Params(scale=scale, softcap=5.0))
    assert a.scale == scale


def test_add_backward_checks_shapes():
    args = abi.make_args(**_problem(), params=P)
    q, k = (2, 5, 4, 64), (2, 7, 2, 64)
    abi.add_backward(
        args,
        _rows("do", q),
        _rows("dq", q),
        _rows("dk", k),
        _rows("dv", k),
        q_shape=q,
        k_shape=k,
    )
    assert list(args.dk_stride) == [7 * 2 * 64, 128, 64]
    with pytest.raises(ValueError, match="dk: shape"):
        abi.add_backward(
            args,
            _rows("do", q),
            _rows("dq", q),
            _rows("dk", q),
            _rows("dv", k),
            q_shape=q,
            k_shape=k,
        )


def test_capabilities_decline_dropout_and_dv():
    from flashmux.backend import capability_reasons
    from flashmux.spec import ProblemSpec

    spec = ProblemSpec(
        kind="torch",
        device_type="cuda",
        device_name="H100",
        compute_capability=(9, 0),
        dtype="bfloat16",
        batch=1,
        seqlen_q=8,
        seqlen_k=8,
        heads_q=2,
        heads_kv=1,
        head_dim=64,
        head_dim_v=32,
        varlen=False,
        causal=True,
        window=False,
        softcap=False,
        dropout=True,
        return_lse=False,
        deterministic=False,
        requires_grad=True,
        traced=False,
    )
    reasons = capability_reasons(flashmux_cuda.backend.capabilities, spec)
    assert any("dropout" in r for r in reasons)
    # Dv != D is taken since session 9 (the kernels of max(D, Dv): test_cuda_dv.py)
    assert not any("head_dim_v" in r for r in reasons)
    assert len(reasons) == 1
    # scale <= 0 is declined at dispatch (so auto dispatch picks another backend), unless softcap
    import dataclasses

    assert flashmux_cuda.backend.reasons(spec) == []
    neg = dataclasses.replace(spec, nonpositive_scale=True)
    assert any("scale <= 0" in r for r in flashmux_cuda.backend.reasons(neg))
    assert flashmux_cuda.backend.reasons(dataclasses.replace(neg, softcap=True)) == []


def test_torch_tensors_checked_before_launch():
    torch = pytest.importorskip("torch")
    from flashmux_cuda import torch_glue

    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        torch_glue.forward(None, q, q, q, None, None, P)
    # A transposed head_dim can't be read in place: the check says so, and _readable copies.
    qt = torch.randn(1, 4, 64, 2, dtype=torch.bfloat16).transpose(-1, -2)
    with pytest.raises(ValueError, match="must be contiguous"):
        abi.make_args(
            torch_glue._ref("q", qt),
            torch_glue._ref("k", q),
            torch_glue._ref("v", q),
            torch_glue._ref("out", q),
            0,
            P,
        )
    assert torch_glue._readable(qt).is_contiguous() and torch_glue._readable(q) is q
    res, buf = torch_glue._grad_buffers(q, (1, 4, 2, 64))
    assert res is buf
    res, buf = torch_glue._grad_buffers(q[..., :40], (1, 4, 2, 40))
    assert res is not buf or res.is_contiguous()


def test_jax_shapes_at_trace_time():
    """The JAX path traces on CPU (ffi_call needs its target only when lowered)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from flashmux_cuda import jax_glue

    class FakeLib:
        def workspace_size(self, args):
            return 4 * args.heads_q * args.total_q

    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((2, 5, 4, 36), bf)  # head_dim 36 is padded to 40 and sliced back
    k = jax.ShapeDtypeStruct((2, 7, 2, 36), bf)
    out, lse = jax.eval_shape(lambda q, k, v: jax_glue.forward(q, k, v, None, None, P), q, k, k)
    assert out.shape == (2, 5, 4, 36) and out.dtype == bf
    assert lse.shape == (2, 4, 5) and lse.dtype == jnp.float32

    def bwd(do, q, k, v, out, lse):
        return jax_glue.backward(FakeLib(), do, None, q, k, v, out, lse, None, None, P)

    dq, dk, dv = jax.eval_shape(bwd, q, q, k, k, out, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape

    pv = Params(scale=1.0, varlen=True, max_seqlen_q=4, max_seqlen_k=4)
    qv = jax.ShapeDtypeStruct((9, 4, 64), bf)
    cu = jax.ShapeDtypeStruct((3,), jnp.int32)
    out, lse = jax.eval_shape(lambda q, c: jax_glue.forward(q, q, q, c, c, pv), qv, cu)
    assert out.shape == (9, 4, 64) and lse.shape == (4, 9)

    v32 = jax.ShapeDtypeStruct((2, 7, 2, 32), bf)
    q64 = jax.ShapeDtypeStruct((2, 5, 4, 64), bf)
    k64 = jax.ShapeDtypeStruct((2, 7, 2, 64), bf)
    # Dv != D (session 9): out and dv take v's head_dim, dq / dk q's and k's
    out, lse = jax.eval_shape(lambda q, k, v: jax_glue.forward(q, k, v, None, None, P), q64, k64,
                              v32)
    assert out.shape == (2, 5, 4, 32) and lse.shape == (2, 4, 5)
    dq, dk, dv = jax.eval_shape(bwd, out, q64, k64, v32, out, lse)
    assert (dq.shape, dk.shape, dv.shape) == (q64.shape, k64.shape, v32.shape)


# ------------------------------------------------------------------------------------------
# The real compile: every translation unit for sm_80 and sm_90 (a build, no run)


def _real_build_ready():
    if b.find_nvcc() is None:
        return "nvcc not found"
    if b.find_ninja() is None:
        return "ninja not found"
    if b.cutlass_include() is None:
        return "CUTLASS headers (nvidia-cutlass) not installed"
    if not any(b.source_dir().rglob("*.cu")):
        return "no kernel sources yet"
    return None


@pytest.mark.skipif(_real_build_ready() is not None, reason=str(_real_build_ready()))
def test_real_compile_sm80_sm90(tmp_path, monkeypatch):
    """Compiles csrc/ for sm_80 and sm_90 with the real nvcc (csrc/sm90/ once, for sm_90a);
    FLASHMUX_CUDA_HEAD_DIMS trims it."""
    monkeypatch.setenv("FLASHMUX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLASHMUX_NVCC", raising=False)
    b._nvcc_version_cache.clear()
    jobs = int(os.environ.get("FLASHMUX_CUDA_JOBS", "2"))
    # The lean tier (a head-dim subset) compiles the sm80 units for sm_80 only (sm_90a for
    # csrc/sm90/): the sm_90 pass over the same sm80 source is what the full tier adds.
    lean = b.parse_head_dims(os.environ.get("FLASHMUX_CUDA_HEAD_DIMS")) is not None
    cfg = b.BuildConfig.from_env(archs="80;90", jobs=jobs, sm80_archs=("80",) if lean else None)
    if lean and "-DFMX_TUNING" not in cfg.flags():
        # the tune_* units compile to nothing without -DFMX_TUNING (~1 s of nvcc each, 13 of
        # them): the lean tier leaves them out (CI time); the full tier still compiles them
        units = b.BuildConfig.translation_units
        monkeypatch.setattr(b.BuildConfig, "translation_units",
                            lambda self: [p for p in units(self) if not p.name.startswith("tune_")])
        assert cfg.translation_units() and len(cfg.translation_units()) < len(units(cfg))
    t0 = time.monotonic()
    lib = b.build(cfg)
    elapsed = time.monotonic() - t0
    sys.stderr.write(
        f"\nreal CUDA compile (sm_80, sm_90, sm80 units for {cfg.sm80_archs or cfg.archs}, "
        f"{len(cfg.translation_units())} TUs, "
        f"head_dims={cfg.head_dims or 'all'}): {elapsed:.0f}s\n"
    )
    syms = subprocess.check_output(["nm", "-D", "--defined-only", str(lib)], text=True)
    for sym in (
        "fmx_abi_version",
        "fmx_attn_fwd",
        "fmx_attn_bwd",
        "fmx_attn_bwd_workspace_size",
        "fmx_last_error",
    ):
        assert sym in syms, sym
    cuobjdump = Path(cfg.nvcc).with_name("cuobjdump")
    if cuobjdump.is_file():
        elfs = subprocess.check_output([str(cuobjdump), "--list-elf", str(lib)], text=True)
        assert "sm_80" in elfs and "sm_90" in elfs
        assert "sm_90a" in elfs  # the sm90 family (wgmma needs the 'a' target)
        sass = subprocess.check_output([str(cuobjdump), "--dump-sass", str(lib)], text=True)
        assert "HGMMA" in sass and "UTMALDG" in sass
    # Loading needs no GPU: the ABI version answers from the host. A head-dim subset may leave
    # the dispatcher's other instantiations unresolved, so load it lazily.
    if cfg.head_dims:
        assert ctypes.CDLL(str(lib), mode=os.RTLD_LAZY).fmx_abi_version() == abi.ABI_VERSION
    else:
        assert abi.Library(lib).lib.fmx_abi_version() == abi.ABI_VERSION
    try:
        import jax  # noqa: F401
    except ImportError:
        return
    jlib = b.build_jax_ffi(cfg, lib)
    jsyms = subprocess.check_output(["nm", "-D", "--defined-only", str(jlib)], text=True)
    assert "FlashmuxCudaFwd" in jsyms and "FlashmuxCudaBwd" in jsyms
