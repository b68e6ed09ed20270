"""Attacks on forge's registry client, each against fake registries that record what they get.

Who may see a registry password: FORGE_REGISTRY_USERNAME/PASSWORD belong to package.registry
only; docker's config.json entries to exactly their host; a token realm only when it belongs
to the registry the credentials are for; and nothing goes over plain HTTP unless the registry
itself was addressed over plain HTTP. The fakes here log every request's scheme and
Authorization header, act as third-party base-image hosts and as token services on another
host (127.0.0.2) or port, and speak TLS and plain HTTP on one port to stage an https → http
downgrade on the same host. Also: push twice then verify, bounded waits on a hung registry,
junk manifests, base images keyed on their digest.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from forge.build import build
from forge.errors import EXIT_INFRA, InfraError, InputError
from forge.oci import layout
from forge.oci.image import ImageConfig, build_image
from forge.oci.registry import (
    BUILD_REPORT_TYPE,
    Credentials,
    RegistryOptions,
    RegistryUnreachable,
    credentials_for,
    list_referrers,
    pull_image,
    push_image,
    realm_belongs_to,
    resolve_credentials,
    resolve_image,
)
from forge.package import registry_options, resolve_base
from tests import registry_server
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.fault_proxy import Fault, FaultProxy
from tests.registry_server import make_base_layout, make_certificate, require

registry = registry_server.registry  # a real distribution 2.8 (htpasswd), one per module

ENV_USER, ENV_PASSWORD = "ci-bot", "env-s3cret-for-package-registry"
CONFIG_USER, CONFIG_PASSWORD = "cfg-user", "config-s3cret"
FAST = RegistryOptions(backoff_s=0.01, retries=1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- recording fakes


@dataclass
class Seen:
    scheme: str
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeRegistry:
    """A registry on loopback serving one OCI layout (any repository, tag `latest`), recording
    every request. `auth`: None (anonymous), "basic" (wants `user:password`) or "bearer" (wants
    the token `realm` hands out). `tls`: also speaks TLS on the same port (the first byte tells).
    `junk`: (body, content type) served for every manifest. `redirect_to_http`: manifest GETs
    over https answer 307 to the same URL over http. `http_upload_location`: upload sessions
    continue at an http:// Location on the same host."""

    layout_dir: Path | None = None
    auth: str | None = None
    user: str = CONFIG_USER
    password: str = CONFIG_PASSWORD
    realm: str = ""
    tls: ssl.SSLContext | None = None
    junk: tuple[bytes, str] | None = None
    redirect_to_http: bool = False
    http_upload_location: bool = False
    bind: str = "127.0.0.1"
    seen: list[Seen] = field(default_factory=list)
    host: str = ""

    def authorizations(self) -> list[str]:
        return [s.authorization for s in self.seen if s.authorization]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeRegistry

    def handle_error(self, request, client_address) -> None:  # a client refusing our cert, a cut connection
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.scheme = "http"
        tls = self.server.fake.tls
        if tls is not None:
            self.request.settimeout(5)
            first = self.request.recv(1, socket.MSG_PEEK)
            if first == b"\x16":  # a TLS ClientHello
                self.request = tls.wrap_socket(self.request, server_side=True)
                self.scheme = "https"
            self.request.settimeout(None)
        super().setup()

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        fake, got = self.server.fake, self.headers.get("Authorization")
        if fake.auth == "basic":
            return got == basic(fake.user, fake.password)
        if fake.auth == "bearer":
            return got == "Bearer fake-token"
        return True

    def _challenge(self) -> None:
        fake = self.server.fake
        if fake.auth == "basic":
            header = 'Basic realm="fake"'
        else:
            header = f'Bearer realm="{fake.realm}",service="fake",scope="repository:library/base:pull"'
        self._answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": header})

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        fake.seen.append(Seen(self.scheme, self.command, self.path, self.headers.get("Authorization")))
        path = urlsplit(self.path).path
        if not self._authorized():
            return self._challenge()
        if path == "/v2/":
            return self._answer(200, b"{}")
        if "/manifests/" in path:
            if self.command == "PUT":
                return self._answer(201)
            if fake.redirect_to_http and self.scheme == "https":
                return self._answer(307, headers={"Location": f"http://{fake.host}{self.path}"})
            return self._manifest(path.rsplit("/", 1)[1])
        if "/blobs/uploads/" in path:
            if self.command == "POST":
                scheme = "http" if fake.http_upload_location else "https" if self.scheme == "https" else "http"
                return self._answer(202, headers={"Location": f"{scheme}://{fake.host}/v2/up/1?state=x"})
            return self._answer(201)
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            blob = layout.blob_path(fake.layout_dir, digest) if fake.layout_dir else None
            if blob is None or not blob.is_file():
                return self._answer(404)
            return self._answer(200, blob.read_bytes(), {"Content-Type": "application/octet-stream"})
        if path.startswith("/v2/up/"):
            return self._answer(201)
        return self._answer(404)

    def _manifest(self, reference: str) -> None:
        fake = self.server.fake
        if fake.junk is not None:
            return self._answer(200, fake.junk[0], {"Content-Type": fake.junk[1]})
        if reference.startswith("sha256:"):
            digest = reference
        else:
            digest = layout.resolve_tag(fake.layout_dir, reference).digest
        data = layout.read_blob(fake.layout_dir, digest)
        media_type = json.loads(data).get("mediaType", layout.MANIFEST)
        self._answer(200, data, {"Content-Type": media_type, "Docker-Content-Digest": digest})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _handle  # noqa: N815


