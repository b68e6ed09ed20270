"""Model images: the artifact as a data-only OCI image, and the manifests that serve it.

Platform teams increasingly ship weights beside the backend's official serving image instead of
inside it. A model image holds no OS and needs no base image, so forge builds it offline:

    /models/model/<file>    one uncompressed layer per model file (a changed shard re-uploads alone)
    /models/engine/<file>   TensorRT-LLM engine mode: the engine, one layer per file
    /models/launch/         serve.sh (the backend's argv), README.md, the backend's config files

The paths are the ones every backend's argv already names (`forge.serving.MODEL_DIR`, ...), so the
same argv runs against:

- a Kubernetes image volume (https://kubernetes.io/docs/concepts/storage/volumes/#image) mounted
  at /models with `subPath: models` (`deployment_manifests`);
- a KServe modelcar (https://kserve.github.io/website/docs/model-serving/storage/providers/oci):
  KServe runs `sh -c "ln -sf /proc/$$/root/models /mnt/ && sleep infinity"` inside the model image
  and the server reads /mnt/models. That command needs `sh`, `ln` and `sleep`, which a data-only
  image lacks: `package.modelcar_base` (a busybox image) adds them as the one extra layer set.

Reproducible: layers and config take their times from SOURCE_DATE_EPOCH, so the same artifact
gives the same digest in any directory, on any machine.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from forge.ci import GFD_PRODUCT_LABEL, GFD_PRODUCTS, GPU_RESOURCE
from forge.oci.image import ImageConfig, build_image
from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, ServeSpec

IMAGE_ROOT = "/models"  # KServe's modelcar links this directory of the image to /mnt/models
KSERVE_ROOT = "/mnt/models"
IMAGE_VOLUME = "model"  # the Deployment's volume name
MODEL_IMAGE_TYPE = "dev.forge.model-image"  # label naming what the image is (no entrypoint to run)


def launch_files(spec: ServeSpec, image_ref: str) -> dict[str, str]:
    """The backend's own launch files plus serve.sh (its argv) and a README saying how to run it."""
    argv = shlex.join(spec.argv)
    serve = f'#!/bin/sh\n# Run inside {spec.base_image} with this image at {IMAGE_ROOT}.\nexec {argv} "$@"\n'
    readme = (
        f"# {image_ref}\n\n"
        f"Model files for `{spec.backend}` (data only: no OS, no entrypoint).\n\n"
        f"- Kubernetes image volume: mount this image at `{IMAGE_ROOT}` with `subPath: models` in a container of\n"
        f"  `{spec.base_image}` and run `{argv}` (port {spec.port}, health `{spec.health_path}`).\n"
        f"- KServe modelcar: `storageUri: oci://{image_ref}`; the server reads `{KSERVE_ROOT}`. KServe runs `sh`,\n"
        "  `ln` and `sleep` inside this image: build it with `package.modelcar_base` for that.\n"
    )
    return {**spec.launch_files, "serve.sh": serve, "README.md": readme}


def build_model_image(
    spec: ServeSpec, model_dir: Path, engine_dir: Path | None, out: Path, tag: str, image_ref: str,
    modelcar_base: str | None = None,
) -> dict:  # fmt: skip
    """The model image of one artifact, written to the OCI layout `out/layout` under `tag`."""
    launch = out / "launch"
    launch.mkdir(parents=True)
    for name, text in launch_files(spec, image_ref).items():
        (launch / name).write_text(text)
    (launch / "serve.sh").chmod(0o755)
    staged = out / "staged"  # the image's /models tree, hard links to the artifact's files
    _link_tree(model_dir, staged / Path(MODEL_DIR).name)
    if engine_dir is not None:
        _link_tree(engine_dir, staged / Path(ENGINE_DIR).name)
    labels = {**spec.labels, MODEL_IMAGE_TYPE: "true", "dev.forge.format": spec.env["FORGE_MODEL_FORMAT"]}
    config = ImageConfig(
        labels=labels,
        annotations={k: v for k, v in labels.items() if k.startswith("dev.forge.")},
        title=labels.get("org.opencontainers.image.title"),
        description=labels.get("org.opencontainers.image.description"),
        version=labels.get("org.opencontainers.image.version"),
        revision=labels.get("org.opencontainers.image.revision"),
        source=labels.get("org.opencontainers.image.source"),
        model_path=IMAGE_ROOT,
        launch_path=LAUNCH_DIR,
    )
    result = build_image(modelcar_base, staged, launch, config, out / "layout", tag)
    return {
        "tag": tag,
        "reference": image_ref,
        "digest": result.manifest.digest,
        "layers": len(result.layers),
        "modelcar_base": modelcar_base,
        "modelcar_ready": modelcar_base is not None,
    }


