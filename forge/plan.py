"""Expand a recipe into the build graph and check it against the compatibility table.

One artifact per (variant, backend, GPU), planned or impossible (with why). Every stage gets a
cache key (the digest of its inputs and of the settings that affect it) and a status: run, cached,
or deferred (needs hardware that is absent, with the command to run later).
Planning reads only small files (the model's config, digests memoized by file stat), so it is
fast and it runs before anything is downloaded or computed.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forge.backends import export_format, trtllm, trtllm_mode
from forge.cache import Cache, atomic_write_text
from forge.compat import (
    SUPPORTED_ARCHITECTURES,
    ModelShape,
    combination_note,
    combination_problem,
    group_size_problem,
)
from forge.datasets import dataset_file
from forge.digest import bounded_file_digests, file_digest, json_digest, refuse_system_directory
from forge.errors import InputError
from forge.gpus import GPUProfile, LocalGPUs, detect_local_gpus, lookup_gpu
from forge.quant.presets import PRESETS, resolve_scheme
from forge.quant.scheme import Scheme
from forge.recipe import Recipe, Target, Variant, expand_tag
from forge.source import read_model_config, remote_code, source_identity

# Bumped when a stage's output would change for the same inputs (a bug fix, a format change).
# baseline 2: final hidden states + output projection instead of fp16 log-probs (forge/eval/perplexity.py).
STAGE_VERSIONS = {"source": 1, "baseline": 2, "quantize": 1, "export": 1, "accuracy": 2}
BUILTIN_CALIBRATION = ("pydoc_topics",)
STAGE_ORDER = (
    "source", "baseline", "quantize", "export", "accuracy", "engine", "model-image", "package", "tasks", "throughput",
    "push",
)  # fmt: skip


@dataclass
class Stage:
    id: str
    kind: str
    status: str  # run | cached | deferred
    key: str | None = None
    reason: str = ""
    command: str | None = None
    needs: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)


def serving_name(backend: str, mode: str | None) -> str:
    """The backend as cells, stage ids and artifact directories name it. TensorRT-LLM serves a
    built engine or, with its PyTorch backend, a checkpoint: two artifacts that may share a
    variant and a GPU, so its mode is part of the name (`trtllm-engine`, `trtllm-pytorch`)."""
    return f"{backend}-{mode}" if mode else backend


@dataclass
class Artifact:
    """One (variant, backend, GPU) cell of the matrix."""

    variant: str
    backend: str
    gpu: str
    format: str | None
    status: str  # planned | impossible
    reason: str = ""
    export_stage: str | None = None
    stages: list[str] = field(default_factory=list)
    tensor_parallel: int = 1
    mode: str | None = None  # TensorRT-LLM's engine | pytorch
    target: int = 0  # index in recipe.targets

    @property
    def cell(self) -> str:
        """`<variant>/<backend>/<gpu>`, the suffix of its stage ids (`package/<cell>`)."""
        return f"{self.variant}/{serving_name(self.backend, self.mode)}/{self.gpu}"


@dataclass
class Plan:
    recipe: Recipe
    recipe_dir: Path
    recipe_file: str  # as the user named it, for the commands printed with deferred stages
    model_config: dict
    source_identity: dict
    schemes: dict[str, Scheme]
    cache: Cache
    local_gpus: LocalGPUs
    revision: str  # git commit of the recipe's repository, for image labels ("unknown" outside git)
    stages: list[Stage] = field(default_factory=list)
    # recipe.targets with the serving limits fitted to the model (`fit_targets`): what every GPU stage uses
    targets: list[Target] = field(default_factory=list)
    allow_deferred_gates: bool = False  # package.allow_deferred_gates or `forge push --allow-deferred-gates`
    artifacts: list[Artifact] = field(default_factory=list)

    def add(self, kind: str, stage_id: str, inputs: dict | None, *, status: str | None = None,
            deferred: tuple[str, str] | None = None, **extra) -> Stage:  # fmt: skip
        """Append a stage; its status is `status`, else cached / deferred / run by its key."""
        key = stage_key(kind, inputs) if inputs is not None else None
        if status is None:
            cached = key is not None and self.cache.has(kind, key)
            status = "cached" if cached else "deferred" if deferred else "run"
        if status == "deferred" and deferred:
            extra["reason"], extra["command"] = deferred
        stage = Stage(stage_id, kind, status, key, **extra)
        self.stages.append(stage)
        return stage

    @property
    def shape_pinned(self) -> bool:
        """Planned from the recipe's `source.hub.config` because the hub could not be reached."""
        return bool(self.model_config.get("_forge_pinned"))

    def stage(self, stage_id: str) -> Stage:
        return next(s for s in self.stages if s.id == stage_id)

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind]

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "model": {
                "architecture": ModelShape.from_config(self.model_config).architecture,
                "config": "pinned in source.hub.config (hub not reached)" if self.shape_pinned else "config.json",
            },
            "stages": [asdict(s) for s in self.stages],
            "artifacts": [asdict(a) for a in self.artifacts],
        }


