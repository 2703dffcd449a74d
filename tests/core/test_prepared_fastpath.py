"""Prepared eager torch calls (flashmux/_prepared.py): a repeated signature skips the checks and
the dispatch, with the same results as the checked path, a new step whenever the signature or
what the dispatcher reads changes, and forced backends honoured. CPU, tiny shapes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flashmux  # noqa: E402
from flashmux import _prepared, dispatch  # noqa: E402
from flashmux.reference import reference_forward  # noqa: E402


@pytest.fixture(autouse=True)
def fresh():
    _prepared.clear()
    yield
    _prepared.clear()


def qkv(b=1, sq=24, sk=24, hq=4, hkv=2, d=32, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, s, h, d, generator=g, dtype=torch.float32).to(dtype)
          for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    return [x.requires_grad_() for x in xs] if grad else xs


def checked(*a, **kw):
    """The same call through the checked path."""
    _prepared.ENABLED = False
    try:
        return flashmux.attention(*a, **kw)
    finally:
        _prepared.ENABLED = True


def chosen():
    (step,) = _prepared.steps.values()
    return step.be.name


@pytest.mark.parametrize("kw", [dict(causal=True), dict(scale=0.3), dict(return_lse=True)],
                         ids=["causal", "scale", "lse"])
def test_same_results_as_checked_path(kw):
    q, k, v = qkv()
    first = flashmux.attention(q, k, v, **kw)  # checks, dispatch, prepares
    assert len(_prepared.steps) == 1 and chosen() == "native"
    again = flashmux.attention(q, k, v, **kw)  # the prepared step
    ref = checked(q, k, v, **kw)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (again, ref))):
        assert torch.equal(a, b)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (first, ref))):
        assert torch.equal(a, b)
    want, want_lse = reference_forward(*(x.double().numpy() for x in (q, k, v)),
                                       causal=kw.get("causal", False), scale=kw.get("scale"))
    out = again[0] if isinstance(again, tuple) else again
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5)
    if kw.get("return_lse"):
        np.testing.assert_allclose(again[1].numpy(), want_lse, atol=2e-5)


@pytest.mark.parametrize("return_lse", [False, True])
def test_gradients_match_checked_path(return_lse):
    q, k, v = qkv(grad=True)
    grads = []
    for fast in (True, True, False):  # prepare, prepared, checked
        _prepared.ENABLED = fast
        try:
            res = flashmux.attention(q, k, v, causal=True, return_lse=return_lse)
        finally:
            _prepared.ENABLED = True
        out, lse = res if return_lse else (res, None)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        if lse is not None:
            loss = loss + lse.square().sum() * 0.1
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for fast_g in grads[:2]:
        for a, b in zip(fast_g, grads[2]):
            assert torch.equal(a, b)
    assert grads[0][1].shape == k.shape  # dK per KV head (GQA)


def test_new_signature_new_step():
    q, k, v = qkv()
    flashmux.attention(q, k, v, causal=True)
    flashmux.attention(q, k, v, causal=True)
    assert len(_prepared.steps) == 1
    variants = [
        lambda: flashmux.attention(q, k, v, causal=False),
        lambda: flashmux.attention(q[:, :10], k, v),  # Sq != Sk, not causal
        lambda: flashmux.attention(q.double(), k.double(), v.double(), causal=True),  # reference
        lambda: flashmux.attention(*qkv(grad=True), causal=True),
        lambda: flashmux.attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                   causal=True),  # other strides
        lambda: flashmux.attention(q, k, v, causal=True, scale=0.25),
        lambda: flashmux.attention(q, k, v, causal=True, window=(3, 0)),  # native declines
    ]
    for i, call in enumerate(variants):
        call()
        assert len(_prepared.steps) == 2 + i
    names = sorted(s.be.name for s in _prepared.steps.values())
    assert names.count("reference") == 2  # float64 and the window
    # each of those, repeated, is right (not the first step's answer)
    out = flashmux.attention(q, k, v, causal=True, window=(3, 0))
    want, _ = reference_forward(*(x.double().numpy() for x in (q, k, v)), causal=True,
                                window=(3, 0))
    np.testing.assert_allclose(out.numpy(), want, atol=2e-5)


def test_forced_backend_honoured(monkeypatch):
    q, k, v = qkv()
    ref = checked(q, k, v, causal=True, backend="reference")
    for _ in range(2):
        flashmux.attention(q, k, v, causal=True)
    assert chosen() == "native"
    for _ in range(2):  # an argument, a block, the environment: each its own step
        assert torch.equal(flashmux.attention(q, k, v, causal=True, backend="reference"), ref)
        with flashmux.use_backend("reference"):
            assert torch.equal(flashmux.attention(q, k, v, causal=True), ref)
        monkeypatch.setenv("FLASHMUX_BACKEND", "reference")
        assert torch.equal(flashmux.attention(q, k, v, causal=True), ref)
        monkeypatch.delenv("FLASHMUX_BACKEND")
    names = [s.be.name for s in _prepared.steps.values()]
    assert names == ["native", "reference", "reference", "reference"]
    # a forced backend that cannot run the call still fails, prepared or not
    with pytest.raises(flashmux.NoBackendError):
        flashmux.attention(q, k, v, causal=True, softcap=5.0, backend="native")


def test_native_env_flags_are_part_of_the_signature(monkeypatch):
    q, k, v = qkv()
    flashmux.attention(q, k, v, causal=True)
    monkeypatch.setenv("FLASHMUX_NATIVE_KERNELS", "cudnn")  # no CPU kernel left: native declines
    out = flashmux.attention(q, k, v, causal=True)
    assert len(_prepared.steps) == 2
    assert [s.be.name for s in _prepared.steps.values()] == ["native", "reference"]
    torch.testing.assert_close(out, checked(q, k, v, causal=True, backend="reference"))


def test_register_invalidates_steps():
    q, k, v = qkv()
    flashmux.attention(q, k, v)
    (step,) = _prepared.steps.values()
    assert step.valid()
    dispatch.register(dispatch.get_backend("reference"))  # same object, new generation
    assert not step.valid()
    flashmux.attention(q, k, v)
    assert all(s.valid() for s in list(_prepared.steps.values())[-1:])


def test_bad_arguments_still_checked():
    q, k, v = qkv()
    flashmux.attention(q, k, v, causal=True)
    with pytest.raises(TypeError, match="causal"):
        flashmux.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="scale"):
        flashmux.attention(q, k, v, causal=True, scale=True)
    with pytest.raises(ValueError, match="window"):
        flashmux.attention(q, k, v, causal=True, window=(-1, 0))
    with pytest.raises(TypeError, match="dtype"):
        flashmux.attention(q, k.double(), v, causal=True)
    with pytest.raises(ValueError, match="head_dim"):
        flashmux.attention(q, k[..., :16], v, causal=True)


def test_not_taken_under_compile_or_for_subclasses(monkeypatch):
    q, k, v = qkv()
    args = (q, k, v, True, None, None, None, False, False, None)
    assert _prepared.key(*args) is not None
    monkeypatch.setattr(_prepared, "_is_compiling", lambda: True)
    assert _prepared.key(*args) is None
    monkeypatch.undo()

    class Sub(torch.Tensor):
        pass

    assert _prepared.key(q.as_subclass(Sub), k, v, *args[3:]) is None
    assert _prepared.key(q, k, v, True, None, None, None, False, False, ["reference"]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["default", "cudnn", "flash", "efficient"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prepared_equals_checked(monkeypatch, kernel, d):
    """Each torch GPU kernel of native (default: native's own pick, where the runner may call
    SDPA itself): the prepared step gives the checked path's forward outputs bitwise and its
    gradients within bf16 rounding (the GPU backward kernels accumulate dQ with atomics: two runs
    of the same path need not agree bitwise), GQA, causal; its output judged against float64."""
    if kernel != "default":
        monkeypatch.setenv("FLASHMUX_NATIVE_KERNELS", kernel)
    q, k, v = (x.cuda().requires_grad_() for x in qkv(b=2, sq=256, sk=256, hq=8, hkv=2, d=d,
                                                      dtype=torch.bfloat16))
    res = []
    for fast in (True, True, False):
        _prepared.ENABLED = fast
        try:
            out, lse = flashmux.attention(q, k, v, causal=True, return_lse=True, backend="native")
            out2 = flashmux.attention(q, k, v, causal=True, backend="native")
        finally:
            _prepared.ENABLED = True
        grads = torch.autograd.grad((out2.float() * out2.float()).sum(), (q, k, v))
        with torch.no_grad():
            out3 = flashmux.attention(q, k, v, causal=True, backend="native")
        res.append((out, lse, out2, out3) + grads)
    assert {s.be.name for s in _prepared.steps.values()} == {"native"}
    print("runners:", [getattr(s.runner, "kernel", "aten") for s in _prepared.steps.values()])
    names = ("out(lse call)", "lse", "out(grad)", "out(no grad)", "dq", "dk", "dv")
    bad = []
    for run, fast_res in enumerate(res[:2]):
        for name, a, b in zip(names, fast_res, res[2]):
            a, b = a.float(), b.float()
            if name.startswith("d"):
                ok = bool(((a - b).abs() <= 2e-2 * max(1.0, float(b.abs().max()))).all())
            elif name == "out(no grad)":  # cuDNN / efficient run without the lse (SDPA's call)
                ok = bool(((a - b).abs() <= 2e-2).all())
            else:
                ok = torch.equal(a, b)
            if not ok:
                bad.append(f"run {run} {name}: max diff {float((a - b).abs().max()):.3g}")
    assert not bad, bad
    want, _ = reference_forward(*(x.detach().double().cpu().numpy() for x in (q, k, v)),
                                causal=True)
    np.testing.assert_allclose(res[0][0].detach().float().cpu().numpy(), want, atol=2e-2)


def test_sdpa_call_only_when_sdpa_runs_natives_kernel():
    """native's prepared runner calls F.scaled_dot_product_attention when SDPA picks the kernel
    native chose (the CPU flash kernel here), bitwise the aten op's output; SDPA's backend
    switches are part of the signature, so under sdpa_kernel(MATH) the step is a new one that
    keeps the aten op."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(grad=True)
    ref = checked(q, k, v, causal=True)
    for _ in range(2):
        out = flashmux.attention(q, k, v, causal=True)
    (step,) = _prepared.steps.values()
    assert getattr(step.runner, "kernel", None) == "cpu_flash"  # the SDPA route
    assert torch.equal(out, ref)
    g_fast = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g_fast, g_ref))
    with sdpa_kernel(SDPBackend.MATH):
        out = flashmux.attention(q, k, v, causal=True)
    assert len(_prepared.steps) == 2
    assert getattr(list(_prepared.steps.values())[1].runner, "kernel", None) is None  # aten op
    assert torch.equal(out, ref)


def test_deterministic_flag_is_part_of_the_signature():
    q, k, v = qkv()
    flashmux.attention(q, k, v, causal=True)
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = flashmux.attention(q, k, v, causal=True)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    assert len(_prepared.steps) == 2
    assert torch.equal(out, checked(q, k, v, causal=True))
