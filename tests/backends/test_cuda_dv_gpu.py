"""GPU tests of the CUDA backend with head_dim_v != head_dim (Dv != D; issue 12, session 9).

Compute capability 9.0 only (the lent H200s; the sm80 family is forced there too); skipped
elsewhere. The kernels of max(D, Dv) run the call, the smaller head dim zero-filled on load
(csrc/common/fmx_params.h): the sm90 forward where it has that instantiation, the sm90 backward
where max(D, Dv) <= 128 (and not 65..96), else sm80 (explain's lowerings say so). out, lse, dq, dk and dv of both forward families are judged
against the float64 reference with the suite's rule: error <= 2x plain attention's in the same
dtype (float32 softmax) + 1e-5, on fresh random inputs.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import flashmux
from flashmux.reference import reference_backward, reference_forward

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cuda_sm90_bwd_gpu as base  # noqa: E402  (skip fixture, plain grads, error)

pytestmark = pytest.mark.gpu
_hopper = base._hopper  # the module's skip: no cuda backend on compute capability 9.0

CASES = [
    # DeepSeek-V3/MLA prefill (D = 128 nope + 64 rope, Dv 128): tails, GQA, causal Sq < Sk
    dict(B=2, Sq=300, Sk=517, Hq=4, Hkv=2, D=192, Dv=128, causal=True),
    dict(B=1, Sq=256, Sk=256, Hq=8, Hkv=1, D=128, Dv=64, causal=False),  # MQA
    dict(B=2, Sq=517, Sk=300, Hq=2, Hkv=2, D=64, Dv=128, causal=True),  # Dv > D, rows w/o keys
    dict(B=1, Sq=129, Sk=70, Hq=4, Hkv=2, D=64, Dv=32, causal=False),  # the conformance shape
    dict(B=1, Sq=200, Sk=333, Hq=4, Hkv=2, D=256, Dv=128, causal=False, window=(60, 20),
         lse_grad=True),
    dict(B=1, Sq=150, Sk=150, Hq=2, Hkv=2, D=96, Dv=64, causal=True),  # sm90 96 fwd, sm80 bwd
    dict(B=1, Sq=100, Sk=170, Hq=2, Hkv=1, D=40, Dv=72, causal=False),  # 72: the 96 kernels
]
FP16 = {0, 2}  # case indices also run in float16


def _sm90_forward(D, Dv):
    return max(D, Dv) <= 256  # 65..96 too since session 10 (the 96 instantiation)


def _inputs(B, Sq, Sk, Hq, Hkv, D, Dv, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv), (B, Sq, Hq, Dv))
    return [torch.randn(s, generator=g).to(dtype).cuda() for s in shapes]


def _run(case, dtype, family, monkeypatch):
    if family == "sm80":
        monkeypatch.setenv("FLASHMUX_CUDA_FAMILY", "sm80")
    else:
        monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    for var in ("FLASHMUX_CUDA_BWD_FAMILY", "FMX_TUNE_SM90", "FLASHMUX_CUDA_SM90_PAD96"):
        monkeypatch.delenv(var, raising=False)
    c = dict(case)
    causal, window, lse_grad = c.pop("causal"), c.pop("window", None), c.pop("lse_grad", False)
    q, k, v, do = _inputs(**c, dtype=getattr(torch, dtype), seed=23)
    scale = 1.0 / math.sqrt(c["D"])
    kw = dict(causal=causal, window=window, backend="cuda")
    ex = flashmux.explain(q, k, v, return_lse=True, **kw)
    want = "sm90" if family == "sm90" and _sm90_forward(c["D"], c["Dv"]) else "sm80"
    assert ex.lowerings["forward"].startswith(want), ex.lowerings
    back = ex.lowerings["backward"]
    # the sm90 backward where the sm90 forward runs at max(D, Dv) <= 64 or 97..128, else sm80
    kd = max(c["D"], c["Dv"])
    want_b = "sm90" if want == "sm90" and (kd <= 64 or 96 < kd <= 128) else "sm80"
    assert back.startswith(want_b), back
    dlse, mine = base.autograd(q, k, v, do, lse_grad, **kw)
    assert mine[0].shape == do.shape, (mine[0].shape, do.shape)
    return (q, k, v, do, dlse, causal, window, scale), mine


def _params():
    out = []
    for i, case in enumerate(CASES):
        for dtype in ("bfloat16", "float16") if i in FP16 else ("bfloat16",):
            for family in ("sm90", "sm80"):
                cid = "-".join(f"{k}{v}" for k, v in case.items())
                out.append(pytest.param(case, dtype, family, id=f"{family}-{dtype}-{cid}"))
    return out


@pytest.mark.parametrize("case, dtype, family", _params())
def test_dv_forward_backward_vs_reference(case, dtype, family, monkeypatch):
    (q, k, v, do, dlse, causal, window, scale), mine = _run(case, dtype, family, monkeypatch)
    npf = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    rkw = dict(causal=causal, window=window, scale=scale)
    r_out, r_lse = reference_forward(npf(q), npf(k), npf(v), **rkw)
    r_grads = reference_backward(npf(do), npf(q), npf(k), npf(v), dlse=npf(dlse), **rkw)
    plain = base._plain_grads(q, k, v, do, dlse, causal, window, scale)
    for name, m, p, r in zip(
        ("out", "lse", "dq", "dk", "dv"), mine, plain, (r_out, r_lse, *r_grads)
    ):
        assert tuple(m.shape) == tuple(r.shape), (name, m.shape, r.shape)
        e_m, e_p = base._err(m, r), base._err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: {family} {e_m:.3g} vs plain {e_p:.3g}"


def test_dv_out_columns_past_dv_untouched(monkeypatch):
    """out is a view of a wider buffer (row stride > Dv): the kernels store Dv columns only, so
    the columns past Dv keep their sentinel (the forward's O tile is max(D, Dv) wide)."""
    import flashmux_cuda
    from flashmux.spec import Params
    from flashmux_cuda import abi, torch_glue

    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    q, k, v, _ = _inputs(1, 130, 200, 4, 2, 192, 128, torch.bfloat16, seed=5)
    wide = torch.full((1, 130, 4, 192), 7.0, dtype=torch.bfloat16, device="cuda")
    out = wide[..., :128]
    lse = torch.empty((1, 4, 130), dtype=torch.float32, device="cuda")
    params = Params(scale=1.0 / math.sqrt(192), causal=True)
    be = flashmux_cuda.backend
    args = abi.make_args(torch_glue._ref("q", q), torch_glue._ref("k", k), torch_glue._ref("v", v),
                         torch_glue._ref("out", out), lse.data_ptr(), params)
    be.lib.forward(args, torch_glue._stream(q.device))
    torch.cuda.synchronize()
    assert torch.all(wide[..., 128:] == 7.0)
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    r_out, _ = reference_forward(npf(q), npf(k), npf(v), causal=True, scale=1.0 / math.sqrt(192))
    assert np.abs(npf(out) - r_out).max() < 3e-2


def test_jax_dv_matches_reference():
    """The XLA FFI path (out and dout strides of Dv columns): jax.grad under jit, D 192 / Dv 128,
    judged against the float64 reference with plain attention's error (torch, same dtype)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip("JAX sees no GPU")
    case = dict(B=2, Sq=200, Sk=300, Hq=4, Hkv=2, D=192, Dv=128)
    q, k, v, do = _inputs(**case, dtype=torch.bfloat16, seed=31)
    scale = 1.0 / math.sqrt(192)
    to_j = lambda t: jnp.asarray(t.float().cpu().numpy(), dtype=jnp.bfloat16)  # noqa: E731
    qj, kj, vj, doj = (to_j(t) for t in (q, k, v, do))

    def loss(q_, k_, v_):
        o = flashmux.attention(q_, k_, v_, causal=True, backend="cuda")
        return (o.astype(jnp.float32) * doj.astype(jnp.float32)).sum(), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(qj, kj, vj)
    npf = lambda t: t.float().cpu().numpy()  # noqa: E731
    rkw = dict(causal=True, window=None, scale=scale)
    r_out, _ = reference_forward(npf(q), npf(k), npf(v), **rkw)
    r_grads = reference_backward(npf(do), npf(q), npf(k), npf(v), **rkw)
    plain = base._plain_grads(q, k, v, do, None, True, None, scale)
    mine = (o, *grads)
    for name, m, p, r in zip(("out", "dq", "dk", "dv"), mine, (plain[0], *plain[2:]),
                             (r_out, *r_grads)):
        m = np.asarray(m.astype(jnp.float32), dtype=np.float64)
        assert m.shape == r.shape, (name, m.shape, r.shape)
        e_m = float(np.abs(m - r).max())
        e_p = base._err(p, r)
        assert e_m <= 2 * e_p + 1e-5, f"{name}: jax {e_m:.3g} vs plain {e_p:.3g}"


def test_dv_varlen_vs_reference(monkeypatch):
    """Packed sequences (cu_seqlens: the sm80 kernels) with D 128 / Dv 64, causal, an empty query
    sequence (its keys' dk, dv are 0) and a length-1 one; each sequence judged against the
    float64 reference with plain attention's error on that sequence."""
    monkeypatch.delenv("FLASHMUX_CUDA_FAMILY", raising=False)
    lens = [(37, 50), (0, 9), (100, 81), (1, 1)]
    D, Dv, Hq, Hkv = 128, 64, 4, 2
    tq, tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    g = torch.Generator(device="cpu").manual_seed(41)
    mk = lambda *s: torch.randn(s, generator=g).to(torch.bfloat16).cuda()  # noqa: E731
    q, k, v, do = mk(tq, Hq, D), mk(tk, Hkv, D), mk(tk, Hkv, Dv), mk(tq, Hq, Dv)
    cq = torch.tensor([0] + list(np.cumsum([a for a, _ in lens])), dtype=torch.int32).cuda()
    ck = torch.tensor([0] + list(np.cumsum([b for _, b in lens])), dtype=torch.int32).cuda()
    scale = 1.0 / math.sqrt(D)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = flashmux.attention(qg, kg, vg, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True,
                             backend="cuda")
    assert out.shape == (tq, Hq, Dv)
    (out.float() * do.float()).sum().backward()
    torch.cuda.synchronize()
    npf = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    q0 = k0 = 0
    for sq, sk in lens:
        sl_q, sl_k = slice(q0, q0 + sq), slice(k0, k0 + sk)
        q0, k0 = q0 + sq, k0 + sk
        if sq == 0:
            assert torch.all(kg.grad[sl_k] == 0) and torch.all(vg.grad[sl_k] == 0)
            continue
        qs, ks, vs, dos = (t[None] for t in (q[sl_q], k[sl_k], v[sl_k], do[sl_q]))
        rkw = dict(causal=True, window=None, scale=scale)
        r_out, _ = reference_forward(npf(qs), npf(ks), npf(vs), **rkw)
        r_grads = reference_backward(npf(dos), npf(qs), npf(ks), npf(vs), **rkw)
        plain = base._plain_grads(qs, ks, vs, dos, None, True, None, scale)
        mine = (out[sl_q][None], qg.grad[sl_q][None], kg.grad[sl_k][None], vg.grad[sl_k][None])
        for name, m, p, r in zip(("out", "dq", "dk", "dv"), mine, (plain[0], *plain[2:]),
                                 (r_out, *r_grads)):
            e_m, e_p = base._err(m, r), base._err(p, r)
            assert e_m <= 2 * e_p + 1e-5, f"seq {sq}x{sk} {name}: {e_m:.3g} vs plain {e_p:.3g}"
