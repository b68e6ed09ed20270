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
from forge.errors import GateFailed, InfraError, InputError
from forge.plan import Plan, Stage, make_plan, stage_key
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
        quantized[variant.name] = run(
            stage, lambda out, v=variant: stage_quantize(plan, v, source_dir, out, progress)
        )

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

    for stage in selected("throughput"):
        model_dir = exports[stage.needs[0]] / "model"
        engine_dir = engines[stage.needs[1]] / "engine" if len(stage.needs) > 1 else None
        run(stage, lambda out, s=stage, m=model_dir, e=engine_dir: stage_throughput(plan, s, m, e, out, progress))

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
    gates = evaluate_accuracy_gates(plan, records)
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
        "validation": {"accuracy": gates, "throughput": throughput},
        "images": [{"stage": sid, "layout": str(path / "layout"), **records[sid]} for sid, path in packages.items()],
    }

    pushes = selected("push")
    if pushes and failed:
        for stage in pushes:  # a release must never publish an artifact that failed its gates
            records[stage.id] = {"status": "disabled", "reason": "not pushed: a validation gate failed"}
    elif pushes:
        report["pushed"] = push_images(plan, pushes, packages, report, progress)
        for stage, pushed in zip(pushes, report["pushed"], strict=True):
            records[stage.id] = {"status": "ran", "digest": pushed["digest"], "bytes_uploaded": pushed["bytes_uploaded"]}
    report["stages"] = [{"id": s.id, "kind": s.kind, "key": s.key, **records[s.id]} for s in plan.stages]
    report["seconds"] = round(time.monotonic() - started, 3)
    report_path = out_root / "build.json"
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_root / "recipe.resolved.yaml", dump_recipe(recipe))
    result = BuildResult(report, report_path, failed)
    if failed:
        raise GateFailed(gate_failure_message(failed), result)
    return result


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
    from forge.quant.model import open_quantized

    qm = open_quantized(quantized_dir)  # streamed: peak memory follows the largest tensor
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
    from forge.eval.perplexity import build_model, compare_pass, load_windows, simulate_dynamic_fp8_activations
    from forge.formats import FORMATS
    from forge.quant.rtn import quantizable_linears

    accuracy = plan.recipe.validation.accuracy
    dataset = Path(plan.stage("baseline").params["dataset"])
    windows = load_windows(dataset, export_dir, accuracy.window, accuracy.max_windows)
    config, state = FORMATS[stage.params["format"]].read(export_dir)
    scheme = plan.schemes[stage.params["variant"]]

    def measure(_out: Path) -> dict:
        model = build_model(config, state)
        if scheme.activations == "dynamic_token":  # serving rounds activations to fp8 per token too
            simulate_dynamic_fp8_activations(model, quantizable_linears(model.state_dict(), scheme))
        with progress.task(f"accuracy {stage.params['variant']} ({stage.params['format']})", len(windows)) as adv:
            return compare_pass(model, windows, baseline_dir, progress=adv)

    # Formats that re-read to bit-identical weights share one measurement (same weights, same numbers).
    weights = state_digest(state)
    key = stage_key("accuracy-weights", {"weights": weights, "baseline": baseline_dir.name, "act": scheme.activations})
    _, metrics, shared = plan.cache.run("accuracy-weights", key, measure)
    metrics = {k: v for k, v in metrics.items() if k not in ("kind", "key")}
    return {**stage.params, **metrics, "weights_sha256": weights, "measurement_shared": shared}


