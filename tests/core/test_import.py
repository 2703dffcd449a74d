"""`import flashmux` stays light: no framework and no backend kernel package is imported."""

import subprocess
import sys


def test_import_does_not_load_frameworks():
    code = (
        "import sys, flashmux\n"
        "heavy = [m for m in ('torch', 'jax', 'triton', 'jaxlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "flashmux.backends()  # discovery loads backend objects, still no framework\n"
        "heavy = [m for m in ('torch', 'jax', 'triton', 'jaxlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
