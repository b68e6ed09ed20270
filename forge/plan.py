"""Expand a recipe into the build graph and check it against the compatibility table.

One artifact per (variant, backend, GPU), planned or impossible (with why). Every stage gets its
kind's inputs record (`forge.stages`), the stages it reads by role, a cache key (the digest of the
record and of those stages' keys) and a status: run, cached, or deferred (needs hardware that is
absent, with the command to run later).
Planning reads only small files (the model's config, digests memoized by file stat), so it is
fast and it runs before anything is downloaded or computed.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from forge import __version__
from forge.backends import RECORDS, export_format, trtllm, trtllm_mode
from forge.cache import Cache, atomic_write_text
from forge.compat import (
    SUPPORTED_ARCHITECTURES,
    ModelShape,
    combination_note,
    combination_problem,
    group_size_problem,
)
from forge.cpu import cpu_threads
from forge.datasets import dataset_file
from forge.digest import bounded_file_digests, file_digest, json_digest, refuse_system_directory
from forge.errors import InputError
from forge.gpus import GPUProfile, LocalGPUs, detect_local_gpus, lookup_gpu
from forge.quant.presets import PRESETS, needs_calibration, resolve_scheme
from forge.quant.scheme import Scheme
from forge.recipe import Recipe, Target, Variant, expand_tag
from forge.serving import ServeSpec, serve_spec
from forge.source import read_model_config, remote_code, source_identity
from forge.stages import KINDS
from forge.stages import accuracy as accuracy_kind
from forge.stages import baseline as baseline_kind
from forge.stages import engine as engine_kind
from forge.stages import export as export_kind
from forge.stages import model_image as model_image_kind
from forge.stages import package as package_kind
from forge.stages import push as push_kind
from forge.stages import quantize as quantize_kind
from forge.stages import source as source_kind
from forge.stages import tasks as tasks_kind
from forge.stages import throughput as throughput_kind
from forge.stages.base import record_json, stage_key
from forge.stages.serve import CPU, Served

BUILTIN_CALIBRATION = ("pydoc_topics",)
STAGE_ORDER = tuple(KINDS)  # the order the build runs the kinds in


@dataclass
class Stage:
    """One stage of the plan: its kind's inputs record (`forge.stages`), the stages whose entries it
    reads by role (`{"export": "export/fp8/compressed-tensors", "baseline": "baseline"}`), and what
    must run before it without being read (`after`: the gates a push waits for)."""

    id: str
    kind: str
    status: str  # run | cached | deferred
    key: str | None = None
    reason: str = ""
    command: str | None = None
    deps: dict[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    inputs: Any = None

    @property
    def needs(self) -> list[str]:
        """Every stage that must be complete before this one: what it reads, then what it waits for."""
        return [*self.deps.values(), *self.after]

    def to_dict(self) -> dict:
        """For `forge plan --json`: the record appears as `params`, local fields included."""
        return {"id": self.id, "kind": self.kind, "status": self.status, "key": self.key, "reason": self.reason,
                "command": self.command, "needs": self.needs, "deps": self.deps,
                "params": record_json(self.inputs)}  # fmt: skip


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
    by_id: dict[str, Stage] = field(default_factory=dict, repr=False)
    bases: dict[str, dict] = field(default_factory=dict, repr=False)  # base image → resolve_base, once per plan

    def add(self, stage_id: str, inputs: Any, *, deps: dict[str, Stage] | None = None, after: tuple[str, ...] = (),
            status: str | None = None, deferred: tuple[str, str] | None = None) -> Stage:  # fmt: skip
        """Append a stage of the kind whose `Inputs` record `inputs` is; its key is the digest of the
        record and of the keys of `deps` (the stages it reads, by role); its status is `status`,
        else cached / deferred / run by its key."""
        kind = next(kind for kind, module in KINDS.items() if isinstance(inputs, module.Inputs))
        deps = deps or {}
        key = None
        if kind != "push":  # an effect on a registry, not content: nothing to key
            key = stage_key(kind, KINDS[kind].VERSION, inputs, {role: dep.key for role, dep in deps.items()})
        if status is None:
            cached = key is not None and self.cache.has(kind, key)
            status = "cached" if cached else "deferred" if deferred else "run"
        reason, command = deferred if status == "deferred" and deferred else ("", None)
        stage = Stage(stage_id, kind, status, key, reason, command, {role: dep.id for role, dep in deps.items()},
                      after, inputs)  # fmt: skip
        self.stages.append(stage)
        self.by_id[stage_id] = stage
        return stage

    @property
    def shape_pinned(self) -> bool:
        """Planned from the recipe's `source.hub.config` because the hub could not be reached."""
        return bool(self.model_config.get("_forge_pinned"))

    def stage(self, stage_id: str) -> Stage:
        return self.by_id[stage_id]

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind]

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.name,
            "model": {
                "architecture": ModelShape.from_config(self.model_config).architecture,
                "config": "pinned in source.hub.config (hub not reached)" if self.shape_pinned else "config.json",
            },
            "stages": [s.to_dict() for s in self.stages],
            "artifacts": [asdict(a) for a in self.artifacts],
        }


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
    for artifact in plan.artifacts:
        for stage in (plan.stage(sid) for sid in artifact.stages):
            if stage.kind != "package":
                continue
            for tag in stage.inputs.tags:
                if tag in seen:
                    raise InputError(
                        f"package.tags: {tag!r} names both {seen[tag]} and {artifact.cell}; "
                        "add {variant}, {backend}, {gpu} or {mode}"
                    )
                seen[tag] = artifact.cell


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
    source = plan.add("source", source_kind.Inputs(identity, recipe.source, recipe_dir))

    accuracy = recipe.validation.accuracy
    baseline, evaluation = None, {}
    if accuracy.enabled:
        dataset = dataset_file(accuracy.dataset, recipe_dir)
        evaluation = {"dataset_sha256": file_digest(dataset), "window": accuracy.window,
                      "max_windows": accuracy.max_windows, "dataset": dataset}  # fmt: skip
        baseline = plan.add("baseline", baseline_kind.Inputs(**evaluation), deps={"source": source})

    tasks = task_inputs(plan) if accuracy.tasks else None
    if tasks:  # the source served by `transformers serve`: every task run's reference
        served = Served(None, CPU, label="tasks/baseline")
        plan.add("tasks/baseline", tasks_kind.Inputs(served, **tasks), deps={"model": source})

    quantize: dict[str, Stage] = {}
    for index, variant in enumerate(recipe.variants):
        scheme = schemes[variant.name]
        preset = PRESETS[variant.scheme]
        calibration, sources = None, ()
        if needs_calibration(scheme, preset.algorithm):
            calibration = calibration_identity(variant, recipe_dir, index)
            sources = tuple(s if s in BUILTIN_CALIBRATION else str((recipe_dir / s).resolve())
                            for s in variant.calibration.sources)  # fmt: skip
        inputs = quantize_kind.Inputs(variant.name, variant.scheme, scheme, preset.algorithm, calibration, sources)
        quantize[variant.name] = plan.add(f"quantize/{variant.name}", inputs, deps={"source": source})

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
                problem = combination_problem(scheme, target.backend, gpu, shape, target.tensor_parallel, mode, target)
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
            e = export.inputs
            inputs = accuracy_kind.Inputs(e.variant, e.format, e.tp, schemes[e.variant], **evaluation)
            plan.add(f"accuracy/{e.variant}/{export_name(e.format, e.tp)}", inputs,
                     deps={"export": export, "baseline": baseline})  # fmt: skip
    plan.stages.sort(key=lambda s: STAGE_ORDER.index(s.kind))  # stable: the order they run in
    memo = model_config_memo(cache, identity)  # written only once the recipe passed every check
    if not memo.is_file() and not config.get("_forge_pinned"):  # a pin is no config.json: check it next time
        atomic_write_text(memo, json.dumps(config, indent=2, sort_keys=True))
    for artifact in plan.artifacts:  # nothing is published before its variant's gates are measured
        for push in [plan.stage(sid) for sid in artifact.stages if plan.stage(sid).kind == "push"]:
            defer_push(plan, push, artifact)
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


