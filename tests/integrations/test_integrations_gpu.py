"""The integrations on a GPU, with the dispatcher's kernels (skipped without CUDA): a bf16 Llama
in transformers (logits unpadded and padded, gradients, a decode step, torch.compile with
inductor) judged against float32 eager on the same weights, the error at most twice sdpa's; the
compat calls against torch SDPA / jax.nn; a Flax block under jit on the GPU (when JAX has one).

    pytest tests/integrations/test_integrations_gpu.py -q
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import flashmux  # noqa: E402
from flashmux.integrations import transformers as fmx_tf  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
SEQ = 512  # tokens per row in the model tests


def _models(head_dim):
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=8 * head_dim,
                                   intermediate_size=16 * head_dim, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                                   initializer_range=0.1)
    torch.manual_seed(0)
    out = {}
    for impl, dtype in (("eager", torch.float32), ("sdpa", torch.bfloat16),
                        (fmx_tf.NAME, torch.bfloat16)):
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                          attn_implementation=impl)
        if out:
            m.load_state_dict(out["eager"].state_dict())
        out[impl] = m.to(DEV, dtype).eval()
    return out


def _err(a, b, keep=None):
    d = (a.float() - b.float()).abs()
    return float((d[keep] if keep is not None else d).max())


def _padding(kind, b, s):
    m = torch.ones(b, s, dtype=torch.long, device=DEV)
    if kind == "left":
        m[0, : s // 3] = 0
    elif kind == "right":
        m[1, s // 2:] = 0
    return m


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_llama_logits_within_twice_sdpa(head_dim, padding):
    ms = _models(head_dim)
    ids = torch.randint(0, 1024, (2, SEQ), device=DEV)
    mask = _padding(padding, 2, SEQ)
    with torch.no_grad():
        want = ms["eager"](ids, attention_mask=mask).logits
        sdpa = ms["sdpa"](ids, attention_mask=mask).logits
        got = ms[fmx_tf.NAME](ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(got[keep]).all()
    assert _err(got, want, keep) <= 2 * _err(sdpa, want, keep) + 1e-3


def test_llama_gradients_and_decode_step():
    ms = _models(128)
    ids = torch.randint(0, 1024, (2, SEQ // 2), device=DEV)
    grads = {}
    for impl in ("eager", "sdpa", fmx_tf.NAME):
        m = ms[impl]
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        grads[impl] = m.model.layers[0].self_attn.q_proj.weight.grad.float()
    assert (grads[fmx_tf.NAME] - grads["eager"]).abs().max() <= \
        2 * (grads["sdpa"] - grads["eager"]).abs().max() + 1e-4
    # prefill then one decode step through the dynamic cache
    steps = {}
    for impl in ("eager", "sdpa", fmx_tf.NAME):
        with torch.no_grad():
            out = ms[impl](ids[:, :-1], use_cache=True)
            steps[impl] = ms[impl](ids[:, -1:], past_key_values=out.past_key_values).logits
    assert _err(steps[fmx_tf.NAME], steps["eager"]) <= 2 * _err(steps["sdpa"], steps["eager"]) + 1e-3


def test_llama_compiled_with_inductor():
    ms = _models(64)
    ids = torch.randint(0, 1024, (2, SEQ // 2), device=DEV)
    torch._dynamo.reset()
    compiled = torch.compile(ms[fmx_tf.NAME], fullgraph=True)
    with torch.no_grad():
        got = compiled(ids).logits
        want = ms["eager"](ids).logits
        sdpa = ms["sdpa"](ids).logits
    assert _err(got, want) <= 2 * _err(sdpa, want) + 1e-3


def test_compat_flash_attn_and_sdpa():
    from flashmux.compat.flash_attn import flash_attn_func, flash_attn_varlen_func
    from flashmux.compat.torch import scaled_dot_product_attention

    F = torch.nn.functional
    q = torch.randn(2, 1024, 8, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 1024, 2, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    t = lambda x: x.transpose(1, 2)
    want = t(F.scaled_dot_product_attention(t(q).float(), t(k).float(), t(v).float(),
                                            is_causal=True, enable_gqa=True))
    plain = t(F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True))
    bound = 2 * _err(plain, want) + 1e-3
    assert _err(flash_attn_func(q, k, v, causal=True), want) <= bound
    assert _err(t(scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True,
                                               enable_gqa=True)), want) <= bound
    cu = torch.tensor([0, 1024, 2048], dtype=torch.int32, device=DEV)
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    got = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, 1024, 1024, causal=True)
    assert _err(got.view_as(q), want) <= bound


def test_compat_jax_and_flax_on_gpu():
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU here")
    import jax.numpy as jnp
    from flax import nnx

    from flashmux.compat.jax import dot_product_attention
    from flashmux.integrations import flax as fmx_flax

    key = jax.random.key(0)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (2, 1024, 8, 128), jnp.bfloat16)
               for i in range(3))
    lens = jnp.array([1024, 700], jnp.int32)
    f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True,
                                                      query_seq_lengths=lens,
                                                      key_value_seq_lengths=lens))
    want = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), is_causal=True,
                                        query_seq_lengths=lens, key_value_seq_lengths=lens)
    plain = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lens,
                                         key_value_seq_lengths=lens)
    err = lambda a: float(jnp.abs(a.astype(jnp.float32) - want).max())
    assert err(f(q, k, v)) <= 2 * err(plain) + 1e-3

    x = jax.random.normal(key, (2, 512, 256), jnp.float32)
    mine = nnx.MultiHeadAttention(num_heads=2, in_features=256, attention_fn=fmx_flax.attention_fn,
                                  decode=False, rngs=nnx.Rngs(0))
    ref = nnx.MultiHeadAttention(num_heads=2, in_features=256, decode=False, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x, is_causal=True))(mine, x)
    y_ref = ref(x, is_causal=True)
    assert float(jnp.abs(y - y_ref).max()) <= 5e-2 * float(jnp.abs(y_ref).max())
    print(flashmux.explain(x.reshape(2, 512, 2, 128), x.reshape(2, 512, 2, 128),
                           x.reshape(2, 512, 2, 128), causal=True))
