"""Pushing: blobs (monolithic or chunked, resumed after a drop, mounted when possible) and manifests."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from forge.errors import InfraError, InputError
from forge.oci import layout
from forge.oci.layout import Descriptor
from forge.oci.registry.auth import Credentials, parse_reference
from forge.oci.registry.pull import _run_parallel
from forge.oci.registry.transport import (
    Registry,
    RegistryError,
    RegistryOptions,
    _FileSlice,
    _range_end,
    _repository_scope,
    _Response,
    _Transient,
    _with_query,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    path: Path | None = None  # a blob on disk, sent with sendfile
    data: bytes | None = None  # or a small blob in memory

    def body(self, offset: int = 0, length: int | None = None) -> bytes | _FileSlice:
        length = self.size - offset if length is None else length
        if self.data is not None:
            return self.data[offset : offset + length]
        return _FileSlice(self.path, offset, length)


@dataclass(frozen=True)
class _BlobOutcome:
    how: str  # "skipped" (already there), "mounted" (cross-repository mount) or "uploaded"
    bytes_sent: int
    retries: int


@dataclass(frozen=True)
class PushResult:
    """What a push did. `bytes_uploaded` counts blob bytes the registry acknowledged; an unchanged
    image re-pushed uploads 0."""

    reference: str
    digest: str
    media_type: str
    size: int
    tags: tuple[str, ...]
    bytes_uploaded: int
    blobs_uploaded: int
    blobs_skipped: int
    blobs_mounted: int
    retries: int
    seconds: float


def _blob_exists(reg: Registry, repository: str, digest: str) -> bool:
    resp = reg.request("HEAD", f"/v2/{repository}/blobs/{digest}", ok=(200, 404), retry=False)
    return resp.status == 200


def _start_upload(reg: Registry, repository: str, mount: tuple[str, str] | None = None) -> str | None:
    """POST an upload session; returns its Location, or None when a mount made it unnecessary
    (dist-spec "Mounting a blob from another repository": 201 mounted, 202 fall back to upload)."""
    path = f"/v2/{repository}/blobs/uploads/"
    if mount is not None:
        path += "?" + urlencode({"mount": mount[0], "from": mount[1]})
    resp = reg.request("POST", path, ok=(201, 202), retry=False)
    if resp.status == 201:
        return None
    location = resp.headers.get("Location")
    if not location:
        raise InfraError(f"registry {reg.host}: upload session for {repository} came back without a Location")
    return reg.url(location)


def _upload_status(reg: Registry, location: str) -> tuple[str, int] | None:
    """Where an interrupted upload stands (dist-spec "Getting an upload session status": 204 with
    `Range` and a fresh `Location`): the location to continue at and the next offset, or None when
    the session is gone. distribution 2.8 drops a session whose last PATCH arrived only in part
    (its signed `_state` no longer matches the bytes on disk), so there the caller starts over;
    registries that keep partial chunks resume mid-blob."""
    resp = reg.request("GET", location, ok=(204, 404), retry=False)
    if resp.status == 404:
        return None
    end = _range_end(resp)
    return reg.url(resp.headers.get("Location", location)), 0 if end is None or end <= 0 else end + 1


@dataclass
class _Upload:
    """One blob's upload across attempts: where to send next, from which offset, in what size of
    chunks (0: one PUT), and how many bytes the registry has acknowledged so far."""

    location: str | None = None
    offset: int = 0
    sent: int = 0
    chunk_size: int = 0
    chunks_refused: bool = False

    def chunked(self, size: int) -> bool:
        return 0 < self.chunk_size < size


def _put_monolithic(reg: Registry, upload: _Upload, blob: _Blob) -> None:
    """One PUT carrying the whole blob (dist-spec "Pushing a blob monolithically", POST then PUT)."""
    reg.request(
        "PUT",
        _with_query(upload.location, digest=blob.digest),
        headers={"Content-Type": "application/octet-stream"},
        body=blob.body(),
        ok=(201,),
        retry=False,
    )
    upload.sent += blob.size


def _put_chunked(reg: Registry, upload: _Upload, blob: _Blob) -> None:
    """PATCH chunks from `upload.offset`, then the closing PUT with the digest (dist-spec "Pushing
    a blob in chunks"). `upload` is updated after every acknowledged chunk, so after a drop the
    next attempt can ask the registry where to go on from."""
    while upload.offset < blob.size:
        length = min(upload.chunk_size, blob.size - upload.offset)
        resp = reg.request(
            "PATCH",
            upload.location,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{upload.offset}-{upload.offset + length - 1}",
            },
            body=blob.body(upload.offset, length),
            ok=(202,),
            retry=False,
        )
        upload.location = reg.url(resp.headers.get("Location", upload.location))
        upload.sent += length
        end = _range_end(resp)
        upload.offset = end + 1 if end is not None and end + 1 > upload.offset else upload.offset + length
    reg.request("PUT", _with_query(upload.location, digest=blob.digest), ok=(201,), retry=False)


def _send_blob(reg: Registry, repository: str, upload: _Upload, blob: _Blob) -> None:
    """One attempt at sending what the registry still lacks of `blob`."""
    if upload.location is None:
        upload.location, upload.offset = _start_upload(reg, repository), 0
    if upload.chunked(blob.size):
        try:
            _put_chunked(reg, upload, blob)
            return
        except RegistryError as e:
            # Some registries refuse chunked uploads (the distribution spec makes PATCH optional:
            # https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pushing-blobs);
            # fall back to one PUT.
            if upload.offset or e.status not in (400, 405, 416, 501):
                raise
            log.info("registry %s refused a chunked upload (%s); sending blobs whole", reg.host, e)
            upload.chunk_size, upload.chunks_refused = 0, True
            upload.location = _start_upload(reg, repository)
    _put_monolithic(reg, upload, blob)


def _after_drop(reg: Registry, upload: _Upload, blob: _Blob, options: RegistryOptions) -> None:
    """Where the next attempt starts. A chunked upload asks the registry how far it got
    (`_upload_status`); a half-received PUT cannot be continued, so that blob starts over with a
    fresh session, now in chunks so that a second drop can resume."""
    if upload.location is None:
        return  # the drop came before any session existed
    if upload.chunked(blob.size):
        upload.location, upload.offset = _upload_status(reg, upload.location) or (None, 0)
        return
    upload.location, upload.offset = None, 0
    if not upload.chunks_refused and 0 < options.resume_chunk_size < blob.size:
        upload.chunk_size = options.resume_chunk_size


def _push_blob(reg: Registry, repository: str, blob: _Blob, options: RegistryOptions) -> _BlobOutcome:
    """HEAD (skip if present) → mount attempt → upload, with bounded retries and exponential
    backoff for dropped connections, 5xx and 429 (see `_after_drop` for where a retry resumes)."""
    with reg.phase(f"uploading blob {blob.digest[:19]}…"):
        return _push_blob_attempts(reg, repository, blob, options)


def _push_blob_attempts(reg: Registry, repository: str, blob: _Blob, options: RegistryOptions) -> _BlobOutcome:
    upload = _Upload(chunk_size=options.chunk_size)
    error: _Transient | None = None
    for attempt in range(options.retries + 1):
        try:
            if attempt:
                reg.backoff(attempt - 1, error.retry_after if error else 0.0, error)
                if _blob_exists(reg, repository, blob.digest):
                    # The drop came after the registry had committed the blob.
                    how = "uploaded" if upload.location or upload.sent else "skipped"
                    return _BlobOutcome(how, upload.sent, attempt)
                _after_drop(reg, upload, blob, options)
            else:
                if _blob_exists(reg, repository, blob.digest):
                    return _BlobOutcome("skipped", 0, 0)
                if options.mount_from and options.mount_from != repository:
                    upload.location = _start_upload(reg, repository, mount=(blob.digest, options.mount_from))
                    if upload.location is None:
                        return _BlobOutcome("mounted", 0, 0)
            _send_blob(reg, repository, upload, blob)
            return _BlobOutcome("uploaded", upload.sent, attempt)
        except _Transient as e:
            error = e
            log.info("registry %s: blob %s: %s (attempt %d)", reg.host, blob.digest[:19], e, attempt + 1)
        except RegistryError as e:
            # A resumed upload whose digest comes out wrong means the offset the registry reported
            # was off (some registries count bytes of a cut-off PATCH); start the blob over.
            if not (attempt and e.status == 400 and "DIGEST_INVALID" in str(e)):
                raise
            error = _Transient(str(e))
            upload.location, upload.offset = None, 0
            log.info("registry %s: blob %s: resumed upload rejected; starting over", reg.host, blob.digest[:19])
    raise InfraError(
        f"registry {reg.host}: uploading blob {blob.digest} failed after {options.retries + 1} attempts: {error}"
    )


def put_manifest(reg: Registry, repository: str, reference: str, data: bytes, media_type: str) -> _Response:
    """PUT a manifest with its media type as Content-Type (dist-spec "Pushing Manifests") and
    check the digest the registry computed against ours."""
    with reg.phase(f"pushing manifest {reference}"):
        resp = reg.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Content-Type": media_type},
            body=data,
            ok=(201,),
        )
    returned = resp.headers.get("Docker-Content-Digest")
    if returned and returned != layout.sha256_digest(data):
        raise InfraError(f"registry {reg.host}: stored manifest {reference} under digest {returned}, not ours")
    return resp


def _layout_blob(root: Path, desc: Descriptor) -> _Blob:
    path = layout.blob_path(root, desc.digest)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{root}: blob {desc.digest} is missing") from None
    if size != desc.size:
        raise InputError(f"{root}: blob {desc.digest} is {size} bytes, its descriptor says {desc.size}")
    return _Blob(desc.digest, desc.size, path=path)


def _manifests_to_push(root: Path, top: Descriptor) -> tuple[list[_Blob], list[tuple[bytes, Descriptor]]]:
    """Every blob and manifest below `top`, children before parents, so the registry never sees a
    manifest before what it references (dist-spec: manifests are pushed last)."""
    blobs: dict[str, _Blob] = {}
    manifests: list[tuple[bytes, Descriptor]] = []

    def visit(desc: Descriptor) -> None:
        data = layout.read_blob(root, desc.digest)
        doc = json.loads(data)
        if desc.media_type in layout.INDEX_TYPES:
            for child in doc.get("manifests", []):
                visit(Descriptor.from_json(child))
        elif desc.media_type in layout.MANIFEST_TYPES:
            for ref in [doc["config"], *doc.get("layers", [])]:
                d = Descriptor.from_json(ref)
                blobs.setdefault(d.digest, _layout_blob(root, d))
        else:
            raise InputError(f"{root}: cannot push {desc.digest} of type {desc.media_type!r}")
        manifests.append((data, desc))

    visit(top)
    return list(blobs.values()), manifests


def push_image(
    layout_dir: Path,
    ref: str,
    *,
    source_tag: str | None = None,
    tags: Sequence[str] = (),
    credentials: Credentials | None = None,
    options: RegistryOptions | None = None,
) -> PushResult:
    """Pushes the image tagged `source_tag` in an OCI layout to `ref` (`host/repo[:tag]`) and to
    each extra tag in `tags`. Blobs go first, several at once; the manifest (for an index, the
    children and then the index) goes last, once per tag. Raises InfraError for anything the
    registry or network refuses, InputError for a broken layout or reference.

    Without `credentials`, FORGE_REGISTRY_USERNAME/PASSWORD are used (this is the registry forge
    pushes to), else docker's config.json entry for exactly this host."""
    options = options or RegistryOptions()
    started = time.monotonic()
    reference = parse_reference(ref)
    all_tags = list(dict.fromkeys([t for t in [reference.tag, *tags] if t]))
    for t in all_tags:
        layout.check_tag(t)
    top = layout.resolve_tag(layout_dir, source_tag)
    if reference.digest and reference.digest != top.digest:
        raise InputError(f"{ref}: pinned digest differs from the layout's image {top.digest}")
    blobs, manifests = _manifests_to_push(layout_dir, top)
    scopes = [_repository_scope(reference.repository, "pull,push")]
    if options.mount_from:
        scopes.append(_repository_scope(options.mount_from, "pull"))
    operation = f"push of {reference.host}/{reference.repository}"
    with Registry(reference.host, credentials=credentials, options=options, env_credentials=True,
                  operation=operation) as reg:  # fmt: skip
        reg.expect_bytes(sum(b.size for b in blobs) + sum(len(data) for data, _ in manifests))
        reg.authenticate(scopes)
        outcomes = _run_parallel(lambda b: _push_blob(reg, reference.repository, b, options), blobs, options.parallel)
        for data, desc in manifests[:-1]:
            put_manifest(reg, reference.repository, desc.digest, data, desc.media_type)
        top_data = manifests[-1][0]
        for target in all_tags or [top.digest]:
            put_manifest(reg, reference.repository, target, top_data, top.media_type)
    result = PushResult(
        reference=f"{reference.host}/{reference.repository}@{top.digest}",
        digest=top.digest,
        media_type=top.media_type,
        size=top.size,
        tags=tuple(all_tags),
        bytes_uploaded=sum(o.bytes_sent for o in outcomes),
        blobs_uploaded=sum(o.how == "uploaded" for o in outcomes),
        blobs_skipped=sum(o.how == "skipped" for o in outcomes),
        blobs_mounted=sum(o.how == "mounted" for o in outcomes),
        retries=sum(o.retries for o in outcomes),
        seconds=time.monotonic() - started,
    )
    log.info(
        "pushed %s (%d blobs uploaded, %d skipped, %d mounted; %d bytes)",
        result.reference,
        result.blobs_uploaded,
        result.blobs_skipped,
        result.blobs_mounted,
        result.bytes_uploaded,
    )
    return result
