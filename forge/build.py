"""`forge build`: run the plan's stages in order, each cached by content, and write build.json.

    resolve source → accuracy baseline → quantize → export per format → accuracy per export
    → engine → lm-eval tasks → throughput → package → gates → push (only when every gate passed) → report

Each stage is a plain function in `forge.stages`; `Cache.run` skips it when its key is already
complete, so an unchanged rebuild does no work and a change to a later stage reuses everything
before it. Stages that need absent hardware are recorded as deferred with their command.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from forge import __version__
from forge.cache import Cache, atomic_write_text
from forge.errors import GateFailed, InfraError, InputError
from forge.plan import Plan, Stage, make_plan
from forge.progress import Progress
from forge.recipe import dump_recipe, load_recipe
from forge.stages import (
    evaluate_accuracy_gates,
    evaluate_task_gates,
    gate_failure_message,
    push_images,
    stage_accuracy,
    stage_baseline,
    stage_engine,
    stage_export,
    stage_package,
    stage_quantize,
    stage_source,
    stage_tasks,
    stage_throughput,
    throughput_results,
    variant_named,
)

TOOLS = ("torch", "transformers", "safetensors", "compressed-tensors", "llmcompressor", "gguf", "pydantic")


@dataclass
class BuildResult:
    report: dict
    report_path: Path
    failed_gates: list[dict] = field(default_factory=list)


def build(
    recipe_path: Path,
    *,
    artifacts_dir: Path = Path("artifacts"),
    cache_dir: Path | None = None,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> BuildResult:
    """Build every artifact of the recipe; raises GateFailed (exit 1) after writing the report.

    `only` / `skip` take stage ids, id prefixes or kinds (`engine`, `export/fp8`): `only` runs
    the named stages and what they need (from the cache when present), even deferred ones.
    """
    started = time.monotonic()
    progress = progress or Progress(enabled=False)
    recipe = load_recipe(recipe_path)
    cache = Cache(cache_dir or artifacts_dir / ".cache")
    plan = make_plan(recipe, recipe_path.parent.resolve(), cache, recipe_file=str(recipe_path))
    chosen = select_stages(plan, only, skip)
    check_hardware(plan, chosen, only)
    records: dict[str, dict] = {}

    def run(stage: Stage, produce) -> Path:
        path, report, cached = cache.run(stage.kind, stage.key, produce)
        records[stage.id] = {"status": "cached" if cached else "ran", **report}
        return path

    def selected(kind: str) -> list[Stage]:
        return [s for s in plan.of_kind(kind) if s.id in chosen]

    source_dir = run(plan.stage("source"), lambda out: stage_source(plan, out)) / "model"

    baseline_dir = None
    for stage in selected("baseline"):
        baseline_dir = run(stage, lambda out, s=stage: stage_baseline(plan, s, source_dir, out, progress))

    quantized: dict[str, Path] = {}
    for stage in selected("quantize"):
        variant = variant_named(plan, stage.params["variant"])
        quantized[variant.name] = run(stage, lambda out, v=variant: stage_quantize(plan, v, source_dir, out, progress))

    exports: dict[str, Path] = {}
    for stage in selected("export"):
        qdir = quantized[stage.params["variant"]]
        exports[stage.id] = run(stage, lambda out, s=stage, q=qdir: stage_export(plan, s, q, source_dir, out))

    for stage in selected("accuracy"):
        export_dir = exports[stage.id.replace("accuracy/", "export/", 1)] / "model"
        run(stage, lambda out, s=stage, e=export_dir: stage_accuracy(plan, s, e, baseline_dir, out, progress))

    engines: dict[str, Path] = {}
    for stage in selected("engine"):
        checkpoint = exports[stage.needs[0]] / "model"
        engines[stage.id] = run(stage, lambda out, s=stage, c=checkpoint: stage_engine(plan, s, c, out, progress))

    def served(stage: Stage) -> tuple[Path, Path | None]:
        """The model directory and TensorRT engine (if any) a serving stage loads."""
        if stage.params["variant"] is None:  # the lm-eval baseline serves the source
            return source_dir, None
        engine = next((engines[n] / "engine" for n in stage.needs if n.startswith("engine/")), None)
        return exports[stage.needs[0]] / "model", engine

    for stage in selected("tasks"):
        run(stage, lambda out, s=stage: stage_tasks(plan, s, *served(s), out, progress))

    for stage in selected("throughput"):
        run(stage, lambda out, s=stage: stage_throughput(plan, s, *served(s), out, progress))

    packages: dict[str, Path] = {}
    for stage in selected("package"):
        model_dir = exports[stage.needs[0]] / "model"
        packages[stage.id] = run(stage, lambda out, s=stage, m=model_dir: stage_package(plan, s, m, out))

    for stage in plan.stages:  # what did not run: deferred, not implemented, or left out by --only/--skip
        if stage.id not in records:
            runnable = stage.status in ("run", "cached")
            records[stage.id] = {
                "status": "disabled" if runnable else stage.status,
                "reason": f"not selected ({selection_text(only, skip)})" if runnable else stage.reason,
                "command": stage.command,
            }
    task_gates, task_scores = evaluate_task_gates(plan, records)
    gates = evaluate_accuracy_gates(plan, records) + task_gates
    throughput = throughput_results(plan, records)
    failed = failed_gates(gates, throughput)
    out_root = artifacts_dir / recipe.name
    report = {
        "forge_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": str(recipe_path),
        "inputs": {"source": plan.source_identity, "model_config": plan.model_config},
        "tools": tool_versions(),
        "stages": [{"id": s.id, "kind": s.kind, "key": s.key, **records[s.id]} for s in plan.stages],
        "artifacts": materialize_artifacts(plan, exports, out_root),
        "impossible": [
            {"variant": a.variant, "backend": a.backend, "gpu": a.gpu, "reason": a.reason}
            for a in plan.artifacts
            if a.status == "impossible"
        ],
        "validation": {"accuracy": gates, "tasks": task_scores, "throughput": throughput},
        "images": [{"stage": sid, "layout": str(path / "layout"), **records[sid]} for sid, path in packages.items()],
    }

    pushes = selected("push")
    if pushes and failed:
        for stage in pushes:  # a release must never publish an artifact that failed its gates
            records[stage.id] = {"status": "disabled", "reason": "not pushed: a validation gate failed"}
    elif pushes:
        report["pushed"] = push_images(plan, pushes, packages, report, progress)
        for stage, pushed in zip(pushes, report["pushed"], strict=True):
            records[stage.id] = {
                "status": "ran",
                "digest": pushed["digest"],
                "bytes_uploaded": pushed["bytes_uploaded"],
            }
    report["stages"] = [{"id": s.id, "kind": s.kind, "key": s.key, **records[s.id]} for s in plan.stages]
    report["seconds"] = round(time.monotonic() - started, 3)
    report = finite_json(report)  # NaN is not JSON: an undefined measurement is null (its gate says why)
    report_path = out_root / "build.json"
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_root / "recipe.resolved.yaml", dump_recipe(recipe))
    result = BuildResult(report, report_path, failed)
    if failed:
        raise GateFailed(gate_failure_message(failed), result)
    return result


def finite_json(value):
    """`value` with every NaN or infinite float replaced by None, so build.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def failed_gates(accuracy: list[dict], throughput: list[dict]) -> list[dict]:
    failed = [g for g in accuracy if not g["passed"]]
    for sweep in throughput:
        artifact = sweep["stage"].removeprefix("throughput/")
        failed += [{**g, "artifact": artifact} for g in sweep["gates"] if not g["passed"]]
    return failed


