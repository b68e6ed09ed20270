"""Serving images for artifacts: assemble without a daemon (default) or with docker buildx, and
push them with the build report and SLSA provenance attached as OCI 1.1 referrers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from forge.errors import InfraError
from forge.oci import registry
from forge.oci.image import ImageConfig, build_image
from forge.serving import LAUNCH_DIR, MODEL_DIR, ServeSpec, render_dockerfile

PROVENANCE_TYPE = "application/vnd.in-toto+json"  # in-toto attestation media type (in-toto/attestation spec)


def image_tag(template: str, variant: str, backend: str, gpu: str) -> str:
    return template.format(variant=variant, backend=backend, gpu=gpu)


def write_build_context(spec: ServeSpec, model_dir: Path, out: Path, artifact: str) -> Path:
    """`out/context/`: Dockerfile, `model/` (hard links) and `launch/` files, ready for buildx."""
    context = out / "context"
    (context / "launch").mkdir(parents=True)
    shutil.copytree(model_dir, context / "model", copy_function=os.link)
    for name, text in spec.launch_files.items():
        (context / "launch" / name).write_text(text)
    model_files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    (context / "Dockerfile").write_text(render_dockerfile(spec, model_files, artifact))
    return context


def package_artifact(spec: ServeSpec, model_dir: Path, out: Path, tag: str, artifact: str, builder: str) -> dict:
    """Build the serving image into the OCI layout `out/layout` tagged `tag`."""
    context = write_build_context(spec, model_dir, out, artifact)
    layout_dir = out / "layout"
    if builder == "docker":
        return buildx_image(context, layout_dir, tag)
    config = ImageConfig(
        entrypoint=spec.argv,
        cmd=[],
        env=spec.env,
        exposed_ports=[spec.port],
        labels=spec.labels,
        user="root" if spec.backend == "trtllm" else "1000:1000",
        title=spec.labels.get("org.opencontainers.image.title"),
        description=spec.labels.get("org.opencontainers.image.description"),
        version=spec.labels.get("org.opencontainers.image.version"),
        revision=spec.labels.get("org.opencontainers.image.revision"),
        source=spec.labels.get("org.opencontainers.image.source"),
        model_path=MODEL_DIR,
        launch_path=LAUNCH_DIR,
    )
    launch = context / "launch" if spec.launch_files else None
    result = build_image(spec.base_image, model_dir, launch, config, layout_dir, tag)
    return {
        "builder": "daemonless",
        "tag": tag,
        "digest": result.manifest.digest,
        "base": result.base,
        "base_digest": result.base_digest,
        "layers": len(result.layers),
    }


def buildx_image(context: Path, layout_dir: Path, tag: str) -> dict:
    """`docker buildx build` of the rendered context into an OCI layout (needs a Docker engine)."""
    if shutil.which("docker") is None:
        raise InfraError("package.builder: docker needs a Docker engine with buildx; docker CLI not found")
    archive = layout_dir.with_suffix(".tar")
    command = ["docker", "buildx", "build", "--output", f"type=oci,dest={archive},tar=true", str(context)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise InfraError(f"docker buildx build failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    layout_dir.mkdir()
    shutil.unpack_archive(archive, layout_dir, "tar")
    archive.unlink()
    index = json.loads((layout_dir / "index.json").read_text())
    return {"builder": "docker", "tag": tag, "digest": index["manifests"][0]["digest"]}


def push_artifact(layout_dir: Path, source_tag: str, registry_host: str, repository: str, tags: list[str]) -> dict:
    """Push one image under every tag; credentials come from the environment or docker config."""
    reference = f"{registry_host}/{repository}:{tags[0]}"
    credentials = registry.resolve_credentials(registry_host)
    result = registry.push_image(layout_dir, reference, source_tag=source_tag, tags=tags[1:], credentials=credentials)
    return {
        "reference": reference,
        "digest": result.digest,
        "tags": list(result.tags),
        "bytes_uploaded": result.bytes_uploaded,
        "blobs_uploaded": result.blobs_uploaded,
        "blobs_skipped": result.blobs_skipped,
    }


def attach_documents(reference: str, documents: dict[str, bytes]) -> dict[str, str]:
    """Attach each document (artifact type → bytes) to the pushed image; returns their digests."""
    credentials = registry.resolve_credentials(reference.split("/", 1)[0])
    return {
        artifact_type: registry.attach_referrer(
            reference, data, artifact_type=artifact_type, credentials=credentials
        ).digest
        for artifact_type, data in documents.items()
    }