MEASURING = ("accuracy", "tasks", "throughput")  # the kinds whose gates a push waits for


def defer_push(plan: Plan, push: Stage, artifact: Artifact) -> None:
    """A push waits for every measuring stage of its variant, and is deferred while its image is (an
    engine not built yet) or while the gates measured on its GPU (lm-eval tasks, throughput) are
    deferred, unless `allow_deferred_gates` says to publish unmeasured; `forge push` refuses a
    deferred push (build.refuse_deferred_pushes)."""
    push.after = tuple(s.id for s in plan.stages if s.kind in MEASURING and s.status in ("run", "cached")
                       and getattr(s.inputs, "variant", None) == push.inputs.variant)  # fmt: skip
    image = plan.stage(push.deps["image"])
    own = [plan.stage(sid) for sid in artifact.stages]
    gates = tuple(s.id for s in own if s.kind in ("tasks", "throughput") and s.status == "deferred")
    push.inputs = replace(push.inputs, deferred_gates=gates)
    command = f"forge push {plan.recipe_file}  # once the stages above ran on a GPU builder"
    if image.status == "deferred":
        push.status, push.command = "deferred", command
        push.reason = f"its image is deferred ({image.id}: {image.reason})"
    elif gates and not plan.allow_deferred_gates:
        push.status, push.command = "deferred", command
        push.reason = (
            f"its gates are deferred to a GPU builder ({', '.join(gates)}): nothing is published unmeasured; "
            "run them there, or set package.allow_deferred_gates: true"
        )
    elif gates:
        push.reason = f"allow_deferred_gates: pushed with {len(gates)} gate stage(s) not measured ({', '.join(gates)})"


