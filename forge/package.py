"""Serving images for artifacts: assemble without a daemon (default) or with docker buildx, and
push them with the build report and SLSA provenance attached as OCI 1.1 referrers.

Who gets which credentials: FORGE_REGISTRY_USERNAME / FORGE_REGISTRY_PASSWORD go to
`package.registry` only (pushes, its referrers, a base image or `forge verify` on that same
registry); every other registry (the default base images on Docker Hub or ghcr.io, a
`forge verify` elsewhere) is asked anonymously unless docker's config.json has an entry for
exactly that host. `package.insecure_registries` relaxes TLS per registry; SSL_CERT_FILE names a
CA bundle to trust instead of the system's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from forge.errors import InfraError, InputError
from forge.oci import registry
from forge.oci.image import ImageConfig, build_image, local_base_digest, split_oci_base
from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, ServeSpec, render_dockerfile

PROVENANCE_TYPE = "application/vnd.in-toto+json"  # in-toto attestation media type (in-toto/attestation spec)
CREATED = "org.opencontainers.image.created"  # on each referrer, so verify can tell the newest

# Resolving a base image's tag at plan time: a plan must stay fast, so one short try, and a
# registry (or DNS) that does not answer in time leaves the stage keyed on the name.
PLAN_RESOLVE_TIMEOUT_S = 10.0


def _env_seconds(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"{name}: {raw!r} is not a positive number of seconds")
    return value


def registry_options(host: str, insecure_registries: Iterable[str] = (), **overrides) -> registry.RegistryOptions:
    """The options forge talks to `host` with: `package.insecure_registries` applied, and the
    read timeout and whole-operation deadline from FORGE_REGISTRY_TIMEOUT_S /
    FORGE_REGISTRY_DEADLINE_S when set."""
    settings = dict(overrides)
    timeout, deadline = _env_seconds("FORGE_REGISTRY_TIMEOUT_S"), _env_seconds("FORGE_REGISTRY_DEADLINE_S")
    if timeout is not None:
        settings.setdefault("timeout_s", timeout)
    if deadline is not None:
        settings.setdefault("deadline_s", deadline)
    return registry.RegistryOptions(**settings).for_host(host, insecure_registries)


def write_build_context(
    spec: ServeSpec, model_dir: Path, out: Path, artifact: str, engine_dir: Path | None = None
) -> Path:
    """`out/context/`: Dockerfile, `model/` and `engine/` (hard links) and `launch/` files, ready for buildx."""
    context = out / "context"
    (context / "launch").mkdir(parents=True)
    shutil.copytree(model_dir, context / "model", copy_function=os.link)
    if engine_dir is not None:
        shutil.copytree(engine_dir, context / "engine", copy_function=os.link)
    for name, text in spec.launch_files.items():
        (context / "launch" / name).write_text(text)
    model_files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    engine_files = (
        sorted(str(p.relative_to(engine_dir)) for p in engine_dir.rglob("*") if p.is_file()) if engine_dir else []
    )
    (context / "Dockerfile").write_text(render_dockerfile(spec, model_files, artifact, engine_files))
    return context


def package_artifact(
    spec: ServeSpec, model_dir: Path, out: Path, tag: str, artifact: str, builder: str,
    base: dict | None = None, push_registry: str | None = None, insecure_registries: Iterable[str] = (),
    engine_dir: Path | None = None,
) -> dict:  # fmt: skip
    """Build the serving image into the OCI layout `out/layout` tagged `tag`. `base` is what
    `resolve_base` found at plan time (the image to build from, pinned to its digest when it
    resolved); `push_registry` (package.registry) is the one registry the environment's
    credentials may be sent to. `engine_dir`: a TensorRT-LLM engine, one layer per file under
    ENGINE_DIR, where the image's trtllm-serve loads it."""
    layout_dir = out / "layout"
    if builder == "docker":
        source = (base or {}).get("image") or spec.base_image  # pinned `name@digest` when it resolved
        contexts = {}
        if source.startswith("oci:"):  # a Dockerfile cannot say `FROM oci:…`: a named context can
            contexts[BASE_CONTEXT] = oci_layout_context(source, (base or {}).get("digest"))
            source = BASE_CONTEXT
        context = write_build_context(dataclasses.replace(spec, base_image=source), model_dir, out, artifact,
                                      engine_dir)  # fmt: skip
        return buildx_image(context, layout_dir, tag, contexts)
    context = write_build_context(spec, model_dir, out, artifact, engine_dir)
    config = ImageConfig(
        entrypoint=spec.argv,
        cmd=[],
        env=spec.env,
        exposed_ports=[spec.port],
        labels=spec.labels,
        user=spec.user,
        title=spec.labels.get("org.opencontainers.image.title"),
        description=spec.labels.get("org.opencontainers.image.description"),
        version=spec.labels.get("org.opencontainers.image.version"),
        revision=spec.labels.get("org.opencontainers.image.revision"),
        source=spec.labels.get("org.opencontainers.image.source"),
        model_path=MODEL_DIR,
        launch_path=LAUNCH_DIR,
    )
    launch = context / "launch" if spec.launch_files else None
    files_root, files_path = model_dir, MODEL_DIR
    if engine_dir is not None:  # model/ and engine/ side by side under /models, each file its own layer
        files_root, files_path = out / "files", str(PurePosixPath(MODEL_DIR).parent)
        files_root.mkdir()
        for name, path in ((PurePosixPath(MODEL_DIR).name, model_dir), (PurePosixPath(ENGINE_DIR).name, engine_dir)):
            shutil.copytree(path, files_root / name, copy_function=os.link)
        config = dataclasses.replace(config, model_path=files_path)
    source = (base or {}).get("image") or spec.base_image
    credentials = options = None
    if not source.startswith("oci:"):
        host = registry.parse_reference(source).host
        credentials = registry.credentials_for(host, push_registry)
        options = registry_options(host, insecure_registries)
    result = build_image(source, files_root, launch, config, layout_dir, tag, credentials=credentials,
                         registry_options=options)  # fmt: skip
    facts = {
        "builder": "daemonless",
        "tag": tag,
        "digest": result.manifest.digest,
        "base": spec.base_image,
        "base_digest": result.base_digest,
        "layers": len(result.layers),
    }
    if base and base.get("digest"):
        facts["base_resolved"] = base["digest"]  # what the tag (or layout) named at plan time
    return facts


