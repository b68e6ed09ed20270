"""A registry client for the OCI distribution API: push and pull images, attach referrers.

Spec: https://github.com/opencontainers/distribution-spec/blob/v1.1.0/spec.md (cited below as
"dist-spec"). Auth follows the Docker token flow (https://distribution.github.io/distribution/spec/auth/token/):
a 401 carries `WWW-Authenticate: Basic …` or `Bearer realm=…,service=…,scope=…`.

Built on `http.client` rather than an HTTP library so that blob bodies go out with
`socket.sendfile` straight from the page cache: memory stays flat whatever the blob size, and a
2-core machine spends its CPU on the registry, not on copying bytes through Python.

Credentials never appear in exceptions or logs: messages name the user, never the password or
token, and upload URLs are shown without their query (which carries registry state).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

from forge.errors import InfraError, InputError
from forge.oci import layout
from forge.oci.layout import Descriptor

log = logging.getLogger(__name__)

DEFAULT_PLATFORM = "linux/amd64"
BUILD_REPORT_TYPE = "application/vnd.forge.build-report+json"

# Docker Hub's names: `ubuntu` is `docker.io/library/ubuntu`, served from registry-1.docker.io.
_HUB_HOST = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

# dist-spec "Pulling manifests": repository names are path components of this form.
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_RANGE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)$")

# https://github.com/opencontainers/image-spec/blob/v1.1.0/manifest.md#guidance-for-an-empty-descriptor
_EMPTY_JSON = b"{}"

_MANIFEST_ACCEPT = ", ".join([*layout.MANIFEST_TYPES, *layout.INDEX_TYPES])
# Read/write unit for downloads and TLS uploads: large enough that per-call overhead vanishes,
# small enough that memory stays flat with several blobs in flight.
_IO_CHUNK = 1 << 20
# Image configs are a few KiB; anything this large is not one.
_MAX_CONFIG = 16 << 20
# A referrer's document (build report, provenance) is read whole: refuse absurd sizes up front.
_MAX_DOCUMENT = 64 << 20


# ---------------------------------------------------------------- references and credentials


@dataclass(frozen=True)
class Reference:
    """`host/repository[:tag][@digest]`, with Docker Hub short names expanded."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after `/manifests/`: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parses an image reference the way docker does: the first component is a registry host when
    it has a `.` or `:` or is `localhost`; otherwise the image is on Docker Hub."""
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        layout.check_digest(digest)
    tag = None
    name = rest
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = rest.rsplit(":", 1)
        layout.check_tag(tag)
    first, _, remainder = name.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = "docker.io", name
    if host in _HUB_ALIASES:
        host = _HUB_HOST
        if "/" not in repository:
            repository = f"library/{repository}"
    if not repository or not all(_REPO_COMPONENT.match(c) for c in repository.split("/")):
        raise InputError(f"image reference {text!r}: repository {repository!r} is not a valid name")
    return Reference(host, repository, tag, digest)


@dataclass(frozen=True)
class Credentials:
    """A registry login. The password is kept out of repr so it cannot leak into logs."""

    username: str
    password: str = field(repr=False)


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"


def canonical_host(host: str) -> str:
    """`docker.io`, `index.docker.io` … → `registry-1.docker.io`; other hosts lower-cased. Two
    names are the same registry only when these are equal (host and port)."""
    host = host.strip().lower()
    return _HUB_HOST if host in _HUB_ALIASES else host


def same_registry(a: str | None, b: str | None) -> bool:
    return bool(a and b) and canonical_host(a) == canonical_host(b)


def resolve_credentials(
    host: str,
    username: str | None = None,
    password: str | None = None,
    docker_config: Path | None = None,
    *,
    use_env: bool = True,
) -> Credentials | None:
    """Credentials for `host`, first found wins: explicit arguments, then FORGE_REGISTRY_USERNAME /
    FORGE_REGISTRY_PASSWORD, then docker's config.json entry for exactly this host (`auths`
    entries, then `credHelpers` / `credsStore` via `docker-credential-<name> get`). None means
    anonymous.

    The environment variables are one login for one registry, the one forge pushes to
    (`package.registry`): callers asking for any other host (a base image's, the image of a
    `forge verify` elsewhere) pass `use_env=False`, so that password never leaves for a third
    party. The registry client itself only reads them for the registry it pushes to."""
    if username is not None or password is not None:
        if not (username and password):
            raise InputError("registry credentials: give both a username and a password")
        return Credentials(username, password)
    if use_env:
        env_user = os.environ.get("FORGE_REGISTRY_USERNAME")
        env_password = os.environ.get("FORGE_REGISTRY_PASSWORD")
        if env_user or env_password:
            if not (env_user and env_password):
                raise InputError("FORGE_REGISTRY_USERNAME and FORGE_REGISTRY_PASSWORD must be set together")
            return Credentials(env_user, env_password)
    return _docker_config_credentials(host, docker_config or docker_config_path())


def credentials_for(host: str, push_registry: str | None) -> Credentials | None:
    """What forge sends to `host` when `push_registry` is the recipe's `package.registry`: the
    environment's login only there, docker's config.json entry for exactly `host` everywhere."""
    return resolve_credentials(host, use_env=same_registry(host, push_registry))


def _config_key_host(key: str) -> str:
    """`https://index.docker.io/v1/` → `index.docker.io`: config.json keys come in several forms."""
    return urlsplit(key if "://" in key else f"//{key}").netloc


def _docker_config_credentials(host: str, path: Path) -> Credentials | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: cannot be read as JSON") from None
    wanted = _HUB_ALIASES if host == _HUB_HOST else {host}
    for key, entry in (config.get("auths") or {}).items():
        if _config_key_host(key) not in wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InputError(f"{path}: auths[{key!r}].auth is not base64 of 'user:password'") from None
            if user and secret:
                return Credentials(user, secret)
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"])
    helper = (config.get("credHelpers") or {}).get(host) or config.get("credsStore")
    if helper:
        server = _HUB_CONFIG_KEY if host == _HUB_HOST else host
        return _credential_helper(helper, server, path)
    return None


def _credential_helper(name: str, server: str, config_path: Path) -> Credentials | None:
    """Runs a docker credential helper (https://github.com/docker/docker-credential-helpers):
    `get` reads the server URL on stdin and prints {"Username", "Secret"}."""
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True, timeout=60)
    except FileNotFoundError:
        raise InfraError(f"credential helper {program} (set in {config_path}) is not installed") from None
    except subprocess.TimeoutExpired:
        raise InfraError(f"credential helper {program} did not answer within 60 s") from None
    if proc.returncode != 0:
        return None  # helpers exit non-zero for "no credentials for this server"
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise InfraError(f"credential helper {program} printed something other than its JSON answer") from None
    if user == "<token>":  # an identity token for the OAuth2 refresh flow, which forge does not speak
        return None
    return Credentials(user, secret)


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class RegistryOptions:
    """How forge talks to a registry.

    Blobs go up in one PUT by default, as docker, containerd and skopeo send them: on
    distribution 2.8 that measured ~25% faster than 64 MiB chunks (each PATCH ends with the
    registry syncing the upload file; bench/bench_push.py). Chunked uploads let a dropped
    connection resume from the registry's `Range` instead of starting the blob over, so after a
    first drop the blob is retried in `resume_chunk_size` chunks; `chunk_size` chunks from the
    start (for registries or proxies that cap request bodies).

    Every wait is bounded: `connect_timeout_s` for TCP + TLS, `timeout_s` for any silence once
    connected, and `deadline_s` for the whole operation (a push, a pull, a referrer) across all
    its requests and retries. A timed-out request is retried like a dropped one; once the
    deadline has passed nothing more is tried, and the error names the deadline and what forge
    was doing (authenticating, uploading blob …, pushing manifest …)."""

    chunk_size: int = 0  # blobs larger than this go up in PATCH chunks this big; 0: one PUT per blob
    resume_chunk_size: int = 64 << 20  # chunk size once a blob's upload has been dropped; 0: keep PUT
    parallel: int = 4  # blobs transferred at once
    retries: int = 4  # further attempts after a dropped connection, a timeout, a 5xx or a 429
    backoff_s: float = 0.5  # first wait between attempts; doubles each time, capped at 30 s
    mount_from: str | None = None  # repository on the same registry to mount missing blobs from
    plain_http: bool | None = None  # None: plain HTTP for loopback hosts only, as docker allows
    tls_verify: bool = True  # False: accept any certificate (see `for_host` and package.insecure_registries)
    ca_file: str | None = None  # PEM file of CAs to trust besides the system's (SSL_CERT_FILE works too)
    timeout_s: float = 60.0  # read/write timeout: the longest silence tolerated once connected
    connect_timeout_s: float = 30.0  # TCP connect + TLS handshake: an unreachable host fails fast
    deadline_s: float | None = None  # whole operation; None: 300 s plus 1 s per MiB it moves

    def for_host(self, host: str, insecure_registries: Iterable[str] = ()) -> RegistryOptions:
        """These options for `host`, with the recipe's `package.insecure_registries` applied:
        an entry `host[:port]` (or `https://host[:port]`) turns certificate verification off for
        that registry only; `http://host[:port]` speaks plain HTTP to it (and so allows its
        credentials over plain HTTP, which forge otherwise sends only to loopback registries)."""
        for entry in insecure_registries:
            scheme, sep, name = entry.strip().rpartition("://")
            if not same_registry(name.rstrip("/"), host):
                continue
            if sep and scheme == "http":
                return replace(self, plain_http=True)
            return replace(self, plain_http=False, tls_verify=False)
        return self


# An operation's deadline when `deadline_s` is None: a fixed allowance for the API calls plus a
# floor of 1 MiB/s for the bytes it moves, so a hung registry is given up on within minutes
# while a 100 GB push over a slow link is not cut short.
_BASE_DEADLINE_S = 300.0
_DEADLINE_S_PER_BYTE = 1.0 / (1 << 20)


class _ConnectDeadline:
    """Connect (and TLS handshake) under `connect_timeout_s`, then read and write under the
    connection's own `timeout`: http.client uses one timeout for both, so a blackholed registry
    would otherwise hold each attempt for the whole read timeout."""

    connect_timeout_s: float = 30.0

    def connect(self) -> None:
        io_timeout, self.timeout = self.timeout, self.connect_timeout_s
        try:
            super().connect()
        except TimeoutError as e:
            raise TimeoutError(f"no connection within {self.connect_timeout_s:g} s (connect timeout)") from e
        finally:
            self.timeout = io_timeout
        self.sock.settimeout(io_timeout)


class _HTTPConnection(_ConnectDeadline, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectDeadline, http.client.HTTPSConnection):
    pass


@dataclass(frozen=True)
class _FileSlice:
    path: Path
    offset: int
    length: int


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    body_sha256: str | None = None  # set when the body was streamed to a file


class _Transient(Exception):
    """A failure worth another attempt: a dropped connection, a timeout, a 5xx, a 429.
    `unreachable`: no connection could be made at all (refused, DNS, no route, connect timeout)."""

    def __init__(self, message: str, retry_after: float = 0.0, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


class RegistryError(InfraError):
    """The registry answered, and the answer was no."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RegistryUnreachable(InfraError):
    """No connection to the registry could be made (connection refused, DNS failure, no route,
    connect timeout), as opposed to a registry that answered badly (`RegistryError`, junk
    manifests: plain InfraError). Work that only needs the registry later (a base image) can be
    deferred on this; a bad answer is an error."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


def _hostname(host: str) -> str:
    """`127.0.0.1:5000` → `127.0.0.1`, `[::1]:5000` → `::1`, `ghcr.io` → `ghcr.io`."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).lower()


def _is_loopback(host: str) -> bool:
    """`localhost`, `127.0.0.1:5000`, `[::1]:5000`: hosts docker lets speak plain HTTP."""
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def realm_belongs_to(realm_host: str, registry_host: str) -> bool:
    """Whether a token service at `realm_host` is part of the registry `registry_host`, and so may
    see that registry's credentials: the same host name (any port: distribution's token service
    often listens beside the registry), Docker Hub's auth.docker.io, or the registry's own parent
    domain (registry.gitlab.com → gitlab.com, auth.gitlab.com). A parent that could be a public
    suffix (`co.uk`, `com.au`: two labels, the first of three letters or fewer) does not count,
    nor does anything for a registry addressed by IP address."""
    realm, registry = _hostname(realm_host), _hostname(canonical_host(registry_host))
    if not realm or not registry:
        return False
    if realm == registry:
        return True
    if registry == _hostname(_HUB_HOST):
        return realm == "auth.docker.io"
    if _is_ip(registry) or _is_ip(realm):
        return False
    labels = registry.split(".")
    parent = labels[1:]
    if len(parent) < 2 or (len(parent) == 2 and len(parent[0]) <= 3):
        return False
    parent_name = ".".join(parent)
    return realm == parent_name or realm.endswith("." + parent_name)


def _redact(url: str) -> str:
    """The path of a URL without its query: upload URLs carry registry state (and some
    registries sign them), which has no place in a message."""
    return urlsplit(url).path


def _error_detail(resp: _Response) -> str:
    """dist-spec "Error codes": `{"errors": [{"code", "message", "detail"}]}`."""
    try:
        errors = json.loads(resp.body)["errors"]
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = resp.body[:200].decode("utf-8", "replace").strip()
        return text or http.client.responses.get(resp.status, "")


def _send_file(sock: socket.socket, part: _FileSlice) -> None:
    """Sends a byte range of a file: kernel sendfile on plain sockets, 1 MiB writes under TLS."""
    with open(part.path, "rb") as f:
        if isinstance(sock, ssl.SSLSocket):
            f.seek(part.offset)
            remaining = part.length
            while remaining:
                chunk = f.read(min(_IO_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{part.path} is shorter than expected")
                sock.sendall(chunk)
                remaining -= len(chunk)
        elif sock.sendfile(f, part.offset, part.length) != part.length:
            raise OSError(f"{part.path} is shorter than expected")


class Registry:
    """One registry host: per-thread keep-alive connections, the current Authorization header,
    the retry policy and the operation's deadline. Thread-safe; use as a context manager to
    close its connections.

    Credentials go to this host only, and never in clear: the Authorization header is attached
    to requests for exactly `host`, over HTTPS (or over HTTP when the registry itself is spoken
    to over HTTP: loopback, or `plain_http`), so a redirect or an upload `Location` to another
    host or down to `http://` carries none. A token service gets them only when it belongs to
    this registry (`realm_belongs_to`). When no credentials are given they are looked up lazily
    in docker's config.json for exactly this host, and also in FORGE_REGISTRY_USERNAME /
    PASSWORD when `env_credentials` (the registry forge pushes to)."""

    def __init__(
        self,
        host: str,
        *,
        credentials: Credentials | None = None,
        options: RegistryOptions,
        env_credentials: bool = False,
        operation: str | None = None,
    ) -> None:
        self.host = host
        self.options = options
        plain = options.plain_http if options.plain_http is not None else _is_loopback(host)
        self.scheme = "http" if plain else "https"
        self.operation = operation or f"talking to {host}"
        self._credentials = credentials
        self._credentials_resolved = credentials is not None
        self._env_credentials = env_credentials
        self._ssl = ssl.create_default_context()
        if options.ca_file:
            try:
                self._ssl.load_verify_locations(options.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise InputError(f"CA bundle {options.ca_file}: cannot be loaded ({e})") from None
        if not options.tls_verify:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        self._local = threading.local()
        self._all_connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._authorization: str | None = None
        self._scopes: set[str] = set()
        self._withheld_realm: str | None = None
        self._started = time.monotonic()
        self._deadline_s = options.deadline_s if options.deadline_s is not None else _BASE_DEADLINE_S
        self._deadline = self._started + self._deadline_s

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all_connections:
                conn.close()
            self._all_connections.clear()

    def url(self, path_or_url: str) -> str:
        """Absolute URL; upload `Location`s may be relative (dist-spec "Pushing blobs")."""
        return urljoin(f"{self.scheme}://{self.host}/", path_or_url)

    # -- deadline

    def expect_bytes(self, size: int) -> None:
        """Sizes the default deadline (`deadline_s` None) for an operation moving `size` bytes."""
        if self.options.deadline_s is None:
            self._deadline_s = _BASE_DEADLINE_S + size * _DEADLINE_S_PER_BYTE
            self._deadline = self._started + self._deadline_s

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    @contextmanager
    def phase(self, text: str) -> Iterator[None]:
        """Names what this thread is doing, for the deadline's error message."""
        previous = getattr(self._local, "phase", None)
        self._local.phase = text
        try:
            yield
        finally:
            self._local.phase = previous

    def deadline_error(self, last: object = None, doing: str | None = None) -> InfraError:
        doing = getattr(self._local, "phase", None) or doing or "waiting"
        detail = f" (last: {last})" if last else ""
        message = (f"registry {self.host}: {self.operation} gave up at its {self._deadline_s:g} s deadline "
                   f"while {doing}{detail}")  # fmt: skip
        if getattr(last, "unreachable", False):  # every attempt failed to connect
            return RegistryUnreachable(message, self.host)
        return InfraError(message)

    def backoff(self, attempt: int, retry_after: float = 0.0, error: object = None) -> None:
        """Waits before another attempt; raises the deadline's error when that attempt could not
        start before the deadline."""
        wait = min(30.0, max(retry_after, self.options.backoff_s * 2**attempt))
        if self.remaining() <= wait:
            raise self.deadline_error(error)
        time.sleep(wait)

    # -- transport

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = _HTTPSConnection(netloc, timeout=self.options.timeout_s, context=self._ssl)
            elif scheme == "http":
                conn = _HTTPConnection(netloc, timeout=self.options.timeout_s)
            else:
                raise InfraError(f"registry {self.host}: refusing a {scheme or 'scheme-less'} URL it sent")
            conns[(scheme, netloc)] = conn
            with self._lock:
                self._all_connections.append(conn)
        return conn

    def _drop_connection(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("conns", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _send_once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | _FileSlice | None,
        download_to: Path | None,
    ) -> _Response:
        parts = urlsplit(url)
        remaining = self.remaining()
        if remaining <= 0:
            raise self.deadline_error(doing=f"{method} {_redact(url)}")
        io_timeout = min(self.options.timeout_s, remaining)
        conn = self._connection(parts.scheme, parts.netloc)
        conn.timeout = io_timeout
        conn.connect_timeout_s = min(self.options.connect_timeout_s, remaining)
        if conn.sock is not None:
            conn.sock.settimeout(io_timeout)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connecting = conn.sock is None  # connect on its own, so "never reached" is told apart from "failed"
        try:
            if connecting:
                conn.connect()
                connecting = False
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None or method in ("POST", "PUT", "PATCH"):
                length = 0 if body is None else len(body) if isinstance(body, bytes) else body.length
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if isinstance(body, bytes):
                conn.send(body)
            elif body is not None:
                _send_file(conn.sock, body)
            resp = conn.getresponse()
            if download_to is not None and resp.status == 200:
                digest = _stream_to_file(resp, download_to)
                return _Response(resp.status, resp.headers, b"", digest)
            return _Response(resp.status, resp.headers, resp.read())
        except ssl.SSLCertVerificationError as e:
            self._drop_connection(parts.scheme, parts.netloc)
            raise InfraError(
                f"registry {parts.netloc}: TLS certificate not trusted ({e.verify_message}); trust its CA with "
                f"SSL_CERT_FILE=/path/to/ca.pem, or for a test registry list {parts.netloc!r} in the recipe's "
                "package.insecure_registries"
            ) from None
        except ssl.SSLError as e:  # the host answered, with TLS that did not work out: not unreachable
            self._drop_connection(parts.scheme, parts.netloc)
            raise _Transient(f"{method} {_redact(url)}: {type(e).__name__}: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection(parts.scheme, parts.netloc)
            if connecting and isinstance(e, OSError):
                # Refused, DNS failure, no route, connect timeout: no connection was ever made.
                raise _Transient(f"{method} {_redact(url)}: {type(e).__name__}: {e}", unreachable=True) from None
            if isinstance(e, TimeoutError):
                limit = "read/write timeout" if io_timeout == self.options.timeout_s else "operation deadline"
                raise _Transient(f"{method} {_redact(url)}: no progress for {io_timeout:g} s ({limit})") from None
            raise _Transient(f"{method} {_redact(url)}: {type(e).__name__}: {e}") from None

    def may_authorize(self, url: str) -> bool:
        """Whether `url` may carry this registry's Authorization: exactly this host, and over
        HTTPS unless the registry itself is spoken to over plain HTTP."""
        parts = urlsplit(url)
        return parts.netloc == self.host and (parts.scheme == "https" or parts.scheme == self.scheme)

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | _FileSlice | None = None,
        ok: Iterable[int] = (200,),
        retry: bool = True,
        download_to: Path | None = None,
    ) -> _Response:
        """One API call with auth, redirects (GET/HEAD only) and, when `retry`, bounded retries.

        With `retry=False` a transient failure surfaces as `_Transient`, for callers that must
        decide how to resume (a half-sent blob cannot simply be sent again)."""
        ok = tuple(ok)
        url = self.url(path_or_url)
        attempt = 0
        reauthorized = False
        redirects = 0
        while True:
            send_headers = dict(headers or {})
            authorize = self.may_authorize(url)
            if authorize and self._authorization:
                send_headers["Authorization"] = self._authorization
            try:
                resp = self._send_once(method, url, send_headers, body, download_to)
                if resp.status == 429 or resp.status >= 500:
                    retry_after = resp.headers.get("Retry-After", "")
                    raise _Transient(
                        f"{method} {_redact(url)}: {resp.status} {_error_detail(resp)}",
                        float(retry_after) if retry_after.isdigit() else 0.0,
                    )
            except _Transient as e:
                if not retry:
                    raise
                if attempt >= self.options.retries:
                    message = f"registry {self.host}: {e} (gave up after {attempt + 1} attempts)"
                    if e.unreachable:
                        raise RegistryUnreachable(f"{message}: it cannot be reached", self.host) from None
                    raise InfraError(message) from None
                log.debug("registry %s: %s; retrying", self.host, e)
                self.backoff(attempt, e.retry_after, e)
                attempt += 1
                continue
            if resp.status == 401 and not reauthorized:
                if authorize:
                    self._answer_challenge(resp)
                    reauthorized = True
                    continue
                if urlsplit(url).netloc == self.host:
                    raise InfraError(
                        f"registry {self.host}: {method} {_redact(url)} was sent to plain HTTP, which asked for "
                        "credentials; forge never sends them in clear (for a registry without TLS, list "
                        f"'http://{self.host}' in package.insecure_registries)"
                    )
            if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD") and redirects < 5:
                # Blob GETs are often redirected to object storage (S3, GCS) on another host; the
                # Authorization header only ever goes to the registry itself (see may_authorize).
                location = resp.headers.get("Location")
                if not location:
                    raise InfraError(f"registry {self.host}: {method} {_redact(url)}: redirect without a Location")
                url = urljoin(url, location)
                redirects += 1
                continue
            if resp.status not in ok:
                if resp.status == 401:
                    raise self._auth_failed(resp.status)
                raise RegistryError(
                    f"registry {self.host}: {method} {_redact(url)} failed: {resp.status} {_error_detail(resp)}",
                    resp.status,
                )
            return resp

    # -- auth

    def _credentials_for_challenge(self) -> Credentials | None:
        if not self._credentials_resolved:
            self._credentials = resolve_credentials(self.host, use_env=self._env_credentials)
            self._credentials_resolved = True
        return self._credentials

    def _auth_failed(self, status: int) -> InfraError:
        creds = self._credentials_for_challenge()
        if creds is not None and self._withheld_realm:
            return InfraError(
                f"registry {self.host}: authentication failed ({status}): its token service "
                f"{self._withheld_realm} is not part of {self.host} (or not HTTPS), so forge did not send it "
                f"the credentials for {self.host}"
            )
        if creds is None and self._env_credentials:
            return InfraError(
                f"registry {self.host}: authentication required ({status}); set FORGE_REGISTRY_USERNAME "
                "and FORGE_REGISTRY_PASSWORD, or log in with docker/skopeo"
            )
        if creds is None:
            return InfraError(
                f"registry {self.host}: authentication required ({status}); log in to {self.host} with "
                "docker/skopeo (FORGE_REGISTRY_USERNAME/PASSWORD are only sent to package.registry)"
            )
        return InfraError(f"registry {self.host}: authentication failed for user {creds.username!r} ({status})")

    def authenticate(self, scopes: Iterable[str]) -> None:
        """Learns the auth scheme from `GET /v2/` and obtains credentials or a token covering
        `scopes` up front, so a wrong password fails fast rather than halfway through a push
        (dist-spec "Determining support")."""
        with self._lock:
            self._scopes.update(scopes)
        with self.phase("authenticating (GET /v2/)"):
            resp = self.request("GET", "/v2/", ok=(200, 401))
            if resp.status == 401:
                self._answer_challenge(resp)
                self.request("GET", "/v2/")

    def _answer_challenge(self, resp: _Response) -> None:
        header = resp.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = header.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        creds = self._credentials_for_challenge()
        if scheme.lower() == "basic":
            if creds is None:
                raise self._auth_failed(401)
            if self._authorization and self._authorization.startswith("Basic "):
                raise self._auth_failed(401)  # these credentials were already refused
            self._authorization = "Basic " + _basic(creds)
        elif scheme.lower() == "bearer" and params.get("realm"):
            with self._lock:
                if params.get("scope"):
                    self._scopes.update(params["scope"].split(" "))
                scopes = sorted(self._scopes)
            realm = params["realm"]
            if creds is not None and not self._realm_may_see_credentials(realm):
                self._withheld_realm = _redact_realm(realm)
                log.info("registry %s: token service %s is not part of it; asking it anonymously",
                         self.host, self._withheld_realm)  # fmt: skip
                creds = None
            token = self._fetch_token(realm, params.get("service"), scopes, creds)
            self._authorization = "Bearer " + token
        else:
            raise InfraError(f"registry {self.host}: unsupported authentication challenge {scheme or '(none)'!r}")

    def _realm_may_see_credentials(self, realm: str) -> bool:
        """A token realm gets this registry's credentials only when it belongs to the registry
        and is reached over HTTPS (plain HTTP only when the registry itself is plain HTTP)."""
        parts = urlsplit(realm)
        if parts.scheme not in ("https", self.scheme):
            return False
        return realm_belongs_to(parts.netloc, self.host)

    def _fetch_token(self, realm: str, service: str | None, scopes: list[str], creds: Credentials | None) -> str:
        """GET the realm with service and scopes, Basic-authenticated when we have credentials
        (https://distribution.github.io/distribution/spec/auth/token/#requesting-a-token)."""
        query = [("service", service)] if service else []
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": "Basic " + _basic(creds)} if creds else {}
        attempt = 0
        with self.phase(f"requesting a token from {_redact_realm(realm)}"):
            while True:
                try:
                    resp = self._send_once("GET", url, headers, None, None)
                    if resp.status >= 500:
                        raise _Transient(f"token service {urlsplit(realm).netloc}: {resp.status}")
                    break
                except _Transient as e:
                    if attempt >= self.options.retries:
                        raise InfraError(f"registry {self.host}: {e}") from None
                    self.backoff(attempt, 0.0, e)
                    attempt += 1
        if resp.status in (401, 403):
            raise self._auth_failed(resp.status)
        if resp.status != 200:
            raise InfraError(f"registry {self.host}: token service answered {resp.status} {_error_detail(resp)}")
        try:
            answer = json.loads(resp.body)
            return answer.get("token") or answer["access_token"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InfraError(f"registry {self.host}: token service answered without a token") from None


def _redact_realm(realm: str) -> str:
    parts = urlsplit(realm)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _basic(creds: Credentials) -> str:
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def _stream_to_file(resp: http.client.HTTPResponse, path: Path) -> str:
    """Streams a response body into `path` (truncating), returning its sha256 hex digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        while chunk := resp.read(_IO_CHUNK):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _repository_scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if urlsplit(url).query else "?") + urlencode(params)


def _range_end(resp: _Response) -> int | None:
    """The last byte the registry holds, from `Range: 0-<end>` (dist-spec "Pushing a blob in
    chunks"). distribution answers `0-0` both for nothing and for one byte received, and does not
    check Content-Range against what it holds; a wrong offset therefore surfaces as DIGEST_INVALID
    at the closing PUT, after which `_push_blob` starts the blob over."""
    match = _RANGE.match(resp.headers.get("Range", "").strip())
    return int(match.group(2)) if match else None


# ---------------------------------------------------------------- pull


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


# ---------------------------------------------------------------- push


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


# ---------------------------------------------------------------- referrers


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
