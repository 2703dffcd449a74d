"""Whether a backend can run on this machine's GPU, for GPU tests' skip conditions."""

from __future__ import annotations


def backend_gpu_reasons(name: str, capability: tuple[int, int] | None = None) -> list[str]:
    """[] when torch sees a CUDA device and backend `name` is usable; else why not (a skip
    reason): torch missing, no CUDA device, the backend's own availability reasons, or the error
    raised looking it up (e.g. its package not installed). `capability`: the device must also
    have exactly this compute capability (tests of one architecture's kernels)."""
    try:
        import torch
    except ImportError:
        return ["torch not installed"]
    if not torch.cuda.is_available():
        return ["no CUDA device"]
    from .. import dispatch

    try:
        reasons = dispatch.availability(dispatch.get_backend(name))
    except Exception as e:  # not installed
        return [str(e)]
    if reasons:
        return reasons
    got = tuple(torch.cuda.get_device_capability())
    if capability is not None and got != tuple(capability):
        return [f"needs compute capability {capability[0]}.{capability[1]}, got {got[0]}.{got[1]}"]
    return []