def export_name(fmt: str, tp: int) -> str:
    """The format as export and accuracy ids name it: the legacy TensorRT-LLM checkpoint is split per
    tensor-parallel rank, so each degree is its own export."""
    return fmt + (f"-tp{tp}" if fmt == "trtllm-checkpoint" else "")


def export_stage(plan: Plan, exports: dict[str, Stage], quantized: Stage, fmt: str, tp: int) -> Stage:
    """The export of one quantized variant in one format, shared by every target that loads it."""
    variant = quantized.inputs.variant
    export_id = f"export/{variant}/{export_name(fmt, tp)}"
    if export_id not in exports:
        inputs = export_kind.Inputs(variant, fmt, tp, plan.recipe.name, plan.source_identity, __version__)
        exports[export_id] = plan.add(export_id, inputs, deps={"quantized": quantized, "source": plan.stage("source")})
    return exports[export_id]


def target_stages(
    plan: Plan, target: Target, cell: str, variant: Variant, gpu: GPUProfile, export: Stage, tasks: dict | None
) -> list[str]:
    """The GPU-side stages of one artifact (`cell`, its `Artifact.cell`): engine build, lm-eval tasks
    (`tasks`: their inputs, when the recipe lists any), throughput, model image, package, pushes."""
    recipe = plan.recipe
    ids = []
    engine = engine_stage(plan, target, variant, gpu, export, cell) if trtllm_mode(target) == "engine" else None
    if engine is not None:
        ids.append(engine.id)
    # The image first: with packaging on, the GPU stages measure it (gpu_serving_stage), not the base image.
    package = package_stage(plan, target, variant, gpu, export, engine, cell) if recipe.package.enabled else None
    served = (plan, target, variant, gpu, export, engine, package, cell)
    if tasks:  # judged against the baseline run on this machine
        ids.append(gpu_serving_stage(*served, "tasks", tasks, after=("tasks/baseline",)).id)
    if recipe.validation.throughput.enabled:
        flavor = RECORDS[target.backend].loadgen_flavor
        ids.append(gpu_serving_stage(*served, "throughput", {"load": load_of(plan), "flavor": flavor}).id)
    if recipe.package.model_images:
        model_image = model_image_stage(plan, target, variant, gpu, export, engine, cell)
        ids.append(model_image.id)
        if recipe.package.registry:  # pushed beside the serving image, under the same gates
            ids.append(push_stage(plan, f"push/{cell}/model-image", model_image, (model_image.inputs.tag,)).id)
    if package is not None:
        ids.append(package.id)
        if recipe.package.registry:
            # A push is an effect on a registry, not content: it always runs (uploading only
            # the blobs the registry lacks), and only after every gate passed.
            ids.append(push_stage(plan, f"push/{cell}", package, package.inputs.tags).id)
    return ids


