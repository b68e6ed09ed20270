"""`forge build`: run the plan's stages in order, each cached by content, and write build.json.

    resolve source → accuracy baseline → quantize → export per format → accuracy per export
    → (engine, throughput, package, push: deferred / not implemented here) → gates → report

Each stage is a plain function `(inputs…, out_dir, progress) -> facts`; `Cache.run` skips it
when its key is already complete, so an unchanged rebuild does no work and a change to a later
stage reuses everything before it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from forge import __version__
from forge.cache import Cache, atomic_write_text
from forge.digest import sha256_file
from forge.errors import GateFailed
from forge.plan import Plan, Stage, make_plan
from forge.progress import Progress
from forge.recipe import Variant, dump_recipe, load_recipe
from forge.source import materialize_source, read_dense

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
    progress: Progress | None = None,
) -> BuildResult:
    """Build every artifact of the recipe; raises GateFailed (exit 1) after writing the report."""
    started = time.monotonic()
    progress = progress or Progress(enabled=False)
    recipe = load_recipe(recipe_path)
    cache = Cache(cache_dir or artifacts_dir / ".cache")
    plan = make_plan(recipe, recipe_path.parent.resolve(), cache)
    records: dict[str, dict] = {}

    def run(stage: Stage, produce) -> Path:
        path, report, cached = cache.run(stage.kind, stage.key, produce)
        records[stage.id] = {"status": "cached" if cached else "ran", **report}
        return path

    source_dir = run(plan.stage("source"), lambda out: stage_source(plan, out)) / "model"

    baseline_dir = None
    if plan.of_kind("baseline"):
        stage = plan.stage("baseline")
        baseline_dir = run(stage, lambda out: stage_baseline(plan, stage, source_dir, out, progress))

    quantized: dict[str, Path] = {}
    for stage in plan.of_kind("quantize"):
        variant = variant_named(plan, stage.params["variant"])
        quantized[variant.name] = run(
            stage, lambda out, v=variant: stage_quantize(plan, v, source_dir, out, progress)
        )

    exports: dict[str, Path] = {}
    for stage in plan.of_kind("export"):
        qdir = quantized[stage.params["variant"]]
        exports[stage.id] = run(stage, lambda out, s=stage, q=qdir: stage_export(plan, s, q, source_dir, out))

    for stage in plan.of_kind("accuracy"):
        export_dir = exports[stage.id.replace("accuracy/", "export/", 1)] / "model"
        run(stage, lambda out, s=stage, e=export_dir: stage_accuracy(plan, s, e, baseline_dir, out, progress))

    for stage in plan.stages:
        if stage.status in ("deferred", "not-implemented", "disabled"):
            records[stage.id] = {"status": stage.status, "reason": stage.reason, "command": stage.command}

    gates = evaluate_accuracy_gates(plan, records)
    out_root = artifacts_dir / recipe.name
    artifacts = materialize_artifacts(plan, exports, out_root)
    report = {
        "forge_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": str(recipe_path),
        "inputs": {"source": plan.source_identity, "model_config": plan.model_config},
        "tools": tool_versions(),
        "stages": [{"id": s.id, "kind": s.kind, "key": s.key, **records.get(s.id, {})} for s in plan.stages],
        "artifacts": artifacts,
        "impossible": [
            {"variant": a.variant, "backend": a.backend, "gpu": a.gpu, "reason": a.reason}
            for a in plan.artifacts
            if a.status == "impossible"
        ],
        "validation": {"accuracy": gates},
        "seconds": round(time.monotonic() - started, 3),
    }
    report_path = out_root / "build.json"
    atomic_write_text(report_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out_root / "recipe.resolved.yaml", dump_recipe(recipe))
    failed = [g for g in gates if not g["passed"]]
    result = BuildResult(report, report_path, failed)
    if failed:
        raise GateFailed(gate_failure_message(failed), result)
    return result


def variant_named(plan: Plan, name: str) -> Variant:
    return next(v for v in plan.recipe.variants if v.name == name)


# ---------------------------------------------------------------- stages


def stage_source(plan: Plan, out: Path) -> dict:
    facts = materialize_source(plan.recipe.source, plan.recipe_dir, out / "model")
    return {**facts, "files": file_digests(out / "model")}


def stage_baseline(plan: Plan, stage: Stage, source_dir: Path, out: Path, progress: Progress) -> dict:
    from forge.eval.perplexity import baseline_pass, build_model, load_windows

    accuracy = plan.recipe.validation.accuracy
    windows = load_windows(Path(stage.params["dataset"]), source_dir, accuracy.window, accuracy.max_windows)
    config, state = read_dense(source_dir)
    with progress.task("baseline perplexity", total=len(windows)) as advance:
        return baseline_pass(build_model(config, state), windows, out, progress=advance)


def stage_quantize(plan: Plan, variant: Variant, source_dir: Path, out: Path, progress: Progress) -> dict:
    from forge.quant.calibration import load_calibration
    from forge.quant.model import save_quantized
    from forge.quant.presets import PRESETS
    from forge.quant.run import quantize_checkpoint

    scheme = plan.schemes[variant.name]
    preset = PRESETS[variant.scheme]
    calibration = None
    if preset.needs_calibration or scheme.kv_cache_dtype == "fp8":
        cal = variant.calibration
        sources = [s if s == "pydoc_topics" else str((plan.recipe_dir / s).resolve()) for s in cal.sources]
        calibration = load_calibration(sources, source_dir, cal.num_samples, cal.seq_len, cal.seed)
    with progress.task(f"quantize {variant.name} ({variant.scheme})", total=None) as advance:
        qm = quantize_checkpoint(
            source_dir, scheme, preset.algorithm, calibration, progress=lambda _what, done, total: advance(done, total)
        )
    save_quantized(qm, out)
    return {"variant": variant.name, "algorithm": preset.algorithm, "linears": len(qm.linears)}


def stage_export(plan: Plan, stage: Stage, quantized_dir: Path, source_dir: Path, out: Path) -> dict:
    from forge.formats import FORMATS
    from forge.quant.model import load_quantized

    qm = load_quantized(quantized_dir)
    fmt = stage.params["format"]
    metadata = {
        "forge_version": __version__,
        "recipe": plan.recipe.name,
        "variant": stage.params["variant"],
        "format": fmt,
        "source": plan.source_identity,
    }
    FORMATS[fmt].write(qm, source_dir, out / "model", metadata, tp_size=stage.params["tp"])
    return {"format": fmt, "variant": stage.params["variant"], "files": file_digests(out / "model")}


def stage_accuracy(
    plan: Plan, stage: Stage, export_dir: Path, baseline_dir: Path, out: Path, progress: Progress
) -> dict:
    """Perplexity, agreement and KL of an exported artifact, re-read through its format's reader."""
    from forge.eval.perplexity import build_model, compare_pass, load_windows
    from forge.formats import FORMATS

    accuracy = plan.recipe.validation.accuracy
    baseline = json.loads((baseline_dir / "stage.json").read_text())
    dataset = Path(plan.stage("baseline").params["dataset"])
    windows = load_windows(dataset, export_dir, accuracy.window, accuracy.max_windows)
    config, state = FORMATS[stage.params["format"]].read(export_dir)
    with progress.task(f"accuracy {stage.params['variant']} ({stage.params['format']})", len(windows)) as adv:
        metrics = compare_pass(build_model(config, state), windows, baseline_dir, progress=adv)
    increase = 100.0 * (metrics["perplexity"] / baseline["perplexity"] - 1.0)
    return {**stage.params, **metrics, "baseline_perplexity": baseline["perplexity"], "ppl_increase_pct": increase}


