"""Render a plan as CI work: a GitHub Actions matrix, a GitLab child pipeline, Kubernetes Jobs.

A release pipeline runs `forge build` once on an ordinary CPU runner (source, baseline,
quantize, export, accuracy: every stage that needs no GPU and whose inputs are shared by many
cells), then fans out one job per (variant, backend, GPU) cell for the stages that need that
GPU (engine builds, lm-eval tasks, throughput), each running `forge build RECIPE --only <stage>` against the
shared stage cache. These renderers turn the plan into that fan-out; the plan stays the source
of truth, so impossible cells are listed with their reason rather than silently dropped.

Only stages the plan marks `run` or `deferred` are dispatched: `cached` ones are done (they are
listed, not dispatched, so no GPU runner is held for them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import yaml

from forge import __version__
from forge.errors import InputError
from forge.gpus import lookup_gpu
from forge.plan import Plan, serving_name

FORMATS = ("github-matrix", "gitlab", "k8s")

# Stage kinds that need the artifact's GPU; everything else runs on the CPU build.
GPU_STAGE_KINDS = frozenset({"engine", "tasks", "throughput"})
DISPATCHED = frozenset({"run", "deferred"})

CPU_RUNNER = "ubuntu-latest"
DEFAULT_IMAGE = f"forge:{__version__}"
DEFAULT_CACHE_CLAIM = "forge-cache"
DEFAULT_WORKDIR = "/forge/workspace"

# "A matrix will generate a maximum of 256 jobs per workflow run."
# https://docs.github.com/en/actions/writing-workflows/workflow-syntax-for-github-actions#jobsjob_idstrategymatrix
GITHUB_MATRIX_LIMIT = 256

# `nvidia.com/gpu.product` as NVIDIA GPU feature discovery publishes it: the NVML device name with
# spaces replaced by dashes (k8s-device-plugin internal/lm/resource.go, productLabel). NVML names as
# nvidia-smi prints them, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB", "Tesla T4".
# One profile covers several board variants, so the Jobs match any of them (nodeAffinity `In`).
# Time-sliced/MPS-shared GPUs get a "-SHARED" suffix and MIG slices "-MIG-<profile>"; forge wants
# whole GPUs and does not match those.
GFD_PRODUCTS: dict[str, tuple[str, ...]] = {
    "T4": ("Tesla-T4",),
    "A10G": ("NVIDIA-A10G",),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
    "A100-40GB": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    "A100-80GB": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "H200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "B200": ("NVIDIA-B200",),
}
GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's extended resource


@dataclass(frozen=True)
class CellWork:
    """The GPU stages of one planned (variant, backend, GPU) cell that a GPU runner must run."""

    variant: str
    backend: str
    gpu: str
    format: str | None
    tensor_parallel: int
    export_stage: str | None
    stages: tuple[str, ...]
    target: int = 0  # index in recipe.targets
    mode: str | None = None  # TensorRT-LLM's engine | pytorch

    @property
    def serving(self) -> str:
        return serving_name(self.backend, self.mode)

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.serving}/{self.gpu}"


def gpu_work(plan: Plan) -> list[CellWork]:
    """Cells with at least one GPU stage to dispatch, in plan order."""
    cells = []
    for artifact in plan.artifacts:
        if artifact.status != "planned":
            continue
        stages = [plan.stage(sid) for sid in artifact.stages]
        run = tuple(s.id for s in stages if s.kind in GPU_STAGE_KINDS and s.status in DISPATCHED)
        if run:
            cells.append(
                CellWork(
                    artifact.variant,
                    artifact.backend,
                    artifact.gpu,
                    artifact.format,
                    artifact.tensor_parallel,
                    artifact.export_stage,
                    run,
                    artifact.target,
                    artifact.mode,
                )
            )
    return cells


def excluded_cells(plan: Plan) -> list[dict]:
    """Impossible (variant, backend, GPU) combinations with the compatibility table's reason."""
    return [
        {"variant": a.variant, "backend": a.backend, "mode": a.mode, "gpu": a.gpu, "reason": a.reason}
        for a in plan.artifacts
        if a.status == "impossible"
    ]