def push_stage(plan: Plan, stage_id: str, image: Stage, tags: tuple[str, ...]) -> Stage:
    package = plan.recipe.package
    inputs = push_kind.Inputs(image.inputs.variant, tuple(tags), package.registry, package.repository,
                              tuple(package.insecure_registries))  # fmt: skip
    return plan.add(stage_id, inputs, deps={"image": image}, status="run")


def cell_image(plan: Plan, target: Target, variant: Variant, gpu: GPUProfile) -> tuple[ServeSpec, list[str]]:
    """How a cell's images serve it and what they are tagged: one answer for its serving image and
    its model image (`package.tags` expanded for the cell; the model image adds `-model`)."""
    spec = serve_spec(plan.recipe, variant.name, plan.schemes[variant.name], target, gpu.name, plan.revision)
    mode = trtllm_mode(target)
    tags = [expand_tag(t, variant.name, target.backend, gpu.name, mode) for t in plan.recipe.package.tags]
    return spec, tags


def model_image_stage(
    plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, engine: Stage | None, cell: str
) -> Stage:
    """The artifact as a data-only model image plus its deploy manifests (`forge.model_image`):
    no base image, so it builds offline; an engine-mode cell waits for its engine."""
    package = plan.recipe.package
    spec, tags = cell_image(plan, target, variant, gpu)
    tag = tags[0] + "-model"
    reference = f"{package.registry or 'localhost:5000'}/{package.repository or plan.recipe.name}:{tag}"
    base = None
    if package.modelcar_base:  # forge.package brings the registry client: imported only for a base to resolve
        from forge.package import resolve_base

        base = resolve_base(package.modelcar_base, plan.recipe_dir, package.registry, package.insecure_registries)
    name = f"{plan.recipe.name}-{variant.name}-{target.backend}-{gpu.name}".lower().replace(".", "-")
    inputs = model_image_kind.Inputs(
        variant.name, target.backend, gpu.name, spec, tag, reference, name, target.tensor_parallel,
        base and base["digest"], base and base["image"],
    )  # fmt: skip
    deps = {"export": export, **({"engine": engine} if engine else {})}
    stage_id = f"model-image/{cell}"
    deferred = None
    if engine and engine.status not in ("run", "cached"):
        reason = f"needs {engine.id} ({engine.status}): the image must hold the engine"
        deferred = (reason, f"forge build {plan.recipe_file} --only {stage_id}")
    elif base and base.get("unreachable"):  # the modelcar's shell layer comes from it: later, not a failure
        from forge.package import pull_base_hint

        reason = f"its modelcar base {package.modelcar_base} cannot be reached ({base['unreachable']})"
        offline = pull_base_hint(package.modelcar_base, "modelcar", "package.modelcar_base")
        deferred = (reason, f"forge build {plan.recipe_file} --only {stage_id}  # where {package.modelcar_base} can "
                            f"be pulled; or offline: {offline}")  # fmt: skip
    return plan.add(stage_id, inputs, deps=deps, deferred=deferred)


