"""Issue 19's API inconsistencies: plain Python lists raise TypeError (not AttributeError), flags
must be bools (causal=1 is rejected, also after a valid call cached its checks), and under
jax.jit invalid cu_seqlens values pass unchecked (docs/spec.md says so) while eager calls reject
them."""

import numpy as np
import pytest
from corearrays import ints, make

import flashmux


def qkv(kind, b=2, s=5, h=2, d=8):
    return (make(kind, (b, s, h, d)) for _ in range(3))


@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_python_lists_raise_type_error(which):
    q, k, v = (np.random.default_rng(0).standard_normal((1, 3, 2, 4)).astype(np.float32),) * 3
    args = {"q": q, "k": k, "v": v}
    lst = q.tolist()
    if which == "all":
        args = dict.fromkeys("qkv", lst)
    else:
        args[which] = lst
    name = "q" if which == "all" else which
    with pytest.raises(TypeError, match=rf"^{name}: expected a .*array.*got list"):
        flashmux.attention(args["q"], args["k"], args["v"])
    with pytest.raises(TypeError, match=rf"^{name}: expected"):
        flashmux.explain(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("flag", ["causal", "return_lse", "deterministic"])
@pytest.mark.parametrize("value", [1, 0, 1.0, "yes", None])
def test_flags_must_be_bools(kind, flag, value):
    q, k, v = qkv(kind)
    flashmux.attention(q, k, v, **{flag: True})  # a valid call first: its checks are cached
    flashmux.attention(q, k, v, **{flag: False})
    with pytest.raises(TypeError, match=rf"^{flag}: expected a bool, got {value!r}"):
        flashmux.attention(q, k, v, **{flag: value})


def test_numpy_bool_flags_accepted():
    q, k, v = qkv("numpy")
    out = flashmux.attention(q, k, v, causal=np.bool_(True))
    ref = flashmux.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(out, ref)


def _packed(kind, cu):
    t = int(max(cu))
    return make(kind, (t, 2, 8)), make(kind, (t, 2, 8)), make(kind, (t, 2, 8))


def test_jax_jit_skips_value_checks_on_traced_cu_seqlens():
    jax = pytest.importorskip("jax")
    bad = [0, 5, 3]  # decreasing: rejected eagerly
    q, k, v = _packed("jax", [0, 5, 5])
    cu = ints("jax", bad)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected non-decreasing offsets"):
        flashmux.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)

    @jax.jit
    def f(q, k, v, cq, ck):
        return flashmux.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, backend="reference")

    out = f(q, k, v, cu, cu)  # traced offsets: no host values, no check (docs/spec.md, Errors)
    assert out.shape == q.shape
    # checks on types and shapes still run under jit
    with pytest.raises(TypeError, match=r"cu_seqlens_q: expected dtype int32"):
        f(q, k, v, cu.astype("int64") if jax.config.jax_enable_x64 else cu.astype("float32"), cu)
