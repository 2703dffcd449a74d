"""flashmux's sessions.

    nox -s demo                          run flashmux.attention on a realistic shape, explain it,
                                         check it against the reference, time it
    nox -s tests                         everything this machine can run, lean tiers (the CI's
                                         command; 17-19 minutes on a 2-core machine from a fresh
                                         clone, measured 2026-12-01, session 12)
    nox -s full                          the same with the long tiers (full-size conformance in
                                         the interpreters, more hypothesis examples, every head
                                         dim in the nvcc build): hours on a CPU, minutes on a GPU
    nox -s "conformance(backend='triton')"   the conformance suite for one backend
    nox -s lint                          ruff, and mypy on the core ([tool.mypy] in pyproject.toml)
    nox -s bench -- --sweep papers       the benchmark harness (GPU)

How `tests` is laid out, so that a new directory under tests/ is picked up without editing this
file:
  1. every test under tests/ except tests/backends/, once, with the reference backend under test
     (FLASHMUX_TEST_BACKEND=reference) and Triton's interpreter on (CPU);
  2. the per-backend suites, once per kernel backend that runs in an interpreter on a CPU
     (triton: TRITON_INTERPRET=1, pallas: interpret mode) or on every backend on a GPU. A
     per-backend suite is a directory under tests/ whose conftest.py reads FLASHMUX_TEST_BACKEND
     (tests/conformance/conftest.py is the model); a new one joins by doing the same;
  3. tests/backends/: each backend's own tests (interpreters, the CUDA build with the machine's
     nvcc, GPU-only tests skipped without a GPU).
Each stage runs under pytest-xdist (FLASHMUX_TEST_WORKERS, default 2) with a per-test timeout.
Extra arguments go to every pytest call: `nox -s tests -- -x -k varlen`.

On the GPU machine (no package registry), run with `nox --no-venv` (or
`--force-venv-backend none`): sessions then use the machine's own torch, triton and JAX and install
only flashmux's packages, without dependencies. scripts/gpu.py does that and more (see
docs/contributing.md).

torch is pinned to the CPU build that pip finds on the developer/CI machines (torch==2.13.0):
an unpinned torch would pull a multi-GB CUDA build. The packages' own metadata leaves torch
unpinned; flashmux's packages are installed here without dependencies, so nothing replaces it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("FLASHMUX_NOX_PYTHON", "3.11")
TORCH = "torch==2.13.0"
FRAMEWORKS = [TORCH, "jax[cpu]", "triton"]
# what tests/ needs beyond the frameworks (packages/core's `test` extra lists the same):
# absl-py: jax.experimental.mosaic.gpu imports it (the Mosaic GPU backward's CPU-interpreter test);
# flax and transformers: tests/integrations (versions the CPU and GPU machines have)
TEST_DEPS = [
    "pytest>=8", "pytest-xdist>=3", "pytest-timeout", "hypothesis>=6", "absl-py", "ml_dtypes",
    "flax>=0.12.8,<0.13", "transformers>=5.17,<6",
]
# what flashmux-cuda builds with (installed here because packages install without dependencies)
CUDA_BUILD_DEPS = ["nvidia-cutlass==4.2.0.0", "ninja", "filelock"]
LINT_DEPS = ["ruff", "mypy", "numpy"]
PACKAGES = {
    "core": "packages/core",
    "cuda": "packages/backend_cuda",
    "triton": "packages/backend_triton",
    "pallas": "packages/backend_pallas",
}
BACKENDS = ["reference", "cuda", "triton", "pallas"]
# kernel backends whose kernels run on a CPU, in an interpreter
INTERPRETED = ["triton", "pallas"]
PER_TEST_TIMEOUT_S = "1800"  # a hang guard, not a budget (the nvcc build test is the slowest)


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


def _has(session: nox.Session, module: str) -> bool:
    """In a venv nox installed TEST_DEPS; without one, ask the machine's python."""
    if not _no_venv(session):
        return True
    return importlib.util.find_spec(module) is not None


