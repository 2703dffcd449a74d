"""The one case list of the per-backend GPU tools (backend_triton/gpu_check.py,
backend_pallas/gpu_check.py, backend_cuda/tools/kernel_check.py): every feature of SPEC.md at
GPU sizes that cross several blocks and are multiples of no block size, judged by
flashmux.testing.judge. A backend that does not take a case declines it (judge.measure returns
its reasons), which the tools report as "declined", not as a failure.

The conformance suite (tests/conformance/cases.py) is the exhaustive list; this one is what a GPU
tool checks in a minute or two before it times anything. Add a case here, not in a tool.
"""

from __future__ import annotations

from dataclasses import replace

from .judge import Case

BASE: tuple[Case, ...] = (
    Case(batch=2, seqlen_q=384, seqlen_k=384, heads_q=4, heads_kv=4, head_dim=64),
    Case(batch=2, seqlen_q=113, seqlen_k=217, heads_q=4, heads_kv=4, head_dim=64, causal=True),
    # GQA, Sq < Sk
    Case(batch=2, seqlen_q=300, seqlen_k=517, heads_q=8, heads_kv=2, head_dim=128, causal=True),
    # MQA, Sq > Sk: rows that see no key
    Case(batch=1, seqlen_q=600, seqlen_k=257, heads_q=4, heads_kv=1, head_dim=64, causal=True),
    Case(batch=2, seqlen_q=450, seqlen_k=450, heads_q=4, heads_kv=2, head_dim=96,
         window=(100, 17), softcap=30.0),
    Case(batch=1, seqlen_q=333, seqlen_k=700, heads_q=4, heads_kv=4, head_dim=80, causal=True,
         window=(150, None)),
    Case(batch=1, seqlen_q=290, seqlen_k=290, heads_q=8, heads_kv=1, head_dim=128,
         window=(None, 40)),
    Case(batch=1, seqlen_q=150, seqlen_k=170, heads_q=4, heads_kv=4, head_dim=64, window=(0, 0)),
    Case(batch=1, seqlen_q=129, seqlen_k=129, heads_q=4, heads_kv=4, head_dim=64, causal=True,
         softcap=5.0, scale=0.3),
    Case(batch=2, seqlen_q=200, seqlen_k=333, heads_q=3, heads_kv=1, head_dim=40, softcap=5.0),
    Case(batch=1, seqlen_q=70, seqlen_k=150, heads_q=2, heads_kv=2, head_dim=160, causal=True),
    Case(batch=1, seqlen_q=130, seqlen_k=140, heads_q=2, heads_kv=2, head_dim=192, window=(50, 20)),
    Case(batch=1, seqlen_q=260, seqlen_k=260, heads_q=2, heads_kv=1, head_dim=256, causal=True),
    Case(batch=2, seqlen_q=190, seqlen_k=70, heads_q=4, heads_kv=4, head_dim=96),
    # head_dim_v != head_dim
    Case(batch=1, seqlen_q=300, seqlen_k=410, heads_q=2, heads_kv=2, head_dim=192, head_dim_v=128,
         causal=True),
    # varlen, with an empty query sequence and GQA; varlen with a window
    Case(seqlens=((300, 350), (0, 9), (517, 517), (64, 200)), heads_q=8, heads_kv=2, head_dim=64,
         causal=True),
    Case(seqlens=((255, 255), (129, 300)), heads_q=4, heads_kv=4, head_dim=128, window=(64, 8)),
    # a gradient through lse; no keys at all
    Case(batch=2, seqlen_q=140, seqlen_k=160, heads_q=4, heads_kv=4, head_dim=64, causal=True,
         lse_grad=True),
    Case(batch=2, seqlen_q=33, seqlen_k=0, heads_q=4, heads_kv=4, head_dim=64),
    # dropout, padded and packed
    Case(batch=2, seqlen_q=257, seqlen_k=300, heads_q=4, heads_kv=2, head_dim=64, causal=True,
         dropout_p=0.17),
    Case(seqlens=((100, 150), (200, 90)), heads_q=2, heads_kv=2, head_dim=128, dropout_p=0.3),
)


def gpu_cases(dtypes=("float16", "bfloat16"), **fields) -> list[Case]:
    """BASE in each dtype (fields override, e.g. transform="jit" for a JAX tool)."""
    return [replace(c, dtype=dt, **fields) for dt in dtypes for c in BASE]


def check(cases, backend: str, kind: str, *, seed0: int = 0, label: str = "", log=print,
          decline_ok: bool = True, results: list | None = None) -> int:
    """Judge each case on `backend` with `kind` arrays (seeds seed0, seed0 + 1, ...; a failing
    draw is redrawn as the conformance suite does), one PASS/FAIL/DECLINED line each; an
    exception counts as a failure, with its traceback. -> the number of failures. `results`,
    when given, receives one dict per case (for a tool's JSON)."""
    import traceback

    from . import judge

    bad = 0
    for i, c in enumerate(cases):
        verdict, report = "FAIL", {}
        try:
            first = judge.measure(c, backend, kind, seed=seed0 + i)
            if isinstance(first, str):
                verdict, msg = ("DECLINED" if decline_ok else "FAIL"), first
            else:
                pending = [first]
                ok, draws = judge.redraw(
                    lambda s, c=c: pending.pop() if pending else judge.measure(c, backend, kind, seed=s),
                    seed0 + i,
                )
                verdict, report = ("PASS" if ok else "FAIL"), draws[-1][1]
                msg = " ".join(f"{k}={e:.1e}/{b:.1e}" for k, (e, b) in draws[0][1].items())
                if len(draws) > 1:
                    msg += f" (redrawn {len(draws) - 1}x: {'ok' if ok else 'failed again'})"
        except Exception as e:  # noqa: BLE001
            msg = f"ERROR {type(e).__name__}: {str(e)[:600]}"
            traceback.print_exc(limit=4)
        bad += verdict == "FAIL"
        if results is not None:
            results.append({"case": c.id(), "verdict": verdict, "msg": msg,
                            "report": {k: list(v) for k, v in report.items()}})
        log(verdict, label or backend, c.id(), msg)
    return bad
