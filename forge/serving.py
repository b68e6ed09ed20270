"""How one artifact is served: the container's command, port, health check, env and labels.

One `ServeSpec` feeds both the rendered Dockerfile (for `docker buildx`) and forge's daemonless
image config, so the two can never disagree about how the model is launched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from forge import __version__
from forge.backends import BACKENDS, base_image, export_format, trtllm
from forge.gpus import lookup_gpu
from forge.oci.layers import source_date_epoch
from forge.quant.scheme import Scheme
from forge.recipe import Recipe, Target

MODEL_DIR = "/models/model"
LAUNCH_DIR = "/models/launch"
ENGINE_DIR = "/models/engine"  # TensorRT-LLM engine mode: the engine beside the checkpoint's tokenizer


@dataclass(frozen=True)
class ServeSpec:
    backend: str
    base_image: str
    argv: list[str]
    port: int
    health_path: str
    user: str  # the backend module's USER: what its official image supports, one place for both builders
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    launch_files: dict[str, str] = field(default_factory=dict)  # name → content, under LAUNCH_DIR

    @property
    def healthcheck(self) -> list[str]:
        # python3 is in every backend image; curl is not.
        probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{self.port}{self.health_path}')"
        return ["python3", "-c", probe]


def created_timestamp() -> str:
    """RFC 3339 creation time from SOURCE_DATE_EPOCH (reproducible builds spec), else the epoch."""
    return datetime.fromtimestamp(source_date_epoch(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_labels(recipe: Recipe, variant: str, backend: str, gpu: str, revision: str) -> dict[str, str]:
    """OCI annotation keys (github.com/opencontainers/image-spec/blob/main/annotations.md)."""
    labels = {
        "org.opencontainers.image.created": created_timestamp(),
        "org.opencontainers.image.title": f"{recipe.name}-{variant}-{backend}",
        "org.opencontainers.image.description": recipe.description or f"{recipe.name} served by {backend}",
        "org.opencontainers.image.version": variant,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": "forge",
        "dev.forge.recipe": recipe.name,
        "dev.forge.variant": variant,
        "dev.forge.backend": backend,
        "dev.forge.gpu": gpu,
        "dev.forge.version": __version__,
    }
    return {**labels, **recipe.package.labels}


def serve_spec(recipe: Recipe, variant: str, scheme: Scheme, target: Target, gpu: str, revision: str) -> ServeSpec:
    backend = BACKENDS[target.backend]
    launch_files = {}
    argv = backend.serve_command(MODEL_DIR, scheme, target)
    if target.backend == "trtllm":
        plan = trtllm_serve_plan(recipe, scheme, target, gpu)
        argv, launch_files = plan.argv, {"trtllm-serve.yaml": plan.config_yaml}
    if recipe.source.trust_remote_code and backend.TRUST_REMOTE_CODE_FLAG:
        argv = [*argv, backend.TRUST_REMOTE_CODE_FLAG]
    return ServeSpec(
        backend=target.backend,
        base_image=recipe.package.base_images.get(target.backend, base_image(target.backend, target)),
        argv=argv,
        port=backend.PORT,
        health_path=backend.HEALTH_PATH,
        user=backend.USER,
        env={
            "HOME": "/tmp",
            "HF_HUB_OFFLINE": "1",
            "FORGE_MODEL_FORMAT": export_format(target.backend, scheme, target),
        },
        labels=image_labels(recipe, variant, target.backend, gpu, revision),
        launch_files=launch_files,
    )


def trtllm_serve_plan(recipe: Recipe, scheme: Scheme, target: Target, gpu: str) -> trtllm.ServePlan:
    """trtllm-serve argv plus its LLM API YAML, tuned for the recipe's throughput workload."""
    load = recipe.validation.throughput
    workload = trtllm.Workload(max(load.concurrency), load.prompt_tokens, load.output_tokens)
    engine = trtllm.resolve_mode(target.trtllm.mode, target.trtllm.version) == "engine"
    return trtllm.serve_plan(
        ENGINE_DIR if engine else MODEL_DIR, scheme, lookup_gpu(gpu), trtllm.Limits.from_target(target), workload,
        target.trtllm.mode, target.trtllm.version, config_path=f"{LAUNCH_DIR}/trtllm-serve.yaml",
        tokenizer_dir=MODEL_DIR if engine else None,
    )  # fmt: skip


# ---------------------------------------------------------------- serving on a GPU builder


