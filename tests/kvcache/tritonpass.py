"""The module-level skips of the Triton decode tests (test_triton_decode_*.py)."""

from __future__ import annotations

import os

import pytest


def triton_pass_torch():
    """Skip the calling test module unless this is the triton pass (FLASHMUX_TEST_BACKEND=triton)
    with torch and triton installed and a GPU or TRITON_INTERPRET=1; -> the torch module."""
    if os.environ.get("FLASHMUX_TEST_BACKEND") != "triton":
        pytest.skip("runs in the triton pass only", allow_module_level=True)
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return torch
