"""Render a plan as CI work: a GitHub Actions matrix, a GitLab child pipeline, Kubernetes Jobs.

A release pipeline runs `forge build` once on an ordinary CPU runner (source, baseline,
quantize, export, accuracy: every stage that needs no GPU and whose inputs are shared by many
cells), then fans out one job per (variant, backend, GPU) cell for the stages that need that
GPU (engine builds, lm-eval tasks, throughput), each running `forge build RECIPE --only <stage>` against the
shared stage cache. These renderers turn the plan into that fan-out; the plan stays the source
of truth, so impossible cells are listed with their reason rather than silently dropped.

Only stages the plan marks `run` or `deferred` are dispatched: `cached` ones are done,
`not-implemented` and `disabled` ones have nothing to run (they are listed, not dispatched, so
no GPU runner is held for them).
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
from forge.plan import Artifact, Plan

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

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.backend}/{self.gpu}"


def tensor_parallel_of(plan: Plan, artifact: Artifact) -> int:
    """The GPUs per replica of the target that produced `artifact` (Artifact does not carry it)."""
    for target in plan.recipe.targets:
        if target.backend != artifact.backend:
            continue
        if target.variants is not None and artifact.variant not in target.variants:
            continue
        if any((profile := lookup_gpu(g)) is not None and profile.name == artifact.gpu for g in target.gpus):
            return target.tensor_parallel
    return 1


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
                    tensor_parallel_of(plan, artifact),
                    artifact.export_stage,
                    run,
                )
            )
    return cells


def excluded_cells(plan: Plan) -> list[dict]:
    """Impossible (variant, backend, GPU) combinations with the compatibility table's reason."""
    return [
        {"variant": a.variant, "backend": a.backend, "gpu": a.gpu, "reason": a.reason}
        for a in plan.artifacts
        if a.status == "impossible"
    ]


def undispatched_gpu_stages(plan: Plan) -> list[dict]:
    """GPU stages no job is created for (cached, not implemented, disabled), and why."""
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
            "script": ["echo 'forge: no GPU stage to run for this recipe (see .forge-not-dispatched)'"],
        }
    return {
        "stages": ["gpu"],
        "default": {"image": image},
        "variables": {"FORGE_CACHE_DIR": "$CI_PROJECT_DIR/.forge-cache"},
        "cache": {"key": "forge-stage-cache", "paths": [".forge-cache/"]},
        # Hidden keys (leading dot) are not run by GitLab (https://docs.gitlab.com/ci/jobs/#hide-a-job):
        # they keep the plan's impossible cells and idle GPU stages visible in the file itself.
        ".forge-excluded": excluded_cells(plan),
        ".forge-not-dispatched": undispatched_gpu_stages(plan),
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


def k8s_jobs(
    plan: Plan,
    recipe: str,
    *,
    image: str = DEFAULT_IMAGE,
    cache_claim: str = DEFAULT_CACHE_CLAIM,
    workdir: str = DEFAULT_WORKDIR,
    backoff_limit: int = 2,
) -> list[dict]:
    """One `batch/v1` Job per GPU cell, running that cell's GPU stages in order on one pod.

    A cell's stages go in one pod because they depend on each other (the throughput of a
    TensorRT-LLM engine needs the engine) and Jobs have no ordering between them. The shared
    volume holds the workspace (the recipe and its relative paths), the stage cache and the
    per-cell outputs; it must be ReadWriteMany when Jobs land on several nodes.
    Field reference: https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/
    """
    mount = str(PurePosixPath(workdir).parent)
    jobs = []
    for cell in gpu_work(plan):
        name = k8s_name("forge", plan.recipe.name, cell.variant, cell.backend, cell.gpu)
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
        command = ["forge", "build", recipe, "--json", "--artifacts-dir", f"{mount}/artifacts/{name}"]
        for stage in cell.stages:
            command += ["--only", stage]
        container = {
            "name": "forge",
            "image": image,
            "command": command,
            "workingDir": workdir,
            "env": [{"name": "FORGE_CACHE_DIR", "value": f"{mount}/cache"}],
            "resources": {"limits": {GPU_RESOURCE: cell.tensor_parallel}},
            "volumeMounts": [{"name": "forge", "mountPath": mount}],
        }
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": GFD_PRODUCT_LABEL, "operator": "In", "values": list(products)}]}
                    ]
                }
            }
        }
        jobs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {"forge/stages": " ".join(cell.stages), "forge/cell": cell.name},
                },
                "spec": {
                    "backoffLimit": backoff_limit,
                    # Exit 1 (a gate failed) and 2 (bad input) fail the same way on a retry; exit 3
                    # (infrastructure) and evictions are worth retrying. Needs restartPolicy Never.
                    # https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy
                    "podFailurePolicy": {
                        "rules": [
                            {
                                "action": "FailJob",
                                "onExitCodes": {"containerName": "forge", "operator": "In", "values": [1, 2]},
                            },
                            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                        ]
                    },
                    "ttlSecondsAfterFinished": 7 * 24 * 3600,
                    "template": {
                        "metadata": {"labels": dict(labels)},  # a copy: no YAML anchors
                        "spec": {
                            "restartPolicy": "Never",
                            "affinity": affinity,
                            # GPU node pools are commonly tainted so that only GPU work lands there.
                            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
                            "containers": [container],
                            "volumes": [{"name": "forge", "persistentVolumeClaim": {"claimName": cache_claim}}],
                        },
                    },
                },
            }
        )
    return jobs


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
        jobs = k8s_jobs(plan, recipe, image=image, cache_claim=cache_claim, workdir=workdir)
        if not jobs:
            return header + "# no GPU stage to run for this recipe\n"
        return header + yaml.safe_dump_all(jobs, sort_keys=False, width=1000, allow_unicode=True)
    raise InputError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
