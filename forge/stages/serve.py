"""What a measuring stage (lm-eval tasks, a load sweep) serves, and the server it starts for it.

Shared by `tasks` and `throughput`: on the CPU `transformers serve`; on a GPU builder the packaged
image itself when packaging is on (so a passing gate is about the artifact that is released), else
the backend's base image with the artifact mounted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from forge.loadgen.server import SharedServer
from forge.serving import ServeSpec
from forge.stages.base import local

CPU = "cpu"


@dataclass(frozen=True)
class Served:
    variant: str | None  # None: the source itself (the lm-eval baseline's reference run)
    gpu: str  # CPU: `transformers serve` on this machine; else the GPU profile, in the backend's container
    spec: ServeSpec | None = None  # GPU: the backend's command, image, port and health path
    gpus: int = 1  # GPUs per replica (tensor parallelism): the container's --gpus and the price per replica
    image: str | None = None  # packaging on: the name:tag the packaged image is loaded into Docker as
    image_stage: str | None = local()  # the package stage that built it, for the record
    recipe_dir: Path | None = local()  # packaging off: an `oci:` base image's path is relative to it
    label: str = local("")  # names the stage in messages


def serve_artifact(
    served: Served, model_dir: Path, engine_dir: Path | None, out: Path, image: Path | None = None,
    shared: SharedServer | None = None,
):  # fmt: skip
    """The artifact's server, as a context manager: on the CPU `transformers serve` with the export's
    weights served dense (`dense_copy`; the baseline serves the source as it is), by the build's
    `shared` server when there is one; on a GPU builder the
    packaged image (`image`: its OCI layout, loaded into the Docker engine with skopeo); with packaging
    off, the backend's base image with every directory its command names mounted."""
    from forge.loadgen import serve_transformers
    from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, container_mounts, docker_run_argv, serve_command

    if served.gpu == CPU:
        from forge.loadgen.server import check_serving_installed

        check_serving_installed()
        if shared is not None:
            dense = model_dir if served.variant is None else shared_dense_copy(model_dir, shared)
            return shared.serving(dense, out / "server.log")
        dense = model_dir if served.variant is None else dense_copy(model_dir, out / "served-model")
        return serve_transformers(dense, out / "server.log")
    spec = served.spec
    if image is not None:
        return serve_image(served, image, out)
    launch = out / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    for name, text in spec.launch_files.items():
        (launch / name).write_text(text)
    mounts = container_mounts(spec.argv, {MODEL_DIR: model_dir, ENGINE_DIR: engine_dir, LAUNCH_DIR: launch})
    base = spec.base_image
    if base.startswith("oci:"):  # package.base_images as a local layout: docker runs images, not layouts
        from forge.package import daemon_name_for_base, load_into_docker, resolve_base

        source = resolve_base(base, served.recipe_dir)["image"]  # PATH anchored at the recipe's directory
        base = load_into_docker(source, daemon_name_for_base(source, spec.backend), served.label)
    return serve_command(lambda port: docker_run_argv(base, spec, port, served.gpus, mounts), spec,
                         out / "server.log", base)  # fmt: skip


def serve_image(served: Served, layout: Path, out: Path):
    """Load the packaged image into the Docker engine (skopeo) and serve it as built."""
    from forge.package import load_into_docker
    from forge.serving import docker_run_argv, serve_command

    tag = served.image.rpartition(":")[2]  # the layout's tag, which it is loaded under
    load_into_docker(f"oci:{layout}:{tag}", served.image, f"{served.label}: serving the packaged image")
    return serve_command(lambda port: docker_run_argv(served.image, served.spec, port, served.gpus), served.spec,
                         out / "server.log", served.image)  # fmt: skip


def served_as(served: Served, image: Path | None) -> str:
    """What the measurement ran against, for the record: the gate is about the released image only then."""
    if served.gpu == CPU:
        return "transformers serve on this CPU (the export's weights)"
    if image is not None:
        return f"the packaged image ({served.image_stage})"
    return "the backend's base image with the artifact mounted (package.enabled is off: no image to measure)"


def shared_dense_copy(export_dir: Path, shared: SharedServer) -> Path:
    """`dense_copy` of an export made once per build, in the shared server's scratch directory: a
    variant's lm-eval tasks and its load sweep serve the same weights. The export is a cache entry,
    named by its content, so its path names the copy; a copy is complete once renamed into place."""
    import hashlib

    out = shared.scratch() / hashlib.sha256(str(export_dir.resolve()).encode()).hexdigest()[:16]
    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        dense_copy(export_dir, partial).rename(out)
    return out


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
