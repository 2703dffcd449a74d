"""CPU tests of the sm90 backward's selection (issue 12): flashmux_cuda.family.backward_family,
its mirror of the C side (sm90_api.h bwd_unsupported, the API file's use_sm90_bwd), the
workspace's extra rows, lowerings() and the build picking up the new translation units."""

from __future__ import annotations

import pytest

import flashmux_cuda
from flashmux.spec import Params
from flashmux_cuda import build as b
from flashmux_cuda import family as fam

KW = dict(families=7, varlen=False, softcap=None, head_dim=128, seqlen_k=256, deterministic=False)


def test_backward_family_default_and_head_dims(monkeypatch):
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    assert fam.backward_family((9, 0), **KW) == ("sm90", None)
    for d, want in (
        (40, "sm90"),
        (64, "sm90"),
        (72, "sm80"),
        (96, "sm80"),
        (112, "sm90"),
        (128, "sm90"),
        (192, "sm80"),
        (256, "sm80"),
    ):
        assert fam.backward_family((9, 0), **{**KW, "head_dim": d})[0] == want, d


@pytest.mark.parametrize(
    "change, why",
    [
        # a library built before the deterministic sm90 backward (fmx_families() bit 5)
        (dict(deterministic=True), "without the sm90 deterministic backward"),
        (dict(varlen=True), "sm90 backward lacks varlen"),
        (dict(softcap=5.0), "sm90 backward lacks softcap"),
        (dict(alibi=True), "sm90 backward lacks ALiBi"),
        (dict(seqlen_k=0), "no keys"),
        (dict(families=3), "without the sm90 backward"),  # a library built before it
        (dict(families=1), "without a 9.x arch"),
        (dict(env="sm80"), "FLASHMUX_CUDA_FAMILY=sm80"),
        (dict(bwd_env="sm80"), "FLASHMUX_CUDA_BWD_FAMILY=sm80"),
    ],
)
def test_backward_family_declines_with_a_reason(change, why, monkeypatch):
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    got, reason = fam.backward_family((9, 0), **{**KW, **change})
    assert got == "sm80" and why in reason, (change, reason)


def test_deterministic_takes_the_sm90_backward(monkeypatch):
    """Session 10: deterministic calls run the sm90 backward's kDet kernels where the library
    has them (fmx_families() bit 5); an older library (bit 5 clear) keeps them on sm80."""
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    det = {**KW, "deterministic": True}
    assert fam.backward_family((9, 0), **{**det, "families": 63}) == ("sm90", None)
    assert fam.backward_family((9, 0), **{**det, "families": 31})[0] == "sm80"
    assert fam.backward_family((9, 0), **{**det, "families": 63, "head_dim": 256})[0] == "sm80"


def test_backward_family_devices_and_env(monkeypatch):
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.setenv(fam.BWD_FAMILY_ENV, "sm80")
    assert fam.backward_family((9, 0), **KW)[0] == "sm80"
    assert (
        fam.forward_family((9, 0), **{k: v for k, v in KW.items() if k != "deterministic"})[0]
        == "sm90"
    )
    monkeypatch.delenv(fam.BWD_FAMILY_ENV)
    for cc in ((8, 0), (8, 9), (10, 0), None):
        assert fam.backward_family(cc, **KW)[0] == "sm80", cc


def test_backward_rule_matches_the_c_side():
    src = b.source_dir()
    api = (src / "sm90" / "sm90_api.h").read_text()
    assert "return f <= 128 && (d <= 64 || d > 96) ? f : 0;" in api  # bwd_head_dim: 64, 128
    assert 'if (bwd_head_dim(kernel_dim(p)) == 0) return "head_dim";' in api  # max(D, Dv)
    assert 'return "deterministic"' not in api  # session 10: the kDet kernels take it
    assert "if (const char *why = fwd_unsupported(p)) return why;" in api
    top = (src / "flashmux_cuda_api.cu").read_text()
    assert f'std::getenv("{fam.BWD_FAMILY_ENV}")' in top
    assert "if (!use_sm90_fwd(p, cc)) return false;" in top
    assert "return 255;" in top and fam.SM90_BWD_BIT == 4  # fmx_families() bit 2 (3-7 too)
    assert fam.SM90_DET_BIT == 32 and fam.SM90_D96_BIT == 64
    # the workspace grows by the padded lse2/dsum rows whenever the family is built in
    assert "w.sm90 = w.total;" in top and "bwd_extra_floats" in top


def test_sm90_backward_sources_are_sm90_units(tmp_path):
    src = b.source_dir()
    for name in ("bwd_hdim64.cu", "bwd_hdim128.cu", "bwd_aux.cu"):
        assert (src / "sm90" / name).is_file()
        assert b.is_sm90_source(f"sm90/{name}")
    cfg = b.BuildConfig.from_env(archs=("80", "90"))
    rels = {p.relative_to(cfg.src).as_posix() for p in cfg.translation_units()}
    assert {"sm90/bwd_hdim64.cu", "sm90/bwd_hdim128.cu", "sm90/bwd_aux.cu"} <= rels
    cfg80 = b.BuildConfig.from_env(archs=("80",))
    rels80 = {p.relative_to(cfg80.src).as_posix() for p in cfg80.translation_units()}
    assert not any(r.startswith("sm90/") for r in rels80)
    ninja = b.write_build_ninja(cfg, tmp_path).read_text()
    block = ninja.split("desc = sm90/bwd_hdim128.cu", 1)[1].split("build ", 1)[0]
    assert b.SM90_GENCODE in block


def test_lowerings_names_the_backward_family(monkeypatch):
    class Arr:
        shape = (2, 300, 4, 128)

    be = flashmux_cuda.CudaBackend(
        name="cuda-test", capabilities=flashmux_cuda.backend.capabilities
    )
    monkeypatch.setattr(fam, "device_capability", lambda x: (9, 0))
    monkeypatch.delenv(fam.FAMILY_ENV, raising=False)
    monkeypatch.delenv(fam.BWD_FAMILY_ENV, raising=False)
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1))
    assert got["backward"].startswith("sm90")
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1, deterministic=True))
    assert got["forward"].startswith("sm90")
    assert got["backward"].startswith("sm90")  # the deterministic sm90 backward (session 10)
    got = be.lowerings(Arr(), Arr(), Arr(), Params(scale=0.1, varlen=True))
    assert got["backward"].startswith("sm80") and "varlen" in got["backward"]