def _link_tree(source: Path, dest: Path) -> None:
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.hardlink_to(path)


def _kserve_path(arg: str) -> str:
    return KSERVE_ROOT + arg[len(IMAGE_ROOT) :] if arg.startswith(IMAGE_ROOT + "/") else arg


def deployment_manifests(spec: ServeSpec, image_ref: str, name: str, gpu: str, gpus: int) -> list[dict]:
    """A Deployment running the backend's official image with the model image as an image volume
    (Kubernetes ≥ 1.35, where image volumes are beta and on by default), and its Service."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "forge"}
    probe = {"httpGet": {"path": spec.health_path, "port": spec.port}, "periodSeconds": 10}
    products = GFD_PRODUCTS.get(gpu, ())
    pod = {
        "containers": [{
            "name": spec.backend,
            "image": spec.base_image,
            "command": [spec.argv[0]],
            "args": spec.argv[1:],
            "env": [{"name": k, "value": v} for k, v in sorted(spec.env.items())],
            "ports": [{"name": "http", "containerPort": spec.port}],
            "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
            "volumeMounts": [{"name": IMAGE_VOLUME, "mountPath": IMAGE_ROOT, "subPath": IMAGE_ROOT.strip("/"),
                              "readOnly": True}],
            # Loading weights takes minutes: the startup probe holds liveness off until the server answers.
            "startupProbe": {**probe, "failureThreshold": 180},
            "readinessProbe": probe,
            "livenessProbe": probe,
        }],
        "volumes": [{"name": IMAGE_VOLUME, "image": {"reference": image_ref, "pullPolicy": "IfNotPresent"}}],
    }  # fmt: skip
    if products:
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": GFD_PRODUCT_LABEL, "operator": "In", "values": list(products)}]}
        ]}}}  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": spec.port, "targetPort": "http"}]},
    }
    return [deployment, service]


def inference_service(spec: ServeSpec, image_ref: str, name: str, gpus: int, modelcar_ready: bool) -> dict:
    """A KServe InferenceService serving the model image as a modelcar (`storageUri: oci://`).

    A custom predictor container named `kserve-container` with STORAGE_URI is how KServe attaches
    storage to a container it did not define (https://kserve.github.io/website/docs/model-serving/
    storage/storage-containers); the argv reads the model under /mnt/models."""
    annotations = {}
    if not modelcar_ready:
        annotations["forge.dev/modelcar"] = "data-only image: set package.modelcar_base to add sh/ln/sleep"
    argv = [_kserve_path(a) for a in spec.argv]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
        "spec": {
            "predictor": {
                "containers": [{
                    "name": "kserve-container",
                    "image": spec.base_image,
                    "command": [argv[0]],
                    "args": argv[1:],
                    "env": [{"name": "STORAGE_URI", "value": f"oci://{image_ref}"},
                            *({"name": k, "value": v} for k, v in sorted(spec.env.items()))],
                    "ports": [{"containerPort": spec.port, "protocol": "TCP"}],
                    "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                    "readinessProbe": {"httpGet": {"path": spec.health_path, "port": spec.port}},
                }],
            }
        },
    }  # fmt: skip
