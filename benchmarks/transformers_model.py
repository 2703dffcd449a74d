"""flashmux inside a transformers model: a Llama-shaped model (random weights, nothing downloaded)
at 4 x 2048 tokens, head_dim 64 and 128, forward and forward+backward, bf16, three ways:

Timed: the decoder stack (embeddings, layers, final norm; not the LM head).

- sdpa:    attn_implementation="sdpa" (torch's SDPA; FlashAttention-2 kernels on the GPU)
- fmx:     attn_implementation="fmx"  (flashmux.integrations.transformers)
- fmx_unpad (with --padding): the integration gathering the tokens instead of its default
           5 cu_seqlens segments per row over the padded tensors
- fmx_direct: a 3-line attention function that calls flashmux.attention on the same tensors
           (transposed views, causal, scale): the integration must cost nothing on top of it

and, to isolate the attention call, the same three on one layer's q/k/v tensors alone.

    python benchmarks/transformers_model.py                 # the GPU run (about 2-3 minutes)
    python benchmarks/transformers_model.py --padding       # right-padded rows (mask path) instead
    python benchmarks/transformers_model.py --quick         # tiny shapes, any device (smoke test)

Options: --layers N (default 4), --backend NAME (force a flashmux backend), --iters N,
--interleave (the model rows timed in turn, one call each per round, medians: drift falls on
every row alike; all models of a head_dim stay in memory; adds `sdpa_again`, the sdpa model timed
a second time per round, and prints each row's per-round sdpa/row ratios as median [p10, p90]:
the noise floor the bar is read against),
--gqa KERNELS: also time `fmx_kv`, the integration with $FLASHMUX_NATIVE_GQA=KERNELS (the native
backend's GPU kernels listed get the KV heads unrepeated), for A/B runs;
--variant "NAME:VAR=VALUE;VAR=VALUE" (repeatable): also time the integration as row NAME with
those environment variables set, e.g. "fmx_flash:FLASHMUX_NATIVE_KERNELS=flash,cudnn"
("fmx_nofast:FLASHMUX_ATTENTION_FASTPATH=0": the integration with flashmux's prepared eager calls
switched off, every call checked and dispatched).
Rows print as they are measured (a crash keeps what came before), the tables at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import transformers

import flashmux
from flashmux import _prepared
from flashmux.builtin.native import ENV_GQA
from flashmux.integrations import transformers as fmx_tf

FASTPATH_ENV = "FLASHMUX_ATTENTION_FASTPATH"  # 0: flashmux's prepared eager calls off


class _env:
    """Environment variables set inside (a variant row), restored after."""

    def __init__(self, values):
        self.values, self.old = dict(values or {}), {}

    def __enter__(self):
        for key, value in self.values.items():
            self.old[key] = os.environ.get(key)
            os.environ[key] = value
        self.fast = _prepared.ENABLED
        if FASTPATH_ENV in self.values:  # read at import: switched here for the row
            _prepared.ENABLED = self.values[FASTPATH_ENV] != "0"
        return self

    def __exit__(self, *exc):
        for key, old in self.old.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        _prepared.ENABLED = self.fast
        return False


def variants(args) -> dict[str, dict[str, str]]:
    """Extra integration rows: name -> the environment they run with."""
    out = {}
    if args.gqa is not None:
        out["fmx_kv"] = {ENV_GQA: args.gqa}
    for spec in args.variant or ():
        name, _, env = spec.partition(":")
        pairs = [x.partition("=") for x in env.split(";") if x.strip()]
        if not name or any(not eq for _, eq, _ in pairs):
            raise SystemExit(f"--variant: expected NAME:VAR=VALUE;VAR=VALUE, got {spec!r}")
        out[name.strip()] = {k.strip(): v.strip() for k, _, v in pairs}
    return out


def direct_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """The bar: flashmux.attention on the same tensors, no padding/packing logic."""
    out = flashmux.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             causal=True, scale=scaling)
    return out, None


def register_direct():
    transformers.AttentionInterface.register("fmx_direct", direct_attention)
    transformers.masking_utils.AttentionMaskInterface.register("fmx_direct",
                                                               fmx_tf.attention_mask)


def timer(fn, iters, device, warmup=3):
    """Median milliseconds per call (CUDA events on the GPU, perf_counter elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def model_for(head_dim, layers, impl, device, dtype, quick):
    heads = 4 if quick else 16
    cfg = transformers.LlamaConfig(
        vocab_size=256 if quick else 32000, hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim if quick else 4 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 4,
        max_position_embeddings=8192, head_dim=head_dim,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                          attn_implementation=impl,
                                                          dtype=dtype)
    return model.to(device)


def bench_model(args, device, dtype, head_dim, batch, seq):
    rows = []
    ids = torch.randint(0, 256, (batch, seq), device=device)
    mask = None
    if args.padding:
        lens = [seq - i * seq // 8 for i in range(batch)]  # 100%, 87.5%, 75%, ... of the row
        mask = torch.zeros(batch, seq, dtype=torch.long, device=device)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
    # padded: the integration's two padding paths (segments: the default off the CPU; unpad)
    impls = ["sdpa", "fmx", "fmx_unpad"] if args.padding else ["sdpa", "fmx", "fmx_direct"]
    extra = variants(args)  # timed on the fmx model, right after it
    state = None
    pending = []  # --interleave: (name, env, fwd, fwd_bwd, model) timed together at the end
    for impl in impls:
        fmx_tf.PADDING = "unpad" if impl == "fmx_unpad" else "segments"
        model = model_for(head_dim, args.layers, impl.replace("_unpad", ""), device, dtype,
                          args.quick)
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)

        # the decoder stack (model.model): the LM head's (B, S, vocab) matmul would only dilute
        def fwd(model=model):
            with torch.no_grad():
                model.model(ids, attention_mask=mask, use_cache=False)

        def fwd_bwd(model=model):
            out = model.model(ids, attention_mask=mask, use_cache=False)
            out.last_hidden_state.float().square().mean().backward()

        rows_here = [(impl, None)] + (list(extra.items()) if impl == "fmx" else [])
        if args.interleave and impl == "sdpa":  # the noise floor: sdpa against itself
            rows_here.append(("sdpa_again", None))
        for name, env in rows_here:
            if args.interleave:
                pending.append((name, env, fwd, fwd_bwd, model))
            else:
                rows += _time_row("model", name, head_dim, env, fwd, fwd_bwd, args, device)
        model = fwd = fwd_bwd = None  # free the weights before the next model
        if device.type == "cuda" and not args.interleave:
            torch.cuda.empty_cache()
    if pending:
        rows += _time_interleaved("model", head_dim, pending, args, device)
        pending.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_interleaved(what, head_dim, pending, args, device):
    """--interleave: every row's forward timed once per round, rows in turn, for args.iters
    rounds (then the same for forward+backward), so that clock and thermal drift over the run
    fall on every row alike; medians. A failing variant row is reported and dropped."""
    live = list(pending)
    times = {name: ([], []) for name, *_ in live}
    for phase in (0, 1):
        for name, env, *fns, _model in list(live):  # warm-up, and drop what fails
            try:
                with _env(env):
                    for _ in range(3):
                        fns[phase]()
            except Exception as e:
                if env is None:
                    raise
                print(f"  {what} {name} D={head_dim}: ERROR {type(e).__name__}: {str(e)[:300]}")
                live = [x for x in live if x[0] != name]
        for _ in range(args.iters):
            for name, env, *fns, _model in live:
                with _env(env):
                    times[name][phase].append(timer(fns[phase], 1, device, warmup=0))
    rows = []
    base = times.get("sdpa")
    for name, *_ in live:
        f, fb = (statistics.median(t) for t in times[name])
        spread = ""
        if base is not None and name != "sdpa":  # paired per-round ratios sdpa / row
            spread = ", per-round sdpa/row " + "; ".join(
                f"{label} {_quantiles([b / x for b, x in zip(base[phase], times[name][phase])])}"
                for phase, label in ((0, "fwd"), (1, "fwd+bwd")))
        print(f"  {what} {name:12} D={head_dim}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms "
              f"(interleaved){spread}", flush=True)
        rows.append((name, head_dim, f, fb))
    return rows


def _quantiles(ratios):
    """'median [p10, p90]' of paired ratios (the spread the bar is read against)."""
    r = sorted(ratios)
    pick = lambda q: r[min(len(r) - 1, max(0, round(q * (len(r) - 1))))]  # noqa: E731
    return f"{statistics.median(r):.3f} [{pick(0.1):.3f}, {pick(0.9):.3f}]"


def bench_attention(args, device, dtype, head_dim, batch, seq):
    heads = 4 if args.quick else 16
    shape_q, shape_kv = (batch, heads, seq, head_dim), (batch, heads // 4, seq, head_dim)
    # (B, H, S, D) views of (B, S, H, D) tensors, as the projections make them
    q = torch.randn(shape_q[0], shape_q[2], shape_q[1], head_dim, device=device, dtype=dtype)
    k = torch.randn(shape_kv[0], shape_kv[2], shape_kv[1], head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q, k, v = (x.transpose(1, 2).requires_grad_() for x in (q, k, v))
    module = torch.nn.Module()
    module.is_causal = True
    scale = head_dim ** -0.5
    calls = {
        # as transformers' sdpa function calls it, output back in (B, S, H, D) like the others
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2).contiguous(),
        "fmx": lambda: fmx_tf.attention_forward(module, q, k, v, None, scaling=scale)[0],
        "fmx_direct": lambda: flashmux.attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), causal=True, scale=scale),
    }
    extra = variants(args)
    for name in extra:
        calls[name] = calls["fmx"]
    rows = []
    for name, call in calls.items():
        def fwd():
            with torch.no_grad():
                call()

        def fwd_bwd():
            call().float().sum().backward()

        rows += _time_row("attention", name, head_dim, extra.get(name), fwd, fwd_bwd, args,
                          device)
    return rows