def stage_key(kind: str, inputs: dict) -> str:
    return json_digest({"stage": kind, "version": STAGE_VERSIONS.get(kind, 1), "inputs": inputs})


def variant_scheme(variant: Variant) -> Scheme:
    return resolve_scheme(
        variant.scheme,
        group_size=variant.group_size,
        symmetric=variant.symmetric,
        ignore=tuple(variant.ignore),
        kv_cache_dtype=variant.kv_cache_dtype,
        dtype=variant.dtype,
    )


def calibration_identity(variant: Variant, recipe_dir: Path, index: int) -> dict:
    """The calibration settings and the digest of every calibration file they read."""
    from forge.quant.calibration import calibration_file

    files = {}
    for i, name in enumerate(variant.calibration.sources):
        if name in BUILTIN_CALIBRATION:
            continue
        path = calibration_file(recipe_dir, name, f"variants[{index}].calibration.sources[{i}]")
        files[name] = file_digest(path)
    return {**variant.calibration.model_dump(), "files": files}


def model_config_cached(recipe: Recipe, recipe_dir: Path, identity: dict, cache: Cache) -> dict:
    """The model's config.json; memoized by source digest because GGUF metadata is slow to parse."""
    memo = model_config_memo(cache, identity)
    if memo.is_file():
        return json.loads(memo.read_text())
    return read_model_config(recipe.source, recipe_dir)


def model_config_memo(cache: Cache, identity: dict) -> Path:
    return cache.root / "model-config" / f"{json_digest(identity)}.json"


def check_variants(recipe: Recipe, shape: ModelShape) -> dict[str, Scheme]:
    """Per-variant problems that no target can fix (the model's shape, a preset's options)."""
    problems, schemes = [], {}
    for i, variant in enumerate(recipe.variants):
        scheme = variant_scheme(variant)
        preset = PRESETS[variant.scheme]
        if scheme.weight_format != "int4" and variant.group_size is not None:
            problems.append(f"variants[{i}].group_size: {variant.scheme} has no groups; remove group_size")
        if scheme.weight_format != "int4" and variant.symmetric is not None:
            problems.append(f"variants[{i}].symmetric: only int4 presets take symmetric")
        if preset.algorithm == "none":
            problems.append(f"variants[{i}].scheme: {variant.scheme} cannot be produced by forge yet")
        if (problem := group_size_problem(scheme, shape)) is not None:
            key = "group_size" if variant.group_size else "scheme"
            problems.append(f"variants[{i}].{key}: {problem}")
        schemes[variant.name] = scheme
    if problems:
        raise InputError("\n".join(problems))
    return schemes


def git_revision(directory: Path) -> str:
    try:
        done = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def check_tags(plan: Plan) -> None:
    """Two artifacts pushed under one tag would overwrite each other: refuse at plan time."""
    seen: dict[str, str] = {}
    for stage in plan.of_kind("package"):
        cell = stage.id.removeprefix("package/")
        for tag in stage.params["tags"]:
            if tag in seen:
                raise InputError(
                    f"package.tags: {tag!r} names both {seen[tag]} and {cell}; "
                    "add {variant}, {backend}, {gpu} or {mode}"
                )
            seen[tag] = cell


# What a plan cannot decide without the model's config.json.
SHAPE_CHECKS = (
    "the architecture", "group sizes against the projections", "tensor parallelism against the heads",
    "max_seq_len / max_input_len against the model's positions",
)  # fmt: skip


