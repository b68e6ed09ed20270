"""model-image: the artifact as a data-only OCI image (no base image, so it builds offline) plus
the Kubernetes and KServe manifests that serve it with the backend's official image."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from forge.digest import keep_memoized, regular_files, settled_clock
from forge.serving import ServeSpec
from forge.stages.base import Run, local

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    variant: str
    backend: str
    gpu: str
    spec: ServeSpec
    tag: str
    reference: str  # where the manifests pull it from
    name: str  # the manifests' object name
    gpus: int  # per replica (tensor parallelism)
    modelcar_base_digest: str | None  # package.modelcar_base: the shell layers KServe's modelcar needs
    modelcar_base: str | None = local()  # that image as it is pulled here (an `oci:` layout's path)


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `export` (the model directory), `engine` (TensorRT-LLM engine mode)."""
    import yaml

    from forge.model_image import build_model_image, deployment_manifests, inference_service

    spec, out = inputs.spec, run.out
    engine = run.deps["engine"] / "engine" if "engine" in run.deps else None
    before = {d: regular_files(d) for d in (run.deps["export"] / "model", engine) if d is not None}
    image = build_model_image(spec, run.deps["export"] / "model", engine, out, inputs.tag, inputs.reference,
                              inputs.modelcar_base)  # fmt: skip
    shutil.rmtree(out / "staged")  # hard links of the export: the layout holds the layers
    # Linking and unlinking gave the export's files new ctimes: the digest memo follows them, or the
    # next build reads the whole export again to verify it.
    for directory, stats in before.items():
        keep_memoized(stats, settled_clock(directory, marker=out / f".clock-{os.getpid()}"))
    deploy = out / "deploy"
    deploy.mkdir()
    manifests = deployment_manifests(spec, inputs.reference, inputs.name, inputs.gpu, inputs.gpus)
    (deploy / "kubernetes.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    isvc = inference_service(spec, inputs.reference, inputs.name, inputs.gpus, image["modelcar_ready"])
    (deploy / "kserve.yaml").write_text(yaml.safe_dump(isvc, sort_keys=False))
    return {**image, "variant": inputs.variant, "backend": inputs.backend, "gpu": inputs.gpu}
