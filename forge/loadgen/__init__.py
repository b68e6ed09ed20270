"""Throughput and latency measurement of OpenAI-compatible servers (forge issue 5).

`run_sweep` drives closed- or open-loop load with exact-length prompts and fixed-length outputs,
and returns per-level metrics defined as `vllm bench serve` defines them, SLO gates and cost.
`serve_transformers` starts the real CPU server used here and in tests. Plots live in
`forge.loadgen.plots` (imported lazily: matplotlib is only needed when plotting).
"""

from forge.loadgen.client import Endpoint, RequestRecord
from forge.loadgen.metrics import (
    CostEstimate,
    GateResult,
    GpuCost,
    LevelSummary,
    SLOs,
    Stats,
    cost_per_million_output_tokens,
    estimate_cost,
    evaluate_gates,
    summarize_level,
)
from forge.loadgen.runner import SweepResult, run_level, run_sweep
from forge.loadgen.server import RunningServer, launch_argv, serve_transformers
from forge.loadgen.workload import LoadLevel

__all__ = [
    "CostEstimate",
    "Endpoint",
    "GateResult",
    "GpuCost",
    "LevelSummary",
    "LoadLevel",
    "RequestRecord",
    "RunningServer",
    "SLOs",
    "Stats",
    "SweepResult",
    "cost_per_million_output_tokens",
    "estimate_cost",
    "evaluate_gates",
    "launch_argv",
    "run_level",
    "run_sweep",
    "serve_transformers",
    "summarize_level",
]
