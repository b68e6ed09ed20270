"""Pulling: manifests (verified, junk refused), blobs (digest-checked on the way), one platform of an image."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from forge.errors import InfraError, InputError
from forge.oci import layout
from forge.oci.layout import Descriptor
from forge.oci.registry.auth import Credentials, parse_reference
from forge.oci.registry.transport import Registry, RegistryOptions, _repository_scope

DEFAULT_PLATFORM = "linux/amd64"


_MANIFEST_ACCEPT = ", ".join([*layout.MANIFEST_TYPES, *layout.INDEX_TYPES])


# Image configs are a few KiB; anything this large is not one.
_MAX_CONFIG = 16 << 20


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))

    def json(self) -> dict:
        return json.loads(self.data)


def _remote_json(reg: Registry, data: bytes, what: str) -> dict:
    """A JSON object the registry served: anything else (HTML from a proxy, a truncated or junk
    body) is the registry's failure, exit 3, never a traceback."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        start = data[:40].decode("utf-8", "replace").strip()
        raise InfraError(f"registry {reg.host}: {what} is not a JSON object (starts {start!r})")
    return doc


def _remote_descriptor(reg: Registry, entry: object, what: str) -> Descriptor:
    if not isinstance(entry, Mapping):
        raise InfraError(f"registry {reg.host}: {what}: malformed descriptor {entry!r:.80}")
    try:
        return Descriptor.from_json(entry)
    except InputError as e:
        raise InfraError(f"registry {reg.host}: {what}: {e}") from None


def fetch_manifest(reg: Registry, repository: str, reference: str) -> FetchedManifest:
    """GET a manifest or index by tag or digest; a digest reference is verified against the body.
    A body that is not a manifest (junk, HTML, a wrong media type) is an InfraError naming the
    registry and image."""
    name = f"{repository}{'@' if reference.startswith('sha256:') else ':'}{reference}"
    with reg.phase(f"fetching manifest {name}"):
        resp = reg.request("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": _MANIFEST_ACCEPT})
    digest = layout.sha256_digest(resp.body)
    expected = reference if reference.startswith("sha256:") else resp.headers.get("Docker-Content-Digest")
    if expected and expected != digest:
        raise InfraError(f"registry {reg.host}: manifest {name} does not match digest {expected}")
    doc = _remote_json(reg, resp.body, f"manifest {name}")
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    if not media_type or media_type in ("application/json", "application/octet-stream", "text/plain"):
        media_type = doc.get("mediaType", "") if isinstance(doc.get("mediaType"), str) else ""
    if media_type not in (*layout.MANIFEST_TYPES, *layout.INDEX_TYPES):
        raise InfraError(f"registry {reg.host}: {name} is not an image manifest or index (type {media_type!r})")
    key = "manifests" if media_type in layout.INDEX_TYPES else "layers"
    if not isinstance(doc.get(key), list) or (key == "layers" and not isinstance(doc.get("config"), Mapping)):
        raise InfraError(f"registry {reg.host}: manifest {name} has no valid {key!r}")
    return FetchedManifest(resp.body, media_type, digest)


