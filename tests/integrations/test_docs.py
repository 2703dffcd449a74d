"""Every python example in docs/integrations.md runs as it stands."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_has_an_example_per_integration():
    text = "\n".join(BLOCKS)
    for needle in ("flashmux.integrations.transformers", "fmx_flax", "compat.flash_attn",
                   "compat.torch", "compat.jax"):
        assert needle in text


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_doc_example_runs(i):
    code = BLOCKS[i]
    for mod in ("torch", "jax", "transformers", "flax"):
        if re.search(rf"^\s*(import|from) {mod}\b", code, flags=re.M):
            pytest.importorskip(mod)
    exec(compile(code, f"{DOC.name} example {i + 1}", "exec"), {})
