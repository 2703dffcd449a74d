"""This round's integration pieces on a GPU (skipped without CUDA): a static KV cache in
transformers through flashmux.attention_with_kvcache (the dispatcher's decode kernel), greedy
generate token-identical to sdpa in float32 and close in bf16 decode logits; Flax attention
dropout from RNG streams under jit on JAX's GPU (Pallas or whatever the dispatcher picks).

    pytest tests/integrations/test_integrations_gpu_static_dropout.py -q
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import flashmux  # noqa: E402
from flashmux.integrations import transformers as fmx_tf  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _pair(dtype):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, initializer_range=0.3,
                                   pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    fmx = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                        attn_implementation=fmx_tf.NAME)
    fmx.load_state_dict(ref.state_dict())
    return ref.to(DEV, dtype).eval(), fmx.to(DEV, dtype).eval()


def test_static_cache_generate_on_gpu(monkeypatch):
    backends = []
    real = flashmux.attention_with_kvcache

    def spy(q, kc, vc, **kw):
        backends.append(flashmux.explain_kvcache(q, kc, vc, **kw).chosen)
        return real(q, kc, vc, **kw)

    ref, fmx = _pair(torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (2, 37), generator=g).to(DEV)
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        monkeypatch.setattr(flashmux, "attention_with_kvcache", spy)
        got = fmx.generate(ids, **kw)
    print("decode backends:", sorted(set(backends)))
    assert backends and torch.equal(got, want)


def test_flax_dropout_on_gpu():
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU here")
    from flax import nnx

    from flashmux.integrations import flax as fmx_flax

    mha = nnx.MultiHeadAttention(num_heads=4, in_features=256, attention_fn=fmx_flax.attention_fn,
                                 dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0),
                                 dtype=jax.numpy.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 256, 256), jax.numpy.bfloat16)
    traces = []

    @nnx.jit
    def f(m, x, rngs):
        traces.append(1)
        return m(x, is_causal=True, deterministic=False, rngs=rngs)

    a = f(mha, x, nnx.Rngs(dropout=1))
    b = f(mha, x, nnx.Rngs(dropout=1))
    c = f(mha, x, nnx.Rngs(dropout=2))
    assert len(traces) == 1
    assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))