def state_digest(state: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stage_engine(plan: Plan, stage: Stage, checkpoint_dir: Path, out: Path, progress: Progress) -> dict:
    """trtllm-build for one GPU architecture, locally or in the release container."""
    from forge.backends import trtllm
    from forge.gpus import lookup_gpu

    target = plan.recipe.targets[stage.params["target"]]
    scheme = plan.schemes[stage.params["variant"]]
    with progress.task(f"trtllm-build {stage.id}", total=None):
        built = trtllm.build_engine(
            checkpoint_dir, out / "engine", trtllm.Limits.from_target(target), scheme,
            lookup_gpu(stage.params["gpu"]), target.trtllm.version,
        )  # fmt: skip
    return {"runner": built.runner, "command": built.command, "engine_key": built.key, "files": file_digests(out)}


def stage_throughput(
    plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path, progress: Progress
) -> dict:
    """Serve the artifact and sweep the recipe's load: `transformers serve` for the CPU stage, the
    backend's container on a GPU builder otherwise."""
    from forge.gpus import lookup_gpu
    from forge.loadgen import GpuCost, SLOs, run_sweep, serve_transformers
    from forge.loadgen.server import serve_container
    from forge.serving import ENGINE_DIR, MODEL_DIR, serve_spec

    load = plan.recipe.validation.throughput
    slos = SLOs(load.max_ttft_p99_ms, load.max_tpot_p99_ms, load.min_output_tps, load.min_goodput)
    gpu_name = stage.params["gpu"]
    if gpu_name == "cpu":
        price = load.usd_per_hour.get("cpu")
        server = serve_transformers(dense_copy(model_dir, out / "served-model"), out / "server.log")
        flavor, gpus = "transformers", 1
    else:
        target = plan.recipe.targets[stage.params["target"]]
        spec = serve_spec(plan.recipe, stage.params["variant"], plan.schemes[stage.params["variant"]], target, gpu_name, "")
        price = load.usd_per_hour.get(gpu_name, lookup_gpu(gpu_name).usd_per_hour)
        mount = (engine_dir, ENGINE_DIR) if engine_dir else (model_dir, MODEL_DIR)
        server = serve_container(spec.base_image, spec.argv, *mount, spec.port, spec.health_path, out / "server.log",
                                 gpus=target.tensor_parallel)  # fmt: skip
        flavor, gpus = {"vllm": "vllm", "tgi": "none"}.get(target.backend, "openai"), target.tensor_parallel
    with progress.task(f"load sweep {stage.id}", total=None), server as running:
        result = run_sweep(
            running.base_url, running.model, model_dir, load.concurrency, load.prompt_tokens, load.output_tokens,
            load.requests_per_level, out / "sweep", slos, flavor=flavor, server_argv=running.argv,
            gpu_cost=GpuCost(price, gpus) if price else None,
        )  # fmt: skip
    shutil.rmtree(out / "served-model", ignore_errors=True)
    sweep = result.to_dict()
    # Paths relative to the cache entry: `out` is a temporary directory renamed once complete.
    sweep["files"] = {name: str(Path(path).relative_to(out)) for name, path in sweep["files"].items()}
    for level in sweep["levels"]:
        level["records_path"] = level["records_path"] and str(Path(level["records_path"]).relative_to(out))
    return {"variant": stage.params["variant"], "gpu": gpu_name, "sweep": sweep}


def stage_package(plan: Plan, stage: Stage, model_dir: Path, out: Path) -> dict:
    from forge.package import package_artifact
    from forge.serving import serve_spec

    params = stage.params
    target = plan.recipe.targets[params["target"]]
    spec = serve_spec(plan.recipe, params["variant"], plan.schemes[params["variant"]], target, params["gpu"], plan.revision)
    image = package_artifact(spec, model_dir, out, params["tags"][0], stage.id, plan.recipe.package.builder)
    return {**image, "variant": params["variant"], "backend": params["backend"], "gpu": params["gpu"]}


def push_images(plan: Plan, pushes: list[Stage], packages: dict[str, Path], report: dict, progress: Progress) -> list[dict]:
    """Push every image, then attach the build report and its SLSA provenance as referrers.

    The report attached is the one written to build.json minus the push results themselves
    (those only exist afterwards); provenance names that document's digest."""
    from forge.oci.registry import BUILD_REPORT_TYPE
    from forge.package import PROVENANCE_TYPE, attach_documents, push_artifact
    from forge.provenance import provenance_statement

    package = plan.recipe.package
    report_bytes = json.dumps(report, indent=2).encode()
    pushed = []
    with progress.task("push images", total=len(pushes)) as advance:
        for done, stage in enumerate(pushes, 1):
            image = json.loads((packages[stage.needs[0]] / "stage.json").read_text())
            result = push_artifact(
                packages[stage.needs[0]] / "layout", image["tag"], package.registry, package.repository, stage.params["tags"]
            )  # fmt: skip
            name = f"{package.registry}/{package.repository}"
            statement = provenance_statement(report, plan.recipe, name, result["digest"], image, report_bytes)
            referrers = attach_documents(
                f"{name}@{result['digest']}",
                {BUILD_REPORT_TYPE: report_bytes, PROVENANCE_TYPE: json.dumps(statement, indent=2).encode()},
            )
            pushed.append({"stage": stage.id, **result, "referrers": referrers})
            advance(done, len(pushes))
    return pushed


def dense_copy(export_dir: Path, out: Path) -> Path:
    """The export's weights, re-read by forge's compressed-tensors reader, as a plain checkpoint.

    CPUs have no fp8/int4 kernels: transformers serves a compressed-tensors checkpoint by
    re-quantizing on every forward, 4-8× slower than the dense model (measured here). The CPU
    sweep therefore serves the same weights dense; GPU stages serve the export itself."""
    from forge.eval.perplexity import build_model
    from forge.formats import FORMATS
    from forge.source import MODEL_SIDE_FILES

    config, state = FORMATS["compressed-tensors"].read(export_dir)
    build_model(config, state).save_pretrained(out)
    for name in MODEL_SIDE_FILES:
        if name != "config.json" and (export_dir / name).is_file():
            shutil.copy2(export_dir / name, out / name)
    return out


def throughput_results(plan: Plan, records: dict[str, dict]) -> list[dict]:
    """Each measured throughput stage's levels, gates and cost, for the report."""
    results = []
    for stage in plan.of_kind("throughput"):
        record = records[stage.id]
        if "sweep" in record:
            entry = plan.cache.entry(stage.kind, stage.key)
            sweep = {**record["sweep"], "files": {k: str(entry / v) for k, v in record["sweep"]["files"].items()}}
            results.append({"stage": stage.id, "variant": record["variant"], "gpu": record["gpu"], **sweep})
    return results


# ---------------------------------------------------------------- gates and outputs


def evaluate_accuracy_gates(plan: Plan, records: dict[str, dict]) -> list[dict]:
    from forge.eval.gates import evaluate_gates

    results = []
    for stage in plan.of_kind("accuracy"):
        record = records[stage.id]
        if record["status"] not in ("ran", "cached"):
            continue  # left out by --only/--skip: reported as such, never as a pass
        variant = variant_named(plan, stage.params["variant"])
        gates = (variant.gates or plan.recipe.validation.accuracy.gates).model_dump(exclude_none=True)
        gates.pop("min_recovery", None)  # task recovery needs a served endpoint (lm-eval), not this stage
        for gate in evaluate_gates(gates, record):
            results.append({"artifact": stage.id.removeprefix("accuracy/"), **gate.to_dict()})
    return results


def gate_failure_message(failed: list[dict]) -> str:
    lines = ["validation gates failed:"]
    for g in failed:
        measured = "nothing measured" if g["measured"] is None else f"measured {g['measured']:.4g}"
        off = f" (off by {abs(g['measured'] - g['limit']):.4g})" if g["measured"] is not None else ""
        lines.append(f"  {g['artifact']}: {g['name']} limit {g['limit']:g}, {measured}{off}")
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
