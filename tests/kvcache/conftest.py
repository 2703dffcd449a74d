"""KV-cache (decode) suite configuration, like tests/conformance: which backend and array kinds.

    FLASHMUX_TEST_BACKEND=triton TRITON_INTERPRET=1 pytest tests/kvcache     (default: reference)
    FLASHMUX_TEST_KINDS=torch,jax                                            (default: every kind)
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _backend_name(config) -> str:
    return os.environ.get("FLASHMUX_TEST_BACKEND", "reference")


def pytest_generate_tests(metafunc):
    if "kind" not in metafunc.fixturenames or "backend" not in metafunc.fixturenames:
        return
    from flashmux import dispatch

    backend = _backend_name(metafunc.config)
    be = dispatch.get_backend(backend)
    caps = be.capabilities
    kinds = ["numpy"] + [k for k in ("torch", "jax") if importlib.util.find_spec(k) is not None]
    kinds = [k for k in kinds if k in caps.array_kinds]
    env = os.environ.get("FLASHMUX_TEST_KINDS")
    if env:
        kinds = [k for k in env.split(",") if k in kinds]
    metafunc.parametrize("kind", kinds)
    metafunc.parametrize("backend", [backend])


@pytest.fixture(autouse=True)
def _skip_unavailable(request):
    if "backend" not in request.fixturenames:
        return
    from flashmux import dispatch

    name = request.getfixturevalue("backend")
    why = dispatch.availability(dispatch.get_backend(name))
    if why:
        pytest.skip(f"{name} unavailable: {'; '.join(why)}")