def undispatched_gpu_stages(plan: Plan) -> list[dict]:
    """GPU stages no job is created for (cached), and why."""
    return [
        {"stage": s.id, "status": s.status, "reason": s.reason}
        for s in plan.stages
        if s.kind in GPU_STAGE_KINDS and s.status not in DISPATCHED
    ]


def runner_labels(gpu: str, tensor_parallel: int = 1) -> list[str]:
    """Self-hosted runner labels for a GPU profile: `[self-hosted, gpu, h100]` (+ `gpus-N` for tp > 1).

    A job's `runs-on` list matches runners that carry every label
    (https://docs.github.com/en/actions/hosting-your-own-runners/managing-self-hosted-runners/using-labels-with-self-hosted-runners);
    register each GPU runner with these labels (`./config.sh --labels gpu,h100,gpus-2`).
    """
    labels = ["self-hosted", "gpu", gpu.lower()]
    if tensor_parallel > 1:
        labels.append(f"gpus-{tensor_parallel}")
    return labels


# ---------------------------------------------------------------- GitHub Actions


def github_matrix(plan: Plan) -> dict:
    """`{"matrix": {"include": [...]}, "jobs": N, "excluded": [...], "not_dispatched": [...]}`.

    `matrix` goes straight into `strategy.matrix: ${{ fromJSON(needs.plan.outputs.ci).matrix }}`.
    The excluded list sits beside it, not inside: GitHub turns every matrix key other than
    `include`/`exclude` into a dimension and multiplies the jobs by it, and an `exclude` entry
    whose keys are not dimensions is an error. An empty `include` is an error too ("Matrix must
    define at least one vector"), so workflows guard the job with `if: fromJSON(...).jobs > 0`.
    https://docs.github.com/en/actions/writing-workflows/choosing-what-your-workflow-does/running-variations-of-jobs-in-a-workflow
    """
    include = [
        {
            "name": cell.name,
            "variant": cell.variant,
            "backend": cell.backend,
            "gpu": cell.gpu,
            "format": cell.format,
            "tensor_parallel": cell.tensor_parallel,
            "runs_on": runner_labels(cell.gpu, cell.tensor_parallel),
            "stages": list(cell.stages),
        }
        for cell in gpu_work(plan)
    ]
    if len(include) > GITHUB_MATRIX_LIMIT:
        raise InputError(
            f"targets: {len(include)} GPU cells exceed GitHub's {GITHUB_MATRIX_LIMIT}-job matrix limit; "
            "split the recipe or its targets"
        )
    return {
        "matrix": {"include": include},
        "jobs": len(include),
        "cpu_runner": CPU_RUNNER,
        "excluded": excluded_cells(plan),
        "not_dispatched": undispatched_gpu_stages(plan),
    }


# ---------------------------------------------------------------- GitLab CI


def gitlab_job_name(cell: CellWork) -> str:
    # Job names may hold `/` and `:` and run up to 255 characters (https://docs.gitlab.com/ci/jobs/#job-names).
    return f"gpu {cell.name}"