def fetch_blob(reg: Registry, repository: str, digest: str, dest: Path) -> None:
    """Downloads a blob to `dest` through a temporary file, verifying its digest on the way."""
    layout.check_digest(digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".pull-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with reg.phase(f"downloading blob {digest[:19]}…"):
            resp = reg.request("GET", f"/v2/{repository}/blobs/{digest}", download_to=tmp)
        if f"sha256:{resp.body_sha256}" != digest:
            raise InfraError(f"registry {reg.host}: blob {digest} arrived with a different digest")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def select_platform(index: Mapping, platform: str) -> Descriptor:
    """The index entry for `os/arch[/variant]` (image-spec image-index.md, `platform`)."""
    os_name, _, arch_variant = platform.partition("/")
    arch, _, variant = arch_variant.partition("/")
    available = []
    for entry in index.get("manifests", []):
        desc = Descriptor.from_json(entry)
        plat = desc.platform or {}
        available.append(f"{plat.get('os', '?')}/{plat.get('architecture', '?')}")
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            if not variant or plat.get("variant") in (None, variant):
                return desc
    raise InputError(f"no {platform} image in the index (has: {', '.join(available) or 'nothing'})")


def pull_image(
    ref: str,
    out_layout: Path,
    *,
    platform: str = DEFAULT_PLATFORM,
    credentials: Credentials | None = None,
    options: RegistryOptions | None = None,
) -> Descriptor:
    """Copies one platform's image (manifest, config, layers) from a registry into an OCI layout,
    skipping blobs already there. Returns the manifest's descriptor; the layout's index.json is
    left alone (the caller decides what to tag).

    Anonymous unless `credentials` are given or docker's config.json has an entry for exactly
    this registry: FORGE_REGISTRY_USERNAME/PASSWORD are not read here (a base image's registry is
    not the one forge pushes to). A registry serving junk raises InfraError naming it."""
    options = options or RegistryOptions()
    reference = parse_reference(ref)
    layout.init_layout(out_layout)
    with Registry(reference.host, credentials=credentials, options=options, operation=f"pull of {ref}") as reg:
        reg.authenticate([_repository_scope(reference.repository, "pull")])
        fetched = fetch_manifest(reg, reference.repository, reference.reference)
        if fetched.media_type in layout.INDEX_TYPES:
            index = fetched.json()
            for entry in index["manifests"]:
                _remote_descriptor(reg, entry, f"index of {ref}")
            layout.write_blob(out_layout, fetched.data)
            chosen = select_platform(index, platform)
            fetched = fetch_manifest(reg, reference.repository, chosen.digest)
            if fetched.media_type not in layout.MANIFEST_TYPES:
                kind = fetched.media_type
                raise InfraError(f"registry {reg.host}: {ref}: its {platform} entry is a {kind}, not a manifest")
        manifest = fetched.json()
        what = f"manifest of {ref}"
        config = _remote_descriptor(reg, manifest["config"], what)
        blobs = [config] + [_remote_descriptor(reg, d, what) for d in manifest["layers"]]
        reg.expect_bytes(sum(d.size for d in blobs))
        missing = [d for d in blobs if not layout.blob_path(out_layout, d.digest).exists()]
        _run_parallel(
            lambda d: fetch_blob(reg, reference.repository, d.digest, layout.blob_path(out_layout, d.digest)),
            missing,
            options.parallel,
        )
        if config.size > _MAX_CONFIG:
            raise InfraError(f"registry {reg.host}: {ref}: image config of {config.size} bytes is not an image config")
        _remote_json(reg, layout.blob_path(out_layout, config.digest).read_bytes(), f"image config of {ref}")
        layout.write_blob(out_layout, fetched.data)
        os_name, _, arch = platform.partition("/")
        return Descriptor(
            fetched.media_type,
            fetched.digest,
            len(fetched.data),
            platform={"os": os_name, "architecture": arch.split("/")[0]},
        )


def _run_parallel(fn: Callable, items: Sequence, workers: int) -> list:
    """Runs `fn` over `items` on a thread pool; the first failure cancels what has not started."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def resolve_image(ref: str, *, credentials: Credentials | None = None, options: RegistryOptions | None = None) -> str:
    """The manifest digest a tag (or digest) reference points at now: a HEAD's
    `Docker-Content-Digest` where the registry sends one (Docker Hub counts GETs, not HEADs,
    against its pull rate limit: https://docs.docker.com/docker-hub/usage/pulls/), else the
    digest of the manifest fetched."""
    reference = parse_reference(ref)
    with Registry(reference.host, credentials=credentials, options=options or RegistryOptions(),
                  operation=f"resolving {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull")])
        path = f"/v2/{reference.repository}/manifests/{reference.reference}"
        with reg.phase(f"resolving {ref}"):
            head = reg.request("HEAD", path, headers={"Accept": _MANIFEST_ACCEPT}, ok=(200, 404, 405))
        digest = head.headers.get("Docker-Content-Digest", "") if head.status == 200 else ""
        if digest.startswith("sha256:") and not reference.digest:
            try:
                return layout.check_digest(digest)
            except InputError:
                pass  # a malformed header: the manifest itself decides
        return fetch_manifest(reg, reference.repository, reference.reference).digest
