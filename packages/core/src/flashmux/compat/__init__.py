"""Drop-in replacements for other libraries' attention calls, on flashmux:

- `flashmux.compat.flash_attn`: flash_attn_func, flash_attn_varlen_func, the qkv-/kv-packed forms
  and flash_attn_with_kvcache, with FlashAttention's argument conventions;
- `flashmux.compat.torch`: scaled_dot_product_attention with SDPA's (B, H, S, D) layout and
  top-left causal alignment;
- `flashmux.compat.jax`: dot_product_attention with jax.nn.dot_product_attention's semantics.

Switching is an import change: `from flashmux.compat.flash_attn import flash_attn_func`.
None of these is imported by `import flashmux`. See docs/integrations.md.
"""
