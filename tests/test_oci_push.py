"""Push, pull and referrers against a real registry on loopback (distribution 2.8), checked
with skopeo; dropped connections come from a small TCP proxy written here."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from forge.errors import EXIT_INFRA, InfraError, InputError
from forge.oci import layout
from forge.oci.image import ImageConfig, ImageResult, build_image
from forge.oci.registry import (
    Credentials,
    RegistryOptions,
    attach_referrer,
    list_referrers,
    parse_reference,
    pull_image,
    push_image,
    resolve_credentials,
)
from tests import registry_server
from tests.registry_server import (
    RegistryServer,
    make_base_layout,
    require,
    running_registry,
    running_token_registry,
)

# distribution 2.8 with htpasswd auth on a free loopback port, one per test module.
registry = registry_server.registry

CHUNK = 256 * 1024  # forces chunked uploads on the ~1 MiB model layers
FAST = RegistryOptions(chunk_size=CHUNK, backoff_s=0.01)
CREDS = Credentials(registry_server.USERNAME, registry_server.PASSWORD)  # what every test registry accepts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base_layout(tmp_path_factory.mktemp("base") / "layout")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("model") / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model-00001-of-00002.safetensors").write_bytes(os.urandom(1_100_000))
    (model / "model-00002-of-00002.safetensors").write_bytes(os.urandom(900_000))
    return model


def _launch_dir(root: Path) -> Path:
    launch = root / "launch"
    launch.mkdir(exist_ok=True)
    (launch / "serve.sh").write_text("#!/bin/sh\nexec vllm serve /models/model\n")
    (launch / "serve.sh").chmod(0o755)
    return launch


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, base_layout: Path, model_dir: Path) -> ImageResult:
    root = tmp_path_factory.mktemp("image")
    config = ImageConfig(entrypoint=["/opt/forge/serve.sh"], exposed_ports=[8000], title="tiny")
    return build_image(f"oci:{base_layout}:latest", model_dir, _launch_dir(root), config, root / "oci", "v1")


def _skopeo(*args: str) -> str:
    require("skopeo")
    proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---------------------------------------------------------------- push and read back


def test_push_then_skopeo_inspect_and_copy_back(
    registry: RegistryServer, image: ImageResult, model_dir: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="forge.oci")
    ref = f"{registry.host}/forge/tiny:v1"
    result = push_image(image.layout, ref, source_tag="v1", tags=["latest"], credentials=CREDS, options=FAST)
    assert result.digest == image.digest
    assert result.tags == ("v1", "latest")
    manifest = json.loads(layout.read_blob(image.layout, image.digest))
    blob_sizes = [manifest["config"]["size"], *(d["size"] for d in manifest["layers"])]
    assert result.bytes_uploaded == sum(blob_sizes)
    assert (result.blobs_uploaded, result.blobs_skipped) == (len(blob_sizes), 0)

    info = json.loads(
        _skopeo(
            "inspect",
            "--tls-verify=false",
            "--creds",
            registry.creds,
            f"docker://{registry.host}/forge/tiny:v1",
        )
    )
    assert info["Digest"] == image.digest
    assert {"v1", "latest"} <= set(info["RepoTags"])

    copy = tmp_path / "copy"
    _skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", registry.creds,
        "--dest-oci-accept-uncompressed-layers", f"docker://{ref}", f"oci:{copy}:v1",
    )  # fmt: skip
    copied = json.loads(layout.read_blob(copy, layout.resolve_tag(copy, "v1").digest))
    found = {}
    for desc in copied["layers"]:
        with tarfile.open(layout.blob_path(copy, desc["digest"]), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith("models/model/"):
                    found[member.name.removeprefix("models/model/")] = _sha256(tar.extractfile(member).read())
    expected = {p.name: _sha256(p.read_bytes()) for p in model_dir.iterdir()}
    assert found == expected

    # Nothing secret in what forge logged.
    secret_b64 = base64.b64encode(registry.creds.encode()).decode()
    assert registry.password not in caplog.text and secret_b64 not in caplog.text


def test_repush_of_unchanged_image_uploads_nothing(registry: RegistryServer, image: ImageResult) -> None:
    ref = f"{registry.host}/forge/repush:v1"
    first = push_image(image.layout, ref, source_tag="v1", credentials=CREDS, options=FAST)
    again = push_image(image.layout, ref, source_tag="v1", credentials=CREDS, options=FAST)
    assert first.bytes_uploaded > 0
    assert again.digest == first.digest
    assert (again.bytes_uploaded, again.blobs_uploaded) == (0, 0)
    assert again.blobs_skipped == first.blobs_uploaded


def test_wrong_password_is_a_one_line_infra_error(registry: RegistryServer, image: ImageResult) -> None:
    with pytest.raises(InfraError) as caught:
        push_image(
            image.layout,
            f"{registry.host}/forge/tiny:v1",
            credentials=Credentials(registry.username, "not-the-password"),
            options=FAST,
        )
    assert str(caught.value) == f"registry {registry.host}: authentication failed for user 'forge' (401)"
    assert caught.value.exit_code == EXIT_INFRA
    assert "not-the-password" not in repr(caught.value)


def test_missing_credentials_say_how_to_provide_them(
    registry: RegistryServer, image: ImageResult, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("FORGE_REGISTRY_USERNAME", raising=False)
    monkeypatch.delenv("FORGE_REGISTRY_PASSWORD", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    with pytest.raises(InfraError, match="authentication required .* FORGE_REGISTRY_USERNAME"):
        push_image(image.layout, f"{registry.host}/forge/tiny:v1", options=FAST)


def test_credentials_from_environment_and_docker_config(
    registry: RegistryServer, image: ImageResult, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    assert push_image(image.layout, f"{registry.host}/forge/env:v1", options=FAST).digest == image.digest

    monkeypatch.delenv("FORGE_REGISTRY_USERNAME")
    monkeypatch.delenv("FORGE_REGISTRY_PASSWORD")
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    auth = base64.b64encode(registry.creds.encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {f"http://{registry.host}": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    assert push_image(image.layout, f"{registry.host}/forge/cfg:v1", options=FAST).digest == image.digest


def test_credential_precedence(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"hub-user:hub-pw").decode()
    config.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}))
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", "env-user")
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", "env-pw")
    assert resolve_credentials("registry-1.docker.io", "arg-user", "arg-pw", config).username == "arg-user"
    assert resolve_credentials("registry-1.docker.io", docker_config=config).username == "env-user"
    monkeypatch.delenv("FORGE_REGISTRY_USERNAME")
    monkeypatch.delenv("FORGE_REGISTRY_PASSWORD")
    found = resolve_credentials("registry-1.docker.io", docker_config=config)
    assert (found.username, found.password) == ("hub-user", "hub-pw")
    assert "hub-pw" not in repr(found)
    assert resolve_credentials("ghcr.io", docker_config=config) is None


@pytest.mark.parametrize(
    ("text", "host", "repository", "reference"),
    [
        ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest"),
        ("vllm/vllm-openai:v0.9.0", "registry-1.docker.io", "vllm/vllm-openai", "v0.9.0"),
        ("127.0.0.1:5000/ml/smollm2:fp8", "127.0.0.1:5000", "ml/smollm2", "fp8"),
        ("localhost/a@sha256:" + "a" * 64, "localhost", "a", "sha256:" + "a" * 64),
        ("ghcr.io/org/img", "ghcr.io", "org/img", "latest"),
    ],
)
def test_parse_reference(text: str, host: str, repository: str, reference: str) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.reference) == (host, repository, reference)


def test_bad_reference_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a valid name"):
        parse_reference("127.0.0.1:5000/UPPER/case:v1")


# ---------------------------------------------------------------- dropped connections


@dataclass(frozen=True)
class Drop:
    """Cut the connection carrying the `nth` `method` request whose body is at least `min_length`
    bytes (counted since the previous drop): before forwarding any of it, or after `after_bytes`."""

    method: bytes
    nth: int = 1
    after_bytes: int | None = None
    min_length: int = 0


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of the registry that cuts connections as `drops` say,
    each once, in order. It frames requests by Content-Length (forge never sends chunked
    transfer encoding) and counts the PATCH body bytes it delivered."""

    def __init__(self, target: str, drops: list[Drop]) -> None:
        self.target = target.rsplit(":", 1)
        self.pending = list(drops)
        self.seen = 0
        self.patch_bytes = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _responses(upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(1 << 16):
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            s.close()

    def _drop_for(self, method: bytes, length: int) -> Drop | None:
        with self._lock:
            if not self.pending:
                return None
            rule = self.pending[0]
            if method != rule.method or length < rule.min_length:
                return None
            self.seen += 1
            if self.seen < rule.nth:
                return None
            self.pending.pop(0)
            self.seen = 0
            return rule

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(1 << 16)
                    if not data:
                        return upstream.close()
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                head += b"\r\n\r\n"
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                method = head.split(b" ", 1)[0]
                drop = self._drop_for(method, length)
                if drop and drop.after_bytes is None:
                    return self._cut(client, upstream)
                upstream.sendall(head)
                remaining, forwarded = length, 0
                while remaining:
                    if not buf:
                        buf = client.recv(min(1 << 16, remaining))
                        if not buf:
                            return upstream.close()
                    piece, buf = buf[:remaining], buf[remaining:]
                    if drop and forwarded + len(piece) >= drop.after_bytes:
                        upstream.sendall(piece[: drop.after_bytes - forwarded])
                        return self._cut(client, upstream)
                    upstream.sendall(piece)
                    remaining -= len(piece)
                    forwarded += len(piece)
                    if method == b"PATCH":
                        with self._lock:
                            self.patch_bytes += len(piece)
        except OSError:
            client.close()
            upstream.close()


@pytest.fixture
def single_layer_image(tmp_path: Path, base_layout: Path) -> ImageResult:
    """An image whose only blob above CHUNK is one ~1.2 MiB model layer (5 chunks)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(1_200_000))
    return build_image(f"oci:{base_layout}:latest", model, None, ImageConfig(), tmp_path / "oci", "v1")


def _pull_verifies(server: RegistryServer, ref: str, tmp_path: Path) -> str:
    """Pulls the image back with forge (each blob's sha256 is checked on the way in)."""
    return pull_image(ref, tmp_path / "pulled", credentials=CREDS, options=FAST).digest


def _push_through(proxy: DroppingProxy, image: ImageResult, repo: str, options: RegistryOptions) -> object:
    try:
        return push_image(image.layout, f"{proxy.host}/forge/{repo}:v1", credentials=CREDS, options=options)
    finally:
        proxy.close()


def test_dropped_connection_between_chunks_resumes_from_registry_range(
    registry: RegistryServer, single_layer_image: ImageResult, tmp_path: Path
) -> None:
    proxy = DroppingProxy(registry.host, [Drop(b"PATCH", nth=3)])
    result = _push_through(proxy, single_layer_image, "resume", FAST)
    assert not proxy.pending and result.retries == 1
    assert result.digest == single_layer_image.digest
    (layer,) = single_layer_image.layers
    # Every byte of the layer went through exactly once: the upload went on from the registry's
    # Range instead of starting over.
    assert proxy.patch_bytes == layer.size
    assert _pull_verifies(registry, f"{registry.host}/forge/resume:v1", tmp_path) == result.digest


def test_connection_dropped_mid_chunk_still_pushes_the_right_blob(
    registry: RegistryServer, single_layer_image: ImageResult, tmp_path: Path
) -> None:
    """distribution 2.8 discards a session whose PATCH arrived in part, so forge starts that blob
    over; the pushed image must still be exactly the built one."""
    proxy = DroppingProxy(registry.host, [Drop(b"PATCH", nth=2, after_bytes=100_000)])
    result = _push_through(proxy, single_layer_image, "midchunk", FAST)
    assert not proxy.pending and result.retries >= 1
    assert result.digest == single_layer_image.digest
    assert _pull_verifies(registry, f"{registry.host}/forge/midchunk:v1", tmp_path) == result.digest


def test_dropped_put_is_retried_in_resumable_chunks(
    registry: RegistryServer, single_layer_image: ImageResult, tmp_path: Path
) -> None:
    """Default mode: one PUT per blob. Cut mid-PUT, the blob is sent again in chunks; a second cut
    between chunks then resumes without re-sending anything."""
    drops = [Drop(b"PUT", min_length=CHUNK, after_bytes=100_000), Drop(b"PATCH", nth=2)]
    proxy = DroppingProxy(registry.host, drops)
    options = RegistryOptions(backoff_s=0.01, resume_chunk_size=CHUNK)
    result = _push_through(proxy, single_layer_image, "monolithic", options)
    assert not proxy.pending and result.retries == 2
    (layer,) = single_layer_image.layers
    assert proxy.patch_bytes == layer.size
    assert _pull_verifies(registry, f"{registry.host}/forge/monolithic:v1", tmp_path) == result.digest


def test_retries_are_bounded(single_layer_image: ImageResult) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        host = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(InfraError, match=rf"registry {host}: .*gave up after 3 attempts"):
        push_image(single_layer_image.layout, f"{host}/x:v1", options=RegistryOptions(retries=2, backoff_s=0.01))


# ---------------------------------------------------------------- bases, mounts, referrers, tokens


def test_base_from_registry_and_cross_repository_mount(
    registry: RegistryServer, base_layout: Path, model_dir: Path, tmp_path: Path
) -> None:
    pushed_base = push_image(base_layout, f"{registry.host}/forge/base:latest", credentials=CREDS, options=FAST)
    assert pushed_base.media_type == layout.INDEX  # both platforms and the index went up

    config = ImageConfig(cmd=["serve"])
    built = build_image(
        f"{registry.host}/forge/base:latest", model_dir, None, config, tmp_path / "oci", "v1",
        credentials=CREDS, registry_options=FAST,
    )  # fmt: skip
    index = json.loads(layout.read_blob(base_layout, pushed_base.digest))
    amd64 = next(d for d in index["manifests"] if d["platform"]["architecture"] == "amd64")
    assert built.base_digest == amd64["digest"]

    options = RegistryOptions(chunk_size=CHUNK, backoff_s=0.01, mount_from="forge/base")
    result = push_image(built.layout, f"{registry.host}/forge/app:v1", credentials=CREDS, options=options)
    assert result.blobs_mounted == 1  # the base layer came across without an upload
    assert result.bytes_uploaded == sum(layer.size for layer in built.layers) + len(
        layout.read_blob(built.layout, built.config_digest)
    )


def test_build_report_referrer_via_fallback_tag(registry: RegistryServer, image: ImageResult) -> None:
    ref = f"{registry.host}/forge/reports:v1"
    push_image(image.layout, ref, source_tag="v1", credentials=CREDS, options=FAST)
    report = json.dumps({"recipe": "tiny", "gates": "passed"}).encode()
    attached = attach_referrer(ref, report, credentials=CREDS, options=FAST)
    # distribution 2.8 has no referrers API, so the tag schema fallback is used.
    assert attached.fallback_tag == "sha256-" + image.digest.removeprefix("sha256:")
    second = attach_referrer(ref, b'{"sbom": []}', artifact_type="application/spdx+json", credentials=CREDS)

    found = list_referrers(ref, image.digest, credentials=CREDS)
    assert [(d.digest, d.artifact_type) for d in found] == [
        (attached.digest, "application/vnd.forge.build-report+json"),
        (second.digest, "application/spdx+json"),
    ]
    only_reports = list_referrers(
        ref, image.digest, artifact_type="application/vnd.forge.build-report+json", credentials=CREDS
    )
    assert [d.digest for d in only_reports] == [attached.digest]

    raw = _skopeo(
        "inspect", "--raw", "--tls-verify=false", "--creds", registry.creds,
        f"docker://{registry.host}/forge/reports@{attached.digest}",
    )  # fmt: skip
    manifest = json.loads(raw)
    assert manifest["subject"]["digest"] == image.digest
    assert manifest["artifactType"] == "application/vnd.forge.build-report+json"
    assert manifest["layers"][0]["digest"] == "sha256:" + _sha256(report)


def test_bearer_token_flow(image: ImageResult, tmp_path: Path) -> None:
    with running_token_registry(tmp_path / "token-registry") as (server, tokens):
        result = push_image(
            image.layout,
            f"{server.host}/forge/tiny:v1",
            source_tag="v1",
            credentials=CREDS,
            options=FAST,
        )
        assert result.digest == image.digest
        assert ["repository:forge/tiny:pull,push"] in [r["scope"] for r in tokens.requests]
        with pytest.raises(InfraError) as caught:
            push_image(
                image.layout, f"{server.host}/forge/tiny:v1", source_tag="v1",
                credentials=Credentials(server.username, "wrong"), options=FAST,
            )  # fmt: skip
        assert str(caught.value) == f"registry {server.host}: authentication failed for user 'forge' (401)"


def test_tls_registry_verified_and_refused(image: ImageResult, tmp_path: Path, monkeypatch) -> None:
    """Over HTTPS blobs go through the TLS write path; an untrusted certificate is a clear error,
    and trusting it (SSL_CERT_FILE, read by Python's default context) makes the push work."""
    with running_registry(tmp_path / "tls-registry", tls=True) as server:
        ref = f"{server.host}/forge/tls:v1"
        options = RegistryOptions(plain_http=False, backoff_s=0.01, chunk_size=CHUNK)
        with pytest.raises(InfraError, match=f"registry {server.host}: TLS certificate not trusted"):
            push_image(image.layout, ref, source_tag="v1", credentials=CREDS, options=options)
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls-registry" / "registry.crt"))
        result = push_image(image.layout, ref, source_tag="v1", credentials=CREDS, options=options)
        assert result.digest == image.digest
        pulled = pull_image(ref, tmp_path / "pulled", credentials=CREDS, options=options)
        assert pulled.digest == image.digest
