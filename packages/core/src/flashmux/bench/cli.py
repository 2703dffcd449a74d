"""`python -m flashmux bench ...`: measure flashmux backends against the anchors.

Writes into --out: results.json (every raw figure, device and versions), results.md (tables)
and one PNG per sweep. `--priority-from results.json` regenerates the dispatcher's priority
table instead; `--report-from results.json` re-renders the tables and plots of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from .impls import ANCHORS, QUICK_ANCHORS, Context, anchor_impls, flashmux_impls
from .shapes import DTYPES, MODES, SWEEPS, SweepConfig, build_points


def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str | None) -> list[int] | None:
    v = _csv(s)
    if v is None:
        return None
    out = []
    for x in v:
        mult = 1
        if x.lower().endswith("k"):
            x, mult = x[:-1], 1024
        out.append(int(x) * mult)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashmux bench",
        description="Benchmark flashmux backends against torch/JAX attention anchors.",
    )
    p.add_argument(
        "--backends",
        help="flashmux backends to force, comma-separated, 'auto' for "
        "the dispatcher's choice, 'none' for none (default: all discovered + auto; "
        "--quick: reference,auto)",
    )
    p.add_argument(
        "--anchors",
        help="anchors, comma-separated, or 'none' (default: all; "
        f"--quick: {','.join(QUICK_ANCHORS)}). Known: {','.join(ANCHORS)}",
    )
    p.add_argument(
        "--sweep", default=None, help=f"{'|'.join(SWEEPS)}|all, comma-separated (default: papers)"
    )
    p.add_argument("--head-dims", help="head dims, e.g. 64,128 (default per sweep)")
    p.add_argument("--seqlens", help="sequence lengths, e.g. 512,1k,16k (default per sweep)")
    p.add_argument(
        "--modes",
        help="fwd,bwd,fwd_bwd (default per sweep: decode fwd, memory fwd_bwd, others fwd,fwd_bwd)",
    )
    p.add_argument("--dtype", default=None, help="bf16|fp16 (comma list allowed; --quick: fp32)")
    p.add_argument(
        "--causal",
        choices=["both", "yes", "no"],
        default=None,
        help="default per sweep (papers/gqa/varlen both, long yes, decode/memory no)",
    )
    p.add_argument(
        "--frameworks", help="torch,jax,numpy (default: all installed; --quick: torch,numpy)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes on the CPU: checks the harness end to end in seconds",
    )
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2)")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed calls per measurement (default: adaptive, see --target-ms)",
    )
    p.add_argument(
        "--target-ms",
        type=float,
        default=None,
        help="time spent on timed calls per measurement (default 200)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole sweep; what does not fit is marked, not run",
    )
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument(
        "--masks",
        help="masks sweep: mask specs, comma-separated, 'dense' for the unmasked call (default: "
        "dense plus the issue's eight: causal, sliding:1024, sliding:4096, doc:8, doc:64, "
        "prefix:S/4, dilated:256:1024, chunked:1024); a spec ending in '+alibi' (or 'alibi' alone, "
        "the dense call) adds ALiBi slopes, timed against the same call without them",
    )
    p.add_argument(
        "--log-each",
        action="store_true",
        help="a stderr line per measurement with its wall seconds (default on for --sweep masks)",
    )
    p.add_argument(
        "--kvcache-only",
        action="store_true",
        help="decode sweep: only the attention_with_kvcache rows (no plain Sq=1/128 attention)",
    )
    p.add_argument(
        "--kv-pages",
        help="decode sweep: kvcache rows with these page sizes only, 0 = contiguous (default "
        "0,16,64)",
    )
    p.add_argument("--kv-sq", help="decode sweep: kvcache rows with these Sq only (default 1,4)")
    p.add_argument(
        "--kv-no-extras",
        action="store_true",
        help="decode sweep: no ragged-batch and MQA kvcache rows",
    )
    p.add_argument(
        "--compile-threads",
        type=int,
        default=None,
        help="JAX: compile every function ahead, in this many threads, before "
        "timing (default: 8 on a GPU, 0 on the CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--priority-from",
        metavar="RESULTS_JSON",
        help="regenerate the dispatcher priority table from a results JSON",
    )
    p.add_argument(
        "--priority-out",
        metavar="PATH",
        help="where --priority-from writes (default OUT/priority.json); existing "
        "device classes in the file are kept",
    )
    p.add_argument(
        "--report-from",
        metavar="RESULTS_JSON",
        help="re-render results.md and plots from a results JSON (several, comma-separated, "
        "are merged into one run) into --out",
    )
    p.add_argument("--note", help="with --docs: a line shown above the results")
    p.add_argument(
        "--docs",
        metavar="DIR",
        help="with --report-from: write DIR/benchmarks.md and DIR/img/<sweep>.png",
    )
    return p


def _resolve_device(opt: str, quick: bool) -> str:
    if quick or opt == "cpu":
        return "cpu"
    if opt == "cuda":
        return "cuda"
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    except ImportError:
        pass
    try:
        import jax

        if any(d.platform == "gpu" for d in jax.devices()):
            return "cuda"
    except Exception:
        pass
    return "cpu"


def _capability(device: str, fws: dict):
    if device != "cuda":
        return None
    t = fws.get("torch")
    if t is not None:
        return tuple(t.torch.cuda.get_device_capability(0))
    j = fws.get("jax")
    if j is not None:
        cc = getattr(j.dev, "compute_capability", None)
        if cc:
            return tuple(int(x) for x in str(cc).split(".")[:2])
    return None


def write_outputs(data: dict, out: Path, plots: bool = True) -> list[str]:
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / "results.json")
    files = []
    if plots:
        try:
            from .plots import plot_all

            files = plot_all(data, out)
        except Exception as e:  # plots are a nicety: never lose the JSON over them
            data.setdefault("log", []).append(f"plots failed: {type(e).__name__}: {e}")
    (out / "results.md").write_text(report.render(data, files))
    return ["results.json", "results.md", *files]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        argv = argv[1:]
    args = parser().parse_args(argv)
    out = Path(args.out)

    if args.priority_from:
        from .priority import regenerate

        dest = Path(args.priority_out) if args.priority_out else out / "priority.json"
        table = regenerate(args.priority_from, dest)
        print(json.dumps(table, indent=2, sort_keys=True))
        print(f"wrote {dest}", file=sys.stderr)
        return 0
    if args.report_from:
        from .docs import merge, write_docs

        data = merge(_csv(args.report_from))
        if args.docs:
            files = write_docs(data, args.docs, note=args.note)
            print("wrote " + ", ".join(str(Path(args.docs) / f) for f in files))
            return 0
        files = write_outputs(data, out, plots=not args.no_plots)
        print("wrote " + ", ".join(str(out / f) for f in files))
        return 0

    sweeps = _csv(args.sweep) or ["papers"]
    if "all" in sweeps:
        sweeps = list(SWEEPS)
    modes = _csv(args.modes)
    for m in modes or []:
        if m not in MODES:
            print(
                f"error: --modes: unknown mode {m!r} (expected {', '.join(MODES)})", file=sys.stderr
            )
            return 2
    dtypes = _csv(args.dtype) or (["fp32"] if args.quick else ["bf16"])
    for d in dtypes:
        if d not in DTYPES:
            print(
                f"error: --dtype: unknown dtype {d!r} (expected bf16, fp16, fp32)", file=sys.stderr
            )
            return 2
    try:
        cfg = SweepConfig(
            sweeps=sweeps,
            head_dims=_ints(args.head_dims),
            seqlens=_ints(args.seqlens),
            dtypes=dtypes,
            causal=args.causal,
            quick=args.quick,
            kvcache_only=args.kvcache_only,
            kv_pages=_ints(args.kv_pages),
            kv_sq=_ints(args.kv_sq),
            kv_extras=not args.kv_no_extras,
            masks=_csv(args.masks),
        )
        points = build_points(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = _resolve_device(args.device, args.quick)
    if device == "cuda":
        # torch and JAX share the GPU: JAX must not grab 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    anchors = _csv(args.anchors)
    backends = _csv(args.backends)
    lean = sweeps == ["masks"] and not args.quick and device == "cuda"
    if lean:  # the masks sweep's lean default (bench/maskbench.py): what issue 15's bar compares
        from .maskbench import LEAN_ANCHORS, LEAN_BACKENDS

        if anchors is None or backends is None:
            print("masks sweep, lean default: backends "
                  f"{','.join(backends or LEAN_BACKENDS)}, anchors {','.join(anchors or LEAN_ANCHORS)}"
                  " (--backends / --anchors widen it)", file=sys.stderr, flush=True)
        if anchors is None:
            anchors = list(LEAN_ANCHORS)
        if backends is None:
            backends = list(LEAN_BACKENDS)
    if anchors is None:
        anchors = list(QUICK_ANCHORS if args.quick else ANCHORS)
    elif anchors == ["none"]:
        anchors = []
    if backends is None and args.quick:
        backends = ["reference", "auto"]
    if backends == ["none"]:
        backends = []
    try:
        anchor_list = anchor_impls(anchors)
    except ValueError as e:
        print(f"error: --anchors: {e}", file=sys.stderr)
        return 2

    from .frameworks import make_framework

    want_fws = set(
        _csv(args.frameworks) or (["torch", "numpy"] if args.quick else ["torch", "jax", "numpy"])
    )
    fws, fw_reasons = {}, {}
    for name in ("torch", "jax", "numpy"):
        if name in want_fws:
            fw, reason = make_framework(name, device)
            if fw is not None:
                fws[name] = fw
            else:
                fw_reasons[name] = reason
                fws[f"_{name}_reason"] = reason
        else:
            fw_reasons[name] = "framework not selected (--frameworks)"
            fws[f"_{name}_reason"] = fw_reasons[name]
    ctx = Context(device=device, capability=_capability(device, fws), quick=args.quick, fws=fws)
    impls = []
    if backends is None or backends:
        impls += flashmux_impls(backends, ctx, fw_reasons)
    impls += anchor_list
    impls = [i for i in impls if i.framework in want_fws]
    if lean and backends == list(LEAN_BACKENDS):  # Triton serving JAX eagerly: not the bar's
        impls = [i for i in impls if i.id != "flashmux-triton[jax]"]

    from .runner import RunOptions, run_all, short

    opts = RunOptions(
        modes=modes,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        reps=args.reps if args.reps is not None else (2 if args.quick else None),
        target_s=(args.target_ms if args.target_ms is not None else 200) / 1e3,
        time_budget_s=args.time_budget,
        check=not args.no_check,
        precompile_threads=(
            args.compile_threads
            if args.compile_threads is not None
            else (min(8, os.cpu_count() or 1) if device == "cuda" else 0)
        ),
        seed=args.seed,
        log_each=args.log_each or "masks" in sweeps,
    )
    from . import envinfo

    env = envinfo.collect(device, {k: v for k, v in fws.items() if not k.startswith("_")})
    t0 = time.time()
    print(
        f"flashmux bench: {len(points)} problems x {len(impls)} implementations on "
        f"{env.get('device_name', device)}",
        file=sys.stderr,
        flush=True,
    )

    def snapshot(runner, partial: str | None) -> dict:
        data = {
            "schema": 1,
            "env": env,
            "args": {"argv": argv, **{k: v for k, v in vars(args).items()}},
            "wall_s": time.time() - t0,
            "implementations": [{**i.info(), "unavailable": i.unavailable(ctx)} for i in impls],
            "frameworks_missing": fw_reasons,
            "results": list(runner.results),
            "checks": list(runner.checks),
            "log": list(runner.log),
        }
        if partial:
            data["partial"] = partial
        return data

    # Results so far are written after every measurement (at most every 2 s), so a run that is
    # killed leaves what it measured; under --time-budget a watchdog ends a run that overruns
    # its budget inside one step (a compile, a check) and says where it was.
    state = {"runner": None, "written": 0.0, "current": None, "lock": threading.Lock()}

    def on_event(runner, event, impl, point):
        state["runner"] = runner
        state["current"] = f"{impl.id} {point.label}" if event == "start" else None
        if event == "done" and time.monotonic() - state["written"] > 2.0:
            with state["lock"]:
                try:
                    write_outputs(snapshot(runner, "in progress"), out, plots=False)
                except Exception as e:  # a report bug must not end the sweep
                    runner.log.append(f"writing the results so far failed: {short(e)}")
                state["written"] = time.monotonic()

    opts.on_event = on_event
    if args.time_budget is not None:
        grace = 3.0 + 0.02 * args.time_budget

        def overrun():
            print(f"\n[bench] time budget {args.time_budget:g} s + {grace:.0f} s exceeded while "
                  f"running {state['current'] or 'setup'}; ending the run", file=sys.stderr,
                  flush=True)
            r = state["runner"]
            if r is not None and state["lock"].acquire(timeout=2.0):
                try:
                    data = snapshot(r, f"stopped by the time budget in {state['current']}")
                    write_outputs(data, out, plots=False)
                    print(f"wrote {out / 'results.json'} ({len(data['results'])} records)",
                          file=sys.stderr, flush=True)
                except Exception as e:  # the exit must happen regardless
                    print(f"[bench] could not write the results: {e}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(3)

        watchdog = threading.Timer(args.time_budget + grace, overrun)
        watchdog.daemon = True
        watchdog.start()
    runner = run_all(points, impls, ctx, opts, progress=not args.no_progress)
    if args.time_budget is not None:
        watchdog.cancel()
    data = snapshot(runner, None)
    with state["lock"]:
        files = write_outputs(data, out, plots=not args.no_plots)
    _summary(data, out, files)
    return 0 if any(r["status"] == "ok" for r in runner.results) else 1


def _summary(data: dict, out: Path, files: list[str]) -> None:
    from collections import Counter

    from .report import _geomean, ratios

    res = data["results"]
    st = Counter(r["status"] for r in res)
    print(
        f"\n{len(res)} measurements: "
        + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
        + f"; {sum(1 for c in data['checks'] if c.get('ok'))}/{len(data['checks'])} checks ok;"
        + f" {data['wall_s']:.0f} s"
    )
    rats = ratios(res)
    agg: dict = {}
    for r in rats:
        agg.setdefault((r["impl"], r["sweep"], r["mode"]), []).append(r["ratio"])
    for (impl, sw, mode), xs in sorted(agg.items()):
        print(
            f"  {impl:28s} {sw:7s} {mode:8s} {_geomean(xs):.2f}x best same-framework anchor "
            f"({len(xs)} points)"
        )
    best = Counter()
    for r in res:
        if r["status"] == "ok" and r.get("tflops"):
            best[(r["impl"], r["mode"])] = max(best[(r["impl"], r["mode"])], r["tflops"])
    for (impl, mode), v in sorted(best.items()):
        print(f"  peak {impl:28s} {mode:8s} {v:8.1f} TFLOP/s")
    print("wrote " + ", ".join(str(out / f) for f in files))
