"""The Pallas backend's kernels in interpret mode (CPU), judged against flashmux.reference.

Each case runs flashmux.attention(backend="pallas") with return_lse under jax.jit (or vmap, or
eagerly) and its VJP for a random dO (and dlse), and applies SPEC.md's rule:
error <= 2 * error(plain JAX attention in the same precision) + 1e-5 for out, lse, dq, dk, dv.
Interpret mode uses 16x16 blocks, so these small shapes still cross several blocks, tails,
diagonals and window edges. Inputs are fresh random numbers every run; a failure prints its seed,
and FLASHMUX_TEST_SEED replays it.
"""

from __future__ import annotations

import os

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")

import numpy as np  # noqa: E402

from flashmux_pallas import backend  # noqa: E402
from flashmux_pallas._check import Case, passes  # noqa: E402
from flashmux_pallas.ops import Blocks, Config, use_config  # noqa: E402

CASES = [
    Case(),
    Case(seqlen_q=37, seqlen_k=37, causal=True),
    Case(
        seqlen_q=20,
        seqlen_k=45,
        heads_q=4,
        heads_kv=2,
        head_dim=24,
        head_dim_v=16,
        causal=True,
        lse_grad=True,
    ),
    Case(seqlen_q=45, seqlen_k=20, heads_q=4, heads_kv=1, causal=True),  # MQA, Sq > Sk: empty rows
    Case(seqlen_q=40, seqlen_k=40, window=(5, 3)),
    Case(seqlen_q=40, seqlen_k=29, window=(7, None), causal=True),
    Case(seqlen_q=33, seqlen_k=50, window=(None, 4)),
    Case(seqlen_q=35, seqlen_k=35, softcap=2.5, causal=True),
    Case(seqlen_q=33, seqlen_k=33, head_dim=40, head_dim_v=72),
    Case(seqlen_q=24, seqlen_k=24, head_dim=256, batch=1, heads_q=1, heads_kv=1),
    Case(seqlens=((5, 9), (0, 3), (20, 17), (4, 0)), heads_q=4, heads_kv=1, causal=True),
    Case(seqlens=((18, 30), (33, 12)), heads_q=2, heads_kv=2, window=(4, 2), lse_grad=True),
    Case(dropout_p=0.3, causal=True),
    Case(seqlens=((17, 21), (9, 30)), dropout_p=0.25, heads_q=2, heads_kv=1),
    Case(transform="vmap", causal=True, heads_q=4, heads_kv=2),
]
# float16 / bfloat16 and eager calls: the Pallas pass of tests/conformance runs every one of its
# cases eagerly in float16 (windows, softcap, causal GQA among them) and four in bfloat16, with
# the same judge, so this list keeps float32 under jit and vmap (CI time)


def _seed() -> int:
    env = os.environ.get("FLASHMUX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_against_reference(case):
    ok, draws = passes(case, _seed())
    assert ok, draws


@pytest.mark.parametrize(
    "fused_delta,one_loop,scale_ds", [(True, False, True), (False, True, False)]
)
def test_uneven_blocks(fused_delta, one_loop, scale_ds):
    """block_m != block_n in every kernel: the masked/unmasked ranges still cover each key once.
    Both backward schedules: delta inside the dQ kernel (run first), or in XLA before dK/dV; the
    single all-masked loop variant; dS rounded after (default) or before the scale."""
    cfg = Config(
        Blocks(32, 16, 4, 1),
        Blocks(16, 32, 4, 1),
        Blocks(32, 16, 4, 1),
        fused_delta=fused_delta,
        one_loop=one_loop,
        scale_ds=scale_ds,
    )
    cases = (
        Case(seqlen_q=50, seqlen_k=70, causal=True, window=(9, None), heads_q=2, heads_kv=1),
        Case(seqlen_q=70, seqlen_k=50, window=(3, 11)),
    )
    if not fused_delta:  # the other schedule: also varlen, dlse and a low precision
        cases += (
            Case(seqlens=((18, 30), (33, 12)), window=(4, 2), lse_grad=True, dtype="float16"),
        )
    with use_config(cfg):
        for case in cases:
            ok, draws = passes(case, _seed())
            assert ok, (case.id(), draws)


def test_dropout_mask_statistics():
    m = np.asarray(backend.dropout_keep_mask(123, 0.3, 2, 3, 64, 80))
    assert m.shape == (2, 3, 64, 80) and m.dtype == bool
    n = m.size
    rate = m.mean()
    assert abs(rate - 0.7) <= 4 * np.sqrt(0.3 * 0.7 / n)
    # a different seed, batch or head gives a different mask
    m2 = np.asarray(backend.dropout_keep_mask(124, 0.3, 2, 3, 64, 80))
    assert (m != m2).mean() > 0.3
    assert (m[0, 0] != m[1, 0]).mean() > 0.3 and (m[0, 0] != m[0, 1]).mean() > 0.3


def test_fully_masked_rows_are_zero_not_nan():
    import jax.numpy as jnp

    import flashmux

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 30, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 10, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 10, 2, 16)), jnp.float32)

    def f(q, k, v):
        out, lse = flashmux.attention(q, k, v, causal=True, return_lse=True, backend="pallas")
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        q, k, v
    )
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[:, :20] == 0) and np.all(np.isneginf(lse[:, :, :20]))
    assert not any(np.isnan(np.asarray(g)).any() for g in grads)
    assert np.all(np.asarray(grads[0])[:, :20] == 0)


