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
  decode-bench   KV-cache decode GB/s of each backend's variants (forced splits, tuning configs)
                 with a read ceiling and the framework's cuDNN: benchmarks/decode_variants.py
                 BACKEND for triton, cuda and pallas; --decode-args "..." replaces its default
                 arguments (e.g. "--splits auto,4,16 --sk 4096,131072 --configs all"). The
                 decode sweep across backends is the harness's: bench --bench-args "--sweep
                 decode --no-progress"
The CUDA backend's deeper tools (each builds its own library for this GPU: nvcc flags in
FLASHMUX_CUDA_NVCC_FLAGS, its own cache key, -lineinfo for the profiler and sanitizers):
  sm90           the Hopper forward: a build with -DFMX_SM90_TUNING (ptxas registers/spills and
                 the SASS HGMMA and local-memory counts of each sm90 unit), then the --sm90 steps
                 of backend_cuda/tools/sm90_check.py for each --sm90-variants value of
                 FMX_TUNE_SM90 ("-" = default, 1 = sequential): fwd (vs float64), bench (TFLOP/s
                 sm90 / sm80 / SDPA cuDNN), and correctness (kernel_check.py, fwd + bwd),
                 sanitize / racecheck (compute-sanitizer on small sm90 forwards); the sm90
                 backward: bwd (vs float64, per --sm90-bwd-variants value of FMX_TUNE_SM90_BWD:
                 0 default, 1 bulk dQ, 2 flipped issue order, 3 per-warpgroup dQ at hd64),
                 benchbwd (backward vs the sm80 backward, fwd+bwd vs SDPA cuDNN),
                 sanitizebwd / racecheckbwd (compute-sanitizer on small forward+backward);
                 --sm90-lib plain runs the steps on the build stage's library instead (no
                 second build; default variants only). FMX_BENCH_DIMS / FMX_BENCH_SEQS (comma
                 lists) narrow the bench and benchbwd sweeps
  cuda-bench     kernel_check.py LIB bench: TFLOP/s against SDPA flash (head dims 64/128, 2k-16k)
  cuda-profile   ncu (speed of light, occupancy, stalls, ...) of ours and SDPA flash, hd128;
                 $PROFILE_KERNELS picks the kernels (a regex)
  cuda-tune      a -DFMX_TUNING build; kernel_check.py tune and correctness_bf16 of each --tune
                 spec ("NAME:FMX_TUNE_BWD64=1,..."; FMX_TUNE_SEQS / FMX_TUNE_DIMS pick the sweep)
  cuda-variants  one build per line "name|nvcc flags" of --variants (default
                 packages/backend_cuda/tools/variants.txt), each timed by kernel_check.py benchlite
  context-parallel  for the nvidia-h200-x2 kind (2 GPUs; NVLink multicast off: NCCL_NVLS_ENABLE=0
                 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1): tests/distributed's GPU
                 cases (NCCL with 2 ranks, JAX on the GPUs; --cp-tests "" skips them), then
                 benchmarks/ring_scaling.py (--cp-args) into $OUT/ring_scaling.json and its table

