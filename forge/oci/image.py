"""Serving images without a Docker engine: a base image plus forge's layers, written to an OCI
image layout.

The base comes from an OCI layout (`oci:PATH[:TAG]`) or a registry (`HOST/REPO:TAG`); an image
index is narrowed to one platform. Each model file becomes its own uncompressed layer under
`ImageConfig.model_path`, so a changed shard re-uploads only that shard and files are never split;
launch files become one more layer. The config gets forge's Entrypoint/Cmd/Env/ports/labels and
`created` from SOURCE_DATE_EPOCH, so the same inputs give the same manifest digest.

Formats: https://github.com/opencontainers/image-spec/blob/v1.1.0/config.md and manifest.md.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import InputError
from forge.oci import layout
from forge.oci.layers import Layer, source_date_epoch, write_file_layer, write_tree_layer
from forge.oci.layout import Descriptor
from forge.oci.registry import (
    DEFAULT_PLATFORM,
    Credentials,
    RegistryOptions,
    parse_reference,
    pull_image,
    select_platform,
)

# https://github.com/opencontainers/image-spec/blob/v1.1.0/annotations.md#pre-defined-annotation-keys
_OCI_ANNOTATION = "org.opencontainers.image."
BASE_NAME = "org.opencontainers.image.base.name"
BASE_DIGEST = "org.opencontainers.image.base.digest"

# Docker schema 2 media types and their OCI equivalents: the bytes are the same, only the names
# differ (https://github.com/opencontainers/image-spec/blob/v1.1.0/media-types.md#compatibility-matrix).
_OCI_EQUIVALENT = {
    layout.DOCKER_LAYER_GZIP: layout.LAYER_TAR_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": layout.LAYER_TAR,
    layout.DOCKER_CONFIG: layout.CONFIG,
}
_LAYER_TYPES = {layout.LAYER_TAR, layout.LAYER_TAR_GZIP, layout.LAYER_TAR_ZSTD}


@dataclass(frozen=True)
class ImageConfig:
    """What forge sets on top of the base image. `None` keeps the base's value; the
    `org.opencontainers.image.*` fields become both config labels and manifest annotations."""

    entrypoint: Sequence[str] | None = None
    cmd: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: Sequence[str | int] = ()  # 8000 or "8000/tcp"
    labels: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None
    title: str | None = None
    description: str | None = None
    version: str | None = None
    revision: str | None = None
    source: str | None = None
    url: str | None = None
    licenses: str | None = None
    vendor: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)  # extra manifest annotations
    model_path: str = "/models/model"
    launch_path: str = "/opt/forge"
    platform: str = DEFAULT_PLATFORM

    def oci_annotations(self) -> dict[str, str]:
        names = ("title", "description", "version", "revision", "source", "url", "licenses", "vendor")
        return {_OCI_ANNOTATION + n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class ImageResult:
    """The image written into `layout` under `tag`. `layers` are forge's own layers (model files in
    path order, then launch files); the base's layers precede them in the manifest."""

    layout: Path
    tag: str
    manifest: Descriptor
    config_digest: str
    base: str | None
    base_digest: str | None
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def split_oci_base(base: str) -> tuple[Path, str | None]:
    """`oci:PATH[:TAG]`, split at the last colon when what follows is a tag (skopeo's rule). A
    relative PATH is the caller's to anchor (forge's package stage: the recipe's directory)."""
    rest = base.removeprefix("oci:")
    path, sep, tag = rest.rpartition(":")
    if sep and path and layout.TAG_PATTERN.match(tag):
        return Path(path), tag
    return Path(rest), None


def _platform_manifest(root: Path, desc: Descriptor, platform: str) -> Descriptor:
    """Follows image indexes in a layout down to the manifest for `platform`."""
    for _ in range(4):  # an index of indexes is legal; deeper nesting is not worth following
        if desc.media_type in layout.MANIFEST_TYPES:
            return desc
        if desc.media_type not in layout.INDEX_TYPES:
            raise InputError(f"{root}: {desc.digest} is a {desc.media_type!r}, not an image")
        desc = select_platform(layout.read_json_blob(root, desc.digest), platform)
    raise InputError(f"{root}: image indexes nested too deeply")


def local_base_digest(root: Path, tag: str | None, platform: str = DEFAULT_PLATFORM) -> str:
    """The manifest digest of `platform`'s image tagged `tag` in the layout at `root`: what a
    base given as `oci:` is keyed on."""
    return _platform_manifest(Path(root), layout.resolve_tag(Path(root), tag), platform).digest


