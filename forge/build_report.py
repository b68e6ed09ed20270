"""The build report (`artifacts/<name>/build.json`) as a typed model, and its JSON Schema.

`forge build` writes it, `forge report` renders it, `forge verify` reads it back from a registry
and CI jobs parse it, so its shape is a contract: the build validates every report through
`BuildReport` before writing it (a field of the wrong type is a bug in forge, caught where it is
made, not in a reader), and `forge/build_report.schema.json` is generated from the same model
(a test keeps the committed copy current, as `recipe.schema.json` is kept).

Closed where forge decides every key (the top level, validation, gate counts); open where a
stage adds its own facts (stage records, artifacts, sweeps, images), so a new fact is not a
schema change. Renderers stay tolerant of reports from other runners and older forges: they
read plain dicts, this model only judges what this forge writes.

Regenerate the schema with `python -m forge.build_report > forge/build_report.schema.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forge.plan import STAGE_ORDER

SCHEMA_PATH = Path(__file__).parent / "build_report.schema.json"

# What a build's report says as a whole: every gate passed; none failed but some wait for a GPU
# builder (not measured, never counted as passed); a gate failed (exit 1); the build stopped.
BuildStatus = Literal["passed", "gates-deferred", "gates-failed", "error"]
# What a stage did in this build: computed, taken from the cache, deferred to a machine with the
# hardware (with its command), left out by --only/--skip or by a failed gate (push), chosen but not
# reached because the build stopped, or stopped the build.
StageStatus = Literal["ran", "cached", "deferred", "disabled", "not-run", "failed"]
StageKind = Literal[STAGE_ORDER]  # type: ignore[valid-type]
GateState = Literal["passed", "failed", "deferred"]


class Closed(BaseModel):
    """Every key is forge's: an unknown one is a bug."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """Typed where forge relies on a key; other facts (a stage's own, a sweep's) pass through as written."""

    model_config = ConfigDict(extra="allow")


class BuildError(Closed):
    stage: str = Field(description="The stage id or phase (materialize, report) the build was in.")
    type: str = Field(description="The error's type, e.g. InfraError.")
    message: str


class Inputs(Closed):
    source: dict[str, Any] = Field(description="The source's identity (kind, digests, revision).")
    model_config_: dict[str, Any] = Field(alias="model_config", description="The model's config.json.")


class StageRecord(Open):
    """A stage of the plan and what it reported (cache facts such as files, metrics and seconds as they are)."""

    id: str
    kind: StageKind
    key: str | None = Field(description="Cache key; null for a stage that has none (a push).")
    status: StageStatus
    seconds: float | None = Field(
        default=None, ge=0, description="What computing the stage's entry took (also for a cached stage: then)."
    )
    reason: str | None = Field(default=None, description="Why it did not run, or a note about how it ran.")
    command: str | None = Field(default=None, description="For a deferred stage: the command a GPU builder runs.")
    error: str | None = Field(default=None, description="For a failed stage: the error it stopped on.")
    discarded_entry: str | None = Field(
        default=None, description="The stage ran because its cached entry failed verification against its manifest."
    )


class FileDigest(Closed):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Artifact(Open):
    """One built (variant, backend, GPU) cell."""

    variant: str
    backend: str
    mode: str | None = Field(default=None, description="TensorRT-LLM's engine | pytorch; null for the others.")
    gpu: str
    format: str
    path: str = Field(description="artifacts/<recipe>/<variant>/<backend>[-<mode>]: hard links into the cache.")
    files: dict[str, FileDigest]
    stages: list[str] = Field(description="The cell's own stages (engine, throughput, package, push).")


class Impossible(Closed):
    """A combination the compatibility rules ruled out, with why."""

    variant: str
    backend: str
    mode: str | None = Field(default=None, description="TensorRT-LLM's engine | pytorch; null for the others.")
    gpu: str
    reason: str


class Gate(Open):
    """One gate checked against one measured metric (`forge.eval.gates.GateResult`); the name is the
    recipe's field name (`max_ppl_increase_pct`, `min_recovery.<task>`, `min_output_tps`)."""

    artifact: str | None = Field(default=None, description="<variant>/<format> or <variant>/<backend>/<gpu>.")
    name: str
    metric: str | None = None
    limit: float
    measured: float | None = Field(description="null when nothing was measured (the gate fails).")
    passed: bool
    margin: float | None = Field(
        default=None, description="Distance to the limit in the metric's units: positive passed, negative failed."
    )
    level: str | None = Field(default=None, description="The load level a serving gate was judged at.")
    reason: str | None = Field(default=None, description="Why a measurement is undefined.")


class DeferredGate(Closed):
    """A gate of a stage deferred to a GPU builder: not measured, so neither passed nor failed."""

    suite: str
    artifact: str
    name: str
    metric: str
    limit: float
    state: Literal["deferred"]
    stage: str
    reason: str | None
    command: str | None = Field(description="What measures it on a machine with the hardware.")