Options: --budget SECONDS (all stages together, default 570), --backends (default
reference,triton,pallas,cuda), --out DIR (default $OUT, else /tmp/flashmux-gpu), --size
(conformance tier, default full), --hypothesis N (examples, default 25), --workers N (pytest-xdist
per pytest, default 3), --bench-args "..." (replace the benchmark's default arguments),
--sm90, --sm90-variants, --tune, --variants, --cp-tests, --cp-args (the stages above),
--show N (each step's last N log lines on stdout), --dry-run (print the commands, run nothing).
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
          "decode-bench", "sm90", "cuda-bench", "cuda-profile", "cuda-tune", "cuda-variants",
          "context-parallel"]
DEFAULT = ["setup", "build", "conformance", "backend-tests"]
# the most each stage may take (seconds), before the budget's own limit
CAPS = {"setup": 120, "build": 240, "conformance": 330, "backend-tests": 200,
        "sanitize": 420, "bench": 10_000, "decode-bench": 450, "sm90": 480, "cuda-bench": 300,
        "cuda-profile": 240, "cuda-tune": 520, "cuda-variants": 540, "context-parallel": 560}
# multicast over NVLink stays off on the lent multi-GPU machines (the device tool's KINDS.md)
NO_NVLS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
KC = "packages/backend_cuda/tools/kernel_check.py"
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
        shown = " ".join([f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
                         + [shlex.quote(str(c)) for c in cmd])
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
            except OSError as e:  # the tool is not on this machine (nvidia-smi, ncu, ...)
                f.write(f"{e}\n")
                rc = 127
        s = time.monotonic() - t
        last = _last_line(log)
        cut = f" (cut at {limit:.0f} s)" if rc == 124 else ""
        self.say(f"{name}: rc={rc} in {s:.0f} s{cut}: {last}")
        self.tail(log)
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
            self.tail(self.out / f"{name}.log")
            self.rows.append({"step": name, "cmd": " ".join(map(str, cmd)), "rc": rc,
                              "s": round(s, 1), "last": last})

    def tail(self, log: Path):
        """--show N: the last N lines of a step's log on stdout (not in summary.txt)."""
        if self.a.show > 0:
            lines = log.read_text(errors="replace").splitlines()[-self.a.show:]
            print("\n".join("    " + x for x in lines), flush=True)

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
    which = [b for b in ("triton", "cuda", "pallas") if b in r.a.backends]
    for b in which:
        r.step(f"decode_bench_{b}", [PY, "benchmarks/decode_variants.py", b, *args],
               CAPS["decode-bench"] / len(which))


def _cuda_build(r: Run, name: str, flags: str, cap: float, archs: str | None = None) -> str | None:
    """A library built with extra nvcc flags (its own cache entry): its path, or None."""
    cmd = [PY, "-m", "flashmux_cuda", "build", "-q", "-j", str(os.cpu_count() or 8)]
    if archs:
        cmd += ["--archs", archs]
    rc = r.step(name, cmd, cap, env={"FLASHMUX_CUDA_NVCC_FLAGS": flags})
    if r.a.dry_run:
        return "LIB"
    return _last_line(r.out / f"{name}.log").split()[-1] if rc == 0 else None


def sm90(r: Run):
    if r.a.sm90_lib == "plain":  # the build stage's library: no tuning variants, no ptxas facts
        lib = _cuda_lib(r)
        if not lib:
            return
    else:
        lib = _cuda_build(r, "sm90_build",
                          "-DFMX_SM90_TUNING -DFMX_SM90_BWD_TUNING -lineinfo -Xptxas -v", 240, "90")
        if not lib:
            return
        r.step("sm90_facts", [PY, "scripts/gpu.py", "--sm90-facts", lib], 60,
               env={"OUT": str(r.out)})
    tool = "packages/backend_cuda/tools/sm90_check.py"
    san = {"sanitize": "memcheck", "racecheck": "racecheck"}
    for what in r.a.sm90.split():
        if what in ("fwd", "bench"):
            for v in r.a.sm90_variants.split():
                v = "" if v == "-" else v
                r.step(f"sm90_{what}{v}", [PY, tool, lib, what], 150 if what == "bench" else 120,
                       env={"FMX_TUNE_SM90": v})
        elif what == "bwd":  # the sm90 backward vs float64, per FMX_TUNE_SM90_BWD variant
            for v in r.a.sm90_bwd_variants.split():
                dts = "bf16,f16" if v == "0" else "bf16"  # the tuning variants: bf16 only
                r.step(f"sm90_bwd{v}", [PY, tool, lib, "bwd"], 150,
                       env={"FMX_TUNE_SM90_BWD": v, "FMX_BWD_DTYPES": dts})
        elif what == "benchbwd":  # backward ms per variant vs sm80, fwd+bwd vs SDPA cuDNN
            r.step("sm90_benchbwd", [PY, tool, lib, "benchbwd"], 240,
                   env={"FMX_BWD_VARIANTS": ",".join(r.a.sm90_bwd_variants.split())})
        elif what in ("sanitizebwd", "racecheckbwd"):
            r.step(f"sm90_{what}", ["compute-sanitizer", "--tool",
                                    "memcheck" if what == "sanitizebwd" else "racecheck",
                                    "--error-exitcode", "1", PY, tool, lib, "sanitizebwd"], 200)
        elif what == "correctness":
            r.step("sm90_correctness", [PY, KC, lib, "correctness"], 200)
        elif what in san:
            r.step(f"sm90_{san[what]}", ["compute-sanitizer", "--tool", san[what],
                                          "--error-exitcode", "1", PY, tool, lib, "sanitize"], 150)
        else:
            r.say(f"sm90: unknown step {what!r} (fwd bench bwd benchbwd correctness sanitize "
                  "racecheck sanitizebwd racecheckbwd)")


def sm90_facts(lib: str) -> int:
    """ptxas registers/spills of the sm90 forward kernels and SASS counts per sm90 unit."""
    bd = Path(lib).parent
    text = (bd / "build.log").read_text(errors="replace")
    if os.environ.get("OUT"):  # the whole ptxas report beside the other logs
        (Path(os.environ["OUT"]) / "sm90_ptxas.log").write_text(text)
    lines = text.splitlines()
    facts: dict[str, int] = {}
    for i, x in enumerate(lines):
        if "Compiling entry function" in x and "sm90" in x and "fwd_kernel" in x:
            for y in lines[i + 1:i + 3]:
                if "spill" in y or "Used" in y:
                    facts[y.strip()] = facts.get(y.strip(), 0) + 1
    for y, n in sorted(facts.items()):
        print(f"{n:4d} {y}")
    for o in sorted((bd / "obj").glob("sm90_fwd_hdim*.o")):
        sass = subprocess.run(["cuobjdump", "--dump-sass", str(o)], capture_output=True,
                              text=True).stdout
        local = sum(1 for x in sass.splitlines() if "LDL" in x or "STL" in x)
        print(f"{o.name}: {sass.count('HGMMA')} HGMMA, {local} LDL/STL")
    return 0


def cuda_bench(r: Run):
    if lib := _cuda_build(r, "cuda_build_lineinfo", "-lineinfo", 240):
        r.step("cuda_bench", [PY, KC, lib, "bench"], CAPS["cuda-bench"])


def cuda_profile(r: Run):
    if not (lib := _cuda_build(r, "cuda_build_lineinfo", "-lineinfo", 240)):
        return
    kern = os.environ.get("PROFILE_KERNELS", "fwd_kernel|bwd_kernel|dq_dk_dv")
    sections = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "InstructionStats",
                "SourceCounters"]
    cmd = ["ncu", "--clock-control", "none", "-k", f"regex:{kern}"]
    for sec in sections:
        cmd += ["--section", sec]
    r.step("cuda_profile", cmd + ["--print-details", "all", PY, KC, lib, "profile"],
           CAPS["cuda-profile"])


def cuda_tune(r: Run):
    if not r.a.tune:
        r.say("cuda-tune: no --tune specs (e.g. --tune 'A:FMX_TUNE_BWD64=1 B:FMX_TUNE_BWD64=2')")
        return
    if not (lib := _cuda_build(r, "cuda_build_tuning", "-lineinfo -DFMX_TUNING", 240)):
        return
    specs = shlex.split(r.a.tune)
    r.step("cuda_tune", [PY, KC, lib, "tune", "default:", *specs], 280)
    r.step("cuda_tunecheck", [PY, KC, lib, "correctness_bf16", *specs], 240)


def cuda_variants(r: Run):
    for i, line in enumerate(Path(ROOT / r.a.variants).read_text().splitlines(), 1):
        if not line.strip() or "|" not in line:
            continue
        name, flags = (x.strip() for x in line.split("|", 1))
        if lib := _cuda_build(r, f"variant{i}_build", flags, 240):
            r.step(f"variant{i}_bench", [PY, KC, lib, "benchlite", f"{name}: {flags}"], 120)


def context_parallel(r: Run):
    """2 GPUs (nvidia-h200-x2): the distributed GPU tests, then the ring scaling benchmark."""
    r.step("cp_gpus", ["nvidia-smi", "-L"], 30)
    r.step("cp_info", [PY, "-m", "flashmux", "info"], 60)
    if r.a.cp_tests:
        r.step("cp_tests", PYTEST + ["tests/distributed", "-k", r.a.cp_tests], 430, env=NO_NVLS)
    js = r.out / "ring_scaling.json"
    if js.exists():
        js.unlink()
    r.step("cp_bench", [PY, "benchmarks/ring_scaling.py", "--out", str(js),
                        *shlex.split(r.a.cp_args)], CAPS["context-parallel"], env=NO_NVLS)
    if r.a.dry_run or js.exists():
        r.step("cp_table", [PY, "benchmarks/ring_scaling.py", "--markdown", str(js)], 30)


RUN = {"setup": setup, "build": build, "conformance": conformance, "backend-tests": backend_tests,
       "kernels": kernels, "sanitize": sanitize, "bench": bench, "decode-bench": decode_bench,
       "sm90": sm90, "cuda-bench": cuda_bench, "cuda-profile": cuda_profile,
       "cuda-tune": cuda_tune, "cuda-variants": cuda_variants,
       "context-parallel": context_parallel}


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
    ap.add_argument("--sm90", default="fwd bench correctness",
                    help="sm90 steps: fwd bench correctness sanitize racecheck")
    ap.add_argument("--sm90-variants", default="- 1", help="FMX_TUNE_SM90 values, - = default")
    ap.add_argument("--sm90-lib", choices=("tuning", "plain"), default="tuning",
                    help="sm90 stage library: its own -DFMX_SM90_TUNING build (tuning), or the "
                         "build stage's (plain: saves a build; only variant 0 / '-')")
    ap.add_argument("--sm90-bwd-variants", default="0 1 2 3",
                    help="FMX_TUNE_SM90_BWD values for the bwd/benchbwd steps (0 = default)")
    ap.add_argument("--tune", default="", help="cuda-tune specs, NAME:FMX_...=1,...")
    ap.add_argument("--variants", default="packages/backend_cuda/tools/variants.txt")
    ap.add_argument("--cp-tests", default="nccl or gpus",
                    help="-k of tests/distributed for context-parallel ('' skips the tests)")
    ap.add_argument("--cp-args", default="", help="benchmarks/ring_scaling.py arguments")
    ap.add_argument("--sm90-facts", metavar="LIB", help=argparse.SUPPRESS)
    ap.add_argument("--show", type=int, default=0, help="print each step's last N log lines")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print(__doc__)
        return 0
    if a.sm90_facts:
        return sm90_facts(a.sm90_facts)
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