def test_capabilities_and_lazy_import():
    import subprocess
    import sys

    code = "import sys, flashmux_pallas; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    caps = backend.capabilities
    assert caps.array_kinds == {"jax"} and caps.runs_under_jit
    assert {"cuda", "cpu"} <= caps.devices and caps.max_head_dim == 256
    assert backend.availability() == []


def test_lowering_choice(monkeypatch):
    """On sm90 the forward takes Mosaic GPU where it was measured faster, Triton elsewhere."""
    import jax.numpy as jnp

    from flashmux.spec import Params
    from flashmux_pallas import mosaic_kernels, ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(mosaic_kernels, "available", lambda: True)
    x = lambda s, d, dt=jnp.bfloat16: jnp.zeros((1, s, 2, d), dt)  # noqa: E731
    dense = Params(scale=0.1)
    causal = Params(scale=0.1, causal=True, window_right=0)
    monkeypatch.setattr(ops, "MOSAIC_MODE", "auto")
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), dense, False) == "mosaic_gpu"
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), causal, False) == "mosaic_gpu"
    assert ops.lowering(x(256, 64), x(256, 64), x(256, 64), dense, False) == "mosaic_gpu"
    # D=64 streams 256-key tiles, or 128-key tiles where Sk is not a multiple of 256
    assert ops.lowering(x(256, 64), x(384, 64), x(384, 64), dense, False) == "mosaic_gpu"
    assert mosaic_kernels.config_for(64, 384).block_kv == 128
    assert mosaic_kernels.config_for(64, 512).block_kv == 256
    assert mosaic_kernels.config_for(64, 2048, causal=True).block_kv == 128
    assert mosaic_kernels.config_for(64, 4096, causal=True).block_kv == 256
    assert mosaic_kernels.config_for(128, 4096).block_kv == 128
    assert ops.lowering(x(256, 64), x(200, 64), x(200, 64), dense, False) == "triton"
    assert ops.lowering(x(256, 96), x(256, 96), x(256, 96), dense, False) == "triton"
    assert ops.lowering(x(256, 128), x(384, 128), x(384, 128), causal, False) == "triton"
    assert ops.lowering(x(200, 128), x(256, 128), x(256, 128), dense, False) == "triton"
    assert (
        ops.lowering(
            x(256, 128, jnp.float32),
            x(256, 128, jnp.float32),
            x(256, 128, jnp.float32),
            dense,
            False,
        )
        == "triton"
    )
    win = Params(scale=0.1, window_left=8, window_right=0, causal=True)
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), win, False) == "triton"
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), dense, True) == "interpret"
    monkeypatch.setattr(ops, "MOSAIC_MODE", "on")
    assert ops.lowering(x(256, 64), x(256, 64), x(256, 64), dense, False) == "mosaic_gpu"
    monkeypatch.setattr(ops, "MOSAIC_MODE", "off")
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), dense, False) == "triton"
    monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
    monkeypatch.setattr(ops, "MOSAIC_MODE", "auto")
    assert ops.lowering(x(256, 128), x(256, 128), x(256, 128), dense, False) == "triton"


def test_inside_shard_map():
    """Per-shard calls: the kernels' outputs carry the inputs' shard_map typing."""
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import flashmux

    try:
        from jax import shard_map
    except ImportError:  # older jax
        from jax.experimental.shard_map import shard_map

    mesh = Mesh(np.array(jax.devices()[:1]), ("b",))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 20, 2, 16)), jnp.float32) for _ in range(3))

    def attn(q, k, v):
        return flashmux.attention(q, k, v, causal=True, backend="pallas")

    f = shard_map(attn, mesh=mesh, in_specs=(P("b"),) * 3, out_specs=P("b"))
    out = jax.jit(f)(q, k, v)
    ref = flashmux.attention(q, k, v, causal=True, backend="reference")
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


