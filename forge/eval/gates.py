"""Every gate forge checks — accuracy, lm-eval recovery, serving SLOs — in one model.

A gate is data: a name (the recipe's own field name, optionally with a `.suffix` narrowing it
to part of the metric's namespace) and a limit. One evaluator looks the name up in `GATES`,
finds every measured metric it covers and compares; one formatter (`gate_verdict`,
`gate_failure`) says what happened. The names are the same in the recipe, in build.json, in
the Markdown / JUnit / console reports and in `forge bench`'s options, so a gate read in one
place can be found in every other. Adding a gate is one line in `GATES`.
Kept free of torch so planning, reporting and the load generator can import it cheaply.

A gate has three states: passed, failed, and deferred (its stage needs hardware that is absent:
not measured, so it is reported as its own state and never counted as passed).

Thresholds used in the field: vLLM accepts a quantized perplexity at most
1 % over the reference; llm-compressor's lm-eval checks want recovery ≥ 0.95 of the baseline's
scores; llama.cpp and SGLang track mean KL divergence and same-top-token rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from forge.errors import InputError

Direction = Literal["max", "min"]
GateState = Literal["passed", "failed", "deferred"]

# gate name (the recipe's field) -> (metric it limits, whether the limit is an upper or a lower bound)
GATES: dict[str, tuple[str, Direction]] = {
    # validation.accuracy.gates: measured on the exported weights against the baseline
    "max_ppl_increase_pct": ("ppl_increase_pct", "max"),  # 100 * (ppl / baseline_ppl - 1)
    "min_top1_agreement": ("top1_agreement", "min"),  # fraction of positions, 0..1
    "max_kl": ("mean_kl", "max"),  # nats per token, KL(baseline ‖ quantized)
    "min_recovery": ("recovery", "min"),  # quantized / baseline task score, per task and metric
    # validation.throughput: judged at one load level of a sweep (`forge.loadgen.metrics.level_metrics`)
    "max_ttft_p99_ms": ("ttft_ms.p99", "max"),  # p99 time to first token, ms
    "max_tpot_p99_ms": ("tpot_ms.p99", "max"),  # p99 time per output token, ms
    "min_output_tps": ("output_tok_s", "min"),  # output tokens per second
    "min_goodput": ("goodput_rps", "min"),  # requests per second within every latency SLO
    # forge bench only: over every request of the sweep
    "max_failed_pct": ("failed_pct", "max"),
}


def gate_direction(name: str) -> Direction:
    """Whether a gate is an upper or a lower bound; names forge does not know (a report from an
    older forge) say it themselves: `min_*` is a lower bound, anything else an upper one."""
    base = name.partition(".")[0]
    if base in GATES:
        return GATES[base][1]
    return "min" if base.startswith("min_") else "max"


@dataclass(frozen=True)
class GateResult:
    """One gate applied to one measured metric.

    `margin` is the signed distance to the limit in the metric's own units, positive when the
    gate passed with room to spare, negative by how much it failed; `measured` and `margin` are
    None when nothing was measured for the gate, which counts as a failure: a gate that cannot be
    checked must not pass silently. `level` is the load level a serving gate was judged at;
    `reason` says why a measurement is undefined.
    """

    name: str
    metric: str
    limit: float
    measured: float | None
    passed: bool
    margin: float | None
    level: str | None = None
    reason: str | None = None

    @property
    def state(self) -> GateState:
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict:
        """Plain JSON-ready fields, for build records and reports (unset `level` / `reason` left out)."""
        data = asdict(self)
        return {k: v for k, v in data.items() if not (k in ("level", "reason") and v is None)}


@dataclass(frozen=True)
class DeferredGate:
    """A gate whose stage is deferred to a machine with the hardware: its limit and the command that
    measures it, never a pass."""

    suite: str
    artifact: str
    name: str
    metric: str
    limit: float
    stage: str
    reason: str | None
    command: str | None
    state: GateState = "deferred"

    def to_dict(self) -> dict:
        return asdict(self)


def flatten_gates(gates: Mapping[str, float | Mapping]) -> dict[str, float]:
    """`{"min_recovery": {"arc_easy": 0.95}}` -> `{"min_recovery.arc_easy": 0.95}` (any depth)."""
    flat: dict[str, float] = {}
    for key, value in gates.items():
        if isinstance(value, Mapping):
            for sub, limit in flatten_gates(value).items():
                flat[f"{key}.{sub}"] = limit
        else:
            flat[key] = float(value)
    return flat


def _split_gate(name: str) -> tuple[str, Direction]:
    """The metric prefix a gate name covers: `min_recovery.arc_easy` -> `recovery.arc_easy`."""
    base, dot, suffix = name.partition(".")
    if base not in GATES:
        known = ", ".join(sorted(GATES))
        raise InputError(f"gates.{name}: unknown gate {base!r} (known: {known})")
    metric, direction = GATES[base]
    return metric + dot + suffix, direction


def evaluate_gates(
    gates: Mapping[str, float | Mapping | None], results: Mapping[str, float | None], level: str | None = None
) -> list[GateResult]:
    """Check every gate that is set against every measured metric it covers, in the gates' order.

    A gate named `<gate>.<suffix>` covers the metric `<metric>.<suffix>` and everything below it
    (`min_recovery.arc_easy` covers `recovery.arc_easy.acc` and `recovery.arc_easy.acc_norm`);
    a bare `min_recovery` covers every task. Gates set to None are not set; NaN measurements and
    metrics that are None (nothing was measured) fail.
    """
    checked: list[GateResult] = []
    problems: list[str] = []
    for name, limit in flatten_gates({k: v for k, v in gates.items() if v is not None}).items():
        try:
            prefix, direction = _split_gate(name)
        except InputError as error:
            problems.append(str(error))
            continue
        covered = [m for m in results if (m == prefix or m.startswith(prefix + ".")) and results[m] is not None]
        if not covered:
            checked.append(GateResult(name, prefix, limit, None, False, None, level))
        for metric in covered:
            measured = float(results[metric])
            margin = limit - measured if direction == "max" else measured - limit
            passed = not math.isnan(measured) and margin >= 0
            checked.append(GateResult(name, metric, limit, measured, passed, margin, level))
    if problems:
        raise InputError("; ".join(problems))
    return checked


# ---------------------------------------------------------------- the one formatter


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _float(value) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def gate_verdict(gate: GateResult | Mapping) -> str:
    """`pass`, `deferred to a GPU builder`, or `FAIL: <by how much, or why>` for a gate result or a
    gate as stored in a report (which may come from another runner: missing fields are tolerated)."""
    g = gate.to_dict() if isinstance(gate, GateResult) else gate
    if g.get("state") == "deferred":
        return "deferred to a GPU builder"
    if g.get("passed"):
        return "pass"
    if g.get("reason"):
        return f"FAIL: {g['reason']}"
    measured, limit = _float(g.get("measured")), _float(g.get("limit"))
    if measured is None:
        return "FAIL: not measured"
    if math.isnan(measured):
        return "FAIL: measured NaN"
    if limit is None:
        return "FAIL"
    side = "above the maximum" if gate_direction(str(g.get("name", ""))) == "max" else "below the minimum"
    off = abs(measured - limit)
    relative = f" ({off / abs(limit):.1%} of the limit)" if limit else ""
    return f"FAIL: {off:.4g} {side}{relative}"


def gate_failure(gate: GateResult | Mapping) -> str:
    """One line for a failed gate: `<artifact>: <gate> [metric] measured X, limit: maximum Y (why)`."""
    g = gate.to_dict() if isinstance(gate, GateResult) else gate
    name = str(g.get("name", "?"))
    bound = "maximum" if gate_direction(name) == "max" else "minimum"
    limit = _float(g.get("limit"))
    where = f"{g['artifact']}: " if g.get("artifact") else ""
    metric = g.get("metric")
    label = f"{name} [{metric}]" if metric and name.partition(".")[0] == "min_recovery" else name
    at = f" at {g['level']}" if g.get("level") else ""
    if g.get("reason"):
        what = str(g["reason"])
    elif _float(g.get("measured")) is None:
        what = "was not measured"
    else:
        what = f"measured {_number(_float(g['measured']))}"
    return f"{where}{label}{at} {what}, limit: {bound} {_number(limit)}"