def _time_row(what, name, head_dim, env, fwd, fwd_bwd, args, device):
    """[(name, head_dim, fwd ms, fwd+bwd ms)], printed; a variant (env given: e.g. a kernel that
    refuses the KV heads) that fails is reported and gives no row; the others raise."""
    try:
        with _env(env):
            f, fb = timer(fwd, args.iters, device), timer(fwd_bwd, args.iters, device)
    except Exception as e:
        if env is None:
            raise
        print(f"  {what} {name} D={head_dim}: ERROR {type(e).__name__}: {str(e)[:300]}")
        return []
    print(f"  {what} {name:12} D={head_dim}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    return [(name, head_dim, f, fb)]


def table(title, rows):
    print(f"\n{title}")
    print(f"{'impl':12} {'D':>4} {'fwd ms':>9} {'vs sdpa':>8} {'fwd+bwd ms':>11} {'vs sdpa':>8}")
    base = {d: (f, fb) for name, d, f, fb in rows if name == "sdpa"}
    for name, d, f, fb in rows:
        bf, bfb = base[d]
        print(f"{name:12} {d:>4} {f:9.3f} {bf / f:7.2f}x {fb:11.3f} {bfb / fb:7.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test, any device)")
    ap.add_argument("--padding", action="store_true", help="right-padded rows with a mask")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--head-dims", default="64,128", help="comma list, in the order timed")
    ap.add_argument("--model-only", action="store_true", help="skip the single-call rows")
    ap.add_argument("--interleave", action="store_true",
                    help="time the model rows in turn, one call each per round (drift-fair)")
    ap.add_argument("--backend", default=None, help="force a flashmux backend")
    ap.add_argument("--gqa", default=None, metavar="KERNELS",
                    help="also time fmx_kv: the integration with $FLASHMUX_NATIVE_GQA=KERNELS")
    ap.add_argument("--variant", action="append", metavar="NAME:VAR=VALUE;...",
                    help="also time the integration as row NAME with these variables set")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, seq = (2, 64) if args.quick else (4, 2048)
    if args.quick:
        args.layers, args.iters = min(args.layers, 2), min(args.iters, 3)
    register_direct()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {name}, {dtype}, "
          f"B={batch} S={seq}, {args.layers} layers, GQA 4:1"
          + (", right-padded rows" if args.padding else ""))
    with flashmux.use_backend(args.backend) if args.backend else _null():
        heads = 4 if args.quick else 16
        q = torch.zeros(batch, seq, heads, 64, device=device, dtype=dtype)
        kv = q[:, :, : heads // 4]
        print(flashmux.explain(q, kv, kv, causal=True))
        model_rows, attn_rows = [], []
        for head_dim in (int(x) for x in args.head_dims.split(",")):
            model_rows += bench_model(args, device, dtype, head_dim, batch, seq)
            if not args.model_only:
                attn_rows += bench_attention(args, device, dtype, head_dim, batch, seq)
    table("whole model (median ms per step)", model_rows)
    if attn_rows:
        table("one attention call on the model's tensors", attn_rows)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
