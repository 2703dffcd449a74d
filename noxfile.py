"""flashmux's sessions.

    nox -s demo                          run flashmux.attention on a realistic shape, explain it,
                                         check it against the reference, time it
    nox -s tests                         everything this machine can run
    nox -s "conformance(backend='triton')"   the conformance suite for one backend
    nox -s lint                          ruff
    nox -s bench -- --sweep papers       the benchmark harness (GPU)

On the GPU machine (no package registry), run with `nox --no-venv` (or
`--force-venv-backend none`): sessions then use the machine's own torch, triton and JAX and install
only flashmux's packages, without dependencies.

torch is pinned to the CPU build that pip finds on the developer/CI machines (torch==2.13.0):
an unpinned torch would pull a multi-GB CUDA build.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("FLASHMUX_NOX_PYTHON", "3.11")
TORCH = "torch==2.13.0"
FRAMEWORKS = [TORCH, "jax[cpu]", "triton"]
# absl-py: jax.experimental.mosaic.gpu imports it (the Mosaic GPU backward's CPU-interpreter test)
TEST_DEPS = ["pytest>=8", "hypothesis>=6", "pytest-timeout", "absl-py"]
# what flashmux-cuda builds with (installed here because packages install without dependencies)
CUDA_BUILD_DEPS = ["nvidia-cutlass==4.2.0.0", "ninja", "filelock"]
PACKAGES = {
    "core": "packages/core",
    "cuda": "packages/backend_cuda",
    "triton": "packages/backend_triton",
    "pallas": "packages/backend_pallas",
}
BACKENDS = ["reference", "cuda", "triton", "pallas"]


def _no_venv(session: nox.Session) -> bool:
    return session.venv_backend == "none"


def _install(session: nox.Session, *deps: str, packages=tuple(PACKAGES)) -> None:
    """Third-party deps (skipped without a venv: the machine's own are used), then flashmux's
    packages, editable, without dependencies (so nothing ever replaces the pinned torch)."""
    paths = []
    for name in packages:
        paths += ["-e", PACKAGES[name]]
    if _no_venv(session):
        session.run(
            "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *paths
        )
        return
    if deps:
        # torch first, alone, so later ranges (jax, triton...) see it installed
        if TORCH in deps:
            session.install(TORCH)
        session.install(*[d for d in deps if d != TORCH])
    session.install("setuptools>=64", "wheel")
    session.install("--no-deps", "--no-build-isolation", *paths)


def _pytest(session: nox.Session, *args: str, env=None) -> None:
    session.run("python", "-m", "pytest", *args, *session.posargs, env=env or {})


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Core, the reference backend for NumPy/torch/JAX, and each backend's CPU-capable tests."""
    _install(session, *FRAMEWORKS, *TEST_DEPS, *CUDA_BUILD_DEPS, "matplotlib")
    session.run("python", "-c", "import flashmux, sys; print('import ok:', flashmux.__version__)")
    # core + reference conformance (all array kinds)
    _pytest(session, "tests/core", "tests/conformance", "-q", "-p", "no:cacheprovider",
            env={"FLASHMUX_TEST_BACKEND": "reference"})
    # the conformance suite on Triton's CPU interpreter and Pallas' interpret mode (small
    # shapes, every feature; ~1 and ~2 minutes on 2 cores)
    _pytest(session, "tests/conformance", "-q", "-p", "no:cacheprovider",
            env={"FLASHMUX_TEST_BACKEND": "triton", "TRITON_INTERPRET": "1"})
    _pytest(session, "tests/conformance", "-q", "-p", "no:cacheprovider",
            env={"FLASHMUX_TEST_BACKEND": "pallas"})
    # backend tests that run on a CPU: Triton's interpreter, Pallas' interpret mode, CUDA builds
    # (the CUDA build test compiles every kernel for sm_80 and sm_90 with the machine's nvcc)
    _pytest(session, "tests/backends", "-q", "-p", "no:cacheprovider", "-rs",
            env={"TRITON_INTERPRET": "1", "FLASHMUX_CUDA_JOBS": "2"})


@nox.session(python=PYTHON)
@nox.parametrize("backend", BACKENDS)
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite for one backend (interpreters on a CPU, kernels on a GPU)."""
    _install(session, *FRAMEWORKS, *TEST_DEPS, *CUDA_BUILD_DEPS)
    env = {"FLASHMUX_TEST_BACKEND": backend}
    if backend == "triton" and not _has_gpu(session):
        env["TRITON_INTERPRET"] = "1"
    _pytest(session, "tests/conformance", "-q", "-p", "no:cacheprovider", env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    if not _no_venv(session):
        session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: dispatch, explain, check and time one realistic attention call."""
    _install(session, TORCH, "jax[cpu]")  # every flashmux package: explain() shows them all
    session.run("python", "-m", "flashmux", "demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark harness: `nox -s bench -- --sweep papers` (see docs/benchmarks.md)."""
    _install(session, *FRAMEWORKS, *CUDA_BUILD_DEPS, "matplotlib", "tqdm")
    session.run("python", "-m", "flashmux", "bench", *(session.posargs or ["--quick"]))


def _has_gpu(session: nox.Session) -> bool:
    out = session.run(
        "python", "-c", "import torch; print(int(torch.cuda.is_available()))",
        silent=True, log=False,
    )
    return bool(out) and out.strip().endswith("1")
