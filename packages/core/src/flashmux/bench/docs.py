"""docs/benchmarks.md from a results JSON: what is run, how to reproduce it, and the tables and
plots of that run (plots into docs/img/). `python -m flashmux bench --report-from R.json --docs docs`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .shapes import SWEEPS

REPRODUCE = "python -m flashmux bench --sweep papers --head-dims 64,128 --modes fwd,fwd_bwd --dtype bf16 --target-ms 50 --time-budget 440 --out bench-results"

INTRO = """# Benchmarks

`python -m flashmux bench` measures every flashmux backend, forced one at a time and as the
dispatcher chooses (`auto`), against what a user would pick instead, side by side in one run,
the way the FlashAttention papers report. Only same-run ratios count: anchors are measured in
the same process, on the same GPU, minutes apart.

## What is run

- **Implementations.** flashmux: each discovered backend forced (`backend="triton"`, ...) under
  every framework it serves (`flashmux-triton[torch]`, `flashmux-pallas[jax]`, ...), and
  `flashmux-auto[torch|jax]`, the dispatcher's choice (the backend it chose is recorded).
  Anchors, when installed: torch SDPA with each backend forced through
  `torch.nn.attention.sdpa_kernel` (`sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`, `sdpa-math`),
  FlexAttention (`flex`: `torch.compile(flex_attention)`, block masks for causal and varlen),
  standard attention (`standard`: scores materialized, float32 softmax), and in JAX
  `jax.nn.dot_product_attention` (`jax-xla`, `jax-cudnn`), Pallas
  `jax.experimental.pallas.ops.gpu.attention.mha` (`pallas-mha`) and the Hopper kernel
  `attention_mgpu` (`pallas-mgpu`, fp16 always: its backward is fp16 only). A missing or
  failing implementation is listed under *Skipped* with its reason; the sweep never stops.
- **Sweeps** (`--sweep`): `papers`: B·S = 16k tokens, S = 512 ... 16k, model dim 2048
  (H = 2048 / head_dim), head_dim 64/128 (256 with `--head-dims`), causal and not, bf16 (fp16 with
  `--dtype`); `gqa`: the same with Hq/Hkv = 8; `decode`: Sq = 1 and 128 against Sk = 4k ... 128k,
  B = 8, Hq = 32, Hkv = 8, reported as GB/s of K and V read, plus `attention_with_kvcache` rows
  (contiguous, 16- and 64-token pages, Sq 1 and 4, ragged, MQA; `--kvcache-only` runs just
  these); `long`: B = 1, H = 16, S = 32k ...
  128k; `varlen`: packed batches of mixed lengths (~16k tokens); `memory`: peak extra device
  memory of forward+backward against S (B = 1, H = 16, head_dim 128).
- **Modes** (`--modes`): `fwd`, `bwd` (backward alone, the forward's graph built outside the
  timing) and `fwd_bwd`. TFLOP/s by the FlashAttention convention: forward 4·B·H·Sq·Sk·D, halved
  for causal; backward 2.5x and forward+backward 3.5x the forward.
- **Timing.** torch: CUDA events around every call; JAX: a host clock around groups of calls
  enqueued back to back (about 20 ms each), then one `block_until_ready`, so the host round trip
  (about 0.2 ms on the H100 machine) is under 1% of what is measured. Warm-up (compilation,
  autotuning, cuDNN plans) outside the numbers; median of many calls (adaptive count, about
  `--target-ms` per measurement, at least 5); several random input sets rotated so the L2 cache
  is not what is measured; inputs drawn from a normal distribution, never zeros. JAX functions
  are compiled ahead in a thread pool before any JAX timing starts.
- **Correctness before numbers.** Each implementation is first run on a small problem of the
  same configuration (dtype, head_dim, GQA ratio, causal, Sq != Sk, varlen, layout) and compared
  with the float64 NumPy reference (`flashmux.reference`); the yardstick is plain attention in
  the same framework and precision. flashmux backends must meet the SPEC rule (error <= 2x the
  plain-attention error + 1e-5, for out and, with a backward, dq, dk, dv); anchors a sanity bound
  (4x + 1e-4). A failure is marked ✗ and kept out of the ratios.
- **Memory.** torch: `torch.cuda.max_memory_allocated()` during one call minus what was
  allocated before it (inputs excluded, outputs and gradients included); JAX: XLA's own account
  of the compiled call (temporaries + outputs).
- **Output** (`--out`): `results.json` (device, driver, CUDA, cuDNN, torch/jax/triton/flashmux
  versions, date, every raw time), `results.md` (these tables) and one PNG per sweep.

## Reproduce

On the GPU machine, from the repository root, with the backends installed
(`pip install -e packages/core -e packages/backend_triton -e packages/backend_pallas -e packages/backend_cuda`):

```
{reproduce}
```

Other sweeps: `--sweep gqa`, `decode`, `long`, `varlen`, `memory` or `all`. On a laptop,
`python -m flashmux bench --quick` runs tiny shapes on the CPU in seconds (the test suite runs
it). This page is regenerated from a run's JSON with
`python -m flashmux bench --report-from bench-results/results.json --docs docs`, and the
dispatcher's priority table with
`python -m flashmux bench --priority-from bench-results/results.json --priority-out packages/core/src/flashmux/priority.json`.

"""


def write_docs(
    data: dict, docs_dir: str | Path, reproduce: str | None = None, note: str | None = None
) -> list[str]:
    from .plots import plot_all
    from .report import render

    docs_dir = Path(docs_dir)
    img = docs_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    files = plot_all(data, img)
    for sweep in SWEEPS:  # plots of an earlier run that this one did not make
        stale = img / f"{sweep}.png"
        if f"{sweep}.png" not in files and stale.exists():
            stale.unlink()
    body = render(data, [f"img/{f}" for f in files], heading_level=2)
    title = "## Latest results" + (f"\n\n> {note}" if note else "")
    body = body.replace("## flashmux benchmark results", title, 1)
    argv = (data.get("args") or {}).get("argv")
    if reproduce is None and argv:
        keep = [a for a in argv if a not in ("--no-progress",)]
        reproduce = "python -m flashmux bench " + " ".join(keep)
    text = INTRO.replace("{reproduce}", reproduce or REPRODUCE) + body
    (docs_dir / "benchmarks.md").write_text(text)
    return ["benchmarks.md", *[f"img/{f}" for f in files]]


def merge(paths: list[str | Path]) -> dict:
    """Several results JSONs (e.g. one GPU call per head_dim) as one run."""
    datas = [json.loads(Path(p).read_text()) for p in paths]
    if len(datas) == 1:
        return datas[0]
    out = dict(datas[0])
    for key in ("results", "checks", "log", "implementations"):
        out[key] = [x for d in datas for x in d.get(key, [])]
    out["wall_s"] = sum(d.get("wall_s") or 0 for d in datas)
    out["args"] = {"argv": None, "merged": [d.get("args", {}).get("argv") for d in datas]}
    return out