def _manifest_blobs(manifest: Mapping) -> list[Descriptor]:
    return [Descriptor.from_json(manifest["config"])] + [Descriptor.from_json(d) for d in manifest["layers"]]


def _resolve_base(
    base: str,
    out_layout: Path,
    platform: str,
    credentials: Credentials | None,
    options: RegistryOptions | None,
) -> tuple[Descriptor, str | None]:
    """Brings the base image's manifest, config and layers into `out_layout`. Returns the
    manifest's descriptor and the name to record as `base.name` (None for a local layout: its
    path means nothing elsewhere and would make the digest depend on the build directory)."""
    if base.startswith("oci:"):
        root, tag = split_oci_base(base)
        desc = _platform_manifest(root, layout.resolve_tag(root, tag), platform)
        if root.resolve() != Path(out_layout).resolve():
            manifest = layout.read_json_blob(root, desc.digest)
            for blob in [desc, *_manifest_blobs(manifest)]:
                source = layout.blob_path(root, blob.digest)
                if not source.is_file():
                    raise InputError(f"{root}: blob {blob.digest} is missing")
                layout.import_blob(out_layout, source, blob.digest)
        return desc, None
    reference = parse_reference(base)
    desc = pull_image(base, out_layout, platform=platform, credentials=credentials, options=options)
    return desc, str(reference)


def _oci_descriptor(desc: Descriptor) -> Descriptor:
    media_type = _OCI_EQUIVALENT.get(desc.media_type, desc.media_type)
    if media_type not in _LAYER_TYPES and media_type != layout.CONFIG:
        raise InputError(f"base image layer type {desc.media_type!r} is not supported (foreign or unknown)")
    return Descriptor(media_type, desc.digest, desc.size, desc.annotations)


