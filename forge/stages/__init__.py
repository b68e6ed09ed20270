"""The build's stages as data: one module per stage kind, each with

- `VERSION`, bumped when the stage's output would change for the same inputs (a fix, a format change);
- `Inputs`, a frozen record of everything the stage reads: the plan fills it in, its keyed fields
  and the keys of the entries it reads are the cache key (`forge.stages.base.stage_key`), and it
  is the only thing the function receives besides its `Run` (dependency directories by role, the
  output directory, progress);
- `produce(inputs, run) -> facts`, which writes only into `run.out` (renamed into the cache once it
  returns) and returns JSON-able facts for the entry's `stage.json` and the build report.

`KINDS` maps each kind to its module in the order the build runs them; adding a stage kind is one
module here plus one line in `KINDS` (and its place in the plan). Report-time judgement (gates,
prices) is in `forge.stages.gates`.
"""

from __future__ import annotations

from types import ModuleType

from forge.stages import (
    accuracy,
    baseline,
    engine,
    export,
    model_image,
    package,
    push,
    quantize,
    source,
    tasks,
    throughput,
)
from forge.stages.base import Run, stage_key
from forge.stages.gates import (
    deferred_gates,
    evaluate_accuracy_gates,
    evaluate_task_gates,
    gate_failure_message,
    throughput_results,
)
from forge.stages.serve import dense_copy, serve_artifact, served_as

# Kind → module, in the order the build runs them (the plan sorts its stages by it).
KINDS: dict[str, ModuleType] = {
    "source": source,
    "baseline": baseline,
    "quantize": quantize,
    "export": export,
    "accuracy": accuracy,
    "engine": engine,
    "model-image": model_image,
    "package": package,
    "tasks": tasks,
    "throughput": throughput,
    "push": push,
}

__all__ = [
    "KINDS",
    "Run",
    "deferred_gates",
    "dense_copy",
    "evaluate_accuracy_gates",
    "evaluate_task_gates",
    "gate_failure_message",
    "serve_artifact",
    "served_as",
    "stage_key",
    "throughput_results",
]
