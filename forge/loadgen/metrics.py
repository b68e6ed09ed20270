"""Serving metrics, SLO gates and cost, defined as `vllm bench serve` defines them.

Per request (vLLM `vllm/benchmarks/lib/endpoint_request_func.py` and `serve.py::calculate_metrics`):
  TTFT = first token chunk − start;  E2EL = last token chunk − start;
  TPOT = (E2EL − TTFT) / (output_tokens − 1), only when output_tokens > 1;
  ITL  = gaps between consecutive token chunks (a chunk may carry several tokens, so ITL ≠ TPOT).
"start" is the request's scheduled arrival, so client-side queueing for a concurrency slot is inside
TTFT and E2EL (vLLM issue #54101 / PR #54136 report it separately as "client queue time"; forge
keeps it in the headline numbers and also reports `queue_ms`).
Per level: request throughput = completed / duration; output tok/s = Σ output tokens / duration;
total tok/s = Σ (prompt + output) tokens / duration; goodput = requests meeting every per-request
SLO / duration (vLLM `--goodput`). Only successful requests contribute tokens and latencies.
Percentiles interpolate linearly between order statistics, as `numpy.percentile` does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

from forge.errors import InputError
from forge.eval.gates import GateResult, evaluate_gates

if TYPE_CHECKING:  # the HTTP client imports asyncio and ssl; a report re-gating a cached sweep needs neither
    from forge.loadgen.client import RequestRecord
    from forge.loadgen.workload import LoadLevel


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one metric, in milliseconds; None when nothing was measured."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    count: int = 0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default `linear` method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def describe(values_s: Sequence[float]) -> Stats:
    """Stats of values given in seconds, reported in milliseconds."""
    if not values_s:
        return Stats()
    ms = sorted(v * 1000.0 for v in values_s)
    return Stats(
        mean=sum(ms) / len(ms),
        p50=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
        count=len(ms),
    )


@dataclass(frozen=True)
class RequestMetrics:
    """Latencies of one successful request, in seconds."""

    ttft_s: float
    e2el_s: float
    tpot_s: float | None
    itls_s: list[float]
    queue_s: float


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """Derive TTFT, E2EL, TPOT and ITLs of a successful request (definitions in the module doc)."""
    times = record.chunk_times_s
    if not record.ok or not times:
        raise ValueError(f"request {record.index} has no timing: {record.error}")
    ttft = times[0] - record.scheduled_s
    e2el = times[-1] - record.scheduled_s
    out = record.output_tokens or 0
    tpot = (e2el - ttft) / (out - 1) if out > 1 else None
    itls = [b - a for a, b in zip(times, times[1:], strict=False)]
    return RequestMetrics(ttft, e2el, tpot, itls, record.sent_s - record.scheduled_s)


@dataclass(frozen=True)
class SLOs:
    """Service-level objectives, named as the recipe's `validation.throughput` gates; every field is optional.

    The p99 limits gate the level at `at_concurrency` and are also the per-request thresholds for
    goodput (a request is "good" when its own TTFT and TPOT are within them, as vLLM `--goodput`).
    """

    max_ttft_p99_ms: float | None = None
    max_tpot_p99_ms: float | None = None
    min_output_tps: float | None = None
    min_goodput: float | None = None
    at_concurrency: int | None = None

    def gates(self) -> dict[str, float | None]:
        """The limits by gate name (`forge.eval.gates.GATES`), None where not set."""
        return {
            "max_ttft_p99_ms": self.max_ttft_p99_ms,
            "max_tpot_p99_ms": self.max_tpot_p99_ms,
            "min_output_tps": self.min_output_tps,
            "min_goodput": self.min_goodput,
        }


def error_kind(error: str) -> str:
    """Coarse error classes for the summary; the full message stays in the JSONL record."""
    if error.startswith("HTTP 5"):
        return "http_5xx"
    if error.startswith("HTTP "):
        return "http_4xx"
    if error.startswith("timeout"):
        return "timeout"
    if error.startswith("server error event"):
        return "server_error_event"
    if error.startswith("not sent"):
        return "not_sent"
    if error.startswith(("ProtocolError", "bad SSE payload", "ValueError")):
        return "protocol"
    if "mid-stream" in error or "closed" in error or "Connection" in error or "OSError" in error:
        return "connection"
    return "other"


@dataclass
class LevelSummary:
    """One load level of a sweep; latencies in ms, throughputs per second of level duration."""

    label: str
    concurrency: int | None
    request_rate: float | None
    burstiness: float
    requests: int
    completed: int
    errors: int
    error_kinds: dict[str, int]
    duration_s: float
    request_throughput_rps: float
    output_tok_s: float
    total_tok_s: float
    goodput_rps: float | None
    total_input_tokens: int
    total_output_tokens: int
    short_outputs: int
    min_output_tokens: int | None
    output_tokens_source: dict[str, int]
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2el_ms: Stats
    queue_ms: Stats
    records_path: str | None = None
    first_errors: list[str] = field(default_factory=list)


def _is_good(m: RequestMetrics, slos: SLOs) -> bool:
    if slos.max_ttft_p99_ms is not None and m.ttft_s * 1000.0 > slos.max_ttft_p99_ms:
        return False
    if slos.max_tpot_p99_ms is not None and m.tpot_s is not None and m.tpot_s * 1000.0 > slos.max_tpot_p99_ms:
        return False
    return True


def summarize_level(
    level: LoadLevel, records: Sequence[RequestRecord], duration_s: float, slos: SLOs | None = None
) -> LevelSummary:
    """Fold one level's records into throughput, latency percentiles, goodput and error counts."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    per_request = [request_metrics(r) for r in ok]
    out_tokens = [r.output_tokens or 0 for r in ok]
    in_tokens = [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_tokens_requested for r in ok]
    total_out = sum(out_tokens)
    dur = max(duration_s, 1e-9)
    # Goodput counts requests within every per-request limit that is set (all of them if none is).
    goodput = None if slos is None else sum(_is_good(m, slos) for m in per_request) / dur
    return LevelSummary(
        label=level.label,
        concurrency=level.concurrency,
        request_rate=level.request_rate,
        burstiness=level.burstiness,
        requests=len(records),
        completed=len(ok),
        errors=len(failed),
        error_kinds=dict(Counter(error_kind(r.error or "") for r in failed)),
        duration_s=duration_s,
        request_throughput_rps=len(ok) / dur,
        output_tok_s=total_out / dur,
        total_tok_s=(total_out + sum(in_tokens)) / dur,
        goodput_rps=goodput,
        total_input_tokens=sum(in_tokens),
        total_output_tokens=total_out,
        short_outputs=sum(1 for r, n in zip(ok, out_tokens, strict=True) if n < r.output_tokens_requested),
        min_output_tokens=min(out_tokens) if out_tokens else None,
        output_tokens_source=dict(Counter(r.output_tokens_source for r in ok)),
        ttft_ms=describe([m.ttft_s for m in per_request]),
        tpot_ms=describe([m.tpot_s for m in per_request if m.tpot_s is not None]),
        itl_ms=describe([x for m in per_request for x in m.itls_s]),
        e2el_ms=describe([m.e2el_s for m in per_request]),
        queue_ms=describe([m.queue_s for m in per_request]),
        first_errors=sorted({r.error or "" for r in failed})[:5],
    )


