"""What a result was measured on: device, driver, CUDA, framework and library versions, date."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:
        return None


def device_class(capability) -> str:
    """'sm90' for compute capability (9, 0); 'cpu' when there is none."""
    if not capability:
        return "cpu"
    return f"sm{capability[0]}{capability[1]}"


def collect(device: str, fws: dict) -> dict:
    info: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "device_type": device,
        "versions": {},
    }
    v = info["versions"]
    for dist in (
        "flashmux",
        "flashmux-triton",
        "flashmux-cuda",
        "flashmux-pallas",
        "numpy",
        "torch",
        "triton",
        "jax",
        "jaxlib",
        "jax-cuda13-plugin",
        "jax-cuda12-plugin",
        "matplotlib",
    ):
        ver = _version(dist)
        if ver:
            v[dist] = ver
    torch_fw = fws.get("torch")
    if torch_fw is not None:
        t = torch_fw.torch
        v["torch"] = t.__version__
        info["cuda_runtime"] = t.version.cuda
        try:
            info["cudnn"] = t.backends.cudnn.version()
        except Exception:
            pass
        if device == "cuda":
            p = t.cuda.get_device_properties(0)
            info["device_name"] = p.name
            info["compute_capability"] = [p.major, p.minor]
            info["device_memory_bytes"] = int(p.total_memory)
            info["multiprocessors"] = p.multi_processor_count
            info["l2_cache_bytes"] = int(getattr(p, "L2_cache_size", 0)) or None
    jax_fw = fws.get("jax")
    if jax_fw is not None:
        info["jax_device"] = str(getattr(jax_fw.dev, "device_kind", jax_fw.dev))
        v["jax"] = jax_fw.jax.__version__
    if device == "cuda":
        smi = _run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ]
        )
        if smi:
            parts = [s.strip() for s in smi.splitlines()[0].split(",")]
            info["nvidia_smi"] = smi.splitlines()[0]
            if len(parts) > 1:
                info["driver"] = parts[1]
            info.setdefault("device_name", parts[0])
        if "compute_capability" not in info and jax_fw is not None:
            cc = getattr(jax_fw.dev, "compute_capability", None)
            if cc:
                info["compute_capability"] = [int(x) for x in str(cc).split(".")[:2]]
    else:
        info["device_name"] = platform.processor() or platform.machine()
    info["device_class"] = device_class(info.get("compute_capability"))
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        # a tree copied onto another machine can carry an older .git: say when files differ
        changed = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        info["git_commit"] = commit + (" + uncommitted changes" if changed else "")
    return info
