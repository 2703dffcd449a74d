"""Test support that installed packages can import (not imported by `import flashmux`).

flashmux.testing.judge: the conformance judge (Case, the float64-reference rule, the redraw
rule), shared by tests/conformance and the backends' own CPU and GPU checks.
flashmux.testing.decode: `decode_spec(**overrides)`, a DecodeSpec for backends' decode tests.
flashmux.testing.gpu: `backend_gpu_reasons(name)`, the skip condition of backends' GPU tests.
"""
