"""Static (preallocated) KV caches through flashmux's transformers integration: the layers hand
the whole buffer and flashmux.attention_with_kvcache attends only its filled slots. Greedy
generate() is token-identical to attn_implementation="sdpa" in float32 on tiny random models
(Llama, Mistral with sliding-window layers, prompts shorter and
the window, generating past it); a decode step compiles with fullgraph=True; what cannot be mapped
(padded batches) is refused with a sentence. Also: training dropout's seed reaches flashmux as a
device tensor (no host read)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinymodels import VOCAB, model_pair  # noqa: E402
from tinymodels import config as _config  # noqa: E402

import flashmux  # noqa: E402
from flashmux.integrations import transformers as fmx_tf  # noqa: E402
from flashmux.testing.seeds import recorded_seeds  # noqa: E402


def _pair(family):
    """(sdpa model, fmx model) with the same weights, eval mode."""
    return model_pair(family, "sdpa", 4321)


def _ids(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


@pytest.fixture
def kv_calls(monkeypatch):
    seen = []
    real = flashmux.attention_with_kvcache

    def spy(q, k_cache, v_cache, **kw):
        seen.append((tuple(q.shape), tuple(k_cache.shape), kw["cache_seqlens"].clone()))
        return real(q, k_cache, v_cache, **kw)

    monkeypatch.setattr(flashmux, "attention_with_kvcache", spy)
    return seen


def test_static_cache_sliding_window_matches_sdpa():
    """Mistral's sliding layers keep a 4-slot buffer: before it wraps (prompt 2, first steps) the
    filled-slots row and the window apply; after (later steps) every slot is attended."""
    ref, fmx = _pair("mistral")
    ids = _ids(seq=2, seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(fmx.generate(ids, **kw), ref.generate(ids, **kw))


def test_static_cache_generate_matches_sdpa(kv_calls):
    ref, fmx = _pair("llama")
    ids = _ids()
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        got = fmx.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    assert torch.equal(got, want)
    # prefill (9 queries over 9 filled slots), then one query per step over 10, 11, ... slots
    layers = fmx.config.num_hidden_layers
    assert len(kv_calls) == 6 * layers
    assert [int(c[2][0]) for c in kv_calls[::layers]] == list(range(9, 15))
    assert kv_calls[0][0][1] == 9 and kv_calls[-1][0][1] == 1
    assert all(c[1] == kv_calls[0][1] for c in kv_calls)  # the same preallocated buffer shape


def test_static_cache_decode_step_under_compile():
    from torch._dynamo.testing import CompileCounter

    ref, fmx = _pair("llama")
    ids = _ids(batch=1)
    cache = transformers.StaticCache(config=fmx.config, max_cache_len=32)
    cache_ref = transformers.StaticCache(config=ref.config, max_cache_len=32)
    with torch.no_grad():
        fmx(ids, past_key_values=cache, use_cache=True)
        ref(ids, past_key_values=cache_ref, use_cache=True)
        cnt = CompileCounter()
        step = torch.compile(lambda t: fmx(t, past_key_values=cache, use_cache=True).logits,
                             backend=cnt, fullgraph=True)
        tok = torch.tensor([[5]])
        for _ in range(2):
            got = step(tok)
            want = ref(tok, past_key_values=cache_ref, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=2e-4 * max(1.0, float(want.abs().max())))
    assert cnt.frame_count >= 1


def test_static_cache_refusals():
    _, fmx = _pair("llama")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: its keys sit inside the buffer
    with torch.no_grad(), pytest.raises(ValueError, match="padded batches with a static cache"):
        fmx.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                     cache_implementation="static", pad_token_id=0)
    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    kv = torch.randn(1, 2, 6, 8)
    row = (torch.arange(6) < 3)[None, None, None, :]
    module = torch.nn.Module()
    module.is_causal = True
    with pytest.raises(ValueError, match="inference"):
        fmx_tf.attention_forward(module, q, kv, kv, row)
    hole = row.clone()
    hole[..., 1] = False
    with pytest.raises(ValueError, match="prefix of the keys"):
        fmx_tf.attention_forward(module, q.detach(), kv, kv, hole)


def test_training_dropout_seed_is_drawn_on_the_device(monkeypatch):
    """attention_dropout in training: the seed reaches flashmux as a tensor on the device, and
    torch.manual_seed replays the forward."""
    cfg = _config("llama")
    cfg.attention_dropout = 0.3
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=fmx_tf.NAME)
    model.train()
    seeds = recorded_seeds(monkeypatch)
    ids = _ids()
    torch.manual_seed(1)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seeds and all(isinstance(s, torch.Tensor) for s in seeds)
