"""Discovery, capability reasons, priority, forcing, caching and explain()."""


import pytest
from corearrays import make

import flashmux
from flashmux import dispatch
from flashmux.backend import Backend, Capabilities


class Fake(Backend):
    """A backend that records calls and answers with the reference's numbers."""

    calls = 0
    reason_calls = 0

    def reasons(self, spec):
        type(self).reason_calls += 1
        return []

    def forward(self, q, k, v, cu_q, cu_k, params):
        type(self).calls += 1
        from flashmux.builtin.reference import forward

        return forward(q, k, v, cu_q, cu_k, params)


def _fake(name, **caps):
    base = dict(
        array_kinds=frozenset({"numpy"}), devices=frozenset({"cpu"}),
        dtypes=frozenset({"float16", "bfloat16"}), max_head_dim=256, priority=1,
    )
    base.update(caps)
    return Fake(name=name, capabilities=Capabilities(**base))


@pytest.fixture
def fakes(isolated_registry):
    yield


def q16(d=64, dtype="float16"):
    return [make("numpy", s, dtype) for s in ((1, 9, 2, d), (1, 9, 2, d), (1, 9, 2, d))]


def test_reference_is_always_there():
    names = [b.name for b in flashmux.backends()]
    assert "reference" in names
    assert dispatch.availability(dispatch.get_backend("reference")) == []


def test_reason_sentences(fakes):
    flashmux.register(_fake("fast"))
    q, k, v = q16(d=320)
    ex = flashmux.explain(q, k, v)
    assert ex.reasons("fast") == ["head_dim 320 > 256"]
    q, k, v = q16(dtype="float32")
    assert flashmux.explain(q, k, v).reasons("fast") == ["dtype float32 not supported (bfloat16, float16)"]
    flashmux.register(_fake("gpuonly", devices=frozenset({"cuda"})))
    assert "no CUDA device: inputs are on the CPU" in flashmux.explain(q, k, v).reasons("gpuonly")
    flashmux.register(_fake("nocausal", features=frozenset()))
    q, k, v = q16()
    assert flashmux.explain(q, k, v, causal=True).reasons("nocausal") == ["causal masking not supported"]


def test_unavailable_backend_reason(fakes):
    class Missing(Fake):
        def availability(self):
            return ["package triton not installed"]

    flashmux.register(Missing(name="missing", capabilities=_fake("x").capabilities))
    q, k, v = q16()
    assert flashmux.explain(q, k, v).reasons("missing") == ["package triton not installed"]


def test_jit_reason():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    caps = Capabilities(array_kinds=frozenset({"torch"}), devices=frozenset({"cpu"}),
                        dtypes=frozenset({"float32"}), crosses_from=frozenset({"jax"}))
    seen = {}

    def f(q):
        seen["ex"] = flashmux.explain(q, q, q)
        return q

    saved = dict(dispatch.registry())
    try:
        flashmux.register(Fake(name="torchonly", capabilities=caps))
        jax.jit(f)(jnp.ones((1, 4, 2, 8)))
    finally:
        dispatch.registry().clear()
        dispatch.registry().update(saved)
        dispatch.clear_caches()
    assert seen["ex"].reasons("torchonly") == [
        "inside a JAX transformation (jit/grad/vmap): backend serves torch only"
    ]
    assert "traced" in str(seen["ex"])


def test_priority_and_choice(fakes):
    flashmux.register(_fake("fast"))
    q, k, v = q16()
    assert flashmux.explain(q, k, v).chosen == "fast"  # capability priority 1 < reference's 1000
    out = flashmux.attention(q, k, v)
    assert Fake.calls >= 1 and out.shape == (1, 9, 2, 64)


def test_priority_table_file(fakes, tmp_path, monkeypatch):
    flashmux.register(_fake("fast"))
    p = tmp_path / "prio.json"
    p.write_text('{"default": {"numpy": ["reference", "fast"]}}')
    monkeypatch.setenv("FLASHMUX_PRIORITY_FILE", str(p))
    dispatch.clear_caches()
    flashmux.register(_fake("fast"))
    q, k, v = q16()
    assert flashmux.explain(q, k, v).chosen == "reference"


