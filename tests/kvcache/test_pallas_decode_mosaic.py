"""Session 9's Mosaic GPU decode kernel (flashmux_pallas/decode_mosaic.py; opt-in with
FLASHMUX_PALLAS_DECODE=mosaic=1 or decode.tuning(mosaic=1)).

- pallas pass, CPU: the decode routes to it only when asked and in scope, and it lowers to the
  Mosaic GPU custom call for CUDA from the CPU (layouts, wgmma shapes, barriers: not a run);
- FLASHMUX_TEST_MOSAIC_INTERPRET=1: Mosaic GPU's interpreter on the CPU against the float64
  reference (the wgmma calls replaced by dots: the interpreter takes no transposed operand;
  ~10-30 s a case, so not in CI);
- a Hopper GPU under JAX: the compiled kernel judged against the float64 reference."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("FLASHMUX_TEST_BACKEND") != "pallas":
    pytest.skip("runs in the pallas pass only", allow_module_level=True)
jax = pytest.importorskip("jax")
jnp = jax.numpy

from flashmux import reference  # noqa: E402
from flashmux.kvcache import DecodeParams  # noqa: E402


def _gpu_sm90() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 9.0
    except Exception:
        return False


def _params(causal, ns, d):
    return DecodeParams(scale=d**-0.5, causal=causal, window_left=None,
                        window_right=0 if causal else None, softcap=None, alibi=False,
                        num_splits=ns, page_size=0, return_lse=True)


def _case(b, sq, hq, hkv, d, cap, lens, seed, page=0):
    """((q, k_cache, v_cache, lens), block_table or None, float64 inputs of the reference);
    a paged cache gets a shuffled table over a pool with 3 spare pages."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, cap, hkv, d)).astype(np.float32)
    bf = jnp.bfloat16
    qj, kj, vj = (jnp.asarray(x).astype(bf) for x in (q, k, v))
    # the reference sees the bf16-rounded inputs
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (qj, kj, vj))
    table = None
    if page:
        n = b * cap // page
        order = rng.permutation(n + 3)[:n]
        kj = jnp.zeros((n + 3, page, hkv, d), bf).at[order].set(kj.reshape(n, page, hkv, d))
        vj = jnp.zeros((n + 3, page, hkv, d), bf).at[order].set(vj.reshape(n, page, hkv, d))
        table = jnp.asarray(order.astype(np.int32).reshape(b, cap // page))
    return (qj, kj, vj, jnp.asarray(np.asarray(lens, np.int32))), table, (q64, k64, v64)


def _judge(out, lse, ref_in, lens, causal):
    q64, k64, v64 = ref_in
    ref_out, ref_lse, _, _ = reference.attention_with_kvcache(
        q64, k64, v64, cache_seqlens=np.asarray(lens, np.int32), causal=causal)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert np.abs(lse[fin] - ref_lse[fin]).max() < 1e-3
    # bf16 output: rounding of values of magnitude <= ~3
    assert np.abs(out - np.nan_to_num(ref_out)).max() < 2e-2


def test_routing_and_lowering_for_cuda(monkeypatch):
    """decode() takes the Mosaic kernel only on sm90, under mosaic=1 (or MOSAIC_DEFAULT) and in
    scope (48-token pages and float32 stay on the Triton lowering); at the benchmark shape it
    lowers from the CPU (the device is made to look like an sm90 GPU)."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    from flashmux_pallas import decode, ops

    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))

    B, Hq, Hkv, D, S = 8, 32, 8, 128, 4096
    bf = jnp.bfloat16
    q = jax.ShapeDtypeStruct((B, 1, Hq, D), bf)
    kc = jax.ShapeDtypeStruct((B, S, Hkv, D), bf)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)

    def lowered(ns, **tune):
        p = _params(True, ns, D)
        f = jax.jit(lambda q, k, v, n: decode.decode(q, k, v, n, None, None, p, False))
        with decode.tuning(**tune):
            return f.trace(q, kc, kc, lens).lower(lowering_platforms=("cuda",)).as_text()

    for ns, nc in ((1, 1), (2, 1), (2, 2)):  # contiguous; one or two consumer warpgroups
        txt = lowered(ns, mosaic=1, consumers=nc)
        assert "mosaic_gpu" in txt and "triton" not in txt.lower()
    assert ("mosaic_gpu" in lowered(2)) == bool(decode.MOSAIC_DEFAULT)
    assert "mosaic_gpu" not in lowered(2, mosaic=0)
    monkeypatch.setattr(ops, "_compute_capability", lambda: (8, 0))
    assert "mosaic_gpu" not in lowered(2, mosaic=1)  # sm80: the Triton lowering
    monkeypatch.setattr(ops, "_compute_capability", lambda: (9, 0))
    # 16-token pages (4 TMA copies a tile) at the benchmark shape
    pages = jax.ShapeDtypeStruct((B * S // 16, 16, Hkv, D), bf)
    table = jax.ShapeDtypeStruct((B, S // 16), jnp.int32)
    p16 = _params(True, 2, D)
    with decode.tuning(mosaic=1):
        f = jax.jit(lambda q, k, v, n, t: decode.decode(q, k, v, n, t, None, p16, False))
        assert "mosaic_gpu" in f.trace(q, pages, pages, lens, table).lower(
            lowering_platforms=("cuda",)).as_text()
    p = _params(True, 2, D)
    pages48 = jax.ShapeDtypeStruct((64, 48, Hkv, D), bf)
    assert decode.decode_mosaic_reasons(q, pages48, pages48, p, paged=True)
    pages16 = jax.ShapeDtypeStruct((64, 16, Hkv, D), bf)
    assert not decode.decode_mosaic_reasons(q, pages16, pages16, p, paged=True)
    f32 = jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.float32)
    assert decode.decode_mosaic_reasons(jax.ShapeDtypeStruct((B, 1, Hq, D), jnp.float32),
                                        f32, f32, p, paged=False)


@pytest.mark.skipif(os.environ.get("FLASHMUX_TEST_MOSAIC_INTERPRET") != "1",
                    reason="Mosaic GPU interpreter: slow, FLASHMUX_TEST_MOSAIC_INTERPRET=1")
@pytest.mark.parametrize("sq,causal,ns,lens,page,nc", [
    (1, True, 2, (100, 256), 0, 1), (2, False, 1, (0, 256), 0, 1), (3, True, 3, (37, 256), 0, 1),
    (2, True, 2, (100, 256), 16, 1), (1, True, 2, (100, 256), 128, 1),
    (1, True, 2, (100, 256), 0, 2), (2, False, 1, (0, 256), 16, 2)])
def test_interpreted_kernel_matches_reference(sq, causal, ns, lens, page, nc):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from flashmux_pallas import decode_mosaic

    args, table, ref_in = _case(2, sq, 8, 2, 64, 256, lens, seed=sq, page=page)
    out, lse = decode_mosaic.decode(*args, _params(causal, ns, 64), interpret=InterpretGPUParams(),
                                    block_table=table, block_n=64, stages=2, consumers=nc)
    _judge(out, lse, ref_in, lens, causal)


@pytest.mark.skipif(not _gpu_sm90(), reason="needs a Hopper GPU under JAX")
@pytest.mark.parametrize("sq,hq,hkv,d,causal,ns,bn,stages,page,nc", [
    (1, 32, 8, 128, True, None, 0, 0, 0, 1), (1, 32, 8, 128, True, 1, 0, 0, 0, 1),
    (4, 32, 8, 128, True, 3, 128, 2, 0, 1), (1, 8, 1, 64, False, None, 0, 0, 0, 1),
    (16, 16, 4, 128, True, 2, 64, 4, 0, 1), (1, 32, 8, 128, True, None, 0, 0, 16, 1),
    (4, 32, 8, 128, True, 3, 0, 0, 64, 1), (1, 32, 8, 128, True, 2, 0, 0, 256, 1),
    (1, 32, 8, 128, True, None, 0, 2, 0, 1), (1, 32, 8, 128, True, None, 0, 0, 0, 2),
    (4, 32, 8, 128, True, 1, 0, 0, 16, 2)])
def test_compiled_kernel_matches_reference(sq, hq, hkv, d, causal, ns, bn, stages, page, nc):
    from flashmux_pallas import decode_mosaic

    cap = 2048
    lens = (cap, 0, 1, 1000)
    args, table, ref_in = _case(4, sq, hq, hkv, d, cap, lens, seed=hq + d + sq, page=page)
    out, lse = decode_mosaic.decode(*args, _params(causal, ns, d), block_table=table,
                                    block_n=bn, stages=stages, consumers=nc)
    _judge(out, lse, ref_in, lens, causal)


@pytest.mark.skipif(not _gpu_sm90(), reason="needs a Hopper GPU under JAX")
@pytest.mark.parametrize("page", [0, 16])
def test_compiled_kernel_lowers_with_a_readable_error(page, monkeypatch):
    """Lowering alone at the benchmark shape; when Mosaic GPU's layout inference rejects the
    kernel, the failure names its reason (jax 0.11.2's divisibility report asserts inside its
    own error path: retried without that report)."""
    from jax.experimental.mosaic.gpu import layout_inference as li

    from flashmux_pallas import decode_mosaic

    args, table, _ = _case(8, 1, 32, 8, 128, 4096, (4096,) * 8, seed=1, page=page)
    p = _params(True, None, 128)

    def lower():
        jax.jit(lambda q, k, v, n, t: decode_mosaic.decode(q, k, v, n, p, block_table=t)).lower(
            *args, table)

    try:
        lower()
    except Exception as e:  # noqa: BLE001 - reported below
        msg = f"{type(e).__name__}: {e}"
        name = "_check_unsatisfiable_divisibility_constraints"
        if hasattr(li, name):
            monkeypatch.setattr(li, name, lambda *a, **k: None)
            try:
                lower()
                msg += "\n(lowers without the divisibility report)"
            except Exception as e2:  # noqa: BLE001
                msg += f"\nwithout the divisibility report: {type(e2).__name__}: {e2}"
        pytest.fail(msg[:8000])