def gitlab_pipeline(plan: Plan, recipe: str, *, image: str = DEFAULT_IMAGE, build_job: str = "build") -> dict:
    """A child pipeline with one job per GPU cell, for `trigger: include: - artifact:`.

    Each job runs on a runner tagged `gpu` + the GPU's name (a job runs on a runner that has every
    tag it lists, https://docs.gitlab.com/ci/yaml/#tags) and `needs` the parent pipeline's CPU build
    job so it starts after it and gets its artifacts (`needs:pipeline:job` with the parent's
    `PARENT_PIPELINE_ID`, https://docs.gitlab.com/ci/yaml/#needspipelinejob). The stage cache is
    shared through GitLab's cache (distributed cache on S3/GCS for several runners) or a volume.
    """
    jobs: dict[str, dict] = {}
    for cell in gpu_work(plan):
        only = [arg for stage in cell.stages for arg in ("--only", stage)]
        command = " ".join(["forge", "build", quote(recipe), "--json", *only, "> build.json"])
        jobs[gitlab_job_name(cell)] = {
            "stage": "gpu",
            "tags": runner_labels(cell.gpu, cell.tensor_parallel)[1:],  # GitLab has no "self-hosted" tag
            "needs": [{"pipeline": "$PARENT_PIPELINE_ID", "job": build_job}],
            "variables": {
                "FORGE_VARIANT": cell.variant,
                "FORGE_BACKEND": cell.backend,
                "FORGE_GPU": cell.gpu,
                "FORGE_TENSOR_PARALLEL": str(cell.tensor_parallel),
            },
            "script": [command],
            "after_script": [
                "forge report build.json --junit > junit.xml",
                "forge report build.json --markdown > summary.md",
            ],
            "artifacts": {
                "when": "always",
                "paths": ["build.json", "summary.md"],
                "reports": {"junit": "junit.xml"},
            },
        }
    if not jobs:
        # A child pipeline without a visible job fails to be created; say why there is no GPU work.
        jobs["no gpu work"] = {
            "stage": "gpu",
            "script": ["echo 'forge: no GPU stage to run for this recipe (forge plan RECIPE --json says why)'"],
        }
    # Hidden keys (leading dot) are not run by GitLab (https://docs.gitlab.com/ci/jobs/#hide-a-job):
    # they keep the plan's impossible cells and idle GPU stages visible in the file itself. GitLab
    # refuses a hidden key whose value is blank ("config can't be blank": Entry::Hidden validates
    # presence), so an empty list is left out rather than written as `[]`.
    # https://gitlab.com/gitlab-org/gitlab/-/blob/master/lib/gitlab/ci/config/entry/hidden.rb
    hidden = {".forge-excluded": excluded_cells(plan), ".forge-not-dispatched": undispatched_gpu_stages(plan)}
    return {
        "stages": ["gpu"],
        "default": {"image": image},
        "variables": {"FORGE_CACHE_DIR": "$CI_PROJECT_DIR/.forge-cache"},
        "cache": {"key": "forge-stage-cache", "paths": [".forge-cache/"]},
        **{key: value for key, value in hidden.items() if value},
        **jobs,
    }


# ---------------------------------------------------------------- Kubernetes


def k8s_name(*parts: str) -> str:
    """A Job name that is a DNS-1123 label of at most 63 characters.

    Job names end up in the `batch.kubernetes.io/job-name` pod label, so they must be no longer
    than 63 characters (https://kubernetes.io/docs/concepts/workloads/controllers/job/#writing-a-job-spec).
    Long names keep a digest suffix so two cells never collide.
    """
    raw = "-".join(parts).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if len(name) > 63:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    return name


