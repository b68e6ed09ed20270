"""The recipe's accuracy gates, checked by one generic validator.

A gate is data: a name from `GATES` (optionally with a `.suffix` narrowing it to part of the
metric's namespace) and a limit. The validator looks the name up, finds every measured metric it
covers and compares. Adding a gate is one line in `GATES`; nothing else knows gate names.
Kept free of torch so planning and reporting can import it cheaply.

Thresholds used in the field: vLLM accepts a quantized perplexity at most
1 % over the reference; llm-compressor's lm-eval checks want recovery ≥ 0.95 of the baseline's
scores; llama.cpp and SGLang track mean KL divergence and same-top-token rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from forge.errors import GateFailed, InputError

Direction = Literal["max", "min"]

# gate name -> (metric it limits, whether the limit is an upper or a lower bound)
GATES: dict[str, tuple[str, Direction]] = {
    "max_ppl_increase_pct": ("ppl_increase_pct", "max"),  # 100 * (ppl / baseline_ppl - 1)
    "min_top1_agreement": ("top1_agreement", "min"),  # fraction of positions, 0..1
    "max_kl": ("mean_kl", "max"),  # nats per token, KL(baseline ‖ quantized)
    "min_recovery": ("recovery", "min"),  # quantized / baseline task score, per task and metric
}


@dataclass(frozen=True)
class GateResult:
    """One gate applied to one measured metric.

    `margin` is the signed distance to the limit in the metric's own units, positive when the
    gate passed with room to spare, negative by how much it failed; `measured` and `margin` are
    None when nothing was measured for the gate, which counts as a failure: a gate that cannot be
    checked must not pass silently.
    """

    name: str
    metric: str
    limit: float
    measured: float | None
    passed: bool
    margin: float | None

    def to_dict(self) -> dict:
        """Plain JSON-ready fields, for build records and reports."""
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


def _split_gate(name: str) -> tuple[str, str, Direction]:
    """The metric prefix a gate name covers: `min_recovery.arc_easy` -> `recovery.arc_easy`."""
    base, dot, suffix = name.partition(".")
    if base not in GATES:
        known = ", ".join(sorted(GATES))
        raise InputError(f"gates.{name}: unknown gate {base!r} (known: {known})")
    metric, direction = GATES[base]
    return name, metric + dot + suffix, direction


def evaluate_gates(gates: Mapping[str, float | Mapping], results: Mapping[str, float]) -> list[GateResult]:
    """Check every gate against every measured metric it covers, in the gates' order.

    A gate named `<gate>.<suffix>` covers the metric `<metric>.<suffix>` and everything below it
    (`min_recovery.arc_easy` covers `recovery.arc_easy.acc` and `recovery.arc_easy.acc_norm`);
    a bare `min_recovery` covers every task. NaN measurements fail.
    """
    checked: list[GateResult] = []
    problems: list[str] = []
    for name, limit in flatten_gates(gates).items():
        try:
            name, prefix, direction = _split_gate(name)
        except InputError as error:
            problems.append(str(error))
            continue
        covered = [m for m in results if m == prefix or m.startswith(prefix + ".")]
        if not covered:
            checked.append(GateResult(name, prefix, limit, None, False, None))
        for metric in covered:
            measured = float(results[metric])
            margin = limit - measured if direction == "max" else measured - limit
            passed = not math.isnan(measured) and margin >= 0
            checked.append(GateResult(name, metric, limit, measured, passed, margin))
    if problems:
        raise InputError("; ".join(problems))
    return checked


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _verdict(result: GateResult) -> str:
    if result.passed:
        return "pass"
    if result.measured is None:
        return "FAIL: not measured"
    if math.isnan(result.measured):
        return "FAIL: measured NaN"
    side = "above the maximum" if GATES[result.name.partition(".")[0]][1] == "max" else "below the minimum"
    relative = f" ({abs(result.margin) / abs(result.limit):.1%} of the limit)" if result.limit else ""
    return f"FAIL: {abs(result.margin):.4g} {side}{relative}"


def render_gate_table(results: list[GateResult], markdown: bool = False, failures_only: bool = False) -> str:
    """A table of gate outcomes for the terminal (aligned plain text) or a report (Markdown)."""
    rows = [r for r in results if not (failures_only and r.passed)]
    header = ["gate", "metric", "limit", "measured", "margin", "result"]
    body = [[r.name, r.metric, _number(r.limit), _number(r.measured), _number(r.margin), _verdict(r)] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    return "\n".join(lines) + "\n"


def enforce_gates(gates: Mapping[str, float | Mapping], results: Mapping[str, float]) -> list[GateResult]:
    """`evaluate_gates`, raising `GateFailed` (exit 1) with the table of failures if any failed."""
    checked = evaluate_gates(gates, results)
    failed = [r for r in checked if not r.passed]
    if failed:
        table = render_gate_table(failed)
        raise GateFailed(f"{len(failed)} of {len(checked)} accuracy gates failed:\n{table}")
    return checked
