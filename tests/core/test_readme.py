"""The README's Python snippets run as written on this machine (a CPU in CI): each block in a
fresh interpreter, so a snippet that leans on a name it does not define fails."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _needs(code):
    return [m for m in ("torch", "jax") if re.search(rf"^import .*\b{m}\b", code, flags=re.M)]


def test_the_readme_has_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_snippet_runs_as_written(i):
    code = BLOCKS[i]
    for m in _needs(code):
        pytest.importorskip(m)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README snippet {i}:\n{code}\n{r.stderr[-3000:]}"