def container_mounts(argv: list[str], directories: dict[str, Path | None]) -> list[tuple[Path, str]]:
    """(host directory, container directory) for each of `directories` (container dir → host dir) that
    the argv names, itself or a path under it: derived from the argv, so a file the command reads
    (trtllm-serve's YAML under LAUNCH_DIR, the tokenizer in MODEL_DIR beside an engine) is never
    left unmounted. A named directory with no host directory is a bug in the caller."""
    mounts = []
    for container, host in directories.items():
        if any(a == container or a.startswith(container + "/") for a in argv):
            if host is None:
                raise ValueError(f"the serving command reads {container}, which has nothing to mount")
            mounts.append((Path(host).resolve(), container))
    return mounts


def docker_run_argv(image: str, spec: ServeSpec, host_port: int, gpus: int,
                    mounts: list[tuple[Path, str]] | None = None) -> list[str]:  # fmt: skip
    """`docker run` of a serving container on 127.0.0.1:`host_port`. `mounts` None: `image` is the
    packaged image, run as built (its entrypoint, USER, files and HEALTHCHECK); otherwise the backend's
    base image with the artifact mounted read-only and `spec.argv` as the command (packaging off)."""
    argv = ["docker", "run", "--rm", "--init", "--gpus", "all" if gpus <= 0 else str(gpus), "--ipc", "host",
            "-p", f"127.0.0.1:{host_port}:{spec.port}"]  # fmt: skip
    if mounts is None:
        return [*argv, image]
    for host, container in mounts:
        argv += ["-v", f"{host}:{container}:ro"]
    return [*argv, "--entrypoint", spec.argv[0], image, *spec.argv[1:]]


@contextlib.contextmanager
def serve_command(command_for_port: Callable[[int], list[str]], spec: ServeSpec, log_path: Path, image: str):
    """Run `command_for_port(host_port)` (a `docker run`) until the block ends, once its health path
    answers; yields the loadgen's `RunningServer`.

    The docker client dies with this process (`start_server`), SIGKILL included, and its SIGTERM
    reaches the container (`docker run` proxies signals, `--init` passes them to the server), so
    a killed build leaves no container serving: `--rm` then removes it."""
    import shutil

    from forge.errors import InfraError
    from forge.loadgen.server import RunningServer, free_port, start_server, stop_process, wait_healthy

    if shutil.which("docker") is None:
        raise InfraError(f"serving {image} on a GPU needs a Docker engine; docker CLI not found")
    port = free_port()
    command = command_for_port(port)
    base_url = f"http://127.0.0.1:{port}"
    proc = start_server(command, log_path)
    try:
        wait_healthy(base_url, proc, log_path, 1800.0, spec.health_path, name=image)
        # Servers name the model by the path they load: the engine's, else the checkpoint's.
        model = ENGINE_DIR if ENGINE_DIR in spec.argv else MODEL_DIR
        yield RunningServer(base_url, model, command, log_path, proc.pid)
    finally:
        stop_process(proc, grace_s=60.0)


def skopeo_load_argv(layout: Path, tag: str, name: str) -> list[str]:
    """Copy the image from forge's OCI layout into the local Docker engine under `name:tag`
    (https://github.com/containers/skopeo/blob/main/docs/skopeo-copy.1.md: transports `oci:` and `docker-daemon:`)."""
    return ["skopeo", "copy", f"oci:{Path(layout).resolve()}:{tag}", f"docker-daemon:{name}:{tag}"]


def render_dockerfile(spec: ServeSpec, model_files: list[str], artifact: str, engine_files: list[str] = ()) -> str:
    """The Dockerfile `docker buildx build` would use, with the build context laid out as
    `model/<files>`, `engine/<files>` (a TensorRT-LLM engine, served from ENGINE_DIR) and
    `launch/<files>` (what `forge package --builder docker` writes)."""
    from forge.templating import render  # jinja2: only when an image is assembled, not for every plan

    return render(
        f"serving/{spec.backend}.Dockerfile.j2",
        {
            "forge_version": __version__,
            "artifact": artifact,
            "base_image": spec.base_image,
            "labels": spec.labels,
            "model_files": sorted(model_files),
            "model_dir": MODEL_DIR,
            "engine_files": sorted(engine_files),
            "engine_dir": ENGINE_DIR,
            "launch_files": sorted(spec.launch_files),
            "launch_dir": LAUNCH_DIR,
            "env": spec.env,
            "port": spec.port,
            "user": spec.user,
            "healthcheck": spec.healthcheck,
            "argv": spec.argv,
        },
    )
