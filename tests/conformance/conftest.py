"""Conformance suite configuration: which backend, which array kinds, which size tier.

    FLASHMUX_TEST_BACKEND=triton pytest tests/conformance      (or --backend triton)
    FLASHMUX_TEST_KINDS=torch,jax                             (default: every kind it serves)
    FLASHMUX_TEST_SIZE=small|full                             (default: full on GPU, small on CPU
                                                               for kernel backends run in interpreters)
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--backend", default=None, help="backend to run the conformance suite on")


def _kinds_available():
    out = ["numpy"]
    for k in ("torch", "jax"):
        if importlib.util.find_spec(k) is not None:
            out.append(k)
    return out


def pytest_generate_tests(metafunc):
    if "kind" not in metafunc.fixturenames:
        return
    backend = metafunc.config.getoption("--backend") or os.environ.get(
        "FLASHMUX_TEST_BACKEND", "reference"
    )
    from flashmux import dispatch

    be = dispatch.get_backend(backend)
    caps = be.capabilities
    served = caps.array_kinds | caps.crosses_from
    env = os.environ.get("FLASHMUX_TEST_KINDS")
    kinds = [k for k in _kinds_available() if k in served]
    if env:
        kinds = [k for k in env.split(",") if k in kinds]
    # crossing (jax -> torch backend) is forward-only and eager: not a separate conformance kind
    kinds = [k for k in kinds if k in caps.array_kinds] or kinds
    metafunc.parametrize("kind", kinds)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [backend])


@pytest.fixture(autouse=True)
def _skip_unavailable(request):
    if "backend" not in request.fixturenames:
        return
    backend = request.getfixturevalue("backend")
    from flashmux import dispatch

    reasons = dispatch.availability(dispatch.get_backend(backend))
    if reasons:
        pytest.skip(f"backend {backend} unavailable here: {'; '.join(reasons)}")
