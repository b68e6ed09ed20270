"""The OCI image layout on disk: `oci-layout`, `index.json` and `blobs/sha256/<hex>`
(https://github.com/opencontainers/image-spec/blob/v1.1.0/image-layout.md).

Every write goes to a temporary file in the same directory and is renamed into place, so readers
(skopeo, umoci, a concurrent forge) never see a half-written blob or index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import InputError

LAYOUT_VERSION = "1.0.0"

# Media types: https://github.com/opencontainers/image-spec/blob/v1.1.0/media-types.md
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
EMPTY = "application/vnd.oci.empty.v1+json"
# Docker's schema 2 types, still what most public base images are published as
# (https://distribution.github.io/distribution/spec/manifest-v2-2/).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (INDEX, DOCKER_MANIFEST_LIST)

# https://github.com/opencontainers/image-spec/blob/v1.1.0/annotations.md#pre-defined-annotation-keys
REF_NAME = "org.opencontainers.image.ref.name"

# https://github.com/opencontainers/image-spec/blob/v1.1.0/descriptor.md#digests: forge writes
# and accepts sha256 only; the strict pattern also keeps remote digests from naming other paths.
_SHA256 = re.compile(r"^sha256:([a-f0-9]{64})$")
# https://github.com/opencontainers/distribution-spec/blob/v1.1.0/spec.md#pulling-manifests
TAG_PATTERN = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor (https://github.com/opencontainers/image-spec/blob/v1.1.0/descriptor.md)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, str] | None = None
    artifact_type: str | None = None

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> Descriptor:
        try:
            return cls(
                media_type=data["mediaType"],
                digest=check_digest(data["digest"]),
                size=int(data["size"]),
                annotations=dict(data.get("annotations") or {}),
                platform=dict(data["platform"]) if data.get("platform") else None,
                artifact_type=data.get("artifactType"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed OCI descriptor {dict(data)!r}: {e}") from None


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise InputError(f"unsupported or malformed digest {digest!r} (expected sha256:<64 hex>)")
    return digest


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.match(tag):
        raise InputError(f"tag {tag!r} is not a valid OCI tag ([a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}})")
    return tag


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace: the same document always has the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def atomic_write(path: Path, data: bytes) -> None:
    """Writes `data` to `path` via a synced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def blobs_dir(root: Path) -> Path:
    return Path(root) / "blobs" / "sha256"


def blob_path(root: Path, digest: str) -> Path:
    return blobs_dir(root) / check_digest(digest).removeprefix("sha256:")


def init_layout(root: Path) -> None:
    """Creates an empty layout, or leaves an existing one as it is."""
    root = Path(root)
    blobs_dir(root).mkdir(parents=True, exist_ok=True)
    marker = root / "oci-layout"
    if not marker.exists():
        atomic_write(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    if not (root / "index.json").exists():
        write_index(root, [])


def is_layout(root: Path) -> bool:
    return (Path(root) / "oci-layout").is_file() and (Path(root) / "index.json").is_file()


def write_blob(root: Path, data: bytes) -> str:
    """Stores a small blob (a manifest, a config) and returns its digest."""
    digest = sha256_digest(data)
    path = blob_path(root, digest)
    if not path.exists():
        atomic_write(path, data)
    return digest


def read_blob(root: Path, digest: str) -> bytes:
    """Reads a small blob whole and checks it against its digest: a corrupt layout fails here,
    not later as an image that no runtime accepts."""
    path = blob_path(root, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{root}: blob {digest} is missing") from None
    if sha256_digest(data) != digest:
        raise InputError(f"{root}: blob {digest} does not match its digest (corrupt layout)")
    return data


def read_json_blob(root: Path, digest: str) -> dict:
    try:
        return json.loads(read_blob(root, digest))
    except ValueError as e:
        raise InputError(f"{root}: blob {digest} is not JSON ({e})") from None


def import_blob(root: Path, source: Path, digest: str) -> Path:
    """Places an existing blob file into the layout: a hard link where possible (blobs are
    immutable, and copying multi-GB base layers would double the disk), else a copy."""
    target = blob_path(root, digest)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target


def read_index(root: Path) -> list[Descriptor]:
    root = Path(root)
    if not is_layout(root):
        raise InputError(f"{root}: not an OCI image layout (needs oci-layout and index.json)")
    try:
        index = json.loads((root / "index.json").read_text())
        return [Descriptor.from_json(d) for d in index.get("manifests", [])]
    except ValueError as e:
        raise InputError(f"{root}/index.json: not valid JSON ({e})") from None


def write_index(root: Path, manifests: list[Descriptor]) -> None:
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_json() for d in manifests]}
    atomic_write(Path(root) / "index.json", canonical_json(index))


def tag_manifest(root: Path, descriptor: Descriptor, tag: str) -> None:
    """Points `tag` at `descriptor` in index.json, replacing whatever the tag named before;
    other entries are kept."""
    check_tag(tag)
    kept = [d for d in read_index(root) if d.annotations.get(REF_NAME) != tag]
    tagged = Descriptor(
        descriptor.media_type,
        descriptor.digest,
        descriptor.size,
        {**descriptor.annotations, REF_NAME: tag},
        descriptor.platform,
        descriptor.artifact_type,
    )
    write_index(root, [*kept, tagged])


def resolve_tag(root: Path, tag: str | None) -> Descriptor:
    """The index.json entry named `tag`; with no tag, the only entry (as skopeo does)."""
    manifests = read_index(root)
    if tag is None:
        if len(manifests) != 1:
            names = sorted(d.annotations.get(REF_NAME, d.digest) for d in manifests)
            raise InputError(f"{root}: holds {len(manifests)} images; name one of {names}")
        return manifests[0]
    for d in manifests:
        if d.annotations.get(REF_NAME) == tag:
            return d
    names = sorted(d.annotations[REF_NAME] for d in manifests if REF_NAME in d.annotations)
    raise InputError(f"{root}: no image tagged {tag!r} (tags: {', '.join(names) or 'none'})")


def copy_image(source: Path, tag: str, dest: Path) -> Descriptor:
    """The image tagged `tag` in layout `source`, with its blobs, into layout `dest` under the same
    tag (hard links where possible): many images in one layout, e.g. for `skopeo copy oci:DIR:TAG`."""
    desc = resolve_tag(source, tag)
    manifest = read_json_blob(source, desc.digest)
    init_layout(dest)
    blobs = [desc, Descriptor.from_json(manifest["config"]), *(Descriptor.from_json(d) for d in manifest["layers"])]
    for blob in blobs:
        import_blob(dest, blob_path(source, blob.digest), blob.digest)
    tag_manifest(dest, desc, tag)
    return desc