def _model_files(model_dir: Path) -> list[Path]:
    if not Path(model_dir).is_dir():
        raise InputError(f"{model_dir}: model directory does not exist")
    files = sorted((p for p in Path(model_dir).rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    if not files:
        raise InputError(f"{model_dir}: model directory has no files")
    return files


def _merged_env(base_env: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Base `KEY=value` entries with forge's values replacing same-named keys in place."""
    merged = dict(item.split("=", 1) if "=" in item else (item, "") for item in base_env)
    merged.update(env)
    return [f"{k}={v}" for k, v in merged.items()]


def _port(port: str | int) -> str:
    text = str(port)
    return text if "/" in text else f"{text}/tcp"


def _image_config(
    base_config: Mapping, layers: Sequence[Layer], history: Sequence[str], config: ImageConfig, created: str
) -> dict:
    """The base config with forge's runtime settings, diff_ids and history appended
    (image-spec config.md: `config`, `rootfs`, `history`)."""
    out = copy.deepcopy(dict(base_config))
    runtime = dict(out.get("config") or {})
    if config.entrypoint is not None:
        runtime["Entrypoint"] = list(config.entrypoint)
        if config.cmd is None:
            runtime.pop("Cmd", None)  # as a Dockerfile ENTRYPOINT does: the base's Cmd was for its entrypoint
    if config.cmd is not None:
        runtime["Cmd"] = list(config.cmd)
    if config.env:
        runtime["Env"] = _merged_env(runtime.get("Env") or [], config.env)
    if config.exposed_ports:
        runtime["ExposedPorts"] = {
            **(runtime.get("ExposedPorts") or {}),
            **{_port(p): {} for p in config.exposed_ports},
        }
    labels = {**(runtime.get("Labels") or {}), **config.oci_annotations(), **config.labels}
    if labels:
        runtime["Labels"] = labels
    if config.working_dir is not None:
        runtime["WorkingDir"] = config.working_dir
    if config.user is not None:
        runtime["User"] = config.user
    out["config"] = runtime
    out["created"] = created
    rootfs = dict(out.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), *(layer.digest for layer in layers)]
    out["rootfs"] = rootfs
    out["history"] = [
        *(out.get("history") or []),
        *({"created": created, "created_by": line} for line in history),
        {
            "created": created,
            "created_by": "forge: set entrypoint, cmd, env, ports, labels",
            "empty_layer": True,
        },
    ]
    return out


def _read_base(out_layout: Path, base_desc: Descriptor, base: str) -> tuple[dict, dict]:
    """The base image's manifest and config, checked for shape."""
    try:
        base_manifest = layout.read_json_blob(out_layout, base_desc.digest)
        base_config_desc = Descriptor.from_json(base_manifest["config"])
        base_config = layout.read_json_blob(out_layout, base_config_desc.digest)
        if not isinstance(base_config, dict) or not isinstance(base_manifest.get("layers"), list):
            raise TypeError("not an image config and manifest")
    except (KeyError, TypeError, AttributeError, InputError) as e:
        # pull_image checked what a registry served; a local layout is the user's input.
        raise InputError(f"base image {base}: malformed manifest or config ({e})") from None
    return base_manifest, base_config


def build_image(
    base: str | None,
    model_dir: Path,
    launch_dir: Path | None,
    config: ImageConfig,
    out_layout: Path,
    tag: str,
    *,
    credentials: Credentials | None = None,
    registry_options: RegistryOptions | None = None,
) -> ImageResult:
    """Builds base + model + launch files into the OCI layout `out_layout`, tagged `tag`.

    `base` is `oci:PATH[:TAG]` or a registry reference (`credentials` / `registry_options` are
    used to pull it), or None for an image of forge's layers alone (a data-only model image: no
    shell, no OS). Raises InputError for bad paths, references or base images, InfraError when
    the base cannot be pulled."""
    layout.check_tag(tag)
    out_layout = Path(out_layout)
    layout.init_layout(out_layout)
    created = rfc3339(source_date_epoch())
    os_name, _, arch = config.platform.partition("/")
    if base is None:
        base_desc, base_name = None, None
        base_config = {"architecture": arch.split("/")[0], "os": os_name, "config": {},
                       "rootfs": {"type": "layers", "diff_ids": []}}  # fmt: skip
        base_manifest = {"layers": []}
    else:
        base_desc, base_name = _resolve_base(base, out_layout, config.platform, credentials, registry_options)
        base_manifest, base_config = _read_base(out_layout, base_desc, base)
    if (base_config.get("os"), base_config.get("architecture")) != (os_name, arch.split("/")[0]):
        raise InputError(
            f"base image {base} is {base_config.get('os')}/{base_config.get('architecture')}, not {config.platform}"
        )
    base_layers = [_oci_descriptor(Descriptor.from_json(d)) for d in base_manifest["layers"]]
    if len((base_config.get("rootfs") or {}).get("diff_ids") or []) != len(base_layers):
        raise InputError(f"base image {base}: config diff_ids do not match its {len(base_layers)} layers")

    blobs = layout.blobs_dir(out_layout)
    model_root = Path(model_dir)
    layers: list[Layer] = []
    history: list[str] = []
    for path in _model_files(model_root):
        member = f"{config.model_path}/{path.relative_to(model_root).as_posix()}"
        layers.append(write_file_layer(path, member, blobs))
        history.append(f"forge: add model file {member}")
    if launch_dir is not None:
        layers.append(write_tree_layer(Path(launch_dir), config.launch_path, blobs))
        history.append(f"forge: add launch files {config.launch_path}")

    image_config = _image_config(base_config, layers, history, config, created)
    config_data = layout.canonical_json(image_config)
    config_digest = layout.write_blob(out_layout, config_data)
    annotations = {**config.annotations, **config.oci_annotations(), "org.opencontainers.image.created": created}
    if base_desc is not None:
        annotations[BASE_DIGEST] = base_desc.digest
    if base_name:
        annotations[BASE_NAME] = base_name
    manifest = {
        "schemaVersion": 2,
        "mediaType": layout.MANIFEST,
        "config": Descriptor(layout.CONFIG, config_digest, len(config_data)).to_json(),
        "layers": [
            *(d.to_json() for d in base_layers),
            *(Descriptor(layout.LAYER_TAR, layer.digest, layer.size).to_json() for layer in layers),
        ],
        "annotations": annotations,
    }
    manifest_data = layout.canonical_json(manifest)
    manifest_digest = layout.write_blob(out_layout, manifest_data)
    platform = {"architecture": image_config.get("architecture", arch), "os": image_config.get("os", os_name)}
    descriptor = Descriptor(layout.MANIFEST, manifest_digest, len(manifest_data), platform=platform)
    layout.tag_manifest(out_layout, descriptor, tag)
    return ImageResult(
        layout=out_layout,
        tag=tag,
        manifest=descriptor,
        config_digest=config_digest,
        base=base,
        base_digest=base_desc.digest if base_desc else None,
        layers=tuple(layers),
    )


def read_image(root: Path, tag: str | None = None) -> tuple[dict, dict]:
    """The manifest and config of the image tagged `tag` in a layout (for checks and reports)."""
    desc = layout.resolve_tag(root, tag)
    manifest = layout.read_json_blob(root, desc.digest)
    return manifest, json.loads(layout.read_blob(root, manifest["config"]["digest"]))
