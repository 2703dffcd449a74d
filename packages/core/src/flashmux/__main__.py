"""`python -m flashmux info | demo | bench ...`"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("flashmux", "numpy", "torch", "jax", "jaxlib", "triton", "nvidia-cutlass"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _devices() -> list[str]:
    lines = []
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    lines.append(
                        f"torch cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
                        f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"
                    )
            else:
                lines.append("torch: no CUDA device")
        except Exception as e:  # a broken install must not break `info`
            lines.append(f"torch: error {e}")
    if importlib.util.find_spec("jax") is not None:
        try:
            import jax

            for d in jax.devices():
                cc = getattr(d, "compute_capability", None)
                lines.append(f"jax {d.platform}:{d.id}: {d.device_kind}" + (f", compute capability {cc}" if cc else ""))
        except Exception as e:
            lines.append(f"jax: error {e}")
    return lines


def info() -> int:
    from . import dispatch

    print("flashmux info")
    for k, v in _versions().items():
        print(f"  {k:15s} {v}")
    print("devices")
    for line in _devices() or ["  (none found)"]:
        print(f"  {line}")
    print("backends")
    for b in dispatch.registry().values():
        r = dispatch.availability(b)
        caps = b.capabilities
        status = "usable" if not r else "unusable: " + "; ".join(r)
        print(f"  {b.name:10s} {status}")
        kinds = "/".join(sorted(caps.array_kinds)) or "-"
        cross = ("; crosses from " + "/".join(sorted(caps.crosses_from))) if caps.crosses_from else ""
        print(
            f"  {'':10s} arrays {kinds}{cross}; devices {'/'.join(sorted(caps.devices)) or '-'}; "
            f"dtypes {'/'.join(sorted(caps.dtypes)) or '-'}; head_dim <= {caps.max_head_dim}"
        )
        if not r:
            for k, v in b.info().items():
                print(f"  {'':10s} {k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m flashmux", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, backends and why each is (un)usable")
    sub.add_parser("demo", help="one realistic call: explain, check, time", add_help=False)
    sub.add_parser("bench", help="the benchmark harness (see docs/benchmarks.md)", add_help=False)
    if argv and argv[0] in ("bench", "demo"):
        if argv[0] == "bench":
            from .bench.cli import main as bench_main
        else:
            from .demo import main as bench_main
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    return 2


if __name__ == "__main__":
    sys.exit(main())