def package_stage(
    plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, engine: Stage | None, cell: str
) -> Stage:
    """The serving image of one artifact, as an OCI layout in the cache. Keyed on the base
    image's digest, resolved here (once per base per plan; `forge.package.resolve_base`)."""
    from forge.package import resolve_base

    package = plan.recipe.package
    spec, tags = cell_image(plan, target, variant, gpu)
    if spec.base_image not in plan.bases:
        plan.bases[spec.base_image] = resolve_base(spec.base_image, plan.recipe_dir, package.registry,
                                                   package.insecure_registries)  # fmt: skip
    base = plan.bases[spec.base_image]
    stage_id = f"package/{cell}"
    retry = f"forge build {plan.recipe_file} --only {stage_id}"
    inputs = package_kind.Inputs(variant.name, target.backend, gpu.name, spec, tags[0], package.builder,
                                 base["digest"], tuple(tags), base, package.registry,
                                 tuple(package.insecure_registries), stage_id, retry)  # fmt: skip
    deferred = None
    if engine and engine.status == "deferred":  # the image carries the engine: it waits for it
        deferred = (f"its engine is deferred ({engine.id}: {engine.reason})",
                    f"{retry}  # on the GPU builder, after {engine.id}")  # fmt: skip
    elif base.get("unreachable"):  # nothing to build on until the base can be pulled: later, not a failure
        from forge.package import pull_base_hint

        offline = pull_base_hint(spec.base_image, target.backend, f"package.base_images.{target.backend}")
        deferred = (
            f"its base image {spec.base_image} cannot be reached ({base['unreachable']})",
            f"{retry}  # where {spec.base_image} can be pulled; or offline: {offline}",
        )
    deps = {"export": export, **({"engine": engine} if engine else {})}
    stage = plan.add(stage_id, inputs, deps=deps, deferred=deferred)
    if base["note"] and stage.status in ("run", "cached"):
        stage.reason = base["note"]
    return stage


def local_gpu(plan: Plan, gpu: GPUProfile) -> bool:
    return any(g.compute_capability == gpu.compute_capability for g in plan.local_gpus.gpus)


def load_of(plan: Plan) -> throughput_kind.Load:
    """What a measurement depends on besides the artifact: the load and the latency SLOs (goodput
    counts the requests within them). The pure thresholds `min_output_tps` / `min_goodput` and the
    prices are applied when the report is written (forge.stages.gates), so changing one re-gates or
    re-prices the cached sweep instead of measuring again."""
    load = plan.recipe.validation.throughput
    return throughput_kind.Load(tuple(load.concurrency), load.prompt_tokens, load.output_tokens,
                                load.requests_per_level, load.max_ttft_p99_ms, load.max_tpot_p99_ms)  # fmt: skip


def gpu_serving_stage(
    plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, engine: Stage | None,
    package: Stage | None, cell: str, kind: str, settings: dict, after: tuple[str, ...] = (),
) -> Stage:  # fmt: skip
    """A stage that serves the artifact in its backend's container on the target GPU (a load sweep,
    lm-eval tasks): run where that GPU is, else deferred with the command a GPU builder runs. With
    packaging on it serves the packaged image: measured is what is released."""
    stage_id = f"{kind}/{cell}"
    spec = serve_spec(plan.recipe, variant.name, plan.schemes[variant.name], target, gpu.name, "")
    image = f"forge.local/{plan.recipe.name}".lower() + f":{package.inputs.tag}" if package else None
    served = Served(variant.name, gpu.name, spec, target.tensor_parallel, image, package and package.id,
                    plan.recipe_dir, stage_id)  # fmt: skip
    inputs = KINDS[kind].Inputs(served, **settings)
    deps = {"model": export, **({"engine": engine} if engine else {}), **({"image": package} if package else {})}
    deferred = None
    if local_gpu(plan, gpu) and package is not None and package.status == "deferred":
        reason = f"it serves the image of {package.id}, which is deferred ({package.reason})"
        deferred = (reason, f"forge build {plan.recipe_file} --only {stage_id}  # after {package.id}")
    elif not local_gpu(plan, gpu):
        reason = f"needs an NVIDIA {gpu.name} ({gpu.sm}): {plan.local_gpus.reason or 'none of that architecture here'}"
        what = f"the image of {package.id}" if package else f"{spec.base_image} with the artifact mounted"
        command = f"forge build {plan.recipe_file} --only {stage_id}  # serves {what}: {shlex.join(spec.argv)}"
        deferred = (reason, command)
    return plan.add(stage_id, inputs, deps=deps, after=after, deferred=deferred)


