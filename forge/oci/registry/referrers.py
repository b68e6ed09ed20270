"""OCI 1.1 referrers: attach a document to an image, list them (API or the tag-schema fallback)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from forge.errors import InfraError
from forge.oci import layout
from forge.oci.layout import Descriptor
from forge.oci.registry.auth import Credentials, Reference, parse_reference
from forge.oci.registry.pull import _remote_descriptor, _remote_json, _run_parallel, fetch_manifest
from forge.oci.registry.push import _Blob, _push_blob, put_manifest
from forge.oci.registry.transport import Registry, RegistryOptions, _repository_scope

BUILD_REPORT_TYPE = "application/vnd.forge.build-report+json"


# https://github.com/opencontainers/image-spec/blob/v1.1.0/manifest.md#guidance-for-an-empty-descriptor
_EMPTY_JSON = b"{}"


# A referrer's document (build report, provenance) is read whole: refuse absurd sizes up front.
_MAX_DOCUMENT = 64 << 20


@dataclass(frozen=True)
class ReferrerResult:
    """`fallback_tag` is set when the registry lacks the referrers API and forge maintained the
    `sha256-<hex>` tag index instead (dist-spec "Referrers Tag Schema")."""

    digest: str
    subject: str
    artifact_type: str
    fallback_tag: str | None


def referrers_tag(subject_digest: str) -> str:
    """dist-spec "Referrers Tag Schema": `<alg>-<ref>`, e.g. `sha256-0123…`."""
    return layout.check_digest(subject_digest).replace(":", "-")


def _subject_descriptor(reg: Registry, reference: Reference) -> Descriptor:
    fetched = fetch_manifest(reg, reference.repository, reference.reference)
    return fetched.descriptor


def attach_referrer(
    ref: str,
    document: bytes,
    *,
    artifact_type: str = BUILD_REPORT_TYPE,
    subject: Descriptor | None = None,
    annotations: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
    options: RegistryOptions | None = None,
) -> ReferrerResult:
    """Attaches `document` (e.g. forge's JSON build report) to the image `ref` as an OCI 1.1
    artifact manifest whose `subject` is the image (image-spec manifest.md, "artifactType").

    Where the registry processes `subject` it answers with an `OCI-Subject` header and indexes the
    referrer itself; otherwise (distribution 2.8) the `sha256-<hex>` tag's index is fetched,
    extended and re-pushed so clients following the fallback still find it."""
    options = options or RegistryOptions()
    reference = parse_reference(ref)
    with Registry(reference.host, credentials=credentials, options=options, env_credentials=True,
                  operation=f"attaching a referrer to {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull,push")])
        subject = subject or _subject_descriptor(reg, reference)
        subject_ref = Descriptor(subject.media_type, subject.digest, subject.size)
        doc_blob = _Blob(layout.sha256_digest(document), len(document), data=document)
        empty = _Blob(layout.sha256_digest(_EMPTY_JSON), len(_EMPTY_JSON), data=_EMPTY_JSON)
        _run_parallel(lambda b: _push_blob(reg, reference.repository, b, options), [empty, doc_blob], 2)
        manifest = {
            "schemaVersion": 2,
            "mediaType": layout.MANIFEST,
            "artifactType": artifact_type,
            "config": Descriptor(layout.EMPTY, empty.digest, empty.size).to_json(),
            "layers": [Descriptor(artifact_type, doc_blob.digest, doc_blob.size).to_json()],
            "subject": subject_ref.to_json(),
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        data = layout.canonical_json(manifest)
        digest = layout.sha256_digest(data)
        resp = put_manifest(reg, reference.repository, digest, data, layout.MANIFEST)
        if resp.headers.get("OCI-Subject") == subject.digest:
            return ReferrerResult(digest, subject.digest, artifact_type, None)
        tag = referrers_tag(subject.digest)
        entry = Descriptor(layout.MANIFEST, digest, len(data), dict(annotations or {}), None, artifact_type)
        entries = [d for d in _fallback_index(reg, reference.repository, tag) if d.digest != digest]
        index = {
            "schemaVersion": 2,
            "mediaType": layout.INDEX,
            "manifests": [d.to_json() for d in [*entries, entry]],
        }
        put_manifest(reg, reference.repository, tag, layout.canonical_json(index), layout.INDEX)
        return ReferrerResult(digest, subject.digest, artifact_type, tag)


def _fallback_index(reg: Registry, repository: str, tag: str) -> list[Descriptor]:
    with reg.phase(f"reading referrers tag {tag[:19]}…"):
        resp = reg.request("GET", f"/v2/{repository}/manifests/{tag}", headers={"Accept": layout.INDEX}, ok=(200, 404))
    if resp.status == 404:
        return []
    return _index_entries(reg, resp.body, f"referrers of {repository} ({tag})")


def _index_entries(reg: Registry, body: bytes, what: str) -> list[Descriptor]:
    entries = _remote_json(reg, body, what).get("manifests") or []
    if not isinstance(entries, list):
        raise InfraError(f"registry {reg.host}: {what}: 'manifests' is not a list")
    return [_remote_descriptor(reg, d, what) for d in entries]


def list_referrers(
    ref: str,
    subject_digest: str,
    *,
    artifact_type: str | None = None,
    credentials: Credentials | None = None,
    options: RegistryOptions | None = None,
) -> list[Descriptor]:
    """Referrers of `subject_digest` in the repository of `ref`: the referrers API when the
    registry has it (dist-spec "Listing Referrers"; a 404 means it does not), else the
    `sha256-<hex>` fallback tag."""
    options = options or RegistryOptions()
    reference = parse_reference(ref)
    layout.check_digest(subject_digest)
    with Registry(reference.host, credentials=credentials, options=options,
                  operation=f"listing referrers of {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull")])
        path = f"/v2/{reference.repository}/referrers/{subject_digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        with reg.phase("listing referrers"):
            resp = reg.request("GET", path, headers={"Accept": layout.INDEX}, ok=(200, 404))
        if resp.status == 200:
            found = _index_entries(reg, resp.body, f"referrers of {ref}")
        else:
            found = _fallback_index(reg, reference.repository, referrers_tag(subject_digest))
    if artifact_type:
        found = [d for d in found if d.artifact_type == artifact_type]
    return found


def fetch_referrer_document(
    ref: str, manifest_digest: str, *, credentials: Credentials | None = None, options: RegistryOptions | None = None
) -> bytes:
    """The single document an artifact manifest (as written by `attach_referrer`) carries,
    verified against the digest its manifest names."""
    reference = parse_reference(ref)
    with Registry(reference.host, credentials=credentials, options=options or RegistryOptions(),
                  operation=f"fetching referrer {manifest_digest[:19]}… of {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull")])
        manifest = fetch_manifest(reg, reference.repository, manifest_digest).json()
        layers = manifest.get("layers") or []
        if len(layers) != 1:
            raise InfraError(f"{ref}: referrer {manifest_digest} carries {len(layers)} documents, expected 1")
        document = _remote_descriptor(reg, layers[0], f"referrer {manifest_digest}")
        if document.size > _MAX_DOCUMENT:
            raise InfraError(f"{ref}: referrer {manifest_digest} carries a {document.size}-byte document")
        digest = document.digest
        with reg.phase(f"downloading document {digest[:19]}…"):
            body = reg.request("GET", f"/v2/{reference.repository}/blobs/{digest}").body
        if layout.sha256_digest(body) != digest:
            raise InfraError(f"registry {reg.host}: referrer document {digest} arrived with a different digest")
        return body
