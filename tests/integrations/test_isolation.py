"""`import flashmux` loads no integration, no compat module and none of their frameworks."""

from __future__ import annotations

import subprocess
import sys


def test_import_flashmux_loads_no_integration():
    code = (
        "import sys, flashmux\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'jax', 'transformers', 'flax') or m.startswith(('flashmux.integrations', "
        "'flashmux.compat')))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr
