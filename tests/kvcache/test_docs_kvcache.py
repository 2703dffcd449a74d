"""The runnable examples of docs/kvcache.md (every ```python block that starts with an import)."""

from __future__ import annotations

import os
import pathlib
import re

import pytest

# Backend-independent: runs once, in the reference pass (the per-backend passes of CI set
# FLASHMUX_TEST_BACKEND to each kernel backend and would repeat it).
if os.environ.get("FLASHMUX_TEST_BACKEND", "reference") != "reference":
    pytest.skip("runs in the reference pass only", allow_module_level=True)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kvcache.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
          if b.lstrip().startswith("import")]


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_example_runs(code, capsys):
    pytest.importorskip("torch" if "import torch" in code else "jax")
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
    printed = capsys.readouterr().out
    assert printed.strip()


def test_there_are_examples():
    assert len(BLOCKS) >= 2
