"""A real registry on loopback for tests: Debian's `docker-registry` (distribution 2.8) with
htpasswd (bcrypt) auth or token auth, plus a tiny base image built without any network.

`running_registry()` and `running_token_registry()` are context managers; `registry` is a
module-scoped pytest fixture built on the first. Tests skip, saying why, only when the binaries
are missing (install them with `apt-get install $(cat .ci/apt-packages.txt)`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import missing_requirement

REGISTRY_BIN = "docker-registry"
USERNAME = "forge"
PASSWORD = "s3cret-pw"


def require(*programs: str) -> None:
    """Skips (fails in CI) the calling test when a program it needs is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        missing_requirement(f"needs {', '.join(missing)} (apt-get install $(cat .ci/apt-packages.txt))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RegistryServer:
    host: str  # "127.0.0.1:<port>"
    username: str
    password: str
    storage: Path
    log: Path

    @property
    def creds(self) -> str:
        """`user:password`, as skopeo's --creds wants it."""
        return f"{self.username}:{self.password}"


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 15.0) -> None:
    unverified = ssl._create_unverified_context()  # only asks "is it up?"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1, context=unverified)
            return
        except urllib.error.HTTPError:
            return  # 401: up, and asking for credentials
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer on {url} within {timeout_s} s")


def make_certificate(workdir: Path, name: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and key (openssl CLI), valid for `san`."""
    key, cert = workdir / f"{name}.key", workdir / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-subj", f"/CN={name}", "-days", "2", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextmanager
def _serve(
    workdir: Path, auth: dict, username: str, password: str, tls: tuple[Path, Path] | None = None
) -> Iterator[RegistryServer]:
    require(REGISTRY_BIN)
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "forge-test-only"},
        "auth": auth,
    }
    if tls:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = workdir / "registry.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config_path)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/", proc, log)
        yield RegistryServer(f"127.0.0.1:{port}", username, password, storage, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_registry(
    workdir: Path, username: str = USERNAME, password: str = PASSWORD, tls: bool = False
) -> Iterator[RegistryServer]:
    """distribution with htpasswd auth; the bcrypt hash comes from apache2-utils' htpasswd. With
    `tls`, it serves HTTPS with a self-signed certificate at `workdir/registry.crt`."""
    require(REGISTRY_BIN, "htpasswd", *(["openssl"] if tls else []))
    workdir.mkdir(parents=True, exist_ok=True)
    line = subprocess.run(
        ["htpasswd", "-Bbn", username, password], check=True, capture_output=True, text=True
    ).stdout.strip()
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(line + "\n")
    auth = {"htpasswd": {"realm": "forge-test", "path": str(htpasswd)}}
    cert = make_certificate(workdir, "registry") if tls else None
    with _serve(workdir, auth, username, password, cert) as server:
        yield server


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


# ---------------------------------------------------------------- token auth


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenIssuer:
    """Signs distribution tokens (RS256 JWTs with the certificate in `x5c`) using the openssl CLI,
    so the Bearer flow is exercised against the real registry without a crypto dependency."""

    def __init__(self, workdir: Path, service: str, issuer: str) -> None:
        self.cert, self.key = make_certificate(workdir, "forge-test-token", san="DNS:forge-test-token")
        pem = self.cert.read_text()
        self.x5c = "".join(pem.split("-----")[2].split())  # base64 of the DER certificate
        self.service = service
        self.issuer = issuer

    def token(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": hashlib.sha256(f"{now}{scopes}".encode()).hexdigest()[:16], "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"


@dataclass
class TokenLog:
    requests: list[dict]


@contextmanager
def running_token_registry(
    workdir: Path, username: str = USERNAME, password: str = PASSWORD
) -> Iterator[tuple[RegistryServer, TokenLog]]:
    """distribution with `auth: token`, and a token service on another port that checks Basic
    credentials and grants every scope asked for."""
    require(REGISTRY_BIN, "openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    issuer = _TokenIssuer(workdir, service="forge-test-registry", issuer="forge-test-issuer")
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    seen = TokenLog([])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            from urllib.parse import parse_qs, urlsplit

            query = parse_qs(urlsplit(self.path).query)
            seen.requests.append({"scope": query.get("scope", []), "service": query.get("service", [])})
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps({"token": issuer.token(username, query.get("scope", [])), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    auth = {
        "token": {
            "realm": f"http://127.0.0.1:{server.server_address[1]}/token",
            "service": issuer.service,
            "issuer": issuer.issuer,
            "rootcertbundle": str(issuer.cert),
        }
    }
    try:
        with _serve(workdir, auth, username, password) as registry_server:
            yield registry_server, seen
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- a tiny base image


def _tar_gz(files: dict[str, tuple[bytes, int]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted({str(Path(n).parent) for n in files} - {"."}):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _put(blobs: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_base_layout(root: Path) -> Path:
    """A busybox-like base image in an OCI layout, written with plain json/tarfile (not forge's
    code): an image index tagged `latest` with linux/amd64 and linux/arm64 manifests, each with
    one gzip layer holding `bin/busybox` and `etc/os-release`."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries = []
    for arch in ("amd64", "arm64"):
        layer_tar = _tar_gz(
            {
                "bin/busybox": (f"#!/bin/sh\necho busybox {arch}\n".encode(), 0o755),
                "etc/os-release": (f"NAME=tiny\nARCH={arch}\n".encode(), 0o644),
            }
        )
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer_tar)).hexdigest()
        layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_put(blobs, layer_tar)}
        config = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/busybox"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "tiny base"}],
        }
        config_desc = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_put(blobs, json.dumps(config).encode()),
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer],
        }
        entries.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_put(blobs, json.dumps(manifest).encode()),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    index_desc = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        **_put(blobs, json.dumps(index).encode()),
    }
    top = {
        "schemaVersion": 2,
        "manifests": [{**index_desc, "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    }
    (root / "index.json").write_text(json.dumps(top))
    return root
