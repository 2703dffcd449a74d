"""The C side's sm90 family rule against its Python mirror (issue 12), on the CPU.

csrc/sm90/sm90_api.h decides at launch whether the sm90 forward and backward take a problem
(`fwd_head_dim`, `fwd_unsupported`, `bwd_unsupported`); flashmux_cuda.family mirrors the rule so
that explain() can name the family without launching anything. This test compiles the header's
functions into a small host program with nvcc (skipped without nvcc) and compares the two over
every head_dim up to 256 and each condition the mirror covers (varlen, softcap, no keys,
deterministic). Strides are not mirrored (lowerings() sees no strides): the cases use dense ones.
"""

from __future__ import annotations

import itertools
import subprocess

import pytest

from flashmux_cuda import build as b
from flashmux_cuda import family as fam

PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include "sm90/sm90_api.h"
// stdin: lines "d varlen softcap seqlen_k deterministic"; stdout: "fwd_head_dim fwd bwd" where
// fwd/bwd is "-" (the sm90 kernels take it) or the C side's reason.
int main() {
  int d, varlen, sk, det;
  float cap;
  static int32_t cu[2] = {0, 1};
  while (std::scanf("%d %d %f %d %d", &d, &varlen, &cap, &sk, &det) == 5) {
    fmx::Params p;
    std::memset(&p, 0, sizeof(p));
    p.d = d;
    p.d_v = d;  // Dv == D here (test_cuda_dv.py mirrors Dv != D)
    p.cu_q = varlen ? cu : nullptr;
    p.cu_k = varlen ? cu : nullptr;
    p.softcap = cap;
    p.seqlen_k = sk;
    p.deterministic = det;
    // dense (B, S, H, D) strides, each a positive multiple of 8 elements
    p.q_hs = p.k_hs = p.v_hs = p.do_hs = 256;
    p.q_rs = p.k_rs = p.v_rs = p.do_rs = 8 * 256;
    p.q_bs = p.k_bs = p.v_bs = p.do_bs = 64 * 8 * 256;
    const char *f = fmx::sm90::fwd_unsupported(p), *g = fmx::sm90::bwd_unsupported(p);
    std::printf("%d %s %s\n", fmx::sm90::fwd_head_dim(d), f ? f : "-", g ? g : "-");
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def c_rule(tmp_path_factory):
    nvcc = b.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cfg = b.BuildConfig.from_env(archs=["80"], nvcc=nvcc)
    inc = [f for f in cfg.flags() if f.startswith("-I")]
    d = tmp_path_factory.mktemp("sm90_rule")
    (d / "rule.cu").write_text(PROGRAM)
    r = subprocess.run(
        [nvcc, "-std=c++17", *inc, str(d / "rule.cu"), "-o", str(d / "rule")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]

    def run(rows):
        text = "".join(" ".join(str(x) for x in row) + "\n" for row in rows)
        out = subprocess.run(
            [str(d / "rule")], input=text, capture_output=True, text=True, timeout=60, check=True
        ).stdout.split("\n")
        return [line.split(" ", 2) for line in out if line]

    return run


def test_head_dim_classes_match(c_rule):
    dims = list(range(8, 257, 8))
    got = c_rule([(dd, 0, 0.0, 256, 0) for dd in dims])
    for dd, (hd, fwd, bwd) in zip(dims, got):
        assert int(hd) == fam.sm90_fwd_head_dim(dd), dd
        py_fwd = fam.forward_family(
            (9, 0), families=127, varlen=False, softcap=None, head_dim=dd, seqlen_k=256, env=""
        )[0]
        assert (fwd == "-") == (py_fwd == fam.SM90), (dd, fwd, py_fwd)
        py_bwd = fam.backward_family(
            (9, 0),
            families=127,
            varlen=False,
            softcap=None,
            head_dim=dd,
            seqlen_k=256,
            deterministic=False,
            env="",
            bwd_env="",
        )[0]
        assert (bwd == "-") == (py_bwd == fam.SM90), (dd, bwd, py_bwd)
    # the classes themselves: the sm90 forward at every head dim <= 256 (65..96 on the 96
    # instantiation since session 10), the sm90 backward at <= 64 and 97..128 only
    assert [dd for dd, (hd, _, _) in zip(dims, got) if int(hd)] == list(range(8, 257, 8))
    assert {int(hd) for dd, (hd, _, _) in zip(dims, got) if 64 < dd <= 96} == {96}
    assert [dd for dd, (_, _, bwd) in zip(dims, got) if bwd == "-"] == list(range(8, 65, 8)) + [
        104,
        112,
        120,
        128,
    ]
    assert {int(hd) for dd, (hd, _, _) in zip(dims, got) if dd > 128} == {192, 256}


def test_pad96_experiment_matches(c_rule, monkeypatch):
    """FLASHMUX_CUDA_SM90_PAD96=1 (read per call on both sides): 65..96 -> the sm90 forward's 128
    instantiation, the backward stays sm80 there."""
    monkeypatch.setenv(fam.PAD96_ENV, "1")
    dims = [64, 72, 80, 88, 96, 104]
    got = c_rule([(dd, 0, 0.0, 256, 0) for dd in dims])
    assert [int(hd) for hd, _, _ in got] == [64, 128, 128, 128, 128, 128]
    assert [fam.sm90_fwd_head_dim(dd) for dd in dims] == [64, 128, 128, 128, 128, 128]
    assert [bwd == "-" for _, _, bwd in got] == [True, False, False, False, False, True]
    assert [fam.sm90_bwd_head_dim(dd) for dd in dims] == [64, 0, 0, 0, 0, 128]
    monkeypatch.delenv(fam.PAD96_ENV)
    assert fam.sm90_fwd_head_dim(96) == 96  # the 96 instantiation (session 10)


def test_head_dim_96_needs_the_library_bit():
    """A library without fmx_families() bit 6 (built before the 96 instantiation) keeps 65..96 on
    sm80; with it they take the sm90 forward (and the sm80 backward)."""
    kw = dict(varlen=False, softcap=None, seqlen_k=256, env="")
    for d in (72, 96):
        assert fam.forward_family((9, 0), families=63, head_dim=d, **kw)[0] == fam.SM80
        assert fam.forward_family((9, 0), families=127, head_dim=d, **kw)[0] == fam.SM90
        fam_b, why = fam.backward_family(
            (9, 0), families=127, head_dim=d, deterministic=False, bwd_env="", **kw
        )
        assert fam_b == fam.SM80 and "head_dim" in why


def test_wide_head_dims_need_the_library_bit():
    """A library without fmx_families() bit 3 (built before head_dim 192/256) keeps them on sm80."""
    kw = dict(varlen=False, softcap=None, seqlen_k=256, env="")
    assert fam.forward_family((9, 0), families=7, head_dim=256, **kw)[0] == fam.SM80
    assert fam.forward_family((9, 0), families=15, head_dim=256, **kw)[0] == fam.SM90
    assert fam.forward_family((9, 0), families=7, head_dim=128, **kw)[0] == fam.SM90
    fam_b, why = fam.backward_family(
        (9, 0), families=15, head_dim=192, deterministic=False, bwd_env="", **kw
    )
    assert fam_b == fam.SM80 and "head_dim" in why


def test_conditions_match(c_rule):
    rows = list(itertools.product((64, 96, 128, 192), (0, 1), (0.0, 5.0), (0, 1, 300), (0, 1)))
    for row, (_, fwd, bwd) in zip(rows, c_rule(rows)):
        dd, varlen, cap, sk, det = row
        kw = dict(
            families=127, varlen=bool(varlen), softcap=cap or None, head_dim=dd, seqlen_k=sk, env=""
        )
        f, why = fam.forward_family((9, 0), **kw)
        g, gwhy = fam.backward_family((9, 0), deterministic=bool(det), bwd_env="", **kw)
        assert (fwd == "-") == (f == fam.SM90), (row, fwd, why)
        assert (bwd == "-") == (g == fam.SM90), (row, bwd, gwhy)
        if det and f == fam.SM90 and fam.sm90_bwd_head_dim(dd):  # session 10: stays on sm90
            assert bwd == "-" and g == fam.SM90, (row, bwd, gwhy)
