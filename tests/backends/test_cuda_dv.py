"""CPU tests of the CUDA backend's head_dim_v != head_dim (Dv != D; issue 12, session 9).

The kernels of max(D, Dv) run such a call, the smaller head dim zero-filled on load
(csrc/common/fmx_params.h). Here, without a GPU: the argument checks (abi.make_args,
add_backward's Dv shapes), the capability (no longer declined), the decode path's decline,
the family rule of flashmux_cuda.family against csrc/sm90/sm90_api.h compiled with nvcc
(skipped without it), and the backend's lowerings. The numerics are judged on the GPU
(test_cuda_dv_gpu.py).
"""

from __future__ import annotations

import subprocess

import pytest

import flashmux_cuda
from flashmux.spec import Params
from flashmux_cuda import abi
from flashmux_cuda import build as b
from flashmux_cuda import family as fam


def _rows(name, shape, ptr=1 << 20):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return abi.ArrayRef(name, ptr, tuple(shape), tuple(reversed(strides)), "bfloat16")


def _problem(D, Dv, B=2, Sq=5, Sk=7, Hq=4, Hkv=2):
    return dict(
        q=_rows("q", (B, Sq, Hq, D)),
        k=_rows("k", (B, Sk, Hkv, D)),
        v=_rows("v", (B, Sk, Hkv, Dv)),
        out=_rows("out", (B, Sq, Hq, Dv)),
        lse_ptr=1 << 21,
    )


@pytest.mark.parametrize("D, Dv", [(192, 128), (128, 64), (64, 128), (64, 32), (256, 8)])
def test_make_args_takes_dv(D, Dv):
    a = abi.make_args(**_problem(D, Dv), params=Params(scale=0.1))
    assert (a.head_dim, a.head_dim_v) == (D, Dv)
    assert list(a.out_stride) == [5 * 4 * Dv, 4 * Dv, Dv]
    assert list(a.v_stride) == [7 * 2 * Dv, 2 * Dv, Dv]


def test_make_args_checks_out_against_dv():
    prob = _problem(192, 128)
    prob["out"] = _rows("out", (2, 5, 4, 192))
    with pytest.raises(ValueError, match=r"out: shape .*expected \(2, 5, 4, 128\)"):
        abi.make_args(**prob, params=Params(scale=0.1))


def test_add_backward_shapes_follow_dv():
    prob = _problem(192, 128)
    a = abi.make_args(**prob, params=Params(scale=0.1))
    q_shape, k_shape = (2, 5, 4, 192), (2, 7, 2, 192)
    o_shape, v_shape = (2, 5, 4, 128), (2, 7, 2, 128)
    grads = dict(dout=_rows("do", o_shape), dq=_rows("dq", q_shape), dk=_rows("dk", k_shape),
                 dv=_rows("dv", v_shape))
    abi.add_backward(a, **grads, q_shape=q_shape, k_shape=k_shape, out_shape=o_shape,
                     v_shape=v_shape)
    assert list(a.dout_stride) == [5 * 4 * 128, 4 * 128, 128]
    assert list(a.dv_stride) == [7 * 2 * 128, 2 * 128, 128]
    # without out_shape / v_shape the Dv == D shapes are expected: a Dv dO is refused
    with pytest.raises(ValueError, match="do: shape"):
        abi.add_backward(a, **grads, q_shape=q_shape, k_shape=k_shape)
    # dv with k's shape when v has Dv columns: refused
    bad = dict(grads, dv=_rows("dv", k_shape))
    with pytest.raises(ValueError, match="dv: shape"):
        abi.add_backward(a, **bad, q_shape=q_shape, k_shape=k_shape, out_shape=o_shape,
                         v_shape=v_shape)


def _spec(**kw):
    from flashmux.spec import ProblemSpec

    base = dict(kind="torch", device_type="cuda", device_name="H200", compute_capability=(9, 0),
                dtype="bfloat16", batch=1, seqlen_q=8, seqlen_k=8, heads_q=2, heads_kv=1,
                head_dim=192, head_dim_v=128, varlen=False, causal=True, window=False,
                softcap=False, dropout=False, return_lse=False, deterministic=False,
                requires_grad=True, traced=False)
    base.update(kw)
    return ProblemSpec(**base)


def test_capabilities_take_dv():
    from flashmux.backend import capability_reasons

    caps = flashmux_cuda.backend.capabilities
    assert "dv_differs" in caps.features
    assert capability_reasons(caps, _spec()) == []
    assert flashmux_cuda.backend.reasons(_spec()) == []
    # past the kernels' widest head dim, either of the two is declined by name
    assert any("head_dim 264 > 256" in r for r in capability_reasons(caps, _spec(head_dim_v=264)))


def test_decode_declines_dv():
    from flashmux.testing.decode import decode_spec

    spec = decode_spec(batch=2, seqlen_q=1, heads_q=4, heads_kv=2, head_dim=128, head_dim_v=64,
                       capacity=256)
    reasons = flashmux_cuda.backend.decode_reasons(spec)
    assert any("head_dim_v 64 != head_dim 128" in r for r in reasons), reasons
    same = decode_spec(batch=2, seqlen_q=1, heads_q=4, heads_kv=2, head_dim=128, head_dim_v=128,
                       capacity=256)
    assert not any("head_dim_v" in r for r in flashmux_cuda.backend.decode_reasons(same))


