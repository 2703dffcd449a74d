"""GPU tests of the CUDA backend's framework glue (the conformance suite covers the math):
JAX under jax.jit (forward and backward, padded and varlen), torch.compile, non-contiguous and
odd-head-dim inputs, a side CUDA stream, and 64-bit offsets (an input of 2^31 elements).

Judged like the conformance suite: error vs the float64 reference <= 2x plain attention's + 1e-5.
Skipped without a CUDA device or when the backend is unavailable.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import flashmux
from flashmux.reference import reference_backward, reference_forward
from flashmux.testing.gpu import backend_gpu_reasons

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "conformance"))
from harness import ATOL, Case, Framework, make_inputs, max_err  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _available():
    reasons = backend_gpu_reasons("cuda")
    if reasons:
        pytest.skip("cuda backend unavailable: " + "; ".join(reasons))


def _judge(kind, case, q, k, v, cu_q, cu_k, res, do64, keep=None):
    fw = Framework(kind, "cuda")
    q64, k64, v64 = (fw.numpy(x) for x in (q, k, v))
    rkw = dict(
        causal=case.causal,
        window=case.window,
        softcap=case.softcap,
        scale=case.scale,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
    )
    ref = {}
    ref["out"], ref["lse"] = reference_forward(q64, k64, v64, **rkw)
    ref["dq"], ref["dk"], ref["dv"] = reference_backward(do64, q64, k64, v64, **rkw)
    plain = fw.plain(q, k, v, case, cu_q, cu_k, keep, fw.array(do64, case.dtype), None)
    report, bad = [], []
    for name, p in zip(["out", "lse", "dq", "dk", "dv"], plain):
        e_b, e_p = max_err(res[name], ref[name]), max_err(p, ref[name])
        ok = e_b <= 2 * e_p + ATOL
        report.append(f"{name}: backend {e_b:.3g} plain {e_p:.3g} {'ok' if ok else 'FAIL'}")
        if not ok:
            bad.append(name)
    assert not bad, f"{kind} {case.id()}: " + "; ".join(report)
    return report


JIT_CASES = [
    Case(
        batch=2,
        seqlen_q=77,
        seqlen_k=130,
        heads_q=4,
        heads_kv=2,
        head_dim=64,
        causal=True,
        dtype="bfloat16",
    ),
    Case(
        batch=1,
        seqlen_q=65,
        seqlen_k=65,
        heads_q=2,
        heads_kv=1,
        head_dim=128,
        window=(16, 3),
        softcap=4.0,
    ),
    Case(
        seqlens=((5, 7), (0, 3), (40, 33), (1, 1)),
        heads_q=4,
        heads_kv=2,
        head_dim=64,
        dtype="bfloat16",
    ),
    Case(batch=1, seqlen_q=33, seqlen_k=33, heads_q=2, heads_kv=2, head_dim=36),  # padded to 40
]


@pytest.mark.parametrize("case", JIT_CASES, ids=[c.id() for c in JIT_CASES])
def test_jax_jit_forward_backward(case):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip("JAX has no GPU here")
    fw = Framework("jax", "cuda")
    rng = np.random.default_rng(0)
    q64, k64, v64, cu_q, cu_k = make_inputs(case, rng)
    q, k, v = (fw.array(x, case.dtype) for x in (q64, k64, v64))
    do64 = rng.standard_normal(q64.shape[:-1] + (case.dv,))
    do = fw.array(do64, case.dtype)
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale)
    if cu_q is not None:
        kw.update(
            max_seqlen_q=max(a for a, _ in case.seqlens),
            max_seqlen_k=max(b for _, b in case.seqlens),
        )

    @jax.jit
    def run(q, k, v, cq, ck, do):
        def f(q, k, v):
            return flashmux.attention(
                q, k, v, return_lse=True, backend="cuda", cu_seqlens_q=cq, cu_seqlens_k=ck, **kw
            )

        (out, lse), vjp = jax.vjp(f, q, k, v)
        dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
        return out, lse, dq, dk, dv

    cq = None if cu_q is None else jnp.asarray(cu_q)
    ck = None if cu_k is None else jnp.asarray(cu_k)
    outs = run(q, k, v, cq, ck, do)
    text = run.lower(q, k, v, cq, ck, do).as_text()
    assert "flashmux_cuda_fwd" in text and "flashmux_cuda_bwd" in text  # the FFI ran under jit
    res = dict(zip(["out", "lse", "dq", "dk", "dv"], (fw.numpy(x) for x in outs)))
    _judge("jax", case, q, k, v, cu_q, cu_k, res, do64)


def _torch_run(case, q, k, v, do, fn=None, **extra):
    import torch

    qa, ka, va = (x.detach().requires_grad_(True) for x in (q, k, v))
    kw = dict(causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale)

    def f(q, k, v):
        return flashmux.attention(q, k, v, return_lse=True, backend="cuda", **kw, **extra)

    out, lse = (fn or f)(qa, ka, va)
    dq, dk, dv = torch.autograd.grad((out.float() * do.float()).sum(), (qa, ka, va))
    fw = Framework("torch", "cuda")
    return dict(
        zip(["out", "lse", "dq", "dk", "dv"], (fw.numpy(x) for x in (out, lse, dq, dk, dv)))
    )


def _torch_inputs(case, seed=0):
    fw = Framework("torch", "cuda")
    rng = np.random.default_rng(seed)
    q64, k64, v64, cu_q, cu_k = make_inputs(case, rng)
    q, k, v = (fw.array(x, case.dtype) for x in (q64, k64, v64))
    do64 = rng.standard_normal(q64.shape[:-1] + (case.dv,))
    return q, k, v, cu_q, cu_k, fw.array(do64, case.dtype), do64


@pytest.mark.parametrize("d", [20, 36, 64])
def test_torch_noncontiguous_and_odd_head_dims(d):
    """q/k/v sliced out of one fused qkv tensor (strided rows), head dims not multiples of 8."""
    import torch

    case = Case(
        batch=2,
        seqlen_q=45,
        seqlen_k=45,
        heads_q=4,
        heads_kv=4,
        head_dim=d,
        causal=True,
        dtype="bfloat16",
    )
    q, k, v, _, _, do, do64 = _torch_inputs(case)
    qkv = torch.stack([q, k, v], dim=2)  # (B, S, 3, H, D)
    q2, k2, v2 = qkv.unbind(2)
    assert not q2.is_contiguous()
    res = _torch_run(case, q2, k2, v2, do)
    _judge("torch", case, q, k, v, None, None, res, do64)


def test_torch_side_stream():
    import torch

    case = Case(
        batch=2, seqlen_q=200, seqlen_k=300, heads_q=8, heads_kv=2, head_dim=128, dtype="float16"
    )
    q, k, v, _, _, do, do64 = _torch_inputs(case)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        res = _torch_run(case, q, k, v, do)
    torch.cuda.current_stream().wait_stream(s)
    _judge("torch", case, q, k, v, None, None, res, do64)


def test_torch_compile_fullgraph():
    import torch

    case = Case(
        batch=2,
        seqlen_q=64,
        seqlen_k=96,
        heads_q=4,
        heads_kv=1,
        head_dim=64,
        window=(32, 0),
        dtype="bfloat16",
    )
    q, k, v, _, _, do, do64 = _torch_inputs(case)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return flashmux.attention(q, k, v, window=case.window, return_lse=True, backend="cuda")

    res = _torch_run(case, q, k, v, do, fn=f)
    _judge("torch", case, q, k, v, None, None, res, do64)


def test_torch_64bit_offsets():
    """q, k, v of 2^31 elements each: rows past 2^31 elements must land where they belong.
    A sliding window keeps the work small; the last rows are checked against the reference."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    if free < 48 << 30:
        pytest.skip("needs 48 GiB of free GPU memory")
    B, S, H, D, W, R = 1, 1 << 20, 32, 64, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    assert q.numel() >= 2**31
    qa, ka, va = (x.requires_grad_(True) for x in (q, k, v))
    out, lse = flashmux.attention(
        qa, ka, va, causal=True, window=(W, 0), return_lse=True, backend="cuda"
    )
    dq, dk, dv = torch.autograd.grad(out, (qa, ka, va), grad_outputs=do)
    torch.cuda.synchronize()
    f64 = lambda x: x.detach().float().cpu().numpy().astype(np.float64)  # noqa: E731
    qs, ks, vs, dos = (
        f64(q[:, S - R :]),
        f64(k[:, S - R - W :]),
        f64(v[:, S - R - W :]),
        f64(do[:, S - R :]),
    )
    kw = dict(causal=True, window=(W, 0))
    ro, rl = reference_forward(qs, ks, vs, **kw)
    rdq, rdk, rdv = reference_backward(dos, qs, ks, vs, **kw)
    tol = 0.05  # bf16 results of order 1
    assert max_err(f64(out[:, S - R :]), ro) < tol
    assert max_err(f64(lse[:, :, S - R :]), rl) < 1e-3
    assert max_err(f64(dq[:, S - R :]), rdq) < tol
    assert max_err(f64(dk[:, S - R :]), rdk[:, W:]) < tol  # keys fed only by the checked rows
    assert max_err(f64(dv[:, S - R :]), rdv[:, W:]) < tol