# The Dockerfile's `FROM` for a base given as a local OCI layout, bound by `--build-context`.
BASE_CONTEXT = "forge-base"


def oci_layout_context(source: str, digest: str | None) -> str:
    """buildx's named-context form of `oci:PATH[:TAG]`: `oci-layout://PATH[:TAG]`, by tag when the
    recipe names one (buildx 0.33 mis-parses a digest-only layout reference: docker/buildx#3793),
    else by the manifest digest resolved at plan time.
    https://docs.docker.com/reference/cli/docker/buildx/build/#build-context"""
    path, tag = split_oci_base(source)
    return f"oci-layout://{Path(path).resolve()}" + (f":{tag}" if tag else f"@{digest}" if digest else "")


def buildx_image(context: Path, layout_dir: Path, tag: str, contexts: dict[str, str] | None = None) -> dict:
    """`docker buildx build` of the rendered context into an OCI layout (needs a Docker engine);
    `contexts`: named build contexts (`--build-context NAME=VALUE`), e.g. a base image's OCI layout."""
    if shutil.which("docker") is None:
        raise InfraError("package.builder: docker needs a Docker engine with buildx; docker CLI not found")
    archive = layout_dir.with_suffix(".tar")
    command = ["docker", "buildx", "build", "--output", f"type=oci,dest={archive},tar=true"]
    for name, value in (contexts or {}).items():
        command += ["--build-context", f"{name}={value}"]
    command.append(str(context))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise InfraError(f"docker buildx build failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    layout_dir.mkdir()
    shutil.unpack_archive(archive, layout_dir, "tar")
    archive.unlink()
    index = json.loads((layout_dir / "index.json").read_text())
    return {"builder": "docker", "tag": tag, "digest": index["manifests"][0]["digest"]}


def push_artifact(
    layout_dir: Path, source_tag: str, registry_host: str, repository: str, tags: list[str],
    insecure_registries: Iterable[str] = (),
) -> dict:  # fmt: skip
    """Push one image under every tag to package.registry; credentials come from the
    environment or docker config."""
    reference = f"{registry_host}/{repository}:{tags[0]}"
    credentials = registry.credentials_for(registry_host, registry_host)
    options = registry_options(registry_host, insecure_registries)
    result = registry.push_image(layout_dir, reference, source_tag=source_tag, tags=tags[1:], credentials=credentials,
                                 options=options)  # fmt: skip
    return {
        "reference": reference,
        "digest": result.digest,
        "tags": list(result.tags),
        "bytes_uploaded": result.bytes_uploaded,
        "blobs_uploaded": result.blobs_uploaded,
        "blobs_skipped": result.blobs_skipped,
    }


def attach_documents(
    reference: str, documents: dict[str, bytes], insecure_registries: Iterable[str] = ()
) -> dict[str, str]:
    """Attach each document (artifact type → bytes) to the image pushed to package.registry, in
    order, each annotated with when it was attached (so `forge verify` checks the newest pair
    after a re-push); returns their digests."""
    host = registry.parse_reference(reference).host
    credentials = registry.credentials_for(host, host)
    options = registry_options(host, insecure_registries)
    attached = {}
    for artifact_type, data in documents.items():
        annotations = {CREATED: attach_time()}
        attached[artifact_type] = registry.attach_referrer(
            reference, data, artifact_type=artifact_type, annotations=annotations, credentials=credentials,
            options=options,
        ).digest  # fmt: skip
    return attached


def attach_time() -> str:
    """RFC 3339 UTC with microseconds: sorts as text, and two attachments never tie."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def load_into_docker(source: str, name: str, what: str) -> str:
    """Copy the image `source` (`oci:PATH[:TAG]`) into the local Docker engine as `name` (NAME:TAG)
    with skopeo, so `docker run` can start it: docker has no transport for OCI layouts
    (skopeo-copy(1), transports `oci:` and `docker-daemon:`:
    https://github.com/containers/skopeo/blob/main/docs/skopeo-copy.1.md). Returns `name`."""
    if shutil.which("skopeo") is None:
        raise InfraError(f"{what}: loading {source} into Docker as {name} needs skopeo; skopeo not found")
    path, tag = split_oci_base(source)
    argv = ["skopeo", "copy", f"oci:{Path(path).resolve()}" + (f":{tag}" if tag else ""), f"docker-daemon:{name}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise InfraError(f"{what}: skopeo could not load {source} into Docker as {name} ({done.returncode}): "
                         f"{done.stderr.strip()[-500:]}")  # fmt: skip
    return name


def daemon_name_for_base(source: str, backend: str) -> str:
    """The name a base image given as `oci:PATH[:TAG]` gets in the Docker engine: per backend and tag."""
    return f"forge.local/base-{backend}:{split_oci_base(source)[1] or 'latest'}"


# ---------------------------------------------------------------- the base image, at plan time


def resolve_base(
    base_image: str, recipe_dir: Path, push_registry: str | None = None, insecure_registries: Iterable[str] = ()
) -> dict:
    """What the package stage builds from and is keyed on, decided at plan time.

    `oci:PATH[:TAG]`: PATH relative to the recipe's directory; keyed on the manifest digest of
    the layout's image (so changing the layout rebuilds the image). A registry reference: its
    tag resolved to a manifest digest, built from `name@digest`, so a re-tagged base is noticed
    by the next plan. When the registry cannot be reached within PLAN_RESOLVE_TIMEOUT_S (or
    FORGE_OFFLINE=1) the stage is keyed on the name, and `note` says so.

    `unreachable` says why when no connection could be made at all (refused, DNS, timeout, or
    FORGE_OFFLINE): the plan then defers a stage that would have to pull it (package_stage),
    unless its entry is cached. A registry that answered badly is not unreachable: the stage runs
    and its pull fails (exit 3).

    Returns {"image": what build_image pulls, "digest": the key (or None), "note": …, "unreachable": …}."""
    if base_image.startswith("oci:"):
        path, tag = split_oci_base(base_image)
        root = path if path.is_absolute() else (Path(recipe_dir) / path).resolve()
        image = f"oci:{root}" + (f":{tag}" if tag else "")
        return {"image": image, "digest": local_base_digest(root, tag), "note": None, "unreachable": None}
    reference = registry.parse_reference(base_image)
    if reference.digest:
        return {"image": base_image, "digest": reference.digest, "note": None, "unreachable": None}
    if os.environ.get("FORGE_OFFLINE", "").strip() not in ("", "0"):
        why, unreachable = "FORGE_OFFLINE is set", True
    else:
        digest, why, unreachable = _resolve_tag(base_image, reference.host, push_registry, insecure_registries)
        if digest:
            return {"image": f"{base_image}@{digest}", "digest": digest, "note": None, "unreachable": None}
    note = (f"base {base_image} keyed on its name, not its digest ({why}); a re-tagged base is not noticed "
            "until it resolves")  # fmt: skip
    return {"image": base_image, "digest": None, "note": note, "unreachable": why if unreachable else None}


def _resolve_tag(
    ref: str, host: str, push_registry: str | None, insecure_registries: Iterable[str]
) -> tuple[str | None, str, bool]:
    """(digest, "", False) or (None, why not, whether the registry was unreachable), within
    PLAN_RESOLVE_TIMEOUT_S whatever DNS does: the lookup runs on a daemon thread that is abandoned
    when late (a lookup with no answer at all counts as unreachable)."""
    answer: dict = {}
    options = registry_options(
        host, insecure_registries, retries=0, connect_timeout_s=PLAN_RESOLVE_TIMEOUT_S / 2,
        timeout_s=PLAN_RESOLVE_TIMEOUT_S / 2, deadline_s=PLAN_RESOLVE_TIMEOUT_S,
    )  # fmt: skip

    def work() -> None:
        try:
            credentials = registry.credentials_for(host, push_registry)
            answer["digest"] = registry.resolve_image(ref, credentials=credentials, options=options)
        except registry.RegistryUnreachable as error:
            answer["why"], answer["unreachable"] = str(error), True
        except (InfraError, InputError) as error:
            answer["why"] = str(error)

    worker = threading.Thread(target=work, name=f"resolve {ref}", daemon=True)
    worker.start()
    worker.join(PLAN_RESOLVE_TIMEOUT_S + 1.0)
    if "digest" in answer:
        return answer["digest"], "", False
    if "why" in answer:
        return None, answer["why"], answer.get("unreachable", False)
    return None, f"no answer from {host} within {PLAN_RESOLVE_TIMEOUT_S:g} s", True


def pull_base_hint(base_image: str, name: str, key: str) -> str:
    """How to build offline instead: copy the base into a local OCI layout once, where it can be
    pulled, and name that layout in the recipe's `key` (skopeo-copy(1): `docker://` source,
    `oci:PATH:TAG` destination, https://github.com/containers/skopeo/blob/main/docs/skopeo-copy.1.md)."""
    local = f"oci:bases/{name}:{registry.parse_reference(base_image).tag or 'latest'}"
    return f"skopeo copy docker://{base_image} {local} (in the recipe's directory), then set {key}: {local}"


def sign_pushed(reference: str, key, insecure_registries: Iterable[str] = ()) -> dict:
    """Sign the image pushed to package.registry (`host/repository@sha256:…`), cosign's way."""
    from forge.oci.signing import sign_image

    host = registry.parse_reference(reference).host
    return sign_image(reference, key, credentials=registry.credentials_for(host, host),
                      options=registry_options(host, insecure_registries))  # fmt: skip