def recipe_only_cells(recipe: Recipe) -> list[Artifact]:
    """The matrix as far as the recipe alone decides it (GPU capability and backend rules), for a
    hub recipe planned where config.json cannot be read: impossible cells are final, the others
    are `pending` until the shape checks run."""
    from forge.compat import BACKEND_RULES, gpu_problem

    pending = "shape checks wait for config.json"
    cells = []
    for t, target in enumerate(recipe.targets):
        mode = trtllm_mode(target)
        for variant in recipe.variants:
            if target.variants is not None and variant.name not in target.variants:
                continue
            scheme = variant_scheme(variant)
            for gpu_name in target.gpus:
                gpu = lookup_gpu(gpu_name)
                problem = gpu_problem(scheme, gpu, target.backend) or BACKEND_RULES[target.backend](scheme, gpu, mode)
                fmt = None if problem else export_format(target.backend, scheme, target)
                cells.append(Artifact(variant.name, target.backend, gpu.name, fmt,
                                      "impossible" if problem else "pending", problem or pending,
                                      tensor_parallel=target.tensor_parallel, mode=mode, target=t))  # fmt: skip
    return cells


def make_plan(
    recipe: Recipe, recipe_dir: Path, cache: Cache, recipe_file: str = "RECIPE", allow_deferred_gates: bool = False
) -> Plan:
    """Expand the recipe into stages with keys and statuses; raise InputError for impossible asks."""
    identity = source_identity(recipe.source, recipe_dir)
    config = model_config_cached(recipe, recipe_dir, identity, cache)
    shape = ModelShape.from_config(config)
    if shape.architecture not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"source: architecture {shape.architecture} is not supported yet "
            f"(forge maps {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if not recipe.source.trust_remote_code and (named := remote_code(recipe.source, recipe_dir, config)):
        raise InputError(
            f"source.trust_remote_code: the checkpoint's {' and '.join(named)} name code of its own (auto_map); forge "
            "never runs it, but serving stacks may (LMDeploy always does) — set it to true if you trust the source"
        )
    schemes = check_variants(recipe, shape)
    plan = Plan(
        recipe, recipe_dir, recipe_file, config, identity, schemes, cache, detect_local_gpus(),
        git_revision(recipe_dir), allow_deferred_gates=allow_deferred_gates or recipe.package.allow_deferred_gates,
    )  # fmt: skip
    plan.targets = fit_targets(recipe, config)
    source = plan.add("source", "source", identity)

    accuracy = recipe.validation.accuracy
    baseline = None
    if accuracy.enabled:
        dataset = dataset_file(accuracy.dataset, recipe_dir)
        eval_inputs = {"dataset": file_digest(dataset), "window": accuracy.window, "max_windows": accuracy.max_windows}
        baseline = plan.add(
            "baseline", "baseline", {"source": source.key, **eval_inputs},
            needs=["source"], params={"dataset": str(dataset)},
        )  # fmt: skip

    tasks = task_inputs(plan) if accuracy.tasks else None
    if tasks:  # the source served by `transformers serve`: every task run's reference
        plan.add("tasks", "tasks/baseline", {"source": source.key, **tasks}, needs=["source"],
                 params={"variant": None, "gpu": "cpu"})  # fmt: skip

    quantize: dict[str, Stage] = {}
    for variant in recipe.variants:
        scheme = schemes[variant.name]
        preset = PRESETS[variant.scheme]
        inputs = {"source": source.key, "scheme": asdict(scheme), "algorithm": preset.algorithm}
        if preset.needs_calibration or scheme.kv_cache_dtype == "fp8":
            inputs["calibration"] = calibration_identity(variant, recipe_dir, recipe.variants.index(variant))
        quantize[variant.name] = plan.add(
            "quantize", f"quantize/{variant.name}", inputs, needs=["source"],
            params={"variant": variant.name, "algorithm": preset.algorithm},
        )  # fmt: skip

    exports: dict[str, Stage] = {}
    explicit_problems: list[str] = []
    for t, target in enumerate(plan.targets):
        mode = trtllm_mode(target)
        for variant in recipe.variants:
            if target.variants is not None and variant.name not in target.variants:
                continue
            scheme = schemes[variant.name]
            for gpu_name in target.gpus:
                gpu = lookup_gpu(gpu_name)
                problem = combination_problem(scheme, target.backend, gpu, shape, target.tensor_parallel, mode)
                if problem:
                    if target.variants is not None:
                        explicit_problems.append(f"targets[{t}] ({variant.name} on {gpu_name}): {problem}")
                    plan.artifacts.append(
                        Artifact(variant.name, target.backend, gpu.name, None, "impossible", problem,
                                 tensor_parallel=target.tensor_parallel, mode=mode, target=t)
                    )  # fmt: skip
                    continue
                fmt = export_format(target.backend, scheme, target)
                export = export_stage(plan, exports, quantize[variant.name], fmt, target.tensor_parallel)
                artifact = Artifact(variant.name, target.backend, gpu.name, fmt, "planned",
                                    combination_note(scheme, target.backend, gpu), export_stage=export.id,
                                    tensor_parallel=target.tensor_parallel, mode=mode, target=t)  # fmt: skip
                artifact.stages += target_stages(plan, target, artifact.cell, variant, gpu, export, tasks)
                plan.artifacts.append(artifact)
    if explicit_problems:
        raise InputError("\n".join(explicit_problems))
    check_tags(plan)
    if not any(a.status == "planned" for a in plan.artifacts):
        raise InputError("targets: no (variant, backend, GPU) combination can be built:\n" + "\n".join(
            f"  {a.variant} → {a.backend} on {a.gpu}: {a.reason}" for a in plan.artifacts
        ))  # fmt: skip

    throughput = recipe.validation.throughput
    if throughput.enabled and throughput.cpu:
        cpu_throughput_stages(plan, exports, quantize)
    if tasks:
        cpu_task_stages(plan, exports, quantize, tasks)
    if baseline is not None:
        for export in list(exports.values()):
            plan.add(
                "accuracy", export.id.replace("export/", "accuracy/", 1),
                {"export": export.key, "baseline": baseline.key},
                needs=[export.id, "baseline"], params=dict(export.params),
            )  # fmt: skip
    plan.stages.sort(key=lambda s: STAGE_ORDER.index(s.kind))  # stable: the order they run in
    memo = model_config_memo(cache, identity)  # written only once the recipe passed every check
    if not memo.is_file() and not config.get("_forge_pinned"):  # a pin is no config.json: check it next time
        atomic_write_text(memo, json.dumps(config, indent=2, sort_keys=True))
    for push in plan.of_kind("push"):  # nothing is published before its variant's gates are measured
        variant = push.params["variant"]
        push.needs += [s.id for s in plan.stages if s.kind in ("accuracy", "tasks", "throughput")
                       and s.params.get("variant") == variant and s.status in ("run", "cached")]  # fmt: skip
        defer_push(plan, push)
    return plan


