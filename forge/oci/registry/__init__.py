"""A registry client for the OCI distribution API: push and pull images, attach referrers.

Spec: https://github.com/opencontainers/distribution-spec/blob/v1.1.0/spec.md (cited below as
"dist-spec"). Auth follows the Docker token flow (https://distribution.github.io/distribution/spec/auth/token/):
a 401 carries `WWW-Authenticate: Basic …` or `Bearer realm=…,service=…,scope=…`.

Built on `http.client` rather than an HTTP library so that blob bodies go out with
`socket.sendfile` straight from the page cache: memory stays flat whatever the blob size, and a
2-core machine spends its CPU on the registry, not on copying bytes through Python.

Credentials never appear in exceptions or logs: messages name the user, never the password or
token, and upload URLs are shown without their query (which carries registry state).

One module per concern: `auth` (references, whose credentials go where), `transport` (HTTP, timeouts,
retries, the token flow), `pull`, `push` and `referrers`; every public name is importable from here.
"""

from __future__ import annotations

from forge.oci.registry.auth import (
    Credentials,
    Reference,
    canonical_host,
    credentials_for,
    docker_config_path,
    parse_reference,
    resolve_credentials,
    same_registry,
)
from forge.oci.registry.pull import (
    DEFAULT_PLATFORM,
    FetchedManifest,
    fetch_blob,
    fetch_manifest,
    pull_image,
    resolve_image,
    select_platform,
)
from forge.oci.registry.push import PushResult, _Blob, _push_blob, push_image, put_manifest
from forge.oci.registry.referrers import (
    BUILD_REPORT_TYPE,
    ReferrerResult,
    attach_referrer,
    fetch_referrer_document,
    list_referrers,
    referrers_tag,
)
from forge.oci.registry.transport import (
    Registry,
    RegistryError,
    RegistryOptions,
    RegistryUnreachable,
    _repository_scope,
    realm_belongs_to,
)

__all__ = [
    "Reference",
    "parse_reference",
    "Credentials",
    "docker_config_path",
    "canonical_host",
    "same_registry",
    "resolve_credentials",
    "credentials_for",
    "RegistryOptions",
    "RegistryError",
    "RegistryUnreachable",
    "realm_belongs_to",
    "Registry",
    "DEFAULT_PLATFORM",
    "FetchedManifest",
    "fetch_manifest",
    "fetch_blob",
    "select_platform",
    "pull_image",
    "resolve_image",
    "PushResult",
    "put_manifest",
    "push_image",
    "BUILD_REPORT_TYPE",
    "ReferrerResult",
    "referrers_tag",
    "attach_referrer",
    "list_referrers",
    "fetch_referrer_document",
    # Internal helpers forge.oci.signing builds on (a signature is pushed blob by blob).
    "_Blob",
    "_push_blob",
    "_repository_scope",
]
