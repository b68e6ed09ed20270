"""The build's stages: each a plain function `(plan, stage, inputs…, out, progress) -> facts`.

`forge.build.build` calls them in order through the stage cache; each writes only into `out`
(a temporary directory renamed into the cache once the function returns) and returns JSON-able
facts recorded in the entry's `stage.json` and the build report.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import shutil
from pathlib import Path

from forge import __version__
from forge.digest import file_digests
from forge.plan import Plan, Stage, stage_key, task_include_dir
from forge.progress import Progress
from forge.recipe import Variant
from forge.source import materialize_source, read_dense


def variant_named(plan: Plan, name: str) -> Variant:
    return next(v for v in plan.recipe.variants if v.name == name)


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
    facts = {"variant": variant.name, "algorithm": preset.algorithm, "linears": len(qm.linears)}
    # MoE: calibration tokens per expert and layer, and the linears left round-to-nearest for want of any.
    facts.update({k: v for k, v in qm.calibration.items() if v})
    return facts


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


def stage_tasks(
    plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path, progress: Progress,
    image: Path | None = None,
) -> dict:  # fmt: skip
    """lm-eval's tasks against the model `serve_artifact` serves (the source, for the baseline)."""
    from forge.eval.lm_eval import parse_scores, run_lm_eval

    accuracy = plan.recipe.validation.accuracy
    include = task_include_dir(plan)
    server = serve_artifact(plan, stage, model_dir, engine_dir, out, image)
    with progress.task(f"lm-eval {stage.id}: {', '.join(accuracy.tasks)}", total=None), server as running:
        results = run_lm_eval(
            f"{running.base_url}/v1/completions", running.model, str(model_dir.resolve()), accuracy.tasks,
            out / "lm_eval", cwd=include, include_path=include,
            num_fewshot=accuracy.num_fewshot, limit=accuracy.task_limit,
        )  # fmt: skip
    shutil.rmtree(out / "served-model", ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return {"variant": stage.params["variant"], "tasks": accuracy.tasks, "scores": parse_scores(results),
            "served": served_as(stage, image)}  # fmt: skip


def stage_engine(plan: Plan, stage: Stage, checkpoint_dir: Path, out: Path, progress: Progress) -> dict:
    """trtllm-build for one GPU architecture, locally or in the release container."""
    from forge.backends import trtllm
    from forge.gpus import lookup_gpu

    target = plan.targets[stage.params["target"]]
    scheme = plan.schemes[stage.params["variant"]]
    with progress.task(f"trtllm-build {stage.id}", total=None):
        built = trtllm.build_engine(
            checkpoint_dir, out / "engine", trtllm.Limits.from_target(target), scheme,
            lookup_gpu(stage.params["gpu"]), target.trtllm.version,
        )  # fmt: skip
    # The command as one shell line, as every other stage record's `command` is (reports print it).
    return {"runner": built.runner, "command": shlex.join(built.command), "engine_key": built.key,
            "files": file_digests(out)}  # fmt: skip


def stage_throughput(
    plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path, progress: Progress,
    image: Path | None = None,
) -> dict:  # fmt: skip
    """Serve the artifact and sweep the recipe's load: `transformers serve` for the CPU stage, the
    backend's container on a GPU builder otherwise."""
    from forge.loadgen import SLOs, run_sweep

    load = plan.recipe.validation.throughput
    # Only the latency SLOs shape the measurement (goodput counts the requests within them); the
    # pure thresholds and the price are applied when the report is written (`throughput_results`),
    # so changing them re-gates and re-prices the cached sweep instead of measuring again.
    slos = SLOs(max_ttft_p99_ms=load.max_ttft_p99_ms, max_tpot_p99_ms=load.max_tpot_p99_ms)
    gpu_name = stage.params["gpu"]
    if gpu_name == "cpu":
        flavor = "transformers"
    else:
        flavor = {"vllm": "vllm", "tgi": "none"}.get(plan.targets[stage.params["target"]].backend, "openai")
    server = serve_artifact(plan, stage, model_dir, engine_dir, out, image)
    with progress.task(f"load sweep {stage.id}", total=None), server as running:
        result = run_sweep(
            running.base_url, running.model, model_dir, load.concurrency, load.prompt_tokens, load.output_tokens,
            load.requests_per_level, out / "sweep", slos, flavor=flavor, server_argv=running.argv,
        )  # fmt: skip
    shutil.rmtree(out / "served-model", ignore_errors=True)
    sweep = result.to_dict()
    # Paths relative to the cache entry: `out` is a temporary directory renamed once complete.
    sweep["files"] = {name: str(Path(path).relative_to(out)) for name, path in sweep["files"].items()}
    for level in sweep["levels"]:
        level["records_path"] = level["records_path"] and str(Path(level["records_path"]).relative_to(out))
    return {"variant": stage.params["variant"], "gpu": gpu_name, "sweep": sweep, "served": served_as(stage, image)}


def serve_artifact(
    plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path, image: Path | None = None
):  # fmt: skip
    """The artifact's server for a measuring stage, as a context manager: on the CPU `transformers
    serve` with the export's weights served dense (`dense_copy`; the lm-eval baseline, with no
    variant, serves the source as it is); on a GPU builder the packaged image itself when packaging
    is on (`image`: its OCI layout, loaded into the Docker engine with skopeo), so a passing gate is
    about the artifact that is released; with packaging off, the backend's base image with every
    directory its command names mounted (`serving.container_mounts`)."""
    from forge.loadgen import serve_transformers
    from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, container_mounts, docker_run_argv, serve_spec

    if stage.params["gpu"] == "cpu":
        from forge.loadgen.server import check_serving_installed

        check_serving_installed()
        served = model_dir if stage.params["variant"] is None else dense_copy(model_dir, out / "served-model")
        return serve_transformers(served, out / "server.log")
    params = stage.params
    target = plan.targets[params["target"]]
    spec = serve_spec(plan.recipe, params["variant"], plan.schemes[params["variant"]], target, params["gpu"], "")
    if image is not None:
        return serve_image(plan, stage, image, spec, target.tensor_parallel, out)
    launch = out / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    for name, text in spec.launch_files.items():
        (launch / name).write_text(text)
    mounts = container_mounts(spec.argv, {MODEL_DIR: model_dir, ENGINE_DIR: engine_dir, LAUNCH_DIR: launch})
    base = spec.base_image
    if base.startswith("oci:"):  # package.base_images as a local layout: docker runs images, not layouts
        from forge.package import daemon_name_for_base, load_into_docker, resolve_base

        source = resolve_base(base, plan.recipe_dir)["image"]  # PATH anchored at the recipe's directory
        base = load_into_docker(source, daemon_name_for_base(source, target.backend), stage.id)
    return serve_command(lambda port: docker_run_argv(base, spec, port, target.tensor_parallel, mounts),
                         spec, out / "server.log", base)  # fmt: skip


def served_as(stage: Stage, image: Path | None) -> str:
    """What the measurement ran against, for the record: the gate is about the released image only then."""
    if stage.params["gpu"] == "cpu":
        return "transformers serve on this CPU (the export's weights)"
    if image is not None:
        return f"the packaged image ({next(n for n in stage.needs if n.startswith('package/'))})"
    return "the backend's base image with the artifact mounted (package.enabled is off: no image to measure)"


def serve_image(plan: Plan, stage: Stage, layout: Path, spec, gpus: int, out: Path):
    """Load the packaged image into the Docker engine (skopeo) and serve it as built."""
    from forge.package import load_into_docker
    from forge.serving import docker_run_argv

    package = plan.stage(next(n for n in stage.needs if n.startswith("package/")))
    tag = package.params["tags"][0]
    name = f"forge.local/{plan.recipe.name}".lower()
    image = load_into_docker(f"oci:{layout}:{tag}", f"{name}:{tag}", f"{stage.id}: serving the packaged image")
    return serve_command(lambda port: docker_run_argv(image, spec, port, gpus), spec, out / "server.log", image)


@contextlib.contextmanager
def serve_command(command_for_port, spec, log_path: Path, image: str):
    """Run `command_for_port(host_port)` (a `docker run`) until the block ends, once its health path answers."""
    import subprocess

    from forge.errors import InfraError
    from forge.loadgen.server import RunningServer, free_port, stop_process, wait_healthy
    from forge.serving import ENGINE_DIR, MODEL_DIR

    if shutil.which("docker") is None:
        raise InfraError(f"serving {image} on a GPU needs a Docker engine; docker CLI not found")
    port = free_port()
    command = command_for_port(port)
    base_url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            wait_healthy(base_url, proc, log_path, 1800.0, spec.health_path, name=image)
            # Servers name the model by the path they load: the engine's, else the checkpoint's.
            model = ENGINE_DIR if ENGINE_DIR in spec.argv else MODEL_DIR
            yield RunningServer(base_url, model, command, log_path, proc.pid)
        finally:
            stop_process(proc, grace_s=60.0)


def stage_model_image(plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path) -> dict:
    """The artifact's data-only model image (`out/layout`) and the manifests that serve it (`out/deploy/`)."""
    import yaml

    from forge.model_image import build_model_image, deployment_manifests, inference_service
    from forge.serving import serve_spec

    params = stage.params
    target = plan.targets[params["target"]]
    spec = serve_spec(
        plan.recipe, params["variant"], plan.schemes[params["variant"]], target, params["gpu"], plan.revision
    )
    base = params["base"]["image"] if params["base"] else None
    image = build_model_image(spec, model_dir, engine_dir, out, params["tag"], params["reference"], base)
    shutil.rmtree(out / "staged")  # hard links of the export: the layout holds the layers
    name = f"{plan.recipe.name}-{params['variant']}-{params['backend']}-{params['gpu']}".lower().replace(".", "-")
    deploy = out / "deploy"
    deploy.mkdir()
    manifests = deployment_manifests(spec, params["reference"], name, params["gpu"], target.tensor_parallel)
    (deploy / "kubernetes.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    isvc = inference_service(spec, params["reference"], name, target.tensor_parallel, image["modelcar_ready"])
    (deploy / "kserve.yaml").write_text(yaml.safe_dump(isvc, sort_keys=False))
    return {**image, "variant": params["variant"], "backend": params["backend"], "gpu": params["gpu"]}


def stage_package(plan: Plan, stage: Stage, model_dir: Path, engine_dir: Path | None, out: Path) -> dict:
    """The serving image of one artifact: its export, and its TensorRT-LLM engine when it has one."""
    from forge.package import package_artifact
    from forge.serving import serve_spec

    params = stage.params
    target = plan.targets[params["target"]]
    spec = serve_spec(
        plan.recipe, params["variant"], plan.schemes[params["variant"]], target, params["gpu"], plan.revision
    )
    from forge.errors import InfraError
    from forge.oci.registry import RegistryUnreachable
    from forge.package import pull_base_hint

    package = plan.recipe.package
    try:
        image = package_artifact(spec, model_dir, out, params["tags"][0], stage.id, package.builder,
                                 params.get("base"), package.registry, package.insecure_registries,
                                 engine_dir)  # fmt: skip
    except RegistryUnreachable as error:  # answered at plan time, gone since: say how to finish later
        key = f"package.base_images.{params['backend']}"
        raise InfraError(
            f"{stage.id}: {error}; once {spec.base_image} can be pulled run `forge build {plan.recipe_file} --only "
            f"{stage.id}`, or offline: {pull_base_hint(spec.base_image, params['backend'], key)}"
        ) from None
    return {**image, "variant": params["variant"], "backend": params["backend"], "gpu": params["gpu"]}


def push_images(
    plan: Plan, pushes: list[Stage], packages: dict[str, Path], report: dict, progress: Progress
) -> list[dict]:
    """Push every image, then attach the build report and its SLSA provenance as referrers.

    The report attached is the one written to build.json minus the push results themselves
    (those only exist afterwards); provenance names that document's digest."""
    from forge.oci.registry import BUILD_REPORT_TYPE
    from forge.oci.signing import signing_key_from_env
    from forge.package import PROVENANCE_TYPE, attach_documents, push_artifact, sign_pushed
    from forge.provenance import provenance_statement

    package = plan.recipe.package
    report_bytes = json.dumps(report, indent=2).encode()
    key = signing_key_from_env()  # FORGE_SIGNING_KEY: read before the first upload, so a bad key pushes nothing
    pushed = []
    with progress.task("push images", total=len(pushes)) as advance:
        for done, stage in enumerate(pushes, 1):
            image = json.loads((packages[stage.needs[0]] / "stage.json").read_text())
            layout = packages[stage.needs[0]] / "layout"
            result = push_artifact(layout, image["tag"], package.registry, package.repository, stage.params["tags"],
                                   package.insecure_registries)  # fmt: skip
            name = f"{package.registry}/{package.repository}"
            statement = provenance_statement(report, plan.recipe, name, result["digest"], image, report_bytes)
            referrers = attach_documents(
                f"{name}@{result['digest']}",
                {BUILD_REPORT_TYPE: report_bytes, PROVENANCE_TYPE: json.dumps(statement, indent=2).encode()},
                package.insecure_registries,
            )
            signature = sign_pushed(f"{name}@{result['digest']}", key, package.insecure_registries) if key else None
            pushed.append({"stage": stage.id, **result, "referrers": referrers, "signature": signature})
            advance(done, len(pushes))
    return pushed


def dense_copy(export_dir: Path, out: Path) -> Path:
    """The export's weights, re-read by forge's compressed-tensors reader, as a plain checkpoint.

    CPUs have no fp8/int4 kernels: transformers serves a compressed-tensors checkpoint by
    re-quantizing on every forward, 4-8× slower than the dense model (measured here). The CPU
    sweep therefore serves the same weights dense; GPU stages serve the export itself."""
    from forge.eval.perplexity import build_model
    from forge.formats import FORMATS
    from forge.formats.model_dir import SOURCE_FILES

    config, state = FORMATS["compressed-tensors"].read(export_dir)
    build_model(config, state).save_pretrained(out)
    # The export's own list of tokenizer and generation files: the server must tokenize as the export does.
    for name in SOURCE_FILES:
        if (export_dir / name).is_file():
            shutil.copy2(export_dir / name, out / name)
    return out


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
    gpu = stage.params["gpu"]
    if gpu == "cpu":
        return prices.get("cpu"), 1
    return prices.get(gpu, lookup_gpu(gpu).usd_per_hour), plan.targets[stage.params["target"]].tensor_parallel


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
            variant = variant_named(plan, stage.params["variant"])
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
        gates = gates_of(plan, stage.params["variant"]).model_dump(exclude_none=True)
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
        scores.append({"stage": stage.id, "variant": stage.params["variant"], "scores": records[stage.id]["scores"],
                       "recovery": ratios})  # fmt: skip
        limits = gates_of(plan, stage.params["variant"]).min_recovery
        for gate in evaluate_gates({"min_recovery": limits}, ratios):
            if gate.measured is not None and math.isnan(gate.measured):
                gate = replace(gate, reason="the baseline scored 0 on this metric, so recovery is undefined")
            gates.append({"artifact": stage.id.removeprefix("tasks/"), **gate.to_dict()})
    return gates, scores


def gate_failure_message(failed: list[dict]) -> str:
    """The failed gates, one line each, for the error a gate failure exits 1 with."""
    from forge.eval.gates import gate_failure

    return "\n".join(["validation gates failed:", *(f"  {gate_failure(g)}" for g in failed)])
