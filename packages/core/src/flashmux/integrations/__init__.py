"""Integrations with model libraries: `flashmux.integrations.transformers` (Hugging Face
transformers) and `flashmux.integrations.flax` (Flax NNX and Linen).

Neither is imported by `import flashmux`; each imports its framework when it is imported.
See docs/integrations.md.
"""
