"""Tiny random Hugging Face causal LMs for the transformers integration tests (CPU, float32):
configs built here, nothing downloaded, and (reference model, attn_implementation="fmx" model)
pairs with the same weights."""

from __future__ import annotations

import copy

VOCAB = 96
# Weights drawn wide enough (initializer_range) that attention moves the logits: with the
# default 0.02 a model that ignored its mask would still agree with eager to float32 rounding.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def config(family: str):
    """Llama; Mistral (sliding window); Gemma2 (softcap, alternating sliding layers); Qwen2 (a
    sliding layer)."""
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(**COMMON)
    if family == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=4, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=4,
                                         attn_logit_softcapping=1.5, final_logit_softcapping=None,
                                         query_pre_attn_scalar=16)
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1)
    raise ValueError(family)


_models: dict = {}


def model_pair(family: str, reference: str, seed: int):
    """(model with attn_implementation=`reference`, the same weights with "fmx"), eval mode;
    built once per (family, reference, seed)."""
    import torch
    import transformers

    from flashmux.integrations import transformers as fmx_tf

    key = (family, reference, seed)
    if key not in _models:
        torch.manual_seed(seed)
        cfg = config(family)
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                            attn_implementation=reference)
        fmx = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                            attn_implementation=fmx_tf.NAME)
        fmx.load_state_dict(ref.state_dict())
        assert fmx.config._attn_implementation == "fmx"
        _models[key] = (ref.eval(), fmx.eval())
    return _models[key]