@pytest.mark.parametrize("varlen", [False, True])
def test_out_residual(varlen):
    """forward(residual=True) adds out_residual = float32 out - out (out's shape and dtype): r is
    at most half an ulp of out, out + r is closer to the float64 output than out (the float32
    output still carries P's rounding in the PV matmul); residual=False writes no extra output."""
    import jax.numpy as jnp

    from flashmux.reference import reference_forward
    from flashmux.spec import Params
    from flashmux_pallas import ops

    assert backend.capabilities.out_residual
    rng = np.random.default_rng(_seed())
    shape_q, shape_k = ((41, 2, 32), (37, 1, 32)) if varlen else ((2, 41, 2, 32), (2, 37, 1, 32))
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float16) for s in (shape_q, shape_k, shape_k)
    )
    cu_q = jnp.asarray([0, 30, 41], jnp.int32) if varlen else None
    cu_k = jnp.asarray([0, 12, 37], jnp.int32) if varlen else None
    p = Params(scale=32**-0.5, causal=True, window_right=0, window_left=6)
    if varlen:
        p = Params(
            scale=32**-0.5,
            causal=True,
            window_right=0,
            window_left=6,
            varlen=True,
            max_seqlen_q=30,
            max_seqlen_k=25,
        )
    out, lse, r = ops.forward(q, k, v, cu_q, cu_k, p, residual=True)
    assert r.shape == out.shape and r.dtype == out.dtype
    c = lambda x: None if x is None else np.asarray(x)  # noqa: E731
    ref, _ = reference_forward(
        *(np.asarray(x, np.float64) for x in (q, k, v)),
        causal=True,
        window=(6, 0),
        cu_seqlens_q=c(cu_q),
        cu_seqlens_k=c(cu_k),
    )
    o, r = np.asarray(out, np.float64), np.asarray(r, np.float64)
    # mean, not max, absolute errors: over 60 seeds each the ratio of means was 0.48-0.54 (the
    # ratio of maxima reached 0.78, and failed this bound in a CI run); an r of zeros gives 1.0
    e_rounded, e_fixed = np.abs(o - ref).mean(), np.abs(o + r - ref).mean()
    assert np.abs(r).max() > 0 and e_fixed < 0.7 * e_rounded, (e_fixed, e_rounded)
    assert np.all(np.abs(r) <= np.abs(o) * 2.0**-11 + 2.0**-25)
    out2, lse2 = ops.forward(q, k, v, cu_q, cu_k, p)
    assert np.array_equal(np.asarray(out2), np.asarray(out))
    # residual=False: the kernel has exactly two outputs (out and lse)
    jaxpr = jax.make_jaxpr(lambda q, k, v: ops.forward(q, k, v, cu_q, cu_k, p))(q, k, v)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert calls and all(len(e.outvars) == 2 for e in calls)
    # through the core: jax.vjp asks for the residual (3 forward outputs), a plain call does not
    import flashmux

    def fwd_outs(fn):
        eqns = []

        def walk(jx):
            for e in jx.eqns:
                label = str(e.params.get("name", "")) + str(e.params.get("name_and_src_info", ""))
                if e.primitive.name == "pallas_call" and "flashmux_fwd" in label:
                    eqns.append(len(e.outvars))
                for v in e.params.values():
                    for x in v if isinstance(v, (list, tuple)) else [v]:
                        inner = getattr(x, "jaxpr", None)
                        if inner is not None:
                            walk(getattr(inner, "jaxpr", inner))

        walk(jax.make_jaxpr(fn)(q, k, v).jaxpr)
        return eqns

    kw = dict(causal=True, backend="pallas")
    if not varlen:
        assert fwd_outs(lambda q, k, v: flashmux.attention(q, k, v, **kw)) == [2]
        grad_outs = fwd_outs(
            lambda q, k, v: jax.vjp(lambda q: flashmux.attention(q, k, v, **kw), q)
        )
        assert grad_outs == [3], grad_outs
    # float32: the residual is zeros and the kernel still writes two outputs
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    *_, r32 = ops.forward(q32, k32, v32, cu_q, cu_k, p, residual=True)
    assert r32.dtype == jnp.float32 and not np.asarray(r32).any()


def test_mosaic_backward_in_the_mosaic_gpu_interpreter():
    """The Hopper backward (mosaic_backward.py) has no GPU in CI: interpret_check.py runs its
    kernels under Mosaic GPU's CPU interpreter (barrier protocol, TMA indexing, masks, math) and
    judges SPEC cases through flashmux.attention. A subprocess: it relaxes one interpreter check
    for the whole process."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("absl") is None:
        pytest.skip("absl-py not installed (jax.experimental.mosaic.gpu imports it)")
    try:
        from jax._src.pallas.mosaic_gpu.interpret import params  # noqa: F401
    except ImportError:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    script = Path(__file__).resolve().parents[2] / "packages/backend_pallas/interpret_check.py"
    r = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=900
    )
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.startswith(("PASS", "FAIL"))]
    assert r.returncode == 0 and lines and not any(x.startswith("FAIL") for x in lines), (
        r.stdout[-4000:] + r.stderr[-4000:]
    )


def test_passes_redraws_a_failing_draw(monkeypatch):
    """_check.passes: a lone failing draw is redrawn (and warned about); a case that fails again
    on a redraw fails."""
    from flashmux_pallas import _check

    def fake(verdicts):
        it = iter(verdicts)
        monkeypatch.setattr(_check, "run_case", lambda c, seed: {"out": (next(it), 1.0)})

    fake([2.0, 0.5, 0.5])
    with pytest.warns(UserWarning, match="one draw out of bound"):
        ok, draws = passes(Case(), 1)
    assert ok and len(draws) == 3 and len({s for s, _ in draws}) == 3
    fake([2.0, 0.5, 2.0])
    ok, draws = passes(Case(), 1)
    assert not ok and len(draws) == 3
    fake([0.5])
    assert passes(Case(), 1)[0]
