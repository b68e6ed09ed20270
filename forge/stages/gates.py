"""Report-time judgement of the measuring stages: gates checked and sweeps priced under the recipe
as it is now, when the report is written, so a cached measurement follows today's thresholds and
prices without being measured again (the stages' keys hold only what shapes a measurement)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from forge.stages.serve import CPU

if TYPE_CHECKING:
    from forge.plan import Plan, Stage
    from forge.recipe import Variant


def variant_named(plan: Plan, name: str) -> Variant:
    return next(v for v in plan.recipe.variants if v.name == name)


def throughput_slos(plan: Plan):
    """The recipe's throughput gates as the load generator's `SLOs` (same names)."""
    from forge.loadgen import SLOs

    load = plan.recipe.validation.throughput
    return SLOs(max_ttft_p99_ms=load.max_ttft_p99_ms, max_tpot_p99_ms=load.max_tpot_p99_ms,
                min_output_tps=load.min_output_tps, min_goodput=load.min_goodput)  # fmt: skip


def throughput_price(plan: Plan, stage: Stage) -> tuple[float | None, int]:
    """(USD per hour of one GPU, or of the CPU; GPUs per replica) for a throughput stage: the
    recipe's `usd_per_hour`, else the GPU profile's list price; the CPU is priced only when set."""
    from forge.gpus import lookup_gpu

    prices = plan.recipe.validation.throughput.usd_per_hour
    served = stage.inputs.served
    if served.gpu == CPU:
        return prices.get(CPU), 1
    return prices.get(served.gpu, lookup_gpu(served.gpu).usd_per_hour), served.gpus


NO_COST = "cost: no load level met the SLOs without errors, so none is priced"


def throughput_results(plan: Plan, records: dict[str, dict]) -> list[dict]:
    """Each measured throughput stage's levels, gates and cost under the recipe as it is now: a
    cached sweep may have been measured under other thresholds or prices, and is re-gated and
    re-priced here, once, when the report is written (nothing is measured again)."""
    from dataclasses import asdict

    from forge.loadgen.metrics import GpuCost, estimate_cost, evaluate_slo_gates

    slos = throughput_slos(plan)
    results = []
    for stage in plan.of_kind("throughput"):
        record = records[stage.id]
        if "sweep" in record:
            entry = plan.cache.entry(stage.kind, stage.key)
            sweep = {**record["sweep"], "files": {k: str(entry / v) for k, v in record["sweep"]["files"].items()}}
            sweep["gates"] = [g.to_dict() for g in evaluate_slo_gates(sweep["levels"], slos)]
            sweep["gates_passed"] = all(g["passed"] for g in sweep["gates"])
            price, gpus = throughput_price(plan, stage)
            cost = estimate_cost(sweep["levels"], slos, GpuCost(price, gpus)) if price else None
            sweep["cost"] = asdict(cost) if cost else None
            sweep["warnings"] = [w for w in sweep.get("warnings", []) if w != NO_COST]
            if price and cost is None:
                sweep["warnings"].append(NO_COST)
            results.append({"stage": stage.id, "variant": record["variant"], "gpu": record["gpu"], **sweep})
    return results


# ---------------------------------------------------------------- gates


def deferred_gates(plan: Plan, records: dict[str, dict]) -> list[dict]:
    """The gates of every measuring stage deferred to a GPU builder: neither passed nor failed, each
    with the stage and the command that measures it (a report must never count them as passed)."""
    from forge.eval.gates import GATES, DeferredGate, flatten_gates

    throughput = throughput_slos(plan).gates()
    gates = []
    for stage in plan.stages:
        if stage.kind not in ("tasks", "throughput") or records[stage.id]["status"] != "deferred":
            continue
        limits = throughput
        if stage.kind == "tasks":
            variant = variant_named(plan, stage.inputs.variant)
            limits = {"min_recovery": (variant.gates or plan.recipe.validation.accuracy.gates).min_recovery}
        for name, limit in flatten_gates({k: v for k, v in limits.items() if v is not None}).items():
            base, dot, suffix = name.partition(".")
            gate = DeferredGate(stage.kind, stage.id.split("/", 1)[1], name, GATES[base][0] + dot + suffix, limit,
                                stage.id, stage.reason, stage.command)  # fmt: skip
            gates.append(gate.to_dict())
    return gates


def gates_of(plan: Plan, variant_name: str):
    """A variant's accuracy gates: its own, else the recipe's."""
    return variant_named(plan, variant_name).gates or plan.recipe.validation.accuracy.gates


def evaluate_accuracy_gates(plan: Plan, records: dict[str, dict]) -> list[dict]:
    from forge.eval.gates import evaluate_gates

    results = []
    for stage in plan.of_kind("accuracy"):
        record = records[stage.id]
        if record["status"] not in ("ran", "cached"):
            continue  # left out by --only/--skip: reported as such, never as a pass
        gates = gates_of(plan, stage.inputs.variant).model_dump(exclude_none=True)
        gates.pop("min_recovery", None)  # task recovery needs a served endpoint (lm-eval), not this stage
        for gate in evaluate_gates(gates, record):
            results.append({"artifact": stage.id.removeprefix("accuracy/"), **gate.to_dict()})
    return results


def evaluate_task_gates(plan: Plan, records: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(gates, scores): every variant's lm-eval recovery against the baseline's run, checked
    against its `min_recovery` gates (a variant left out by --only/--skip is not reported)."""
    from dataclasses import replace

    from forge.eval.gates import evaluate_gates
    from forge.eval.lm_eval import recovery

    if not plan.of_kind("tasks"):
        return [], []
    base_stage = plan.stage("tasks/baseline")

    def results(stage: Stage) -> dict | None:
        if records[stage.id]["status"] not in ("ran", "cached"):
            return None
        return json.loads((plan.cache.entry(stage.kind, stage.key) / "results.json").read_text())

    baseline = results(base_stage)
    gates, scores = [], [{"stage": base_stage.id, "variant": None, "scores": records[base_stage.id].get("scores")}]
    for stage in plan.of_kind("tasks"):
        measured = None if stage is base_stage or baseline is None else results(stage)
        if measured is None:
            continue
        ratios = recovery(baseline, measured)
        scores.append({"stage": stage.id, "variant": stage.inputs.variant, "scores": records[stage.id]["scores"],
                       "recovery": ratios})  # fmt: skip
        limits = gates_of(plan, stage.inputs.variant).min_recovery
        for gate in evaluate_gates({"min_recovery": limits}, ratios):
            if gate.measured is not None and math.isnan(gate.measured):
                gate = replace(gate, reason="the baseline scored 0 on this metric, so recovery is undefined")
            gates.append({"artifact": stage.id.removeprefix("tasks/"), **gate.to_dict()})
    return gates, scores


def gate_failure_message(failed: list[dict]) -> str:
    """The failed gates, one line each, for the error a gate failure exits 1 with."""
    from forge.eval.gates import gate_failure

    return "\n".join(["validation gates failed:", *(f"  {gate_failure(g)}" for g in failed)])