@contextmanager
def serving(fake: FakeRegistry) -> Iterator[FakeRegistry]:
    server = _Server((fake.bind, 0), _Handler)
    server.fake = fake
    fake.host = f"{fake.bind}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class TokenService:
    """A token realm that records the Authorization it gets and grants `fake-token`: to anyone
    (`anonymous`, as Docker Hub's auth service does for public pulls) or only to `user:password`."""

    user: str = CONFIG_USER
    password: str = CONFIG_PASSWORD
    anonymous: bool = True
    bind: str = "127.0.0.2"  # another host than the registries' 127.0.0.1
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def authorizations(self) -> list[str]:
        return [s.authorization for s in self.seen if s.authorization]


@contextmanager
def token_service(service: TokenService) -> Iterator[TokenService]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            got = self.headers.get("Authorization")
            service.seen.append(Seen("http", "GET", self.path, got))
            if service.anonymous or got == basic(service.user, service.password):
                body, status = b'{"token": "fake-token"}', 200
            else:
                body, status = b'{"errors":[{"code":"DENIED"}]}', 401
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((service.bind, 0), Handler)
    server.daemon_threads = True
    service.url = f"http://{service.bind}:{server.server_address[1]}/token"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def no_ambient_credentials(tmp_path: Path, monkeypatch) -> Path:
    """Env creds set (as in CI), and an empty docker config dir the test may fill."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", ENV_USER)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", ENV_PASSWORD)
    docker = tmp_path / "docker"
    docker.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    return docker


def docker_login(docker: Path, host: str, user: str = CONFIG_USER, password: str = CONFIG_PASSWORD) -> None:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base_layout(tmp_path_factory.mktemp("fake-base") / "layout")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("attack-model") / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    return model


def secrets_in(texts: list[str | None]) -> list[str]:
    """Any of the planted passwords, in clear or in a Basic header, among `texts`."""
    needles = [ENV_PASSWORD, CONFIG_PASSWORD, basic(ENV_USER, ENV_PASSWORD), basic(CONFIG_USER, CONFIG_PASSWORD)]
    return [t for t in texts if t and any(n in t for n in needles)]


# ---------------------------------------------------------------- 1. env credentials stay home


def test_env_credentials_never_reach_a_base_image_host_or_its_realm(
    no_ambient_credentials: Path, base_layout: Path, model_dir: Path, tmp_path: Path
) -> None:
    """The CI case: env creds for the push registry, a base image on a third party whose token
    service is on yet another host (as Docker Hub's is). Neither sees a password; the pull works
    on the anonymous token, as for any public image."""
    with (
        token_service(TokenService(anonymous=True)) as realm,
        serving(FakeRegistry(base_layout, auth="bearer", realm="")) as third_party,
    ):
        third_party.realm = realm.url
        base = f"{third_party.host}/library/base:latest"
        # What the package stage does: plan-time resolution, then the pull, with package.registry elsewhere.
        resolved = resolve_base(base, tmp_path, push_registry="127.0.0.1:1")
        assert resolved["digest"] == layout.resolve_tag(base_layout, "latest").digest
        creds = credentials_for(third_party.host, "127.0.0.1:1")  # as package_artifact asks
        assert creds is None
        built = build_image(resolved["image"], model_dir, None, ImageConfig(), tmp_path / "o", "v1", credentials=creds)
    assert built.base == f"{base}@{resolved['digest']}"
    assert realm.seen, "the token flow was not exercised"
    assert third_party.seen and all(s.authorization in (None, "Bearer fake-token") for s in third_party.seen)
    assert secrets_in([s.authorization for s in third_party.seen + realm.seen]) == []
    assert realm.authorizations() == []


def test_env_credentials_are_not_sent_to_a_base_host_that_asks_for_a_password(
    no_ambient_credentials: Path, base_layout: Path, model_dir: Path, tmp_path: Path
) -> None:
    """A base host answering 401 Basic gets no password: the pull fails, exit 3, saying how to
    log in to that host, and the fake recorded no Authorization at all."""
    with serving(FakeRegistry(base_layout, auth="basic")) as third_party:
        with pytest.raises(InfraError) as caught:
            build_image(f"{third_party.host}/library/base:latest", model_dir, None, ImageConfig(), tmp_path / "o", "v1")
    assert caught.value.exit_code == EXIT_INFRA
    assert f"registry {third_party.host}: authentication required" in str(caught.value)
    assert "only sent to package.registry" in str(caught.value)
    assert third_party.authorizations() == []


def test_env_credentials_go_to_the_push_registry_but_not_to_a_foreign_realm(
    no_ambient_credentials: Path, base_layout: Path
) -> None:
    """The push registry itself gets the env creds (Basic); when it delegates to a token service on
    another host, that service is asked anonymously and the error says why it failed."""
    with serving(FakeRegistry(base_layout, auth="basic", user=ENV_USER, password=ENV_PASSWORD)) as target:
        result = push_image(base_layout, f"{target.host}/library/base:v1", options=FAST)
        assert result.digest == layout.resolve_tag(base_layout, "latest").digest
        assert basic(ENV_USER, ENV_PASSWORD) in target.authorizations()
    with (
        token_service(TokenService(ENV_USER, ENV_PASSWORD, anonymous=False)) as realm,
        serving(FakeRegistry(base_layout, auth="bearer")) as target,
    ):
        target.realm = realm.url
        with pytest.raises(InfraError) as caught:
            push_image(base_layout, f"{target.host}/library/base:v1", options=FAST)
    assert realm.seen and realm.authorizations() == []
    assert f"token service {realm.url}" in str(caught.value) and "did not send" in str(caught.value)


def test_a_realm_on_the_registry_host_gets_its_credentials(no_ambient_credentials: Path, base_layout: Path) -> None:
    """The other side of the rule: a token service on the registry's own host (another port, as
    distribution's often is) is the registry's, and gets the docker-config login."""
    with (
        serving(FakeRegistry(base_layout, auth="bearer")) as target,
        token_service(TokenService(anonymous=False, bind="127.0.0.1")) as realm,
    ):
        target.realm = realm.url
        docker_login(no_ambient_credentials, target.host)
        pulled = pull_image(f"{target.host}/library/base:latest", no_ambient_credentials / "pulled", options=FAST)
    assert pulled.digest
    assert realm.authorizations() == [basic(CONFIG_USER, CONFIG_PASSWORD)]


@pytest.mark.parametrize(
    ("realm", "registry_host", "belongs"),
    [
        ("127.0.0.1:9000", "127.0.0.1:5000", True),
        ("127.0.0.2:9000", "127.0.0.1:5000", False),
        ("localhost:5000", "127.0.0.1:5000", False),
        ("auth.docker.io", "registry-1.docker.io", True),
        ("auth.docker.io", "docker.io", True),
        ("evil.example", "registry-1.docker.io", False),
        ("gitlab.com", "registry.gitlab.com", True),
        ("auth.gitlab.com", "registry.gitlab.com", True),
        ("gitlab.com.evil.io", "registry.gitlab.com", False),
        ("evil.co.uk", "registry.co.uk", False),
        ("ghcr.io", "ghcr.io", True),
        ("token.ghcr.io.evil.net", "ghcr.io", False),
    ],
)
def test_realm_belongs_to(realm: str, registry_host: str, belongs: bool) -> None:
    assert realm_belongs_to(realm, registry_host) is belongs


def test_env_credentials_are_scoped_by_caller(monkeypatch) -> None:
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", ENV_USER)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent")
    assert credentials_for("registry.example:5000", "registry.example:5000").username == ENV_USER
    assert credentials_for("registry-1.docker.io", "docker.io").username == ENV_USER  # one registry, two names
    assert credentials_for("ghcr.io", "registry.example:5000") is None
    assert credentials_for("registry-1.docker.io", None) is None
    assert resolve_credentials("ghcr.io", use_env=False) is None


# ---------------------------------------------------------------- docker config: exact host only


def test_docker_config_credentials_go_only_to_their_exact_host(
    no_ambient_credentials: Path, base_layout: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("FORGE_REGISTRY_USERNAME")
    monkeypatch.delenv("FORGE_REGISTRY_PASSWORD")
    with serving(FakeRegistry(base_layout, auth="basic")) as owner, serving(FakeRegistry(base_layout)) as other:
        docker_login(no_ambient_credentials, owner.host)
        pull_image(f"{owner.host}/library/base:latest", tmp_path / "a", options=FAST)
        pull_image(f"{other.host}/library/base:latest", tmp_path / "b", options=FAST)
        port = owner.host.rsplit(":", 1)[1]
        with pytest.raises(InfraError, match="authentication required"):  # same server, another name
            pull_image(f"localhost:{port}/library/base:latest", tmp_path / "c", options=FAST)
    assert owner.authorizations() and set(owner.authorizations()) == {basic(CONFIG_USER, CONFIG_PASSWORD)}
    localhost_requests = [s for s in owner.seen if s.authorization is None]
    assert localhost_requests  # the 401s: by name `localhost` nothing was sent
    assert other.authorizations() == []


def test_docker_config_credentials_do_not_follow_a_foreign_realm(
    no_ambient_credentials: Path, base_layout: Path, tmp_path: Path
) -> None:
    with token_service(TokenService(anonymous=True)) as realm, serving(FakeRegistry(base_layout, auth="bearer")) as reg:
        reg.realm = realm.url
        docker_login(no_ambient_credentials, reg.host)
        pull_image(f"{reg.host}/library/base:latest", tmp_path / "p", options=FAST)
    assert realm.seen and realm.authorizations() == []


# ---------------------------------------------------------------- 2. no cleartext after a downgrade


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require("openssl")
    return make_certificate(tmp_path_factory.mktemp("tls"), "fake-registry")


def tls_context(files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*files)
    return context


def test_no_authorization_over_http_after_an_https_redirect(
    base_layout: Path, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """The registry is addressed over HTTPS; its manifest GET redirects to http:// on the same
    host and port. The password went over TLS only; the plain request carried nothing, and the
    failure says why."""
    fake = FakeRegistry(base_layout, auth="basic", tls=tls_context(tls_files), redirect_to_http=True)
    options = RegistryOptions(plain_http=False, ca_file=str(tls_files[0]), backoff_s=0.01, retries=0)
    creds = Credentials(CONFIG_USER, CONFIG_PASSWORD)
    with serving(fake):
        with pytest.raises(InfraError) as caught:
            pull_image(f"{fake.host}/library/base:latest", tmp_path / "p", credentials=creds, options=options)
    assert [s for s in fake.seen if s.scheme == "https" and s.authorization]  # creds were in play, over TLS
    plain = [s for s in fake.seen if s.scheme == "http"]
    assert plain and all(s.authorization is None for s in plain)
    assert "plain HTTP" in str(caught.value) and caught.value.exit_code == EXIT_INFRA


def test_no_authorization_on_an_http_upload_location(
    base_layout: Path, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    fake = FakeRegistry(base_layout, auth="basic", tls=tls_context(tls_files), http_upload_location=True)
    fake.layout_dir = tmp_path / "empty"  # holds no blob, so every blob is uploaded
    layout.init_layout(fake.layout_dir)
    options = RegistryOptions(plain_http=False, ca_file=str(tls_files[0]), backoff_s=0.01, retries=0)
    with serving(fake):
        with pytest.raises(InfraError, match="plain HTTP"):
            push_image(base_layout, f"{fake.host}/library/base:v1", credentials=Credentials(CONFIG_USER,
                       CONFIG_PASSWORD), options=options)  # fmt: skip
    assert any(s.scheme == "http" and s.method == "PUT" for s in fake.seen)
    assert all(s.authorization is None for s in fake.seen if s.scheme == "http")


def test_no_credentials_to_a_plain_http_realm_of_an_https_registry(
    base_layout: Path, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same host, but the token service is http://: asked anonymously (its token is still used)."""
    with token_service(TokenService(anonymous=True, bind="127.0.0.1")) as realm:
        fake = FakeRegistry(base_layout, auth="bearer", realm=realm.url, tls=tls_context(tls_files))
        options = RegistryOptions(plain_http=False, ca_file=str(tls_files[0]), backoff_s=0.01, retries=0)
        with serving(fake):
            pull_image(f"{fake.host}/library/base:latest", tmp_path / "p",
                       credentials=Credentials(CONFIG_USER, CONFIG_PASSWORD), options=options)  # fmt: skip
    assert realm.seen and realm.authorizations() == []


def test_explicit_plain_http_registry_still_gets_its_credentials(base_layout: Path, tmp_path: Path) -> None:
    """`http://host` in package.insecure_registries is an explicit choice: that registry (and only
    it) gets its login over plain HTTP; `host` alone means HTTPS without verification."""
    with serving(FakeRegistry(base_layout, auth="basic", bind="127.0.0.1")) as fake:
        host = fake.host
        options = RegistryOptions(backoff_s=0.01).for_host(host, [f"http://{host}"])
        assert (options.plain_http, options.tls_verify) == (True, True)
        pull_image(f"{host}/library/base:latest", tmp_path / "p",
                   credentials=Credentials(CONFIG_USER, CONFIG_PASSWORD), options=options)  # fmt: skip
    assert fake.authorizations() and all(s.scheme == "http" for s in fake.seen)
    relaxed = RegistryOptions().for_host("reg.example:5000", ["reg.example:5000", "other:1"])
    assert (relaxed.plain_http, relaxed.tls_verify) == (False, False)
    assert RegistryOptions().for_host("reg.example:5001", ["reg.example:5000"]) == RegistryOptions()


def test_untrusted_certificate_error_offers_what_users_can_set(
    base_layout: Path, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    fake = FakeRegistry(base_layout, tls=tls_context(tls_files))
    with serving(fake):
        with pytest.raises(InfraError) as caught:
            pull_image(f"{fake.host}/library/base:latest", tmp_path / "p",
                       options=RegistryOptions(plain_http=False, retries=0))  # fmt: skip
        message = str(caught.value)
        assert "TLS certificate not trusted" in message
        assert "SSL_CERT_FILE" in message and "package.insecure_registries" in message
        assert "tls_verify" not in message
        insecure = RegistryOptions(retries=0).for_host(fake.host, [fake.host])  # what the recipe field does
        assert pull_image(f"{fake.host}/library/base:latest", tmp_path / "q", options=insecure).digest


# ---------------------------------------------------------------- 9. bounded waits


@contextmanager
def hung_registry() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()


def test_hung_registry_fails_within_the_deadline_naming_the_phase(base_layout: Path) -> None:
    options = RegistryOptions(timeout_s=60, deadline_s=1.5, retries=4, backoff_s=0.01)
    started = time.monotonic()
    with hung_registry() as host:
        with pytest.raises(InfraError) as caught:
            push_image(base_layout, f"{host}/x/y:v1", options=options)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert elapsed < 1.5 + 2.0, f"took {elapsed:.1f} s"
    assert message.startswith(f"registry {host}: push of {host}/x/y gave up at its 1.5 s deadline")
    assert "while authenticating" in message and "\n" not in message
    assert caught.value.exit_code == EXIT_INFRA


def test_hung_read_timeout_is_named_and_retries_are_bounded(base_layout: Path) -> None:
    options = RegistryOptions(timeout_s=0.3, retries=2, backoff_s=0.01)
    started = time.monotonic()
    with hung_registry() as host:
        with pytest.raises(InfraError, match=r"no progress for 0.3 s \(read/write timeout\).*gave up after 3 attempts"):
            push_image(base_layout, f"{host}/x/y:v1", options=options)
    assert time.monotonic() - started < 3 * 0.3 + 2.0


def test_registry_hanging_mid_push_fails_naming_the_blob(registry, base_layout: Path) -> None:
    """Authentication and HEADs go through; every blob upload then hangs (a proxy that stalls it)."""
    options = RegistryOptions(timeout_s=60, deadline_s=3.0, retries=4, backoff_s=0.01)
    creds = Credentials(registry.username, registry.password)
    started = time.monotonic()
    with FaultProxy(registry.host, [Fault("stall", "PUT|PATCH", r"/blobs/uploads/", times=None, seconds=20)]) as proxy:
        with pytest.raises(InfraError) as caught:
            push_image(base_layout, f"{proxy.host}/hang/base:v1", credentials=creds, options=options)
    assert time.monotonic() - started < 3.0 + 2.0
    assert "gave up at its 3 s deadline while uploading blob sha256:" in str(caught.value)


def test_deadline_and_timeout_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("FORGE_REGISTRY_DEADLINE_S", "120")
    monkeypatch.setenv("FORGE_REGISTRY_TIMEOUT_S", "7.5")
    options = registry_options("reg.example")
    assert (options.deadline_s, options.timeout_s) == (120.0, 7.5)
    monkeypatch.setenv("FORGE_REGISTRY_DEADLINE_S", "soon")
    with pytest.raises(InputError, match="FORGE_REGISTRY_DEADLINE_S"):
        registry_options("reg.example")
    assert RegistryOptions().timeout_s <= 60 and RegistryOptions().deadline_s is None


# ---------------------------------------------------------------- 4. junk manifests


def _index_with(entry: dict) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": layout.INDEX, "manifests": [entry]}).encode()


@pytest.mark.parametrize(
    "junk",
    [
        (b"<html><body>Please log in</body></html>", "text/html"),
        (b"\x00\xff not json at all", layout.MANIFEST),
        (b"[1, 2, 3]", "application/json"),
        (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}', layout.MANIFEST),
        (
            json.dumps(
                {"schemaVersion": 2, "mediaType": layout.MANIFEST, "config": {"digest": "sha256:xyz"}, "layers": []}
            ).encode(),
            layout.MANIFEST,
        ),  # fmt: skip
        (
            json.dumps({"schemaVersion": 2, "mediaType": layout.MANIFEST, "config": "x", "layers": [7]}).encode(),
            layout.MANIFEST,
        ),  # fmt: skip
        (_index_with({"digest": "nope", "platform": "linux"}), layout.INDEX),
        (b'{"schemaVersion": 1, "name": "old/schema1"}', "application/vnd.docker.distribution.manifest.v1+json"),
    ],
    ids=["html", "binary", "json-list", "no-config", "bad-digest", "bad-descriptors", "bad-index", "schema1"],
)
def test_junk_manifest_is_a_clean_infra_error(junk, model_dir: Path, tmp_path: Path) -> None:
    with serving(FakeRegistry(junk=junk)) as fake:
        with pytest.raises(InfraError) as caught:
            build_image(f"{fake.host}/library/junk:latest", model_dir, None, ImageConfig(), tmp_path / "o", "v1",
                        registry_options=FAST)  # fmt: skip
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_INFRA
    assert message.startswith(f"registry {fake.host}: ") and "library/junk" in message, message
    assert "\n" not in message


def test_junk_index_entry_served_by_digest(base_layout: Path, model_dir: Path, tmp_path: Path) -> None:
    """The tag's index is fine, the platform manifest it points to is junk with the right digest."""
    junk = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": {}}'
    root = tmp_path / "layout"
    layout.init_layout(root)
    digest = layout.write_blob(root, junk)
    index = _index_with({"mediaType": layout.MANIFEST, "digest": digest, "size": len(junk),
                         "platform": {"os": "linux", "architecture": "amd64"}})  # fmt: skip
    layout.tag_manifest(root, layout.Descriptor(layout.INDEX, layout.write_blob(root, index), len(index)), "latest")
    with serving(FakeRegistry(root)) as fake:
        with pytest.raises(InfraError, match=rf"registry {fake.host}: manifest library/junk@{digest}"):
            build_image(f"{fake.host}/library/junk:latest", model_dir, None, ImageConfig(), tmp_path / "o", "v1",
                        registry_options=FAST)  # fmt: skip


# ---------------------------------------------------------------- 14/15. the base image in the key


def plan_stage(recipe: Path, kind: str = "package") -> dict:
    code, output = run_cli("plan", str(recipe), "--json", "--artifacts-dir", str(recipe.parent / "artifacts"))
    assert code == 0, output
    return next(s for s in json.loads(output)["stages"] if s["kind"] == kind)


def base_recipe(tiny_model: Path, eval_text: Path, base: str, **package) -> dict:
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = data["variants"][:1]
    data["package"] = {"enabled": True, "base_images": {"vllm": base}, **package}
    return data


def test_a_retagged_base_changes_the_package_key(
    registry, tiny_model: Path, eval_text: Path, tmp_path: Path, monkeypatch
) -> None:
    """The base lives on package.registry (so the env login may be used to resolve it). Pushing
    another image under the same tag changes the digest the plan records and the stage's key."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    creds = Credentials(registry.username, registry.password)
    first = make_base_layout(tmp_path / "first")
    second = tmp_path / "second"
    layout.init_layout(second)
    built = build_image(f"oci:{first}:latest", tiny_model, None, ImageConfig(cmd=["x"]), second, "latest")
    ref = f"{registry.host}/retag/base:latest"
    recipe = write_recipe(tmp_path / "r", base_recipe(tiny_model, eval_text, ref, registry=registry.host,
                                                      repository="retag/app"))  # fmt: skip

    pushed = push_image(first, ref, credentials=creds, options=FAST)
    before = plan_stage(recipe)
    push_image(second, ref, source_tag="latest", credentials=creds, options=FAST)
    after = plan_stage(recipe)
    assert before["params"]["base"]["digest"] == pushed.digest
    assert after["params"]["base"]["digest"] == built.digest
    assert before["params"]["base"]["image"] == f"{ref}@{pushed.digest}"
    assert before["key"] != after["key"]
    assert not before["reason"]


def closed_host() -> str:
    """`127.0.0.1:PORT` with nothing listening: every connection is refused."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        return f"127.0.0.1:{closed.getsockname()[1]}"


@pytest.mark.parametrize("host", ["refused", "forge-no-such-host.invalid"])
def test_a_registry_that_cannot_be_reached_is_told_apart_from_one_that_answers_badly(host: str) -> None:
    """Connection refused and a DNS failure (`.invalid` never resolves: RFC 2606) are
    RegistryUnreachable; a registry serving junk is an InfraError that is not."""
    host = closed_host() if host == "refused" else host
    with pytest.raises(RegistryUnreachable) as caught:
        resolve_image(f"{host}/gone/base:v1", options=FAST)
    assert caught.value.exit_code == EXIT_INFRA and caught.value.host == host
    junk = (b"<html>log in</html>", "text/html")
    with serving(FakeRegistry(junk=junk)) as fake, pytest.raises(InfraError) as answered:
        resolve_image(f"{fake.host}/library/junk:latest", options=FAST)
    assert not isinstance(answered.value, RegistryUnreachable), answered.value


def test_an_unreachable_base_defers_the_package_stage_with_its_command(
    tiny_model: Path, eval_text: Path, tmp_path: Path, monkeypatch
) -> None:
    """Nothing listens on the base's host: the plan defers the package stage (keyed on the name)
    with the command that builds it later, and the offline way round (a local layout)."""
    host = closed_host()
    base = f"{host}/gone/base:v1"
    recipe = write_recipe(tmp_path / "r", base_recipe(tiny_model, eval_text, base))
    stage = plan_stage(recipe)
    assert stage["status"] == "deferred", stage
    assert stage["params"]["base"]["digest"] is None
    assert f"its base image {base} cannot be reached" in stage["reason"] and host in stage["reason"]
    assert stage["command"].startswith(f"forge build {recipe} --only package/fp8/vllm/H100  # where {base}")
    assert f"skopeo copy docker://{base} oci:bases/vllm:v1" in stage["command"]
    assert "package.base_images.vllm: oci:bases/vllm:v1" in stage["command"]
    monkeypatch.setenv("FORGE_OFFLINE", "1")
    offline = plan_stage(recipe)
    assert offline["status"] == "deferred" and "FORGE_OFFLINE" in offline["reason"]


def test_build_with_an_unreachable_base_defers_the_image_and_records_the_command(
    tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    """The build goes on (exit 0: nothing failed, the GPU gates are deferred as without a base),
    build.json says the package stage is deferred, with its command; no image is listed."""
    base = f"{closed_host()}/gone/base:v1"
    data = base_recipe(tiny_model, eval_text, base)
    data["validation"]["throughput"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r", data)
    artifacts = tmp_path / "artifacts"
    code, output = run_cli("build", str(recipe), "--json", "--artifacts-dir", str(artifacts))
    assert code == 0, output
    report = json.loads((artifacts / "tiny" / "build.json").read_text())
    package = next(s for s in report["stages"] if s["id"] == "package/fp8/vllm/H100")
    assert package["status"] == "deferred", package
    assert package["command"].startswith(f"forge build {recipe} --only package/fp8/vllm/H100")
    assert report["images"] == []
    assert report["status"] != "error"


def test_build_against_a_base_registry_serving_junk_fails_with_exit_3(
    tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    """A registry that answers, badly, is no reason to defer: the package stage fails, exit 3,
    naming the registry, and build.json records the failure."""
    junk = (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}', layout.MANIFEST)
    with serving(FakeRegistry(junk=junk)) as fake:
        data = base_recipe(tiny_model, eval_text, f"{fake.host}/library/junk:latest")
        data["validation"]["throughput"] = {"enabled": False}
        recipe = write_recipe(tmp_path / "r", data)
        assert plan_stage(recipe)["status"] == "run"
        artifacts = tmp_path / "artifacts"
        code, output = run_cli("build", str(recipe), "--artifacts-dir", str(artifacts))
    assert code == EXIT_INFRA, output
    assert f"registry {fake.host}" in output and "Traceback" not in output
    assert "forge: package/fp8/vllm/H100: " in output  # the stage that failed, then why
    report = json.loads((artifacts / "tiny" / "build.json").read_text())
    assert report["status"] == "error" and report["error"]["message"].startswith("package/fp8/vllm/H100: ")
    assert next(s for s in report["stages"] if s["id"] == "package/fp8/vllm/H100")["status"] == "failed"


def test_relative_oci_base_is_resolved_from_the_recipe_and_keyed_on_its_digest(
    tiny_model: Path, eval_text: Path, tmp_path: Path, monkeypatch
) -> None:
    recipe_dir = tmp_path / "project"
    base = make_base_layout(recipe_dir / "bases" / "tiny")
    recipe = write_recipe(recipe_dir, base_recipe(tiny_model, eval_text, "oci:bases/tiny:latest"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    stage = plan_stage(recipe)
    index = json.loads(layout.read_blob(base, layout.resolve_tag(base, "latest").digest))
    amd64 = next(m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == "amd64")
    assert stage["params"]["base"] == {
        "image": f"oci:{base.resolve()}:latest",
        "digest": amd64,
        "note": None,
        "unreachable": None,
    }
    # Another image in the layout under the same tag: a new digest, so a new key.
    other = next(m for m in index["manifests"] if m["platform"]["architecture"] == "arm64")
    layout.tag_manifest(base, layout.Descriptor.from_json(other), "latest")
    again = plan_stage(recipe)
    assert again["params"]["base"]["digest"] == other["digest"] and again["key"] != stage["key"]
    missing = write_recipe(tmp_path / "other", base_recipe(tiny_model, eval_text, "oci:bases/tiny:latest"))
    code, output = run_cli("plan", str(missing), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "bases/tiny" in output


# ---------------------------------------------------------------- 6 + end to end: the CI job


def test_ci_build_push_twice_then_verify(
    registry, tiny_model: Path, eval_text: Path, base_layout: Path, tmp_path: Path, monkeypatch
) -> None:
    """`forge build` with env creds for package.registry and a base image on a third-party host
    whose token service is elsewhere (the default-base-image CI job): the third party and its
    realm never see a password, build.json records the base digest resolved at plan time, and
    after a second `forge push` (a second report + provenance) `forge verify` still passes."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    with token_service(TokenService(anonymous=True)) as realm, serving(FakeRegistry(base_layout, auth="bearer")) as hub:
        hub.realm = realm.url
        recipe = write_recipe(tmp_path / "r", base_recipe(
            tiny_model, eval_text, f"{hub.host}/library/base:latest", registry=registry.host,
            repository="forge/twice", tags=["{variant}-{backend}-{gpu}", "latest"],
        ))  # fmt: skip
        artifacts = tmp_path / "artifacts"
        report = build(recipe, artifacts_dir=artifacts).report
        code, output = run_cli("push", str(recipe), "--json", "--artifacts-dir", str(artifacts))
        assert code == 0, output
    assert hub.seen and realm.seen
    assert secrets_in([s.authorization for s in hub.seen + realm.seen]) == []
    assert realm.authorizations() == []
    assert registry.password not in json.dumps(report)
    image = report["images"][0]
    assert image["base_resolved"] == layout.resolve_tag(base_layout, "latest").digest

    digest = report["pushed"][0]["digest"]
    assert json.loads(output)[0]["digest"] == digest
    creds = Credentials(registry.username, registry.password)
    reports = list_referrers(f"{registry.host}/forge/twice@{digest}", digest, artifact_type=BUILD_REPORT_TYPE,
                             credentials=creds)  # fmt: skip
    assert len(reports) == 2, "the second push attached a second report"
    code, output = run_cli("verify", f"{registry.host}/forge/twice:latest", "--recipe", str(recipe))
    assert code == 0, output
    assert "FAIL" not in output and "ok   build report untampered" in output

    # A report attached outside a push is still caught, however many pushes there were.
    from forge.oci.registry import attach_referrer

    attach_referrer(f"{registry.host}/forge/twice@{digest}", b'{"validation": {}}', credentials=creds)
    code, output = run_cli("verify", f"{registry.host}/forge/twice:latest", "--recipe", str(recipe))
    assert code == 1 and "FAIL build report untampered" in output


def test_verify_elsewhere_gets_no_env_credentials(
    registry, tiny_model: Path, eval_text: Path, base_layout: Path, tmp_path: Path, monkeypatch
) -> None:
    """`forge verify` of an image on another host than the recipe's package.registry: anonymous."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", ENV_USER)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    recipe = write_recipe(tmp_path / "r", base_recipe(tiny_model, eval_text, "oci:x", registry=registry.host,
                                                      repository="a/b"))  # fmt: skip
    with serving(FakeRegistry(base_layout, auth="basic", user=ENV_USER, password=ENV_PASSWORD)) as elsewhere:
        code, output = run_cli("verify", f"{elsewhere.host}/library/base:latest", "--recipe", str(recipe))
    assert code == EXIT_INFRA and "authentication required" in output
    assert elsewhere.authorizations() == []


def test_junk_base_manifest_through_the_cli_is_exit_3(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    with serving(FakeRegistry(junk=(b"<html>captive portal</html>", "text/html"))) as fake:
        recipe = write_recipe(tmp_path / "r", base_recipe(tiny_model, eval_text, f"{fake.host}/library/junk:1"))
        code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == EXIT_INFRA, output
    assert f"registry {fake.host}" in output and "library/junk" in output
    assert "Traceback" not in output


def test_a_base_gone_between_plan_and_pull_fails_with_the_command_to_finish(
    tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    """A base pinned by digest needs no lookup at plan time, so the stage runs; its registry cannot
    be reached when it pulls: exit 3 (the build was asked to make the image), naming the stage and
    the commands that finish it later or offline."""
    base = f"{closed_host()}/gone/base@sha256:{'a' * 64}"
    data = base_recipe(tiny_model, eval_text, base)
    data["validation"]["throughput"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r", data)
    assert plan_stage(recipe)["status"] == "run"
    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == EXIT_INFRA, output
    assert "package/fp8/vllm/H100: registry " in output and "cannot be reached" in output
    assert f"forge build {recipe} --only package/fp8/vllm/H100" in output
    assert f"skopeo copy docker://{base} oci:bases/vllm:latest" in output and "Traceback" not in output


def test_an_unreachable_modelcar_base_defers_the_model_image(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    base = f"{closed_host()}/library/busybox:1.37"
    data = base_recipe(tiny_model, eval_text, f"{closed_host()}/gone/base:v1")
    data["package"] = {"model_images": True, "modelcar_base": base}
    recipe = write_recipe(tmp_path / "r", data)
    stage = plan_stage(recipe, "model-image")
    assert stage["status"] == "deferred" and f"its modelcar base {base} cannot be reached" in stage["reason"]
    assert stage["command"].startswith(f"forge build {recipe} --only model-image/fp8/vllm/H100")
    assert "then set package.modelcar_base: oci:bases/modelcar:1.37" in stage["command"]