def _pytest(session: nox.Session, *args: str, env=None) -> None:
    workers = os.environ.get("FLASHMUX_TEST_WORKERS", "2")
    opts = ["-q", "-rs", "-p", "no:cacheprovider"]
    if workers not in ("0", "1") and _has(session, "xdist"):
        opts += ["-n", workers]
    if _has(session, "pytest_timeout"):
        opts.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    session.run("python", "-m", "pytest", *args, *opts, *session.posargs, env=env or {})


def per_backend_suites() -> list[str]:
    """Directories under tests/ whose conftest.py reads FLASHMUX_TEST_BACKEND."""
    return [
        str(c.parent) for c in sorted(Path("tests").glob("*/conftest.py"))
        if "FLASHMUX_TEST_BACKEND" in c.read_text()
    ]


def _suite(session: nox.Session, full: bool) -> None:
    gpu = _has_gpu(session)
    interp = {} if gpu else {"TRITON_INTERPRET": "1"}
    size = {"FLASHMUX_TEST_SIZE": "full"} if full else {}
    hyp = {"FLASHMUX_HYPOTHESIS_EXAMPLES": "25"} if full else {}
    session.run("python", "-c", "import flashmux, sys; print('import ok:', flashmux.__version__)")
    # 1. everything but the backends' own tests, on the reference backend (small tier on a CPU,
    #    as TRITON_INTERPRET=1 makes size_tier() say; `full` runs its full tier)
    _pytest(session, "tests", "--ignore=tests/backends",
            env={"FLASHMUX_TEST_BACKEND": "reference", **interp, **size, **hyp})
    # 2. the per-backend suites on each kernel backend (small tier in interpreters unless full)
    suites = per_backend_suites()
    for backend in BACKENDS[1:] if gpu else INTERPRETED:
        _pytest(session, *suites, env={"FLASHMUX_TEST_BACKEND": backend, **interp, **size, **hyp})
    # 3. the backends' own tests: interpreters, the CUDA build (the translation units for sm_80
    #    and sm_90 with the machine's nvcc, ninja running FLASHMUX_CUDA_JOBS compiles at once).
    #    The lean tier compiles the head dims 64 and 128 only (each non-empty unit costs ~30-60 s
    #    of CPU per arch); `full` compiles every head dim. FLASHMUX_CUDA_HEAD_DIMS overrides.
    env = {"FLASHMUX_CUDA_JOBS": os.environ.get("FLASHMUX_CUDA_JOBS", "2"), **interp, **size, **hyp}
    if not full:
        env["FLASHMUX_CUDA_HEAD_DIMS"] = os.environ.get("FLASHMUX_CUDA_HEAD_DIMS", "64,128")
    _pytest(session, "tests/backends", env=env)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Core, the reference backend for NumPy/torch/JAX, the per-backend suites in the CPU
    interpreters (small tier) and each backend's CPU-capable tests."""
    _install(session, *FRAMEWORKS, *TEST_DEPS, *CUDA_BUILD_DEPS, "matplotlib")
    _suite(session, full=False)


@nox.session(python=PYTHON)
def full(session: nox.Session) -> None:
    """`tests` with the long tiers: full-size conformance everywhere, 25 hypothesis examples."""
    _install(session, *FRAMEWORKS, *TEST_DEPS, *CUDA_BUILD_DEPS, "matplotlib")
    _suite(session, full=True)


@nox.session(python=PYTHON)
@nox.parametrize("backend", BACKENDS)
def conformance(session: nox.Session, backend: str) -> None:
    """The per-backend suites for one backend (interpreters on a CPU, kernels on a GPU)."""
    _install(session, *FRAMEWORKS, *TEST_DEPS, *CUDA_BUILD_DEPS)
    env = {"FLASHMUX_TEST_BACKEND": backend}
    if backend == "triton" and not _has_gpu(session):
        env["TRITON_INTERPRET"] = "1"
    _pytest(session, *per_backend_suites(), env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff on the tree; mypy on the core (configuration and its not-yet-clean list:
    [tool.mypy] in pyproject.toml)."""
    if not _no_venv(session):
        session.install(*LINT_DEPS)
    session.run("ruff", "check", ".")
    session.run("mypy")


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
