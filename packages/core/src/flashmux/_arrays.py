"""Small adapters that read what the dispatcher needs off torch tensors, JAX arrays and NumPy
arrays, without importing a framework unless its arrays are actually passed in.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

_DTYPE_NAMES = {
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
}


def array_kind(x) -> str | None:
    """'torch', 'jax', 'numpy' or None, judged by the type's module (no imports needed)."""
    mod = type(x).__module__ or ""
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod.startswith("torch"):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            return "torch"
    if mod.startswith(("jax", "jaxlib")):
        jax = sys.modules.get("jax")
        if jax is not None and isinstance(x, jax.Array | jax.core.Tracer):
            return "jax"
    return None


def dtype_name(x) -> str:
    s = str(x.dtype)
    s = s.rsplit(".", 1)[-1]
    return _DTYPE_NAMES.get(s, s)


def torch_compiling() -> bool:
    """Inside a torch.compile trace: caches must not be written (dynamo can't replay stores
    of our frozen dataclasses into module-level dicts)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def is_traced(x) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cpu" | "cuda" | other platform names
    index: int
    name: str
    compute_capability: tuple[int, int] | None


_CPU = DeviceInfo("cpu", 0, "cpu", None)
_device_cache: dict = {}


def device_of(x, kind: str) -> DeviceInfo:
    if kind == "numpy":
        return _CPU
    if kind == "torch":
        dev = x.device
        if dev.type != "cuda":
            return DeviceInfo(dev.type, dev.index or 0, dev.type, None)
        key: tuple = ("torch", dev.index)
        if key not in _device_cache:
            import torch

            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            info = DeviceInfo("cuda", idx, props.name, (props.major, props.minor))
            if torch.compiler.is_compiling():
                return info
            _device_cache[key] = info
        return _device_cache[key]
    # jax
    try:
        devs = x.devices() if not is_traced(x) else None
    except Exception:  # sharded or deleted arrays
        devs = None
    if devs:
        dev = next(iter(devs))
    else:
        import jax

        dev = jax.devices()[0]  # traced values: the default device runs the computation
    key = ("jax", dev.platform, dev.id)
    if key not in _device_cache:
        platform = "cuda" if dev.platform in ("gpu", "cuda") else dev.platform
        cc = None
        cap = getattr(dev, "compute_capability", None)
        if cap:
            try:
                major, minor = str(cap).split(".")[:2]
                cc = (int(major), int(minor))
            except ValueError:
                cc = None
        _device_cache[key] = DeviceInfo(platform, dev.id, getattr(dev, "device_kind", platform), cc)
    return _device_cache[key]


def same_device(a, b, kind: str) -> bool:
    if kind == "numpy":
        return True
    if kind == "torch":
        return a.device == b.device
    if is_traced(a) or is_traced(b):
        return True
    try:
        return a.devices() == b.devices()
    except Exception:
        return True


def to_numpy_int(x, kind: str) -> np.ndarray | None:
    """cu_seqlens as a host int64 array, or None when the values are traced (inside jit)."""
    if kind == "torch":
        return x.detach().cpu().numpy().astype(np.int64)
    if kind == "jax":
        if is_traced(x):
            return None
        return np.asarray(x).astype(np.int64)
    return np.asarray(x).astype(np.int64)
