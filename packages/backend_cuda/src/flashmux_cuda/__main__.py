"""``python -m flashmux_cuda build [--archs 80,90] [--jobs N] [--head-dims 64,128] [--jax]``:
build the kernel library ahead of time and print its path. ``info`` prints what a build would use.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmux_cuda")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("build", help="build libflashmux_cuda.so into the cache, print its path")
    pb.add_argument(
        "--archs",
        help="e.g. 80,90 (default: FLASHMUX_CUDA_ARCHS or this machine's GPUs); a 9.x arch "
        "also builds the sm90 (Hopper) family for sm_90a",
    )
    pb.add_argument("--jobs", "-j", type=int, help="parallel nvcc processes")
    pb.add_argument("--head-dims", help="only these head-dim instantiations, e.g. 64,128 (CI)")
    pb.add_argument("--force", action="store_true", help="rebuild even when cached")
    pb.add_argument("--jax", action="store_true", help="also build the JAX FFI library")
    pb.add_argument("--quiet", "-q", action="store_true")
    sub.add_parser("info", help="print the toolchain and the cache key a build would use")
    args = ap.parse_args(argv)

    from . import build as b

    try:
        if args.cmd == "info":
            cfg = b.BuildConfig.from_env()
            print(f"nvcc      {cfg.nvcc} ({cfg.nvcc_version})")
            print(f"ninja     {b.find_ninja()}")
            print(f"cutlass   {cfg.cutlass_include} ({cfg.cutlass_version})")
            print(f"src       {cfg.src} ({len(cfg.translation_units())} .cu)")
            print(f"archs     {' '.join(cfg.archs)}")
            fams = (
                "sm80 + sm90 (sm_90a)" if b.has_sm90(cfg.archs) else "sm80 (no 9.x arch: no sm90)"
            )
            print(f"families  {fams}")
            print(f"head_dims {cfg.head_dims or 'all'}")
            print(f"key       {cfg.key()}")
            print(f"library   {cfg.library_path()}")
            return 0
        cfg = b.BuildConfig.from_env(archs=args.archs, head_dims=args.head_dims, jobs=args.jobs)
        t0 = time.monotonic()
        lib = b.build(cfg, quiet=args.quiet, force=args.force)
        if args.jax:
            jlib = b.build_jax_ffi(cfg, lib, quiet=args.quiet)
            print(jlib)
        if not args.quiet:
            sys.stderr.write(f"flashmux_cuda: ready in {time.monotonic() - t0:.1f}s\n")
        print(lib)
        return 0
    except (b.BuildError, ValueError) as e:
        print(f"flashmux_cuda: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
