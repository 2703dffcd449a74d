"""Build libflashmux_cuda.so (and the JAX FFI library) with nvcc, driven by a generated build.ninja.

The kernels are compiled on first use into a versioned cache directory,
``$FLASHMUX_CACHE_DIR/cuda/<key>/`` (default ``~/.cache/flashmux/cuda/<key>/``), where the key
hashes everything that changes the binary: the sources under csrc/, the nvcc flags, the arch
list, the nvcc version, the CUTLASS headers' version and the ABI version. A file lock makes
concurrent processes wait for one build instead of racing. ``python -m flashmux_cuda build``
builds ahead of time.

Knobs (environment):

- ``FLASHMUX_CUDA_ARCHS``: "80;90" (also "8.0,9.0", "90a"); default: the GPUs on this machine.
- ``FLASHMUX_CUDA_HEAD_DIMS``: "64,128": compile only these head-dim instantiations (CI uses it
  to keep the compile short). Passed to the sources as ``-DFMX_HEAD_DIMS_LIMITED`` plus
  ``-DFMX_HEAD_DIM_<N>=1`` for each; .cu files named ``*hdim<N>*`` for other N are skipped.
- ``FLASHMUX_CUDA_SM80_ARCHS``: archs for the units outside ``csrc/sm90/`` (default: the arch
  list). CI's compile-only check sets "80": the sm80 kernels are then compiled for sm_80 once,
  not again for sm_90 (the same source through the same front end; the library it makes has no
  sm_90 code for them, so it is for checking compiles, not for running on Hopper).
- ``FLASHMUX_CUDA_JOBS`` (or ``MAX_JOBS``): parallel nvcc processes.
- ``FLASHMUX_CUDA_NVCC_FLAGS``: extra nvcc flags, appended.
- ``FLASHMUX_CUTLASS_INCLUDE``: the CUTLASS/CuTe include directory (default: the pinned
  nvidia-cutlass wheel's ``cutlass_library/source/include``).
- ``FLASHMUX_CUDA_SRC``: the csrc/ directory (default: next to the package).
- ``FLASHMUX_NVCC``: the nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH).

Kernel families: ``csrc/sm90/`` (wgmma/TMA, Hopper) is compiled only for
``-gencode=arch=compute_90a,code=sm_90a`` (wgmma and setmaxnreg need the ``a`` target), and
only when the arch list has a 9.x arch; every other translation unit is compiled for the arch
list as given. With the sm90 family in, all units see ``-DFMX_HAS_SM90`` (the API file then
dispatches the forward to it on compute capability 9.0; see ``family.py``).

The kernel sources may add nvcc flags of their own in ``csrc/nvcc_flags.txt`` (one or more per
line, ``#`` comments); they enter the key like every other flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .abi import ABI_VERSION

LIB_NAME = "libflashmux_cuda.so"
JAX_LIB_NAME = "libflashmux_cuda_jax.so"
BASE_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG")
HOST_FLAGS = ("-Xcompiler", "-fPIC")
# Bump when the generated build.ninja changes in a way the other key parts don't capture.
_GENERATOR_VERSION = "2"
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cc", ".cpp", ".inl", ".txt")
_JAX_FFI_DIR = "jax_ffi"


class BuildError(RuntimeError):
    """The build could not run or failed; ``log`` is the build log's path when there is one."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message if log is None else f"{message}, log: {log}")
        self.reason = message
        self.log = log


# ------------------------------------------------------------------------------------------
# Tools and inputs


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def source_dir() -> Path:
    """csrc/: $FLASHMUX_CUDA_SRC, a copy shipped inside the package, or the source tree's."""
    env = os.environ.get("FLASHMUX_CUDA_SRC")
    if env:
        return Path(env).resolve()
    shipped = package_dir() / "csrc"
    if shipped.is_dir():
        return shipped
    return package_dir().parents[1] / "csrc"