def load_key(level: LevelSummary) -> tuple[float, float]:
    """Order levels by offered load: a closed loop offers unbounded rate, then more concurrency."""
    return (
        level.request_rate if level.request_rate is not None else math.inf,
        level.concurrency if level.concurrency is not None else math.inf,
    )


def level_view(level: LevelSummary | Mapping) -> LevelSummary:
    """A level as measured, or as stored in a report (`LevelSummary` as a dict): how forge re-gates
    and re-prices a cached sweep when only a threshold or a price changed."""
    if not isinstance(level, Mapping):
        return level
    stats = {k: Stats(**level[k]) for k in ("ttft_ms", "tpot_ms") if isinstance(level.get(k), Mapping)}
    return SimpleNamespace(**{**level, **stats})  # type: ignore[return-value]


def level_metrics(level: LevelSummary) -> dict[str, float | None]:
    """The metrics a serving gate can limit (`forge.eval.gates.GATES`), None where not measured."""
    return {
        "ttft_ms.p99": level.ttft_ms.p99,
        "tpot_ms.p99": level.tpot_ms.p99,
        "output_tok_s": level.output_tok_s,
        "goodput_rps": level.goodput_rps,
    }


def gate_level(levels: Sequence[LevelSummary], slos: SLOs) -> LevelSummary:
    """The level gates are judged at: the one at `slos.at_concurrency`, else the highest load."""
    if not levels:
        raise InputError("levels: no load levels were measured")
    if slos.at_concurrency is None:
        return max(levels, key=load_key)
    matches = [lv for lv in levels if lv.concurrency == slos.at_concurrency]
    if not matches:
        measured = ", ".join(lv.label for lv in levels)
        raise InputError(f"slos.at_concurrency: {slos.at_concurrency} is not a measured level ({measured})")
    return max(matches, key=load_key)