KW = dict(varlen=False, softcap=None, seqlen_k=256, env="")


@pytest.mark.parametrize(
    "D, Dv, fwd, bwd",
    [
        (192, 128, fam.SM90, "sm90 backward has head_dim <= 64 and 97..128, not 192"),
        (128, 64, fam.SM90, None),  # the sm90 backward at 128 (dO and V zero-filled past 64)
        (64, 128, fam.SM90, None),
        (64, 32, fam.SM90, None),
        (96, 64, fam.SM80, "head_dim"),  # max(D, Dv) = 96: no sm90 instantiation
        (40, 72, fam.SM80, "head_dim"),
        (256, 128, fam.SM90, "not 256"),
    ],
)
def test_family_rule_uses_the_larger_head_dim(D, Dv, fwd, bwd):
    got, _ = fam.forward_family((9, 0), families=31, head_dim=D, head_dim_v=Dv, **KW)
    assert got == fwd
    b_fam, why = fam.backward_family((9, 0), families=31, head_dim=D, head_dim_v=Dv,
                                     deterministic=False, bwd_env="", **KW)
    if bwd is None:
        assert b_fam == fam.SM90 and why is None, why
    else:
        assert b_fam == fam.SM80 and bwd in why, why
    # Dv == D keeps the sm90 backward where it was
    assert fam.backward_family((9, 0), families=31, head_dim=128, head_dim_v=128,
                               deterministic=False, bwd_env="", **KW)[0] == fam.SM90


def test_lowerings_name_dv(monkeypatch):
    class Arr:
        def __init__(self, shape):
            self.shape = shape

    be = flashmux_cuda.backend
    monkeypatch.setattr(fam, "device_capability", lambda x: (9, 0))
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    q, k, v = Arr((1, 64, 2, 128)), Arr((1, 64, 2, 128)), Arr((1, 64, 2, 64))
    got = be.lowerings(q, k, v, Params(scale=0.1))
    assert got["forward"].startswith("sm90"), got
    assert got["backward"].startswith("sm90"), got  # Dv != D on the 128 kernels
    q, k, v = Arr((1, 64, 2, 192)), Arr((1, 64, 2, 192)), Arr((1, 64, 2, 128))
    got = be.lowerings(q, k, v, Params(scale=0.1))
    assert got["forward"].startswith("sm90"), got
    assert got["backward"].startswith("sm80") and "192" in got["backward"], got


PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include "sm90/sm90_api.h"
// stdin: lines "d dv"; stdout: "kernel_dim fwd_head_dim fwd bwd" (fwd/bwd: "-" or the reason)
int main() {
  int d, dv;
  while (std::scanf("%d %d", &d, &dv) == 2) {
    fmx::Params p;
    std::memset(&p, 0, sizeof(p));
    p.d = d;
    p.d_v = dv;
    p.seqlen_k = 256;
    p.q_hs = p.k_hs = p.v_hs = p.do_hs = 256;
    p.q_rs = p.k_rs = p.v_rs = p.do_rs = 8 * 256;
    p.q_bs = p.k_bs = p.v_bs = p.do_bs = 64 * 8 * 256;
    const char *f = fmx::sm90::fwd_unsupported(p), *g = fmx::sm90::bwd_unsupported(p);
    const int kd = fmx::sm90::kernel_dim(p);
    std::printf("%d %d %s %s\n", kd, fmx::sm90::fwd_head_dim(kd), f ? f : "-", g ? g : "-");
  }
  return 0;
}
"""


def test_c_rule_matches_mirror(tmp_path):
    """sm90_api.h's kernel_dim / fwd_unsupported / bwd_unsupported for (D, Dv) pairs against
    family.forward_family / backward_family (one host compile, ~10 s)."""
    nvcc = b.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cfg = b.BuildConfig.from_env(archs=["80"], nvcc=nvcc)
    inc = [f for f in cfg.flags() if f.startswith("-I")]
    (tmp_path / "rule.cu").write_text(PROGRAM)
    r = subprocess.run([nvcc, "-std=c++17", *inc, str(tmp_path / "rule.cu"), "-o",
                        str(tmp_path / "rule")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dims = (32, 64, 72, 96, 128, 192, 256)
    pairs = [(d, dv) for d in dims for dv in dims]
    text = "".join(f"{d} {dv}\n" for d, dv in pairs)
    out = subprocess.run([str(tmp_path / "rule")], input=text, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    rows = [line.split(" ") for line in out if line]
    assert len(rows) == len(pairs)
    for (d, dv), (kd, hd, fwd, bwd) in zip(pairs, rows):
        assert int(kd) == max(d, dv)
        assert int(hd) == fam.sm90_fwd_head_dim(max(d, dv)), (d, dv)
        py_f = fam.forward_family((9, 0), families=127, head_dim=d, head_dim_v=dv, **KW)[0]
        assert (fwd == "-") == (py_f == fam.SM90), (d, dv, fwd, py_f)
        py_b = fam.backward_family((9, 0), families=127, head_dim=d, head_dim_v=dv,
                                   deterministic=False, bwd_env="", **KW)[0]
        assert (bwd == "-") == (py_b == fam.SM90), (d, dv, bwd, py_b)
        if fwd == "-" and max(d, dv) <= 128 and not 64 < max(d, dv) <= 96:
            assert bwd == "-", (d, dv, bwd)  # the sm90 backward takes Dv != D too