def cache_root() -> Path:
    base = os.environ.get("FLASHMUX_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "flashmux"
    return root / "cuda"


def find_nvcc() -> str | None:
    env = os.environ.get("FLASHMUX_NVCC")
    if env:
        return env if Path(env).is_file() or shutil.which(env) else None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


_nvcc_version_cache: dict[str, str] = {}


def nvcc_version(nvcc: str) -> str:
    """nvcc's 'release X.Y, VX.Y.Z' line (part of the cache key)."""
    if nvcc not in _nvcc_version_cache:
        try:
            out = subprocess.run(
                [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"nvcc at {nvcc} does not run: {e}") from None
        lines = [ln for ln in out.splitlines() if "release" in ln] or out.splitlines()[-1:]
        _nvcc_version_cache[nvcc] = lines[0].strip() if lines else "unknown"
    return _nvcc_version_cache[nvcc]


def find_ninja() -> str | None:
    """The `ninja` PyPI package's binary, else `ninja` on PATH."""
    try:
        import ninja  # the PyPI package

        cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.is_file():
            return str(cand)
    except Exception:
        pass
    return shutil.which("ninja")


def cutlass_include() -> Path | None:
    """The CuTe/CUTLASS include directory: $FLASHMUX_CUTLASS_INCLUDE or the nvidia-cutlass wheel."""
    env = os.environ.get("FLASHMUX_CUTLASS_INCLUDE")
    if env:
        return Path(env).expanduser().resolve()
    import importlib.util

    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "source" / "include"
        if (inc / "cute").is_dir():
            return inc
    return None


def _cutlass_version(inc: Path) -> str:
    """CUTLASS's version from its version.h (part of the key), or the path when unreadable."""
    try:
        text = (inc / "cutlass" / "version.h").read_text()
        nums = [
            re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")
        ]
        return ".".join(m.group(1) if m else "?" for m in nums)
    except OSError:
        return str(inc)


# ------------------------------------------------------------------------------------------
# GPU detection without a framework: the driver API through ctypes


def detect_devices() -> list[tuple[int, int]]:
    """Compute capabilities of the visible CUDA devices ([] when no driver or no device)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return []
    try:
        if cuda.cuInit(0) != 0:
            return []
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        caps = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
                continue
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
            cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
            caps.append((major.value, minor.value))
        return caps
    except Exception:
        return []


def parse_archs(text: str) -> tuple[str, ...]:
    """'80;90', '8.0,9.0', 'sm_90a 80' -> ('80', '90') / ('80', '90a'), sorted, unique."""
    out = set()
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        t = tok.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", t):
            raise ValueError(
                f"FLASHMUX_CUDA_ARCHS: cannot read arch {tok!r} (expected e.g. 80, 9.0, 90a)"
            )
        out.add(t)
    if not out:
        raise ValueError("FLASHMUX_CUDA_ARCHS is empty")
    return tuple(sorted(out, key=lambda a: (int(re.match(r"\d+", a).group()), a)))


def default_archs() -> tuple[str, ...]:
    env = os.environ.get("FLASHMUX_CUDA_ARCHS")
    if env:
        return parse_archs(env)
    caps = detect_devices()
    if not caps:
        raise BuildError("no CUDA device to build for (set FLASHMUX_CUDA_ARCHS, e.g. 80;90)")
    return parse_archs(";".join(f"{a}{b}" for a, b in caps))


def gencode_flags(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


SM90_DIR = "sm90"
SM90_GENCODE = "-gencode=arch=compute_90a,code=sm_90a"


def has_sm90(archs) -> bool:
    """Does the arch list ask for Hopper (9.x), so that the sm90 family is built?"""
    return any(re.match(r"9\d[a-z]?$", a) for a in archs)


def is_sm90_source(rel: str) -> bool:
    """csrc-relative path of a source of the sm90 family (compiled for sm_90a only)."""
    return rel.split("/", 1)[0] == SM90_DIR


def parse_head_dims(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    dims = sorted({int(t) for t in re.split(r"[;,\s]+", text.strip()) if t})
    return tuple(dims) or None


# ------------------------------------------------------------------------------------------
# The build configuration and its key


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the binary. `key` hashes it; the cache directory is named by it."""

    archs: tuple[str, ...]
    nvcc: str
    nvcc_version: str
    src: Path
    cutlass_include: Path | None
    cutlass_version: str = ""
    head_dims: tuple[int, ...] | None = None
    extra_flags: tuple[str, ...] = ()
    jobs: int | None = field(default=None, compare=False)
    # archs of the units outside csrc/sm90/ (None: `archs`); CI's lean compile check uses ("80",)
    sm80_archs: tuple[str, ...] | None = None

    @classmethod
    def from_env(
        cls, archs=None, head_dims=None, jobs=None, nvcc=None, sm80_archs=None
    ) -> BuildConfig:
        nvcc = nvcc or find_nvcc()
        if nvcc is None:
            raise BuildError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
        archs = parse_archs(archs) if isinstance(archs, str) else (tuple(archs) if archs else None)
        if head_dims is None:
            head_dims = parse_head_dims(os.environ.get("FLASHMUX_CUDA_HEAD_DIMS"))
        elif isinstance(head_dims, str):
            head_dims = parse_head_dims(head_dims)
        if sm80_archs is None:
            sm80_archs = os.environ.get("FLASHMUX_CUDA_SM80_ARCHS") or None
        if isinstance(sm80_archs, str):
            sm80_archs = parse_archs(sm80_archs)
        inc = cutlass_include()
        if jobs is None:
            env_jobs = os.environ.get("FLASHMUX_CUDA_JOBS") or os.environ.get("MAX_JOBS")
            jobs = int(env_jobs) if env_jobs else None
        return cls(
            archs=archs or default_archs(),
            nvcc=nvcc,
            nvcc_version=nvcc_version(nvcc),
            src=source_dir(),
            cutlass_include=inc,
            cutlass_version=_cutlass_version(inc) if inc else "",
            head_dims=tuple(head_dims) if head_dims else None,
            extra_flags=tuple(shlex.split(os.environ.get("FLASHMUX_CUDA_NVCC_FLAGS", ""))),
            jobs=jobs,
            sm80_archs=tuple(sm80_archs) if sm80_archs else None,
        )

    # -- inputs ----------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        """Every file under csrc/ that can change the library (csrc/jax_ffi/ excluded)."""
        if not self.src.is_dir():
            return []
        files = []
        for p in sorted(self.src.rglob("*")):
            rel = p.relative_to(self.src)
            if rel.parts and rel.parts[0] == _JAX_FFI_DIR:
                continue
            if p.is_file() and p.suffix in _SOURCE_SUFFIXES:
                files.append(p)
        return files

    def translation_units(self) -> list[Path]:
        tus = [p for p in self.source_files() if p.suffix == ".cu"]
        if not has_sm90(self.archs):
            tus = [p for p in tus if not is_sm90_source(p.relative_to(self.src).as_posix())]
        if self.head_dims:
            keep = set(self.head_dims)
            out = []
            for p in tus:
                m = re.search(r"hdim(\d+)", p.name)
                if m is None or int(m.group(1)) in keep:
                    out.append(p)
            tus = out
        return tus

    def source_flags(self) -> list[str]:
        """Flags the kernel sources ask for in csrc/nvcc_flags.txt."""
        f = self.src / "nvcc_flags.txt"
        if not f.is_file():
            return []
        flags: list[str] = []
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                flags += shlex.split(line)
        return flags

    def flags(self) -> list[str]:
        """Compile flags, arch flags excluded."""
        flags = list(BASE_FLAGS) + list(HOST_FLAGS)
        flags += [f"-I{self.src}"]
        if self.cutlass_include is not None:
            flags += [f"-I{self.cutlass_include}"]
        flags += [f"-DFMX_ABI_VERSION_EXPECTED={ABI_VERSION}"]
        if has_sm90(self.archs):
            flags += ["-DFMX_HAS_SM90"]
        if self.head_dims:
            flags += ["-DFMX_HEAD_DIMS_LIMITED"] + [f"-DFMX_HEAD_DIM_{d}=1" for d in self.head_dims]
        flags += self.source_flags()
        flags += list(self.extra_flags)
        return flags

    def key(self) -> str:
        h = hashlib.sha256()

        def put(*parts):
            for p in parts:
                h.update(str(p).encode())
                h.update(b"\0")

        put("gen", _GENERATOR_VERSION, "abi", ABI_VERSION, "nvcc", self.nvcc_version)
        put("archs", *self.archs)
        if self.sm80_archs:
            put("sm80_archs", *self.sm80_archs)
        # Flags without absolute paths, so that moving the cache or the checkout keeps the key.
        put("flags", *[f for f in self.flags() if not f.startswith("-I")])
        put("cutlass", self.cutlass_version)
        put("tus", *[p.relative_to(self.src).as_posix() for p in self.translation_units()])
        for p in self.source_files():
            put(p.relative_to(self.src).as_posix())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()[:16]

    def build_dir(self) -> Path:
        return cache_root() / self.key()

    def library_path(self) -> Path:
        return self.build_dir() / LIB_NAME


# ------------------------------------------------------------------------------------------
# build.ninja


def _ninja_escape(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _q(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def compile_rank(rel: str) -> tuple[int, int]:
    """A unit's rough compile cost (larger first): ninja starts ready units in the order of the
    build statements, so listing the long ones first keeps them off the end of a parallel build
    (the GPU machine's 16-core build was about twice its longest unit with the sm90 units last).
    sm90 kernels > sm80 backward > sm80 forward > decode > the rest > tune_* (empty unless
    -DFMX_TUNING); a larger head dim first within a class."""
    name = rel.rsplit("/", 1)[-1]
    m = re.search(r"hdim(\d+)", name)
    d = int(m.group(1)) if m else 0
    if name.startswith("tune_"):
        cls = 0
    elif is_sm90_source(rel) and m:
        cls = 5
    elif "bwd_hdim" in name:
        cls = 4
    elif m:
        cls = 3
    elif name.startswith("decode"):
        cls = 2
    else:
        cls = 1
    return cls, d


def write_build_ninja(cfg: BuildConfig, build_dir: Path) -> Path:
    tus = sorted(
        cfg.translation_units(),
        key=lambda p: compile_rank(p.relative_to(cfg.src).as_posix()),
        reverse=True,
    )
    if not tus:
        raise BuildError(f"no .cu sources under {cfg.src}")
    lines = [
        "# generated by flashmux_cuda.build; do not edit",
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(cfg.nvcc)}",
        f"cflags = {_q(cfg.flags())}",
        f"gencode = {_q(gencode_flags(cfg.archs))}",
        "",
        "rule nvcc",
        "  command = $nvcc $cflags $gencode -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $desc",
        "",
        "rule link",
        "  command = $nvcc -shared $gencode $in -o $out",
        "  description = link $out",
        "",
    ]
    objs = []
    for tu in tus:
        rel = tu.relative_to(cfg.src).as_posix()
        obj = "obj/" + re.sub(r"[^A-Za-z0-9_.-]", "_", rel) + ".o"
        objs.append(obj)
        lines.append(f"build {obj}: nvcc {_ninja_escape(str(tu))}")
        lines.append(f"  desc = {rel}")
        if is_sm90_source(rel):
            lines.append(f"  gencode = {SM90_GENCODE}")
        elif cfg.sm80_archs:
            lines.append(f"  gencode = {_q(gencode_flags(cfg.sm80_archs))}")
    lines.append(f"build {LIB_NAME}: link {' '.join(objs)}")
    lines.append(f"default {LIB_NAME}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# Lock and run


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None):
    """An exclusive inter-process lock on `path` (fcntl.flock; the filelock package elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        import filelock

        with filelock.FileLock(str(path), timeout=-1 if timeout is None else timeout):
            yield
        return
    with open(path, "a+") as fh:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if timeout is not None and time.monotonic() - start > timeout:
                    raise BuildError(f"timed out waiting for the build lock {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run_ninja(build_dir: Path, jobs: int | None, log_path: Path, quiet: bool = False) -> None:
    ninja = find_ninja()
    if ninja is None:
        raise BuildError("ninja not found (pip install ninja)")
    cmd = [ninja, "-C", str(build_dir)]
    if jobs:
        cmd += ["-j", str(jobs)]
    env = dict(os.environ, NINJA_STATUS="[%f/%t %es] ")
    tty = sys.stderr.isatty() and not quiet
    with open(log_path, "w") as log:
        log.write("$ " + _q(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
        except OSError as e:
            raise BuildError(f"could not start ninja: {e}", log_path) from None
        last_status = False
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if quiet:
                continue
            status = line.startswith("[") and "] " in line
            if tty and status:
                sys.stderr.write("\r\033[K" + line.rstrip("\n")[:200])
                last_status = True
            else:
                if last_status:
                    sys.stderr.write("\n")
                    last_status = False
                sys.stderr.write(line)
            sys.stderr.flush()
        rc = proc.wait()
        if last_status:
            sys.stderr.write("\n")
    if rc != 0:
        raise BuildError("build failed", log_path)


def build(cfg: BuildConfig | None = None, *, quiet: bool = False, force: bool = False) -> Path:
    """Build (or find in the cache) libflashmux_cuda.so and return its path."""
    cfg = cfg or BuildConfig.from_env()
    bdir = cfg.build_dir()
    lib = bdir / LIB_NAME
    done = bdir / "BUILD_OK"
    if done.is_file() and lib.is_file() and not force:
        return lib
    with file_lock(bdir.parent / f"{bdir.name}.lock"):
        if done.is_file() and lib.is_file() and not force:
            return lib  # another process built it while we waited
        bdir.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        write_build_ninja(cfg, bdir)
        (bdir / "config.txt").write_text(
            f"key {cfg.key()}\narchs {' '.join(cfg.archs)}\nnvcc {cfg.nvcc} ({cfg.nvcc_version})\n"
            f"src {cfg.src}\ncutlass {cfg.cutlass_include} ({cfg.cutlass_version})\n"
            f"head_dims {cfg.head_dims or 'all'}\n"
        )
        log = bdir / "build.log"
        if not quiet:
            n = len(cfg.translation_units())
            sys.stderr.write(
                f"flashmux_cuda: building {n} CUDA sources for sm_{',sm_'.join(cfg.archs)} "
                f"into {bdir} (once; cached)\n"
            )
        t0 = time.monotonic()
        _run_ninja(bdir, cfg.jobs, log, quiet=quiet)
        if not lib.is_file():
            raise BuildError("build produced no library", log)
        done.write_text(f"{time.monotonic() - t0:.1f}s\n")
    return lib


# ------------------------------------------------------------------------------------------
# The JAX FFI library: csrc/jax_ffi/*.cc against jaxlib's headers, linked to the kernel library


def jax_ffi_sources(cfg: BuildConfig) -> list[Path]:
    d = cfg.src / _JAX_FFI_DIR
    return (
        sorted(p for p in d.glob("*") if p.suffix in (".cc", ".cpp", ".cu")) if d.is_dir() else []
    )


def build_jax_ffi(cfg: BuildConfig, kernel_lib: Path, *, quiet: bool = False) -> Path:
    """Build libflashmux_cuda_jax.so (XLA FFI handlers) beside the kernel library."""
    import jax.ffi

    inc = Path(jax.ffi.include_dir())
    srcs = jax_ffi_sources(cfg)
    if not srcs:
        raise BuildError(f"no XLA FFI sources under {cfg.src / _JAX_FFI_DIR}")
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = "?"
    h = hashlib.sha256()
    h.update(f"{_GENERATOR_VERSION}|{jaxlib_version}|{cfg.nvcc_version}".encode())
    for p in srcs + [cfg.src / "flashmux_cuda.h"]:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    out_dir = kernel_lib.parent / f"jax-{h.hexdigest()[:12]}"
    lib = out_dir / JAX_LIB_NAME
    done = out_dir / "BUILD_OK"
    if done.is_file() and lib.is_file():
        return lib
    with file_lock(kernel_lib.parent / f"{out_dir.name}.lock"):
        if done.is_file() and lib.is_file():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = ["-O2", "-std=c++17", *HOST_FLAGS, "-isystem", str(inc), f"-I{cfg.src}"]
        lines = [
            "# generated by flashmux_cuda.build; do not edit",
            f"nvcc = {shlex.quote(cfg.nvcc)}",
            f"cflags = {_q(flags)}",
            "rule cxx",
            "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule link",
            f"  command = $nvcc -shared $in -o $out -L{_ninja_escape(str(kernel_lib.parent))} "
            f"-lflashmux_cuda -Xlinker -rpath={_ninja_escape(str(kernel_lib.parent))}",
            "  description = link $out",
        ]
        objs = []
        for s in srcs:
            obj = f"obj/{s.name}.o"
            objs.append(obj)
            lines.append(f"build {obj}: cxx {_ninja_escape(str(s))}")
        lines.append(f"build {JAX_LIB_NAME}: link {' '.join(objs)}")
        (out_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        _run_ninja(out_dir, cfg.jobs, out_dir / "build.log", quiet=quiet)
        done.write_text("ok\n")
    return lib