def evaluate_slo_gates(levels: Sequence[LevelSummary | Mapping], slos: SLOs) -> list[GateResult]:
    """Every SLO that is set, checked by the one gate evaluator at the gate level; a metric that
    could not be measured fails its gate."""
    if not any(limit is not None for limit in slos.gates().values()):
        return []
    level = gate_level([level_view(lv) for lv in levels], slos)
    return evaluate_gates(slos.gates(), level_metrics(level), level=level.label)


def meets_slos(level: LevelSummary, slos: SLOs | None) -> bool:
    """Whether a level is usable for cost: no errors and p99 latencies within the limits."""
    if level.errors or level.completed == 0:
        return False
    if slos is None:
        return True
    if slos.max_ttft_p99_ms is not None and (level.ttft_ms.p99 is None or level.ttft_ms.p99 > slos.max_ttft_p99_ms):
        return False
    if slos.max_tpot_p99_ms is not None and (level.tpot_ms.p99 is None or level.tpot_ms.p99 > slos.max_tpot_p99_ms):
        return False
    return True


@dataclass(frozen=True)
class GpuCost:
    """What the serving hardware costs: price per GPU-hour and GPUs per replica."""

    usd_per_gpu_hour: float
    gpus: int = 1


@dataclass(frozen=True)
class CostEstimate:
    level: str
    output_tok_s: float
    usd_per_gpu_hour: float
    gpus: int
    usd_per_million_output_tokens: float


def cost_per_million_output_tokens(usd_per_gpu_hour: float, gpus: int, output_tok_s: float) -> float:
    """GPU $/h × GPUs / (output tok/s × 3600) × 1e6: dollars per million output tokens at the measured rate."""
    if output_tok_s <= 0:
        raise ValueError("output throughput must be positive to price it")
    return usd_per_gpu_hour * gpus / (output_tok_s * 3600.0) * 1e6


def estimate_cost(levels: Sequence[LevelSummary | Mapping], slos: SLOs | None, gpu: GpuCost) -> CostEstimate | None:
    """Price output tokens at the highest load that still met the SLOs, not at the offline peak:
    that is the throughput a replica can actually sell. None when no level qualified. Levels may be
    as stored in a report, so a cached sweep is priced at today's price."""
    usable = [lv for lv in map(level_view, levels) if meets_slos(lv, slos) and lv.output_tok_s > 0]
    if not usable:
        return None
    best = max(usable, key=load_key)
    usd = cost_per_million_output_tokens(gpu.usd_per_gpu_hour, gpu.gpus, best.output_tok_s)
    return CostEstimate(best.label, best.output_tok_s, gpu.usd_per_gpu_hour, gpu.gpus, usd)