# ---------------------------------------------------------------- gates and outputs


def evaluate_accuracy_gates(plan: Plan, records: dict[str, dict]) -> list[dict]:
    from forge.eval.gates import evaluate_gates

    results = []
    for stage in plan.of_kind("accuracy"):
        record = records[stage.id]
        variant = variant_named(plan, stage.params["variant"])
        gates = (variant.gates or plan.recipe.validation.accuracy.gates).model_dump(exclude_none=True)
        gates.pop("min_recovery", None)  # task recovery needs a served endpoint (lm-eval), not this stage
        for gate in evaluate_gates(gates, record):
            results.append({"artifact": stage.id.removeprefix("accuracy/"), **gate.to_dict()})
    return results


def gate_failure_message(failed: list[dict]) -> str:
    lines = ["validation gates failed:"]
    for g in failed:
        lines.append(
            f"  {g['artifact']}: {g['name']} limit {g['limit']:g}, measured {g['measured']:.4g}"
            f" (off by {abs(g['margin']):.4g})"
        )
    return "\n".join(lines)


def materialize_artifacts(plan: Plan, exports: dict[str, Path], out_root: Path) -> list[dict]:
    """`artifacts/<recipe>/<variant>/<backend>/`: hard links into the cache entries (no copies)."""
    listed = []
    for artifact in plan.artifacts:
        if artifact.status != "planned":
            continue
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
    """Replace `dst` with hard links to every file of `src` (copies across filesystems)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_digests(directory: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "forge": __version__}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