def k8s_label_value(value: str) -> str:
    """Label values: ≤ 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63]
    return cleaned.strip("-_.")


def k8s_manifests(
    plan: Plan,
    recipe: str,
    *,
    image: str = DEFAULT_IMAGE,
    cache_claim: str = DEFAULT_CACHE_CLAIM,
    workdir: str = DEFAULT_WORKDIR,
    backoff_limit: int = 2,
) -> list[dict]:
    """One `batch/v1` Job per GPU cell (and a ConfigMap beside it for the server's launch files).

    A pod has no Docker daemon, so no container runs `forge build` (whose GPU stages shell out to
    `docker run`): each stage runs directly in the image that does the work, on the shared volume
    where the CPU build left the stage cache (`<mount>/cache/<kind>/<key>/`):

    - engine: an init container in the TensorRT-LLM image runs `trtllm-build` from the export's
      checkpoint in the cache into `<mount>/artifacts/<job>/engine`;
    - throughput / tasks: a server runs as a native sidecar (an init container with
      `restartPolicy: Always`, started before and stopped after the main containers; its
      startupProbe gates them), and forge's load generator (`forge bench`, the forge image) or
      lm-eval measures it over 127.0.0.1. A plain second main container would keep the pod, and so
      the Job, running after the measurement ended. With packaging on, the server is the image
      forge packaged for the cell, run as built, so a gate is about the released image
      (`packaged_image`: pulled from package.registry, staged there under a `-candidate` tag by the
      command in the Job's `forge/image-staging` annotation); with packaging off, or for an engine
      this pod builds, it is the backend's own image with the artifact mounted from the volume.
      https://kubernetes.io/docs/concepts/workloads/pods/sidecar-containers/

    A cell's stages share one pod because they depend on each other (the throughput of a
    TensorRT-LLM engine needs the engine) and Jobs have no ordering between them. The volume must
    be ReadWriteMany when Jobs land on several nodes. Results go to `<mount>/artifacts/<job>/`.
    Field reference: https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/
    """
    from forge.backends import trtllm
    from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, serve_spec

    mount = PurePosixPath(workdir).parent
    manifests = []
    for cell in gpu_work(plan):
        name = k8s_name("forge", plan.recipe.name, cell.variant, cell.serving, cell.gpu)
        products = GFD_PRODUCTS.get(cell.gpu)
        if products is None:
            raise InputError(f"targets: no {GFD_PRODUCT_LABEL} label known for GPU {cell.gpu}")
        labels = {
            "app.kubernetes.io/name": "forge",
            "app.kubernetes.io/component": "gpu-stage",
            "app.kubernetes.io/version": k8s_label_value(__version__),
            "forge/recipe": k8s_label_value(plan.recipe.name),
            "forge/variant": k8s_label_value(cell.variant),
            "forge/backend": k8s_label_value(cell.backend),
            "forge/gpu": k8s_label_value(cell.gpu),
        }
        target = plan.targets[cell.target]  # limits fitted to the model (plan.fit_targets)
        scheme = plan.schemes[cell.variant]
        kinds = {plan.stage(sid).kind: sid for sid in cell.stages}
        export = plan.stage(cell.export_stage) if cell.export_stage else None
        if export is None:
            raise InputError(f"targets: cell {cell.name} has GPU stages but no export to run them on")
        # subPaths on the one volume (https://kubernetes.io/docs/concepts/storage/volumes/#using-subpath)
        model_sub = f"cache/{export.kind}/{export.key}/model"
        out_sub = f"artifacts/{name}"
        gpus = {"limits": {GPU_RESOURCE: cell.tensor_parallel}}
        init: list[dict] = []
        main: list[dict] = []
        config_map = None
        if "engine" in kinds:
            limits = trtllm.Limits.from_target(target)
            init.append({
                "name": "engine",
                "image": trtllm.image(target.trtllm.version),
                "command": trtllm.build_argv(MODEL_DIR, ENGINE_DIR, limits, scheme),
                "resources": gpus,
                "volumeMounts": [
                    {"name": "forge", "mountPath": MODEL_DIR, "subPath": model_sub, "readOnly": True},
                    {"name": "forge", "mountPath": ENGINE_DIR, "subPath": f"{out_sub}/engine"},
                ],
            })  # fmt: skip
        measures = [kind for kind in ("tasks", "throughput") if kind in kinds]
        package = next((s for s in plan.stages if s.id == f"package/{cell.name}"), None)
        annotations = {"forge/stages": " ".join(cell.stages), "forge/cell": cell.name}
        if measures:
            spec = serve_spec(plan.recipe, cell.variant, scheme, target, cell.gpu, plan.revision)
            mounts = [{"name": "forge", "mountPath": MODEL_DIR, "subPath": model_sub, "readOnly": True}]
            served = ENGINE_DIR if ENGINE_DIR in spec.argv else MODEL_DIR
            # The image that is released, as built (entrypoint, USER, files), when packaging is on and
            # it can exist before the pod starts (an engine this pod builds is not in any image yet).
            image_ref = None
            if package is not None and package.status in ("run", "cached") and "engine" not in kinds:
                image_ref, staging = packaged_image(plan, package, mount)
                annotations["forge/image"] = image_ref
                annotations["forge/image-staging"] = staging
            elif spec.base_image.startswith("oci:"):
                instead = ("or set package.enabled: true so the Job serves the packaged image" if package is None
                           else f"the Job serves it because {package.id} is not built before the pod runs")  # fmt: skip
                raise InputError(
                    f"package.base_images.{cell.backend}: {spec.base_image} is a local OCI layout, which a "
                    f"Kubernetes node cannot pull; name a registry image ({instead})"
                )
            elif package is not None:
                why = "carries the engine this pod builds" if "engine" in kinds else f"is {package.status}"
                annotations["forge/served"] = f"{spec.base_image} with the artifact mounted: {package.id} {why}"
        if measures and image_ref is not None:
            init.append(server_container(image_ref, spec, gpus))  # no command: the image's own entrypoint
            volumes_extra = []
        elif measures:
            if ENGINE_DIR in spec.argv:
                # The engine this pod builds, or the one a GPU builder left in the cache.
                built = next(s for s in plan.stages if s.id == f"engine/{cell.name}")
                engine_sub = f"{out_sub}/engine" if "engine" in kinds else f"cache/engine/{built.key}/engine"
                mounts.append({"name": "forge", "mountPath": ENGINE_DIR, "subPath": engine_sub, "readOnly": True})
            volumes_extra = []
            if spec.launch_files:
                config_map = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name, "labels": dict(labels)},
                    "data": dict(spec.launch_files),
                }
                mounts.append({"name": "launch", "mountPath": LAUNCH_DIR, "readOnly": True})
                volumes_extra.append({"name": "launch", "configMap": {"name": name}})
            env = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
            init.append(server_container(spec.base_image, spec, gpus, command=spec.argv, env=env, volumeMounts=mounts))
        if measures:
            endpoint = f"http://127.0.0.1:{spec.port}"
            tokenizer = f"{mount}/{model_sub}"
            forge_env = [{"name": "FORGE_CACHE_DIR", "value": f"{mount}/cache"}]
            forge_mounts = [{"name": "forge", "mountPath": str(mount)}]
            if "tasks" in kinds:
                step = {
                    "name": "tasks",
                    "image": image,
                    "command": tasks_command(plan, recipe, workdir, endpoint, served, tokenizer,
                                             f"{mount}/{out_sub}/tasks"),
                    "workingDir": workdir,
                    "env": forge_env,
                    "volumeMounts": forge_mounts,
                }  # fmt: skip
                # lm-eval before the load sweep, so neither measures the server under the other's load.
                (init if "throughput" in kinds else main).append(step)
            if "throughput" in kinds:
                main.append({
                    "name": "loadgen",
                    "image": image,
                    "command": bench_command(plan, cell, endpoint, served, tokenizer, f"{mount}/{out_sub}/throughput"),
                    "workingDir": workdir,
                    "env": forge_env,
                    "volumeMounts": forge_mounts,
                })  # fmt: skip
        else:
            volumes_extra = []
        if not main:
            # Only an engine to build: it is the pod's one container.
            main, init = init[-1:], init[:-1]
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": GFD_PRODUCT_LABEL, "operator": "In", "values": list(products)}]}
                    ]
                }
            }
        }
        pod: dict = {
            "restartPolicy": "Never",
            "affinity": affinity,
            # GPU node pools are commonly tainted so that only GPU work lands there.
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        }
        if init:
            pod["initContainers"] = init
        pod["containers"] = main
        pod["volumes"] = [{"name": "forge", "persistentVolumeClaim": {"claimName": cache_claim}}, *volumes_extra]
        if config_map:
            manifests.append(config_map)
        manifests.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": annotations,
                },
                "spec": {
                    "backoffLimit": backoff_limit,
                    "podFailurePolicy": {"rules": pod_failure_rules([c["name"] for c in init + main])},
                    "ttlSecondsAfterFinished": 7 * 24 * 3600,
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod},  # a copy: no YAML anchors
                },
            }
        )
    return manifests


def packaged_image(plan: Plan, package, mount: PurePosixPath) -> tuple[str, str]:
    """(reference the Job's server pulls, the command that puts it there) for a cell's packaged image.

    A node pulls from a registry, and `forge push` publishes only after every gate passed, so the
    image is staged for measurement under a `-candidate` tag of package.repository, copied from the
    layout the CPU build left in the cache with its digest preserved; the Job pins that digest once
    the package stage is cached (its `stage.json`), else it names the candidate tag."""
    recipe_package = plan.recipe.package
    if not recipe_package.registry:
        raise InputError(
            "package.registry: Kubernetes Jobs serve the image forge packaged for each cell, which the cluster "
            "pulls from a registry; set package.registry and package.repository (or package.enabled: false to "
            "serve the backend's image with the artifact mounted)"
        )
    name = f"{recipe_package.registry}/{recipe_package.repository}"
    tag = package.inputs.tag
    facts = plan.cache.entry(package.kind, package.key) / "stage.json"
    digest = json.loads(facts.read_text()).get("digest") if package.status == "cached" and facts.is_file() else None
    reference = f"{name}@{digest}" if digest else f"{name}:{tag}-candidate"
    layout = f"{mount}/cache/{package.kind}/{package.key}/layout"
    # skopeo-copy(1): https://github.com/containers/skopeo/blob/main/docs/skopeo-copy.1.md
    staging = f"skopeo copy --preserve-digests oci:{layout}:{tag} docker://{name}:{tag}-candidate"
    return reference, staging


def k8s_jobs(plan: Plan, recipe: str, **options) -> list[dict]:
    """The Jobs of `k8s_manifests`, without their ConfigMaps."""
    return [m for m in k8s_manifests(plan, recipe, **options) if m["kind"] == "Job"]


# Exit codes that fail the same way on a retry, per container. `forge bench`: 1 a gate failed,
# 2 bad arguments (3, no request succeeded, is worth a retry: the server may have died on a bad
# node). trtllm-build and lm_eval are Python programs: 2 is argparse refusing the command line;
# trtllm-build's 1 is an exception in the build (unsupported config, out of memory), which a
# retry repeats. lm_eval's 1 also covers an unreachable server, so it is retried.
# Needs restartPolicy Never. https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy
FATAL_EXIT_CODES = {"loadgen": [1, 2], "engine": [1, 2], "tasks": [2]}


def pod_failure_rules(containers: list[str]) -> list[dict]:
    rules = [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": name, "operator": "In", "values": FATAL_EXIT_CODES[name]},
        }
        for name in containers
        if name in FATAL_EXIT_CODES
    ]
    return [*rules, {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]


def server_container(image: str, spec, gpus: dict, **extra) -> dict:
    """The serving container of a Job, as a native sidecar (an init container that keeps running)
    that the load generator waits for through its startup probe."""
    return {
        "name": "server",
        "image": image,
        "restartPolicy": "Always",
        "ports": [{"name": "http", "containerPort": spec.port}],
        "securityContext": {"runAsUser": k8s_user_id(spec.user)},
        # Loading a large model takes minutes; the probe gives it up to 30 minutes.
        "startupProbe": {"httpGet": {"path": spec.health_path, "port": spec.port}, "periodSeconds": 10,
                         "failureThreshold": 180},
        "resources": gpus,
        **extra,
    }  # fmt: skip


def k8s_user_id(user: str) -> int:
    """`runAsUser` for a backend's USER (`root` or `uid[:gid]`)."""
    return 0 if user == "root" else int(user.split(":")[0])


def bench_command(plan: Plan, cell: CellWork, endpoint: str, model: str, tokenizer: str, out: str) -> list[str]:
    """`forge bench` with the recipe's throughput settings and gates (what the throughput stage runs)."""
    load = plan.recipe.validation.throughput
    from forge.backends import RECORDS

    flavor = RECORDS[cell.backend].loadgen_flavor
    argv = [
        "forge", "bench", "--endpoint", endpoint, "--model", model, "--tokenizer", tokenizer,
        "--flavor", flavor, "--concurrency", ",".join(map(str, load.concurrency)),
        "--prompt-tokens", str(load.prompt_tokens), "--output-tokens", str(load.output_tokens),
        "--requests", str(load.requests_per_level), "--gpus", str(cell.tensor_parallel), "--out", out, "--json",
    ]  # fmt: skip
    gates = {"--max-ttft-p99-ms": load.max_ttft_p99_ms, "--max-tpot-p99-ms": load.max_tpot_p99_ms,
             "--min-output-tps": load.min_output_tps, "--min-goodput": load.min_goodput}  # fmt: skip
    for option, value in gates.items():
        if value is not None:
            argv += [option, f"{value:g}"]
    price = load.usd_per_hour.get(cell.gpu, lookup_gpu(cell.gpu).usd_per_hour)  # as stages.gates.throughput_price
    if price:
        argv += ["--gpu-usd-per-hour", f"{price:g}"]
    return argv


def tasks_command(
    plan: Plan, recipe: str, workdir: str, endpoint: str, model: str, tokenizer: str, out: str
) -> list[str]:
    """`lm_eval` against the served artifact, as the tasks stage runs it (forge.eval.lm_eval)."""
    from forge.eval.lm_eval import lm_eval_command

    accuracy = plan.recipe.validation.accuracy
    include = None
    if accuracy.task_include_path:
        include = str(PurePosixPath(workdir) / PurePosixPath(recipe).parent / accuracy.task_include_path)
    argv = lm_eval_command(
        f"{endpoint}/v1/completions", model, tokenizer, accuracy.tasks, out,
        num_fewshot=accuracy.num_fewshot, limit=accuracy.task_limit, include_path=include,
    )  # fmt: skip
    return ["python3", *argv[1:]]  # the pod's interpreter, not this machine's sys.executable


# ---------------------------------------------------------------- rendering


def quote(word: str) -> str:
    """Quote a word for a POSIX shell only when it needs it (keeps generated scripts readable)."""
    if re.fullmatch(r"[A-Za-z0-9_./@%+=:,-]+", word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def render_matrix(
    plan: Plan,
    fmt: str,
    recipe: str,
    *,
    image: str = DEFAULT_IMAGE,
    cache_claim: str = DEFAULT_CACHE_CLAIM,
    workdir: str = DEFAULT_WORKDIR,
) -> str:
    """The text `forge plan RECIPE --format FMT` prints.

    `github-matrix` is one line of JSON, so a step can write it to `$GITHUB_OUTPUT` as `ci=<json>`;
    `gitlab` is a child-pipeline YAML file; `k8s` is a multi-document YAML stream of Jobs for
    `kubectl apply -f -`. `recipe` is the recipe path as the runner or pod will see it.
    """
    if fmt == "github-matrix":
        return json.dumps(github_matrix(plan), separators=(",", ":")) + "\n"
    header = f"# Generated by forge {__version__} from {recipe} (recipe {plan.recipe.name}); do not edit.\n"
    if fmt == "gitlab":
        pipeline = gitlab_pipeline(plan, recipe, image=image)
        return header + yaml.safe_dump(pipeline, sort_keys=False, width=1000, allow_unicode=True)
    if fmt == "k8s":
        jobs = k8s_manifests(plan, recipe, image=image, cache_claim=cache_claim, workdir=workdir)
        if not jobs:
            return header + "# no GPU stage to run for this recipe\n"
        return header + yaml.safe_dump_all(jobs, sort_keys=False, width=1000, allow_unicode=True)
    raise InputError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