def matches(stage: Stage, selector: str) -> bool:
    return stage.kind == selector or stage.id == selector or stage.id.startswith(selector.rstrip("/") + "/")


def select_stages(plan: Plan, only: tuple[str, ...], skip: tuple[str, ...]) -> set[str]:
    """Stage ids to execute: the plan's runnable stages, or `only` and everything they need."""
    for selector in (*only, *skip):
        if not any(matches(s, selector) for s in plan.stages):
            raise InputError(f"--only/--skip: {selector!r} names no stage of this plan (see `forge plan`)")
    by_id = {s.id: s for s in plan.stages}
    if only:
        chosen: set[str] = set()
        todo = [s.id for s in plan.stages if any(matches(s, sel) for sel in only)]
        while todo:
            stage = by_id[todo.pop()]
            if stage.id not in chosen:
                chosen.add(stage.id)
                todo += stage.needs
    else:
        chosen = {s.id for s in plan.stages if s.status in ("run", "cached")}
    chosen = {sid for sid in chosen if not any(matches(by_id[sid], sel) for sel in skip)}
    return {sid for sid in chosen if by_id[sid].status not in ("not-implemented", "impossible")}


def selection_text(only: tuple[str, ...], skip: tuple[str, ...]) -> str:
    return " ".join([*(f"--only {o}" for o in only), *(f"--skip {s}" for s in skip)])


def check_hardware(plan: Plan, chosen: set[str], only: tuple[str, ...]) -> None:
    """`on_missing_hardware: fail` stops before any work when a wanted stage needs absent hardware."""
    missing = [s for s in plan.stages if s.status == "deferred" and (s.id in chosen or not only)]
    if plan.recipe.on_missing_hardware == "fail" and missing:
        lines = "\n".join(f"  {s.id}: {s.reason}" for s in missing)
        raise InfraError(f"on_missing_hardware: fail, and these stages need hardware that is absent:\n{lines}")


# ---------------------------------------------------------------- outputs


def materialize_artifacts(plan: Plan, exports: dict[str, Path], out_root: Path) -> list[dict]:
    """`artifacts/<recipe>/<variant>/<backend>/`: hard links into the cache entries (no copies)."""
    listed = []
    for artifact in plan.artifacts:
        if artifact.status != "planned" or artifact.export_stage not in exports:
            continue  # impossible, or its export left out by --only/--skip
        entry = exports[artifact.export_stage]
        target = out_root / artifact.variant / artifact.backend
        link_tree(entry / "model", target)
        files = json.loads((entry / "stage.json").read_text())["files"]
        listed.append(
            {
                "variant": artifact.variant,
                "backend": artifact.backend,
                "gpu": artifact.gpu,
                "format": artifact.format,
                "path": str(target),
                "files": files,
                "stages": artifact.stages,
            }
        )
    return listed


def link_tree(src: Path, dst: Path) -> None:
    """Replace `dst` with hard links to every file of `src` (copies across filesystems).

    Under a lock per directory, so concurrent builds of one recipe never interleave their swaps;
    leftovers of killed builds (`.<name>.*.tmp` / `.old`) are removed there too."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.with_name(f".{dst.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in [*dst.parent.glob(f".{dst.name}.*.tmp"), *dst.parent.glob(f".{dst.name}.*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        if same_files(src, dst):
            return
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)


def same_files(src: Path, dst: Path) -> bool:
    """`dst` already holds hard links to exactly `src`'s files."""
    if not dst.is_dir():
        return False
    ours = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
    return ours == theirs and all((src / f).stat().st_ino == (dst / f).stat().st_ino for f in ours)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "forge": __version__}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
