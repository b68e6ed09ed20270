"""Throughput and latency measurement of OpenAI-compatible servers.

`run_sweep` drives closed- or open-loop load with exact-length prompts and fixed-length outputs,
and returns per-level metrics defined as `vllm bench serve` defines them, SLO gates and cost.
`serve_transformers` starts the real CPU server used here and in tests. Plots live in
`forge.loadgen.plots` (imported lazily: matplotlib is only needed when plotting).

The names below load their module on first use (PEP 562 `__getattr__`), so that the CLI can read
`forge.loadgen.workload`'s bounds for its options without importing asyncio and the HTTP client.
"""

from __future__ import annotations

from forge.lazy import lazy_exports

_EXPORTS = {
    "Endpoint": "client",
    "RequestRecord": "client",
    "CostEstimate": "metrics",
    "GpuCost": "metrics",
    "LevelSummary": "metrics",
    "SLOs": "metrics",
    "Stats": "metrics",
    "cost_per_million_output_tokens": "metrics",
    "estimate_cost": "metrics",
    "evaluate_slo_gates": "metrics",
    "summarize_level": "metrics",
    "SweepResult": "runner",
    "run_level": "runner",
    "run_sweep": "runner",
    "RunningServer": "server",
    "launch_argv": "server",
    "serve_transformers": "server",
    "LoadLevel": "workload",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