def test_forcing_by_argument_list_context_and_env(fakes, monkeypatch):
    flashmux.register(_fake("fast"))
    q, k, v = q16()
    assert flashmux.explain(q, k, v, backend="reference").chosen == "reference"
    assert flashmux.explain(q, k, v, backend=["reference", "fast"]).chosen == "reference"
    with flashmux.use_backend("reference"):
        assert flashmux.explain(q, k, v).chosen == "reference"
        with flashmux.use_backend("fast"):
            assert flashmux.explain(q, k, v).chosen == "fast"
    monkeypatch.setenv("FLASHMUX_BACKEND", "reference")
    assert flashmux.explain(q, k, v).chosen == "reference"
    # the argument wins over the environment
    assert flashmux.explain(q, k, v, backend="fast").chosen == "fast"


def test_forced_backend_never_falls_back(fakes):
    flashmux.register(_fake("fast"))
    q, k, v = q16(d=320)
    with pytest.raises(flashmux.NoBackendError) as e:
        flashmux.attention(q, k, v, backend="fast")
    assert "fast: head_dim 320 > 256" in str(e.value)
    # a forced list tries only its members, in order
    q, k, v = q16(d=320)
    out = flashmux.attention(q, k, v, backend=["fast", "reference"])
    assert out.shape == (1, 9, 2, 320)


def test_broken_plugin_is_reported_not_raised(fakes):
    flashmux.register(dispatch._Broken("broken", "ImportError: nope"))
    q, k, v = q16()
    ex = flashmux.explain(q, k, v)
    assert ex.reasons("broken") == ["failed to load: ImportError: nope"]
    assert ex.chosen is not None


def test_decisions_are_cached(fakes):
    flashmux.register(_fake("fast"))
    q, k, v = q16()
    flashmux.attention(q, k, v)
    n = Fake.reason_calls
    for _ in range(5):
        flashmux.attention(q, k, v)
    assert Fake.reason_calls == n


def test_explain_table_lists_every_backend():
    q, k, v = q16()
    text = str(flashmux.explain(q, k, v))
    for b in flashmux.backends():
        assert b.name in text
    assert "CHOSEN" in text


class _Lowering(Fake):
    def lowerings(self, q, k, v, params):
        return {"forward": "wide" if q.shape[-1] > 64 else "narrow", "backward": "plain"}


class _BadLowering(Fake):
    def lowerings(self, q, k, v, params):
        raise RuntimeError("no device")


def test_explain_reports_the_chosen_backends_lowering(fakes):
    flashmux.register(_Lowering(name="low", capabilities=_fake("x").capabilities))
    ex = flashmux.explain(*q16(d=128), backend="low")
    assert ex.lowerings == {"forward": "wide", "backward": "plain"}
    assert "low lowering: forward: wide, backward: plain" in str(ex)
    assert flashmux.explain(*q16(d=64), backend="low").lowerings["forward"] == "narrow"
    # a backend without the hook reports nothing; a failing report is shown, never raised
    flashmux.register(_fake("plainfake"))
    assert flashmux.explain(*q16(), backend="plainfake").lowerings is None
    flashmux.register(_BadLowering(name="bad", capabilities=_fake("y").capabilities))
    ex = flashmux.explain(*q16(), backend="bad")
    assert ex.chosen == "bad" and "no device" in ex.lowerings["report"]


def test_explain_rejects_unknown_keywords():
    q, k, v = q16()
    with pytest.raises(TypeError, match="unexpected keyword"):
        flashmux.explain(q, k, v, causel=True)


def test_entry_points_registered():
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group="flashmux.backends")}
    assert "reference" in names


@pytest.mark.parametrize("pkg", ["flashmux_triton", "flashmux_cuda", "flashmux_pallas"])
def test_backend_imported_before_flashmux(pkg):
    """Importing a backend package first imports flashmux from inside it: discovery then sees the
    backend half-initialised and must load it again once it is complete."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} not installed")
    name = pkg.removeprefix("flashmux_")
    code = (
        f"import {pkg}, flashmux\n"
        "from flashmux import dispatch\n"
        f"b = dispatch.registry()['{name}']\n"
        "assert not isinstance(b, dispatch._Broken), dispatch.availability(b)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
