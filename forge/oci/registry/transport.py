"""HTTP to one registry: per-thread keep-alive connections, bounded timeouts and an operation
deadline, retries, redirects, and the Basic / Bearer token authentication flow."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

from forge.errors import InfraError, InputError
from forge.oci.registry.auth import _HUB_HOST, Credentials, canonical_host, resolve_credentials, same_registry

log = logging.getLogger(__name__)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


_RANGE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)$")


# Read/write unit for downloads and TLS uploads: large enough that per-call overhead vanishes,
# small enough that memory stays flat with several blobs in flight.
_IO_CHUNK = 1 << 20


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