class TaskRun(Open):
    """An lm-eval run: the baseline's scores, or a variant's scores and recovery (quantized / baseline)."""

    stage: str
    variant: str | None
    scores: dict[str, Any] | None = None
    recovery: dict[str, float | None] | None = None


class Cost(Open):
    level: str = Field(description="The highest load level that met the latency SLOs without errors.")
    output_tok_s: float
    usd_per_gpu_hour: float = Field(description="The price applied when the report was written.")
    gpus: int
    usd_per_million_output_tokens: float


class Sweep(Open):
    """A throughput stage's load sweep (forge.loadgen's SweepResult), gated and priced when the report
    was written, so a cached sweep follows the recipe's thresholds and prices of today."""

    stage: str | None = None
    variant: str | None = None
    gpu: str | None = None
    levels: list[dict[str, Any]] = Field(default_factory=list)
    gates: list[Gate] = Field(default_factory=list)
    gates_passed: bool | None = None
    cost: Cost | None = None
    files: dict[str, str] = Field(default_factory=dict)


class Validation(Closed):
    accuracy: list[Gate] = Field(
        description="One entry per (artifact, gate, metric) checked: accuracy gates, and lm-eval min_recovery gates."
    )
    tasks: list[TaskRun] = Field(default_factory=list, description="lm-eval runs (validation.accuracy.tasks).")
    throughput: list[Sweep] = Field(default_factory=list, description="Load sweeps, when throughput validation ran.")
    deferred: list[DeferredGate] = Field(default_factory=list, description="Gates deferred to a GPU builder.")


class GateCounts(Closed):
    passed: int = Field(ge=0)
    failed: int = Field(ge=0)
    deferred: int = Field(ge=0, description="Not measured here: never counted as passed.")


class StageTime(Closed):
    stage: str
    kind: StageKind
    status: Literal["ran", "cached", "failed"]
    seconds: float = Field(ge=0, description="Wall time in this run: computing the entry, or finding and "
                           "verifying the cached one.")  # fmt: skip


class Timing(Closed):
    """Where this run's wall time went: every stage it computed or took from the cache, in plan order,
    the same summed by kind, and the rest of `seconds` outside any stage (planning, writing the
    artifact directories and the report)."""

    stages: list[StageTime]
    by_kind: dict[str, float]
    outside_stages: float = Field(ge=0)


class BuildReport(Closed):
    """What `forge build` writes next to the artifacts and prints with --json."""

    forge_version: str
    status: BuildStatus = Field(
        default=None,  # type: ignore[assignment]  # always written by forge; optional for hand-made samples
        description="passed: every gate passed; gates-deferred: none failed, some are deferred to a GPU builder "
        "(not measured); gates-failed: exit 1; error: the build stopped (see error), and artifacts/pushed list "
        "only what completed.",
    )
    recipe: dict[str, Any] = Field(
        description="The resolved recipe, every default filled in (validates against forge/recipe.schema.json)."
    )
    recipe_file: str = Field(description="The recipe path as given to forge build.")
    inputs: Inputs
    tools: dict[str, str] = Field(
        description="Versions of python, forge (and its commit) and the libraries used; `cpu`: the processor and "
        "thread count the figures were computed on."
    )
    stages: list[StageRecord] = Field(description="Every stage of the plan, in plan order.")
    artifacts: list[Artifact]
    impossible: list[Impossible]
    validation: Validation
    gates: GateCounts = Field(default=None)  # type: ignore[assignment]
    images: list[dict[str, Any]] = Field(default_factory=list, description="Serving images (package stages).")
    model_images: list[dict[str, Any]] = Field(default_factory=list, description="Data-only model images.")
    allow_deferred_gates: Literal[True] = Field(
        default=None,  # type: ignore[assignment]
        description="Present when pushes were allowed with deferred gates (package.allow_deferred_gates or "
        "forge push --allow-deferred-gates).",
    )
    pushed: list[dict[str, Any]] = Field(default_factory=list, description="Pushes, when a push was attempted.")
    error: BuildError = Field(default=None, description="Why the build stopped (status error).")  # type: ignore[assignment]
    seconds: float = Field(ge=0, description="Wall time of this run of forge build (a cached rerun is quick).")
    timing: Timing = Field(default=None)  # type: ignore[assignment]  # absent in reports of older forges


def typed_report(report: dict) -> dict:
    """`report` checked against `BuildReport` and written back as JSON-ready data with the same keys."""
    return BuildReport.model_validate(report).model_dump(mode="json", by_alias=True, exclude_unset=True)


def report_schema() -> dict:
    schema = BuildReport.model_json_schema(mode="serialization", by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "forge build report (artifacts/<recipe>/build.json)"
    return schema


def schema_text() -> str:
    return json.dumps(report_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
