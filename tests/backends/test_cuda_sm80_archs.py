"""The build's per-family arch lists (issue 12, session 8), on the CPU with no nvcc.

`BuildConfig.sm80_archs` (env FLASHMUX_CUDA_SM80_ARCHS) compiles the units outside csrc/sm90/ for
their own arch list; CI's lean compile check uses ("80",) so that the sm80 kernels are compiled
once (sm_80) and csrc/sm90/ once (sm_90a), instead of the sm80 units twice. It must change the
cache key and reach only the non-sm90 units' gencode.
"""

from __future__ import annotations

from flashmux_cuda import build as b


def _src(tmp_path):
    src = tmp_path / "csrc"
    for name in ("api.cu", "sm80/fwd_hdim64.cu", "sm90/fwd_hdim64.cu"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("// x\n")
    return src


def _cfg(src, **kw):
    base = dict(
        archs=("80", "90"), nvcc="nvcc", nvcc_version="release 13.0", src=src, cutlass_include=None
    )
    return b.BuildConfig(**{**base, **kw})


def _gencode_overrides(text):
    lines = text.splitlines()
    out = {}
    for i, ln in enumerate(lines):
        if ln.startswith("  desc = "):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            out[ln.split(" = ", 1)[1]] = (
                nxt.split(" = ", 1)[1] if nxt.startswith("  gencode") else None
            )
    return out


def test_sm80_archs_override_only_the_sm80_units(tmp_path):
    src = _src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    plain = _gencode_overrides(b.write_build_ninja(_cfg(src), out).read_text())
    assert plain == {
        "api.cu": None,
        "sm80/fwd_hdim64.cu": None,
        "sm90/fwd_hdim64.cu": b.SM90_GENCODE,
    }
    lean_cfg = _cfg(src, sm80_archs=("80",))
    lean = _gencode_overrides(b.write_build_ninja(lean_cfg, out).read_text())
    assert lean["sm90/fwd_hdim64.cu"] == b.SM90_GENCODE
    for name in ("api.cu", "sm80/fwd_hdim64.cu"):
        assert lean[name] == "-gencode=arch=compute_80,code=sm_80", name
    # the sm90 family stays in (the arch list still has a 9.x) and the key tells the builds apart
    assert "-DFMX_HAS_SM90" in lean_cfg.flags()
    assert lean_cfg.key() != _cfg(src).key()


def test_sm80_archs_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMUX_NVCC", "/bin/true")
    monkeypatch.setattr(b, "nvcc_version", lambda nvcc: "release 13.0")
    monkeypatch.setenv("FLASHMUX_CUDA_SM80_ARCHS", "8.0")
    assert b.BuildConfig.from_env(archs="80;90").sm80_archs == ("80",)
    monkeypatch.delenv("FLASHMUX_CUDA_SM80_ARCHS")
    assert b.BuildConfig.from_env(archs="80;90").sm80_archs is None
    assert b.BuildConfig.from_env(archs="80;90", sm80_archs="80").sm80_archs == ("80",)


def test_long_units_are_listed_first(tmp_path):
    """build.ninja lists the units longest first (ninja starts ready units in that order)."""
    src = tmp_path / "csrc"
    names = [
        "api.cu",
        "decode/decode.cu",
        "sm80/bwd_aux.cu",
        "sm80/bwd_hdim64.cu",
        "sm80/fwd_extras_hdim64.cu",
        "sm80/fwd_hdim128.cu",
        "sm80/tune_hdim64_fwd1.cu",
        "sm90/bwd_hdim64.cu",
        "sm90/fwd_hdim256.cu",
    ]
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("// x\n")
    out = tmp_path / "out"
    out.mkdir()
    text = b.write_build_ninja(_cfg(src), out).read_text()
    order = [ln.split(" = ", 1)[1] for ln in text.splitlines() if ln.startswith("  desc = ")]
    assert order[:2] == ["sm90/fwd_hdim256.cu", "sm90/bwd_hdim64.cu"]
    assert order.index("sm80/bwd_hdim64.cu") < order.index("sm80/fwd_hdim128.cu")
    assert order.index("sm80/fwd_hdim128.cu") < order.index("decode/decode.cu")
    assert order[-1] == "sm80/tune_hdim64_fwd1.cu"
    link = next(ln for ln in text.splitlines() if ln.startswith("build libflashmux_cuda.so"))
    assert link.index("sm90_fwd_hdim256") < link.index("api.cu")