def cpu_throughput_stages(plan: Plan, exports: dict[str, Stage], quantize: dict[str, Stage]) -> None:
    """Per variant: its compressed-tensors export served by `transformers serve` on this CPU."""
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
               "threads": cpu_threads()}  # fmt: skip
    for variant in plan.recipe.variants:
        # transformers loads compressed-tensors on CPU; the export is added if no target asked for it.
        export = export_stage(plan, exports, quantize[variant.name], "compressed-tensors", 1)
        stage_id = f"throughput/{variant.name}/cpu"
        inputs = throughput_kind.Inputs(Served(variant.name, CPU, label=stage_id), load_of(plan), "transformers",
                                        machine)  # fmt: skip
        plan.add(stage_id, inputs, deps={"model": export})


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
        "tasks": tuple(accuracy.tasks),
        "limit": accuracy.task_limit,
        "num_fewshot": accuracy.num_fewshot,
        "include_digests": bounded_file_digests(include, "validation.accuracy.task_include_path") if include else None,
        "include": include,
    }


def cpu_task_stages(plan: Plan, exports: dict[str, Stage], quantize: dict[str, Stage], tasks: dict) -> None:
    """lm-eval tasks against each variant's compressed-tensors export served on this machine by
    `transformers serve` (the same weights every backend's export holds)."""
    for variant in plan.recipe.variants:
        export = export_stage(plan, exports, quantize[variant.name], "compressed-tensors", 1)
        stage_id = f"tasks/{variant.name}/cpu"
        inputs = tasks_kind.Inputs(Served(variant.name, CPU, label=stage_id), **tasks)
        plan.add(stage_id, inputs, deps={"model": export}, after=("tasks/baseline",))


def engine_stage(plan: Plan, target: Target, variant: Variant, gpu: GPUProfile, export: Stage, cell: str) -> Stage:
    """A TensorRT engine for one GPU architecture: run where that GPU is, else deferred with the
    exact command a GPU builder runs (`forge build RECIPE --only engine/<cell>`)."""
    scheme = plan.schemes[variant.name]
    limits = trtllm.Limits.from_target(target)
    inputs = engine_kind.Inputs(variant.name, gpu.name, gpu.sm, limits, scheme, target.trtllm.version)
    stage_id = f"engine/{cell}"
    if local_gpu(plan, gpu):
        return plan.add(stage_id, inputs, deps={"export": export})
    reason = f"needs an NVIDIA {gpu.name} ({gpu.sm}): {plan.local_gpus.reason or 'none of that architecture here'}"
    # Paste-ready: absolute paths of the export this machine caches and of an engine directory beside
    # the artifacts (a relative path would resolve against wherever the line is pasted).
    checkpoint = plan.cache.entry("export", export.key).resolve() / "model"
    engine_dir = plan.cache.root.resolve().parent / plan.recipe.name / "engines" / cell
    build = trtllm.engine_build_command(checkpoint, engine_dir, limits, scheme, target.trtllm.version)
    command = f"forge build {plan.recipe_file} --only {stage_id}  # or run: {build}"
    return plan.add(stage_id, inputs, deps={"export": export}, deferred=(reason, command))