def position_limit(config: dict) -> int | None:
    """The longest sequence the model's positions allow, as vLLM derives it (`_get_and_verify_max_len` in
    https://github.com/vllm-project/vllm/blob/main/vllm/config/model.py): max_position_embeddings, times
    rope_scaling.factor for the types that stretch the positions (yarn stretches
    original_max_position_embeddings); llama3 / longrope / su already state the stretched length."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return None
    rope = config.get("rope_scaling")
    if isinstance(rope, dict) and isinstance(rope.get("factor"), int | float):
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in ("su", "longrope", "llama3", "default", None):
            original = rope.get("original_max_position_embeddings") if kind == "yarn" else None
            limit = int((original if isinstance(original, int) else limit) * rope["factor"])
    return limit


def fit_targets(recipe: Recipe, config: dict) -> list[Target]:
    """recipe.targets with max_seq_len / max_input_len checked against the model's positions: a value the
    recipe sets beyond them is an InputError naming its key (every server refuses it: vLLM's
    --max-model-len, TGI's --max-total-tokens, LMDeploy's --session-len, trtllm-build's --max_seq_len);
    a default beyond them is lowered to fit (max_input_len to half of it, the defaults' ratio)."""
    limit = position_limit(config)
    if limit is None:
        return list(recipe.targets)
    fitted, problems = [], []
    for i, target in enumerate(recipe.targets):
        explicit = target.model_fields_set
        seq, prompt = target.max_seq_len, target.max_input_len
        if seq > limit:
            if "max_seq_len" in explicit:
                problems.append(f"targets[{i}].max_seq_len: {seq} exceeds the model's {limit} positions "
                                f"(max_position_embeddings, rope_scaling); use at most {limit}")  # fmt: skip
            seq = limit
        if prompt >= seq:
            if "max_input_len" in explicit:
                problems.append(f"targets[{i}].max_input_len: {prompt} must be below max_seq_len {seq} (the model "
                                f"has {limit} positions)")  # fmt: skip
            prompt = seq // 2
        fitted.append(target.model_copy(update={"max_seq_len": seq, "max_input_len": prompt}))
    if problems:
        raise InputError("\n".join(problems))
    return fitted


def cell_of(stage: Stage) -> str:
    """`<variant>/<backend>/<gpu>` of a per-artifact stage (`throughput/fp8/vllm/H100` → `fp8/vllm/H100`)."""
    return stage.id.split("/", 1)[1]


def defer_push(plan: Plan, push: Stage) -> None:
    """A push is deferred while its image is (an engine not built yet), and while the gates measured on
    its GPU (lm-eval tasks, throughput) are deferred, unless `allow_deferred_gates` says to publish
    unmeasured; `forge push` refuses a deferred push (build.refuse_deferred_pushes)."""
    package = plan.stage(push.needs[0])
    gates = [s.id for s in plan.stages if s.kind in ("tasks", "throughput") and s.status == "deferred"
             and cell_of(s) == cell_of(push)]  # fmt: skip
    push.params = {**push.params, "deferred_gates": gates}
    command = f"forge push {plan.recipe_file}  # once the stages above ran on a GPU builder"
    if package.status == "deferred":
        push.status, push.command = "deferred", command
        push.reason = f"its image is deferred ({package.id}: {package.reason})"
    elif gates and not plan.allow_deferred_gates:
        push.status, push.command = "deferred", command
        push.reason = (
            f"its gates are deferred to a GPU builder ({', '.join(gates)}): nothing is published unmeasured; "
            "run them there, or set package.allow_deferred_gates: true"
        )
    elif gates:
        push.reason = f"allow_deferred_gates: pushed with {len(gates)} gate stage(s) not measured ({', '.join(gates)})"


def export_stage(plan: Plan, exports: dict[str, Stage], quantized: Stage, fmt: str, tp: int) -> Stage:
    """The export of one quantized variant in one format, shared by every target that loads it."""
    variant = quantized.params["variant"]
    export_id = f"export/{variant}/{fmt}" + (f"-tp{tp}" if fmt == "trtllm-checkpoint" else "")
    if export_id not in exports:
        exports[export_id] = plan.add(
            "export", export_id, {"quantized": quantized.key, "format": fmt, "tp": tp},
            needs=[quantized.id], params={"variant": variant, "format": fmt, "tp": tp},
        )  # fmt: skip
    return exports[export_id]


def target_stages(
    plan: Plan, target: Target, cell: str, variant: Variant, gpu: GPUProfile, export: Stage,
    tasks: dict | None,
) -> list[str]:  # fmt: skip
    """The GPU-side stages of one artifact (`cell`, its `Artifact.cell`): engine build, lm-eval tasks
    (`tasks`: their inputs, when the recipe lists any), throughput, package, push."""
    recipe, add = plan.recipe, plan.add
    ids = []
    if trtllm_mode(target) == "engine":
        ids.append(engine_stage(plan, target, variant, gpu, export, cell).id)
    # The image first: with packaging on, the GPU stages measure it (gpu_serving_stage), not the base image.
    package = package_stage(plan, target, variant, gpu, export, cell) if recipe.package.enabled else None
    if tasks:  # judged against the baseline run on this machine
        ids.append(gpu_serving_stage(plan, "tasks", target, variant, gpu, export, cell, tasks,
                                     needs=("tasks/baseline",)).id)  # fmt: skip
    if recipe.validation.throughput.enabled:
        ids.append(
            gpu_serving_stage(plan, "throughput", target, variant, gpu, export, cell, throughput_inputs(plan)).id
        )
    if recipe.package.model_images:
        model_image = model_image_stage(plan, target, variant, gpu, export, cell)
        ids.append(model_image.id)
        if recipe.package.registry:  # pushed beside the serving image, under the same gates
            params = {**model_image.params, "tags": [model_image.params["tag"]]}
            ids.append(add("push", f"push/{cell}/model-image", None, status="run", needs=[model_image.id],
                           params=params).id)  # fmt: skip
    if package is not None:
        ids.append(package.id)
        if recipe.package.registry:
            # A push is an effect on a registry, not content: it always runs (uploading only
            # the blobs the registry lacks), and only after every gate passed.
            ids.append(add("push", f"push/{cell}", None, status="run", needs=[package.id], params=package.params).id)
    return ids


def model_image_stage(plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, cell: str) -> Stage:
    """The artifact as a data-only model image plus its deploy manifests (`forge.model_image`):
    no base image, so it builds offline; an engine-mode cell waits for its engine."""
    from forge.package import resolve_base
    from forge.serving import serve_spec

    package = plan.recipe.package
    spec = serve_spec(plan.recipe, variant.name, plan.schemes[variant.name], target, gpu.name, plan.revision)
    tag = expand_tag(package.tags[0], variant.name, target.backend, gpu.name, trtllm_mode(target)) + "-model"
    reference = f"{package.registry or 'localhost:5000'}/{package.repository or plan.recipe.name}:{tag}"
    engine = next((s for s in plan.stages if s.id == f"engine/{cell}"), None)
    base = None
    if package.modelcar_base:
        base = resolve_base(package.modelcar_base, plan.recipe_dir, package.registry, package.insecure_registries)
    inputs = {"export": export.key, "engine": engine.key if engine else None, "spec": asdict(spec), "tag": tag,
              "reference": reference, "gpus": target.tensor_parallel,
              "modelcar_base": base and base["digest"]}  # fmt: skip
    params = {"variant": variant.name, "backend": target.backend, "gpu": gpu.name, "tag": tag, "reference": reference,
              "target": plan.targets.index(target), "base": base}  # fmt: skip
    needs = [export.id] + ([engine.id] if engine else [])
    stage_id = f"model-image/{cell}"
    if engine and engine.status not in ("run", "cached"):
        reason = f"needs {engine.id} ({engine.status}): the image must hold the engine"
        return plan.add("model-image", stage_id, inputs, needs=needs, params=params,
                        deferred=(reason, f"forge build {plan.recipe_file} --only {stage_id}"))  # fmt: skip
    if base and base.get("unreachable"):  # the modelcar's shell layer comes from it: later, not a failure
        from forge.package import pull_base_hint

        reason = f"its modelcar base {package.modelcar_base} cannot be reached ({base['unreachable']})"
        offline = pull_base_hint(package.modelcar_base, "modelcar", "package.modelcar_base")
        command = (f"forge build {plan.recipe_file} --only {stage_id}  # where {package.modelcar_base} can be "
                   f"pulled; or offline: {offline}")  # fmt: skip
        return plan.add("model-image", stage_id, inputs, needs=needs, params=params, deferred=(reason, command))
    return plan.add("model-image", stage_id, inputs, needs=needs, params=params)


def package_stage(plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, cell: str) -> Stage:
    """The serving image of one artifact, as an OCI layout in the cache. Keyed on the base
    image's digest, resolved here (once per base per plan; `forge.package.resolve_base`)."""
    from forge.package import resolve_base
    from forge.serving import serve_spec

    spec = serve_spec(plan.recipe, variant.name, plan.schemes[variant.name], target, gpu.name, plan.revision)
    mode = trtllm_mode(target)
    tags = [expand_tag(t, variant.name, target.backend, gpu.name, mode) for t in plan.recipe.package.tags]
    engine = next((s for s in plan.stages if s.id == f"engine/{cell}"), None)
    package = plan.recipe.package
    bases = vars(plan).setdefault("_package_bases", {})
    if spec.base_image not in bases:
        bases[spec.base_image] = resolve_base(spec.base_image, plan.recipe_dir, package.registry,
                                              package.insecure_registries)  # fmt: skip
    base = bases[spec.base_image]
    inputs = {"export": export.key, "engine": engine.key if engine else None, "spec": asdict(spec),
              "builder": plan.recipe.package.builder, "tag": tags[0], "base_digest": base["digest"]}  # fmt: skip
    params = {"variant": variant.name, "backend": target.backend, "gpu": gpu.name, "tags": tags,
              "target": plan.targets.index(target), "base": base}  # fmt: skip
    needs = [export.id] + ([engine.id] if engine else [])
    deferred = None
    if engine and engine.status == "deferred":  # the image carries the engine: it waits for it
        deferred = (
            f"its engine is deferred ({engine.id}: {engine.reason})",
            f"forge build {plan.recipe_file} --only package/{cell}  # on the GPU builder, after {engine.id}",
        )
    elif base.get("unreachable"):  # nothing to build on until the base can be pulled: later, not a failure
        from forge.package import pull_base_hint

        offline = pull_base_hint(spec.base_image, target.backend, f"package.base_images.{target.backend}")
        deferred = (
            f"its base image {spec.base_image} cannot be reached ({base['unreachable']})",
            f"forge build {plan.recipe_file} --only package/{cell}  # where {spec.base_image} can be pulled; "
            f"or offline: {offline}",
        )
    stage = plan.add("package", f"package/{cell}", inputs, needs=needs, params=params, deferred=deferred)
    if base["note"] and stage.status in ("run", "cached"):
        stage.reason = base["note"]
    return stage


def local_gpu(plan: Plan, gpu: GPUProfile) -> bool:
    return any(g.compute_capability == gpu.compute_capability for g in plan.local_gpus.gpus)


def throughput_inputs(plan: Plan) -> dict:
    """What a measurement depends on besides the artifact: the load and the latency SLOs (goodput
    counts the requests within them). The pure thresholds `min_output_tps` / `min_goodput` are
    checked when the report is written (stages.throughput_results), so changing one re-gates the
    cached sweep instead of measuring again."""
    exclude = {"usd_per_hour", "min_output_tps", "min_goodput"}
    return {"load": plan.recipe.validation.throughput.model_dump(exclude=exclude)}


def gpu_serving_stage(
    plan: Plan, kind: str, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, cell: str,
    inputs: dict, needs: tuple[str, ...] = (),
) -> Stage:  # fmt: skip
    """A stage that serves the artifact in its backend's container on the target GPU (a load sweep,
    lm-eval tasks): run where that GPU is, else deferred with the command a GPU builder runs."""
    from forge.serving import serve_spec

    stage_id = f"{kind}/{cell}"
    inputs = {"export": export.key, "target": target.model_dump(), "gpu": gpu.name, **inputs}
    params = {"variant": variant.name, "gpu": gpu.name, "target": plan.targets.index(target)}
    engine = f"engine/{cell}"
    needs = [export.id, *([engine] if any(s.id == engine for s in plan.stages) else []), *needs]
    package = next((s for s in plan.stages if s.id == f"package/{cell}"), None)
    if package is not None:  # it serves the packaged image: measured is what is released
        inputs["image"] = package.key
        needs.append(package.id)
    if local_gpu(plan, gpu) and package is not None and package.status == "deferred":
        reason = f"it serves the image of {package.id}, which is deferred ({package.reason})"
        return plan.add(
            kind,
            stage_id,
            inputs,
            needs=needs,
            params=params,
            deferred=(reason, f"forge build {plan.recipe_file} --only {stage_id}  # after {package.id}"),
        )
    if local_gpu(plan, gpu):
        return plan.add(kind, stage_id, inputs, needs=needs, params=params)
    spec = serve_spec(plan.recipe, variant.name, plan.schemes[variant.name], target, gpu.name, "")
    reason = f"needs an NVIDIA {gpu.name} ({gpu.sm}): {plan.local_gpus.reason or 'none of that architecture here'}"
    served = f"the image of {package.id}" if package else f"{spec.base_image} with the artifact mounted"
    command = f"forge build {plan.recipe_file} --only {stage_id}  # serves {served}: {shlex.join(spec.argv)}"
    return plan.add(kind, stage_id, inputs, deferred=(reason, command), needs=needs, params=params)


def cpu_throughput_stages(plan: Plan, exports: dict[str, Stage], quantize: dict[str, Stage]) -> None:
    """Per variant: its compressed-tensors export served by `transformers serve` on this CPU."""
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count()}
    for variant in plan.recipe.variants:
        # transformers loads compressed-tensors on CPU; the export is added if no target asked for it.
        export = export_stage(plan, exports, quantize[variant.name], "compressed-tensors", 1)
        plan.add(
            "throughput", f"throughput/{variant.name}/cpu",
            {"export": export.key, **throughput_inputs(plan), "cpu": machine},
            needs=[export.id], params={"variant": variant.name, "gpu": "cpu"},
        )  # fmt: skip


def task_include_dir(plan: Plan) -> Path | None:
    """The recipe's own lm-eval task directory, resolved against the recipe's folder and checked."""
    from forge.eval.lm_eval import include_dir

    path = plan.recipe.validation.accuracy.task_include_path
    if path:  # before anything walks it: `/` would mean the whole filesystem
        refuse_system_directory(plan.recipe_dir / path, "validation.accuracy.task_include_path")
    return include_dir(plan.recipe_dir, path) if path else None


def task_inputs(plan: Plan) -> dict:
    """What an lm-eval run depends on besides the model: the tasks, their options and files."""
    from forge.eval.lm_eval import INSTALL_HINT, lm_eval_available

    accuracy = plan.recipe.validation.accuracy
    if not lm_eval_available():
        raise InputError(f"validation.accuracy.tasks: lm-evaluation-harness is not installed; {INSTALL_HINT}")
    include = task_include_dir(plan)
    if include and not include.is_dir():
        raise InputError(f"validation.accuracy.task_include_path: {include} is not a directory")
    return {
        "tasks": accuracy.tasks,
        "limit": accuracy.task_limit,
        "num_fewshot": accuracy.num_fewshot,
        "include": bounded_file_digests(include, "validation.accuracy.task_include_path") if include else None,
    }


def cpu_task_stages(plan: Plan, exports: dict[str, Stage], quantize: dict[str, Stage], inputs: dict) -> None:
    """lm-eval tasks against each variant's compressed-tensors export served on this machine by
    `transformers serve` (the same weights every backend's export holds)."""
    for variant in plan.recipe.variants:
        export = export_stage(plan, exports, quantize[variant.name], "compressed-tensors", 1)
        plan.add(
            "tasks", f"tasks/{variant.name}/cpu", {"export": export.key, **inputs},
            needs=[export.id, "tasks/baseline"], params={"variant": variant.name, "gpu": "cpu"},
        )  # fmt: skip


def engine_stage(plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, cell: str) -> Stage:
    """A TensorRT engine for one GPU architecture: run where that GPU is, else deferred with the
    exact command a GPU builder runs (`forge build RECIPE --only engine/<cell>`)."""
    scheme = plan.schemes[variant.name]
    limits = trtllm.Limits.from_target(target)
    inputs = {
        "export": export.key,
        "build_config": trtllm.build_config(limits, scheme),
        "trtllm_version": target.trtllm.version,
        "gpu_sm": gpu.sm,  # an engine runs only on the architecture that built it
    }
    stage_id = f"engine/{cell}"
    params = {"variant": variant.name, "gpu": gpu.name, "target": plan.targets.index(target)}
    if local_gpu(plan, gpu):
        return plan.add("engine", stage_id, inputs, needs=[export.id], params=params)
    reason = f"needs an NVIDIA {gpu.name} ({gpu.sm}): {plan.local_gpus.reason or 'none of that architecture here'}"
    # Paste-ready: absolute paths of the export this machine caches and of an engine directory beside
    # the artifacts (a relative path would resolve against wherever the line is pasted).
    checkpoint = plan.cache.entry("export", export.key).resolve() / "model"
    engine_dir = plan.cache.root.resolve().parent / plan.recipe.name / "engines" / cell
    build = trtllm.engine_build_command(checkpoint, engine_dir, limits, scheme, target.trtllm.version)
    command = f"forge build {plan.recipe_file} --only {stage_id}  # or run: {build}"
    return plan.add(
        "engine", stage_id, inputs, status=None, deferred=(reason, command), needs=[export.id], params=params
    )
