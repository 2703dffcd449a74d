"""Correctness checks shared by the CPU tests, interpret_check.py and gpu_check.py (not used by
the kernels): the conformance suite's judge (flashmux.testing.judge: its Case, its rule and its
redraw rule) on JAX arrays and backend="pallas", with this package's defaults for a case (small
float32 shapes, the call under jax.jit).

One case = one flashmux.attention call with return_lse, plus its VJP for a random dO (and dlse),
judged against flashmux.reference (float64): error <= 2 * error(plain JAX attention in the same
precision) + 1e-5, for out, lse, dq, dk, dv.
"""

from __future__ import annotations

from flashmux.testing import judge as _judge
from flashmux.testing.judge import passed  # noqa: F401  (re-exported for gpu_check.py)

# the package's defaults; any field of flashmux.testing.judge.Case can be given
DEFAULTS = dict(
    batch=2, seqlen_q=33, seqlen_k=33, heads_q=2, heads_kv=2, head_dim=32, dtype="float32",
    transform="jit",
)


def Case(**fields) -> _judge.Case:  # noqa: N802  (reads as the dataclass it builds)
    """A flashmux.testing.judge.Case with this package's defaults (DEFAULTS)."""
    return _judge.Case(**{**DEFAULTS, **fields})


def run_case(case: _judge.Case, seed: int = 0, backend: str = "pallas") -> _judge.Report:
    """One draw: {name: (error, bound)}. A backend that declines the case raises (the checks
    name cases the backend must run)."""
    report = _judge.measure(case, backend, "jax", seed=seed)
    if isinstance(report, str):
        raise RuntimeError(report)
    return report


def passes(case: _judge.Case, seed: int, redraws: int = _judge.REDRAWS):
    """-> (ok, [(seed, report), ...]): judged like the conformance suite (judge.redraw)."""
    return _judge.redraw(lambda s: run_case(case, seed=s), seed, redraws)


def judge(cases, seed0: int, label: str, log=print) -> int:
    """Run and judge each case (seeds seed0, seed0 + 1, ...), one PASS/FAIL line each (an
    exception or a declined case counts as a failure); -> the number of failures."""
    from flashmux.testing.gpu_cases import check

    return check(cases, "pallas", "jax", seed0=seed0, label=label, log=log, decline_ok=False)
