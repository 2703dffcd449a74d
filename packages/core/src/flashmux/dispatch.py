"""Backend discovery and selection.

Backends are found through the ``flashmux.backends`` entry-point group (the core's own
`reference` backend registers there too, and is added directly when the core runs from a source
tree without being installed). For each call the dispatcher walks the priority order for the
device class and array kind, and takes the first backend with no reasons against it. Decisions
are cached by the problem's signature (`ProblemSpec`) and the forced list.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources

from ._arrays import torch_compiling
from .backend import Backend, capability_reasons
from .spec import ProblemSpec

ENTRY_POINT_GROUP = "flashmux.backends"
ENV_VAR = "FLASHMUX_BACKEND"


class NoBackendError(RuntimeError):
    """No backend (or no forced backend) can run the call; the message lists every reason."""


class _Broken(Backend):
    """Stand-in for a backend whose entry point failed to load."""

    def __init__(self, name: str, error: str):
        super().__init__(name=name, description="failed to load")
        self._error = error

    def availability(self):
        return [f"failed to load: {self._error}"]


_backends: dict[str, Backend] | None = None
# Entry points whose module was still being imported when discovery ran (a backend package
# imported before flashmux imports flashmux itself): loaded again on the next registry() call.
_pending: dict[str, metadata.EntryPoint] = {}
_availability: dict[str, list[str]] = {}
_decisions: dict[tuple, Backend] = {}
_priority_table: dict | None = None
# Innermost `use_backend` block last. A plain list, not a ContextVar: torch.compile can read it.
_forced_stack: list[tuple[str, ...]] = []
# Bumped whenever a cached choice may change (register, clear_caches, a pending backend loaded):
# flashmux's prepared eager calls (_prepared.py) are valid for one generation.
_generation = 0


def _discover() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in found:
            continue
        try:
            obj = ep.load()
            found[obj.name] = obj
        except Exception as e:  # a broken plugin must not break import or dispatch
            if _partially_imported(ep):
                _pending[ep.name] = ep
            found[ep.name] = _Broken(ep.name, f"{type(e).__name__}: {e}")
    if "reference" not in found:
        from .builtin.reference import backend as ref

        found["reference"] = ref
    if "native" not in found:  # a source tree whose installed metadata predates it
        from .builtin.native import backend as native

        found["native"] = native
    return found


def _partially_imported(ep) -> bool:
    mod = sys.modules.get(ep.value.split(":")[0])
    spec = getattr(mod, "__spec__", None)
    return mod is not None and getattr(spec, "_initializing", False)


def registry() -> dict[str, Backend]:
    global _backends
    if _backends is None:
        _backends = _discover()
    if _pending:
        for name, ep in list(_pending.items()):
            if _partially_imported(ep):
                continue
            del _pending[name]
            try:
                obj = ep.load()
            except Exception:
                continue  # stays reported as broken
            _backends.pop(name, None)
            _backends[obj.name] = obj
            _availability.pop(obj.name, None)
            _decisions.clear()
            _bump()
    return _backends


def register(backend: Backend) -> None:
    """Add or replace a backend at run time (tests, experiments); clears cached decisions."""
    registry()[backend.name] = backend
    _availability.pop(backend.name, None)
    _decisions.clear()
    _bump()


def _bump() -> None:
    global _generation
    _generation += 1


def get_backend(name: str) -> Backend:
    try:
        return registry()[name]
    except KeyError:
        known = ", ".join(sorted(registry()))
        raise ValueError(f"backend: unknown backend {name!r} (known: {known})") from None


def _fill_availability(b: Backend) -> list[str]:
    if b.name not in _availability:
        try:
            _availability[b.name] = list(b.availability())
        except Exception as e:
            _availability[b.name] = [f"availability check failed: {type(e).__name__}: {e}"]
    return _availability[b.name]


def _registered_availability(name: str) -> tuple[str, ...]:
    return tuple(_fill_availability(registry()[name]))


# what torch.compiler.assume_constant_result(fn) does (torch >= 2.1), without importing torch here
# and outside any trace (dynamo refuses to trace the decorator itself): dynamo calls the function
# eagerly and keeps its result as a constant
_registered_availability._dynamo_marked_constant = True  # type: ignore[attr-defined]


def availability(b: Backend) -> list[str]:
    """Why a backend can't run at all on this machine (cached; empty when usable).

    The first check of a backend can happen inside a torch.compile trace (a compiled call that is
    the process's first): it then runs eagerly, its result a constant of the graph, because
    backends probe packages with calls dynamo refuses to trace (importlib.util.find_spec on
    torch 2.11)."""
    cached = _availability.get(b.name)
    if cached is not None:
        return cached
    if torch_compiling() and registry().get(b.name) is b:
        return list(_registered_availability(b.name))
    return _fill_availability(b)


def reasons(b: Backend, spec: ProblemSpec) -> list[str]:
    out = list(availability(b))
    if out:
        return out
    out = capability_reasons(b.capabilities, spec)
    if not out:
        try:
            out = list(b.reasons(spec))
        except Exception as e:
            out = [f"reasons() failed: {type(e).__name__}: {e}"]
    return out


# -- priority --------------------------------------------------------------------------------


def priority_table() -> dict:
    """{device class: {array kind: [backend names, fastest first], "classes": {problem class:
    {array kind: [...]}}}}, with a "default" entry; "classes" is optional (see `ordered`).

    Shipped as flashmux/priority.json; `python -m flashmux bench --priority-from` regenerates it.
    FLASHMUX_PRIORITY_FILE points at another file.
    """
    global _priority_table
    if _priority_table is None:
        path = os.environ.get("FLASHMUX_PRIORITY_FILE")
        try:
            if path:
                with open(path) as f:
                    _priority_table = json.load(f)
            else:
                text = resources.files("flashmux").joinpath("priority.json").read_text()
                _priority_table = json.loads(text)
        except (OSError, ValueError):
            _priority_table = {}
    return _priority_table


def device_class(spec: ProblemSpec) -> str:
    if spec.device_type == "cuda" and spec.compute_capability:
        major, minor = spec.compute_capability
        return f"sm{major}{minor}"
    return spec.device_type


def problem_class(head_dim: int, causal: bool, training: bool, seqlen_q: int, seqlen_k: int,
                  dtype: str) -> str:
    """The priority table's problem class, e.g. "d128-causal-train-prefill-16bit".

    head_dim bucket (64, 128, 256, 512 = anything larger); causal or full; train (a gradient is
    needed) or infer; decode (at most 16 query rows against at least 4x as many keys) or
    prefill; 16bit (float16/bfloat16) or fp32 (float32/float64). The benchmark harness files its
    results under the same keys (flashmux.bench.priority)."""
    hd = next((b for b in (64, 128, 256) if head_dim <= b), 512)
    phase = "decode" if seqlen_q <= 16 and seqlen_k >= 4 * seqlen_q else "prefill"
    bits = "fp32" if dtype in ("float32", "float64", "fp32", "fp64") else "16bit"
    return (f"d{hd}-{'causal' if causal else 'full'}-{'train' if training else 'infer'}-"
            f"{phase}-{bits}")


def spec_class(spec: ProblemSpec) -> str:
    return problem_class(spec.head_dim, spec.causal, spec.requires_grad, spec.seqlen_q,
                         spec.seqlen_k, spec.dtype)


def priority_source(spec: ProblemSpec) -> str:
    """Which list of the priority table orders this problem (for explain)."""
    table = priority_table()
    dc = device_class(spec)
    key = dc if table.get(dc) else "default"
    entry = table.get(key) or {}
    if ((entry.get("classes") or {}).get(spec_class(spec)) or {}).get(spec.kind):
        return f"{key} table, class {spec_class(spec)}"
    if entry.get(spec.kind):
        return f"{key} table, {spec.kind} list (no entry for class {spec_class(spec)})"
    return "no table entry: backends' own priorities"


def _triton_before_cuda(names: list[str]) -> list[str]:
    """Torch prefill calls with a block mask or ALiBi slopes: Triton goes before CUDA (decode
    keeps the table's order: not measured with slopes). The class tables
    are measured without masks, and rank CUDA first for some inference classes. On the H200
    (session 8, docs/benchmarks.md) CUDA's block-mask and ALiBi paths took much longer than
    Triton's: they run its sm80 kernels, because its sm90 forward steps aside for them. At 8k,
    over every mask, CUDA took 1.1-2.0x Triton's time forward and 1.3-1.5x forward+backward;
    with ALiBi it took 1.9x forward and 1.5x forward+backward."""
    if "triton" in names and "cuda" in names and names.index("cuda") < names.index("triton"):
        names = [n for n in names if n != "triton"]
        names.insert(names.index("cuda"), "triton")
    return names


def ordered(spec: ProblemSpec) -> list[Backend]:
    """Every backend, in the order the dispatcher tries them for this problem: the device
    class's list for the problem class (see `problem_class`) when the table has one, else the
    device class's list for the array kind, else the "default" entry's."""
    table = priority_table()
    entry = table.get(device_class(spec)) or table.get("default") or {}
    by_class = (entry.get("classes") or {}).get(spec_class(spec)) or {}
    names = list(by_class.get(spec.kind) or entry.get(spec.kind, []))
    if spec.kind == "torch" and (spec.block_mask or spec.alibi) and "-prefill-" in spec_class(spec):
        names = _triton_before_cuda(names)
    reg = registry()
    rank = {n: i for i, n in enumerate(names)}
    return sorted(
        reg.values(),
        key=lambda b: (rank.get(b.name, len(rank)), b.capabilities.priority, b.name),
    )


# -- forcing ---------------------------------------------------------------------------------


def _as_names(value) -> tuple[str, ...]:
    if isinstance(value, str):
        names = tuple(n.strip() for n in value.split(",") if n.strip())
    elif isinstance(value, Iterable):
        names = tuple(value)
    else:
        raise TypeError(f"backend: expected a name, a list of names or None, got {value!r}")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"backend: expected backend names (str), got {n!r}")
        get_backend(n)  # unknown names are an error, not a silent skip
    if not names:
        raise ValueError("backend: expected at least one backend name, got an empty list")
    return names


def forced_backends(backend=None) -> tuple[str, ...] | None:
    """The forced priority list: the `backend` argument, else `use_backend`, else $FLASHMUX_BACKEND."""
    if backend is not None:
        return _as_names(backend)
    if _forced_stack:
        return _forced_stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env.lower() != "auto":
        return _as_names(env)
    return None


@contextlib.contextmanager
def use_backend(*names: str | Sequence[str]):
    """Force backends for the calls inside the block, in this priority order.

    >>> with flashmux.use_backend("cuda", "triton"):
    ...     out = flashmux.attention(q, k, v)
    """
    flat: list[str] = []
    for n in names:
        flat.extend([n] if isinstance(n, str) else list(n))
    _forced_stack.append(_as_names(flat))
    try:
        yield
    finally:
        _forced_stack.pop()


# -- selection -------------------------------------------------------------------------------


@dataclass
class Decision:
    spec: ProblemSpec
    forced: tuple[str, ...] | None
    chosen: str | None
    rows: list[tuple[str, list[str]]] = field(default_factory=list)  # (backend, reasons) in order


def _candidates(spec: ProblemSpec, forced: tuple[str, ...] | None) -> list[Backend]:
    """The forced backends in their given order, else every backend in priority order."""
    reg = registry()
    return [reg[n] for n in forced] if forced else ordered(spec)


def decide(spec: ProblemSpec, forced: tuple[str, ...] | None) -> Decision:
    """Walk every backend and record why each one is passed over (used by explain)."""
    candidates = _candidates(spec, forced)
    rows: list[tuple[str, list[str]]] = []
    chosen = None
    for b in candidates:
        r = reasons(b, spec)
        rows.append((b.name, r))
        if not r and chosen is None:
            chosen = b.name
    if forced:  # also show the backends that were not asked for
        for b in ordered(spec):
            if b.name not in forced:
                rows.append((b.name, ["not in the forced list"]))
    return Decision(spec, forced, chosen, rows)


# An environment variable that changes a backend's reasons between calls (the native backend's
# kernel list): part of the decision cache's key, so that a change is seen.
NATIVE_KERNELS_ENV = "FLASHMUX_NATIVE_KERNELS"


def select(spec: ProblemSpec, forced: tuple[str, ...] | None) -> Backend:
    key = (spec, forced, os.environ.get(NATIVE_KERNELS_ENV))
    b = _decisions.get(key)
    if b is not None:
        return b
    for b in _candidates(spec, forced):
        if not reasons(b, spec):
            if not torch_compiling():
                _decisions[key] = b
            return b
    d = decide(spec, forced)
    raise NoBackendError(_no_backend_message(d))


def _no_backend_message(d: Decision, what: str = "call") -> str:
    """The NoBackendError text: every (forced) backend with its reasons; `what` names the call
    ("call", or "decode call" for attention_with_kvcache)."""
    head = (
        f"no forced backend ({', '.join(d.forced)}) can run this {what}"
        if d.forced
        else f"no backend can run this {what}"
    )
    lines = [head + ":"]
    for name, r in d.rows:
        if d.forced and name not in d.forced:
            continue
        lines.append(f"  {name}: " + "; ".join(r))
    return "\n".join(lines)


def clear_caches() -> None:
    """Forget discovered backends, availability and decisions (after installing a backend)."""
    global _backends, _priority_table
    _backends = None
    _pending.clear()
    _priority_table = None
    _availability.clear()
    _decisions.clear()
    _bump()
