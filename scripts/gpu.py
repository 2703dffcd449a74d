"""The GPU check: one entry point, in stages, within a time budget, logs in $OUT.

Run from the repository root on the GPU machine (through the device tool, one call <= 10 min):

    python scripts/gpu.py                                  # setup build conformance backend-tests
    python scripts/gpu.py setup build kernels sanitize     # the per-backend GPU tools
    python scripts/gpu.py setup build bench --budget 580   # the papers benchmark in the time left
    python scripts/gpu.py --list                           # the stages and what each runs

Stages (in the order given; setup first when the machine is fresh):
  setup          wheels carried in .carry/ (nvidia-cutlass; nox and its dependencies) into
                 /tmp/flashmux-site, then flashmux's four packages, editable, without dependencies
                 (the machine's own torch, triton and JAX stay)
  build          the CUDA library (and its JAX FFI library) for this machine's GPU, then
                 `python -m flashmux info`
  conformance    the per-backend suites (directories under tests/ whose conftest.py reads
                 FLASHMUX_TEST_BACKEND), full tier, one pytest per backend, concurrently
  backend-tests  tests/backends and the core's GPU tests (what is skipped without a GPU)
  kernels        each backend's GPU tool on the shared case list (flashmux.testing.gpu_cases):
                 backend_triton/gpu_check.py check, backend_pallas/gpu_check.py
                 --only-correctness, backend_cuda/tools/kernel_check.py LIB correctness and big
  sanitize       compute-sanitizer memcheck and racecheck on kernel_check.py LIB sanitize
  bench          `python -m flashmux bench --sweep papers` with the time left (docs/benchmarks.md)
  decode-bench   KV-cache decode GB/s: backend_cuda/tools/decode_bench.py (vs SDPA cuDNN) and
                 backend_pallas/decode_bench.py (vs JAX cuDNN), each with a read ceiling;
                 --decode-args "..." replaces both scripts' default arguments (e.g. "--splits
                 auto,4,16 --sk 4096,131072"; the Pallas one also takes --configs)

Options: --budget SECONDS (all stages together, default 570), --backends (default
reference,triton,pallas,cuda), --out DIR (default $OUT, else /tmp/flashmux-gpu), --size
(conformance tier, default full), --hypothesis N (examples, default 25), --workers N (pytest-xdist
per pytest, default 3), --bench-args "..." (replace the benchmark's default arguments),
--dry-run (print the commands, run nothing).
Each stage gets at most its own cap and what is left of the budget; a stage cut short says so.
Output: one line per step on stdout and in $OUT/summary.txt, each step's full log in
$OUT/<step>.log, and $OUT/gpu.json (step, command, rc, seconds, last line).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = "/tmp/flashmux-site"
PY = sys.executable
STAGES = ["setup", "build", "conformance", "backend-tests", "kernels", "sanitize", "bench",
          "decode-bench"]
DEFAULT = ["setup", "build", "conformance", "backend-tests"]
# the most each stage may take (seconds), before the budget's own limit
CAPS = {"setup": 120, "build": 240, "conformance": 330, "backend-tests": 200,
        "sanitize": 420, "bench": 10_000, "decode-bench": 400}
PYTEST = [PY, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider"]


class Run:
    def __init__(self, args):
        self.a = args
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.lib: str | None = None  # the CUDA library the build stage made
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if Path(SITE).is_dir():
            self._use_site()

    def _use_site(self):
        pp = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = SITE + (os.pathsep + pp if pp else "")

    def left(self) -> float:
        return self.a.budget - (time.monotonic() - self.t0)

    def say(self, line: str):
        print(line, flush=True)
        with open(self.out / "summary.txt", "a") as f:
            f.write(line + "\n")

    def step(self, name: str, cmd, cap: float, env=None, cwd=None) -> int:
        """Run one command with a timeout of min(cap, budget left - 10 s); log to $OUT/name.log."""
        limit = min(cap, self.left() - 10)
        shown = " ".join(shlex.quote(str(c)) for c in cmd)
        if self.a.dry_run:
            self.say(f"[dry-run] {name}: {shown}")
            return 0
        if limit < 5:
            self.say(f"{name}: SKIPPED, the budget is spent ({self.left():.0f} s left)")
            self.rows.append({"step": name, "cmd": shown, "rc": None, "s": 0, "last": "skipped"})
            return 124
        t = time.monotonic()
        log = self.out / f"{name}.log"
        with open(log, "w") as f:
            f.write(f"$ {shown}\n")
            f.flush()
            try:
                rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                    env={**self.env, **(env or {})}, cwd=cwd or ROOT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        s = time.monotonic() - t
        last = _last_line(log)
        cut = f" (cut at {limit:.0f} s)" if rc == 124 else ""
        self.say(f"{name}: rc={rc} in {s:.0f} s{cut}: {last}")
        self.rows.append({"step": name, "cmd": shown, "rc": rc, "s": round(s, 1), "last": last})
        return rc

    def parallel(self, steps, cap: float):
        """steps: [(name, cmd, env)], run at once, each with the same timeout."""
        if self.a.dry_run:
            for name, cmd, env in steps:
                self.step(name, cmd, cap, env)
            return
        limit = min(cap, self.left() - 10)
        if limit < 5:
            self.say(f"{', '.join(n for n, _, _ in steps)}: SKIPPED, the budget is spent")
            return
        t = time.monotonic()
        procs = []
        for name, cmd, env in steps:
            f = open(self.out / f"{name}.log", "w")  # noqa: SIM115  (closed below)
            f.write("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
            f.flush()
            p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                 env={**self.env, **env}, cwd=ROOT)
            procs.append((name, cmd, p, f))
        for name, cmd, p, f in procs:
            try:
                rc = p.wait(timeout=max(1.0, limit - (time.monotonic() - t)))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = 124
            f.close()
            s = time.monotonic() - t
            last = _last_line(self.out / f"{name}.log")
            self.say(f"{name}: rc={rc} in {s:.0f} s{' (cut)' if rc == 124 else ''}: {last}")
            self.rows.append({"step": name, "cmd": " ".join(map(str, cmd)), "rc": rc,
                              "s": round(s, 1), "last": last})

    def save(self):
        with open(self.out / "gpu.json", "w") as f:
            json.dump({"budget_s": self.a.budget, "used_s": round(time.monotonic() - self.t0),
                       "steps": self.rows}, f, indent=1)


def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def per_backend_suites() -> list[str]:
    """The rule the noxfile uses: directories under tests/ whose conftest.py reads
    FLASHMUX_TEST_BACKEND."""
    return [str(c.parent.relative_to(ROOT)) for c in sorted((ROOT / "tests").glob("*/conftest.py"))
            if "FLASHMUX_TEST_BACKEND" in c.read_text()]


# -- stages ----------------------------------------------------------------------------------


def setup(r: Run):
    carry = sorted((ROOT / ".carry").glob("*.whl")) + sorted((ROOT / ".carry/nox").glob("*.whl"))
    if carry:
        r.step("setup_wheels", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                "--no-compile", "--upgrade", "--target", SITE, *carry],
               CAPS["setup"])
        r._use_site()
    else:
        r.say("setup: no .carry/*.whl (nvidia-cutlass, nox): using what the machine has")
    pkgs = []
    for p in ("core", "backend_cuda", "backend_triton", "backend_pallas"):
        pkgs += ["-e", f"packages/{p}"]
    r.step("setup_packages", [PY, "-m", "pip", "install", "-q", "--no-deps",
                              "--no-build-isolation", *pkgs], CAPS["setup"])


def build(r: Run):
    rc = r.step("build_cuda", [PY, "-m", "flashmux_cuda", "build", "--jax"], CAPS["build"])
    if rc == 0 and not r.a.dry_run:
        r.lib = _last_line(r.out / "build_cuda.log").split()[-1]
    r.step("info", [PY, "-m", "flashmux", "info"], 60)


def conformance(r: Run):
    suites = per_backend_suites()
    steps = []
    for b in r.a.backends:
        env = {"FLASHMUX_TEST_BACKEND": b, "FLASHMUX_TEST_SIZE": r.a.size,
               "FLASHMUX_HYPOTHESIS_EXAMPLES": str(r.a.hypothesis)}
        steps.append((f"conformance_{b}", PYTEST + ["-n", str(r.a.workers), *suites], env))
    r.parallel(steps, CAPS["conformance"])


def backend_tests(r: Run):
    r.step("backend_tests", PYTEST + ["-n", str(r.a.workers), "tests/backends",
                                      "tests/core/test_gpu_compile.py", "tests/core/test_crossing.py",
                                      "-k", "not real_compile"], CAPS["backend-tests"])


def _cuda_lib(r: Run) -> str | None:
    if r.lib is None and not r.a.dry_run:
        rc = r.step("build_cuda", [PY, "-m", "flashmux_cuda", "build", "--jax"], CAPS["build"])
        if rc == 0:
            r.lib = _last_line(r.out / "build_cuda.log").split()[-1]
    return r.lib or ("LIB" if r.a.dry_run else None)


def kernels(r: Run):
    b = set(r.a.backends)
    if "triton" in b:
        r.step("kernels_triton", [PY, "packages/backend_triton/gpu_check.py", "check"], 180,
               env={"OUT": str(r.out)})
    if "pallas" in b:
        r.step("kernels_pallas", [PY, "packages/backend_pallas/gpu_check.py",
                                  "--only-correctness", "--deadline", "200"], 240,
               env={"OUT": str(r.out)})
    if "cuda" in b and (lib := _cuda_lib(r)):
        tool = "packages/backend_cuda/tools/kernel_check.py"
        r.step("kernels_cuda", [PY, tool, lib, "correctness"], 240)
        r.step("kernels_cuda_big", [PY, tool, lib, "big"], 120)


def sanitize(r: Run):
    lib = _cuda_lib(r)
    if not lib:
        r.say("sanitize: no CUDA library (the build failed)")
        return
    tool = "packages/backend_cuda/tools/kernel_check.py"
    for t in ("memcheck", "racecheck"):
        r.step(f"sanitize_{t}", ["compute-sanitizer", "--tool", t, "--error-exitcode", "1", PY,
                                 tool, lib, "sanitize"], CAPS["sanitize"] / 2)


def bench(r: Run):
    budget = int(r.left() - 30)
    args = shlex.split(r.a.bench_args) if r.a.bench_args else [
        "--sweep", "papers", "--head-dims", "64,128", "--seqlens", "2k,4k,8k,16k",
        "--modes", "fwd,fwd_bwd", "--dtype", "bf16", "--target-ms", "30", "--no-progress"]
    r.step("bench", [PY, "-m", "flashmux", "bench", *args, "--time-budget", str(budget),
                     "--out", str(r.out)], CAPS["bench"])


def decode_bench(r: Run):
    args = shlex.split(r.a.decode_args) if r.a.decode_args else ["--sq", "1,4"]
    b = set(r.a.backends)
    if "cuda" in b:
        r.step("decode_bench_cuda", [PY, "packages/backend_cuda/tools/decode_bench.py", *args],
               CAPS["decode-bench"] / 2)
    if "pallas" in b:
        r.step("decode_bench_pallas", [PY, "packages/backend_pallas/decode_bench.py", *args],
               CAPS["decode-bench"] / 2)


RUN = {"setup": setup, "build": build, "conformance": conformance, "backend-tests": backend_tests,
       "kernels": kernels, "sanitize": sanitize, "bench": bench, "decode-bench": decode_bench}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stages", nargs="*", help=f"of {', '.join(STAGES)} (default: {' '.join(DEFAULT)})")
    ap.add_argument("--budget", type=float, default=570)
    ap.add_argument("--backends", default="reference,triton,pallas,cuda")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/flashmux-gpu")
    ap.add_argument("--size", default="full")
    ap.add_argument("--hypothesis", type=int, default=25)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--bench-args", default="")
    ap.add_argument("--decode-args", default="")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print(__doc__)
        return 0
    a.backends = [b for b in a.backends.split(",") if b]
    stages = a.stages or DEFAULT
    unknown = [s for s in stages if s not in RUN]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}: expected some of {STAGES}")
    r = Run(a)
    r.say(f"gpu.py: stages {' '.join(stages)}, budget {a.budget:.0f} s, backends "
          f"{','.join(a.backends)}, logs in {r.out}")
    for s in stages:
        RUN[s](r)
    r.save()
    bad = [x["step"] for x in r.rows if x["rc"] not in (0, None)]
    r.say(f"gpu.py: done in {a.budget - r.left():.0f} s; "
          + (f"failed or cut: {', '.join(bad)}" if bad else "every step passed"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
