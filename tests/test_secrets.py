"""Secrets never leave the environment: a registry password and an HF_TOKEN, planted in the
environment and in docker's config.json, appear nowhere forge writes or prints.

The build of the tiny recipe packages an image and pushes it to a real registry (distribution
2.8 on loopback, htpasswd auth) with the right password, then with a wrong one (exit 3). Then
every byte forge produced is searched for each secret in the forms it could take on the wire
or on disk (raw, base64 of `user:password` as in a Basic header or config.json, base64 alone,
URL-encoded, JSON-escaped): stdout and stderr of every run, every file under the artifacts
directory (cache included) and the digest memo, every member of every tar layer of every OCI
layout (untarred), every blob the registry stored (the pushed image, build report and
provenance referrers), and forge's log records at DEBUG.
"""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import json
import logging
import os
import secrets
import subprocess
import tarfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from forge.errors import EXIT_INFRA, InfraError
from forge.oci.registry import Credentials, RegistryOptions, push_image, resolve_credentials
from tests.conftest import FORGE, tiny_recipe, write_recipe
from tests.registry_server import RegistryServer, make_base_layout, running_registry, running_token_registry

USER = "forge"
# Fresh per run, so a hit can only come from this run; long and unlike anything in a model.
PASSWORD = "pw-" + secrets.token_urlsafe(18)
WRONG_PASSWORD = "wrong-" + secrets.token_urlsafe(18)
HF_TOKEN = "hf_" + secrets.token_hex(17)


def forms(secret: str, user: str = USER) -> dict[str, bytes]:
    """The shapes a secret takes in headers, configs, URLs and JSON."""
    raw = secret.encode()
    return {
        "raw": raw,
        "basic user:secret": base64.b64encode(f"{user}:{secret}".encode()),
        "base64": base64.b64encode(raw).rstrip(b"="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "url-encoded": quote(secret, safe="").encode(),
        "json": json.dumps(secret).encode()[1:-1],
        "utf-16": secret.encode("utf-16-le"),
    }


SECRETS = {"registry password": PASSWORD, "wrong password": WRONG_PASSWORD, "HF_TOKEN": HF_TOKEN}


def hits(data: bytes, where: str) -> list[str]:
    found = []
    for name, secret in SECRETS.items():
        for form, needle in forms(secret).items():
            if needle and needle in data:
                found.append(f"{where}: {name} ({form})")
    return found


def scan_bytes(data: bytes, where: str, depth: int = 0) -> list[str]:
    """Search `data`, and inside it when it is a tar (any compression) or gzip."""
    found = hits(data, where)
    if depth > 3:
        return found
    if data[:2] == b"\x1f\x8b":
        try:
            return found + scan_bytes(gzip.decompress(data), f"{where} (gunzipped)", depth + 1)
        except (OSError, EOFError):
            return found
    if len(data) >= 512 and data[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                found += hits(member.name.encode(), f"{where}!{member.name} (name)")
                for key, value in (member.pax_headers or {}).items():
                    found += hits(f"{key}={value}".encode(), f"{where}!{member.name} (pax)")
                if member.isfile():
                    content = tar.extractfile(member).read()
                    found += scan_bytes(content, f"{where}!{member.name}", depth + 1)
    return found


def scan_tree(root: Path) -> tuple[list[str], int]:
    """(hits, files scanned) over every file under `root`, tar layers opened."""
    found, count = [], 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            count += 1
            found += scan_bytes(path.read_bytes(), str(path.relative_to(root)))
    return found, count


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def secret_registry(tmp_path_factory) -> Iterator[RegistryServer]:
    with running_registry(tmp_path_factory.mktemp("secret-registry"), username=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def plant(tmp_path_factory, secret_registry: RegistryServer) -> dict:
    """A docker config.json holding the password, and the environment every run gets."""
    root = tmp_path_factory.mktemp("planted")
    docker = root / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {secret_registry.host: {"auth": auth}}}))
    env = {
        **os.environ,
        "HF_TOKEN": HF_TOKEN,
        "HUGGING_FACE_HUB_TOKEN": HF_TOKEN,
        "DOCKER_CONFIG": str(docker),
        "FORGE_DIGEST_MEMO": str(root / "digests.json"),
    }
    return {"root": root, "env": env, "docker": docker}


def run_forge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*FORGE, *args], capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def campaign(tiny_model: Path, eval_text: Path, secret_registry: RegistryServer, plant: dict) -> dict:
    """Builds and pushes with credentials from the environment (right, then wrong), from
    docker's config.json, then a plan of a hub source with HF_TOKEN set."""
    root = plant["root"]
    base = make_base_layout(root / "base")
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["variants"] = [recipe["variants"][1]]  # int4 only: one image
    recipe["targets"] = [recipe["targets"][0]]
    recipe["package"] = {"enabled": True, "registry": secret_registry.host, "repository": "secrets/tiny",
                         "base_images": {"vllm": f"oci:{base}:latest"}}  # fmt: skip
    path = write_recipe(root / "recipe", recipe)
    artifacts = root / "artifacts"
    runs = {}
    env_right = {**plant["env"], "FORGE_REGISTRY_USERNAME": USER, "FORGE_REGISTRY_PASSWORD": PASSWORD}
    runs["build, password in env"] = run_forge("build", str(path), "--json", "--artifacts-dir", str(artifacts),
                                               env=env_right)  # fmt: skip
    env_wrong = {**plant["env"], "FORGE_REGISTRY_USERNAME": USER, "FORGE_REGISTRY_PASSWORD": WRONG_PASSWORD}
    runs["build, wrong password"] = run_forge("build", str(path), "--artifacts-dir", str(artifacts), env=env_wrong)
    runs["build, docker config"] = run_forge("build", str(path), "--json", "--artifacts-dir", str(artifacts),
                                             env=plant["env"])  # fmt: skip
    runs["plan"] = run_forge("plan", str(path), "--json", "--artifacts-dir", str(artifacts), env=env_right)
    return {"runs": runs, "artifacts": artifacts, "recipe": path}


# ---------------------------------------------------------------- the checks


def test_the_scanner_finds_what_it_looks_for(tmp_path: Path) -> None:
    """Positive control: each form, inside a file inside a tar inside a gzip, is found."""
    for form, needle in forms(PASSWORD).items():
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            info = tarfile.TarInfo("etc/conf")
            content = b"x" * 1000 + needle + b"y"
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        (tmp_path / "layer.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
        found, _ = scan_tree(tmp_path)
        assert any(f"registry password ({form})" in f for f in found), form


def test_the_runs_did_what_they_should(campaign: dict, secret_registry: RegistryServer) -> None:
    runs = campaign["runs"]
    pushed = json.loads(runs["build, password in env"].stdout)["pushed"]
    assert runs["build, password in env"].returncode == 0, runs["build, password in env"].stderr[-2000:]
    assert pushed and pushed[0]["digest"].startswith("sha256:")
    wrong = runs["build, wrong password"]
    assert wrong.returncode == EXIT_INFRA, wrong.stderr[-2000:]
    assert f"authentication failed for user '{USER}'" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert runs["build, docker config"].returncode == 0, runs["build, docker config"].stderr[-2000:]
    assert runs["plan"].returncode == 0


def test_no_secret_in_any_output(campaign: dict) -> None:
    found = []
    for name, run in campaign["runs"].items():
        found += hits(run.stdout.encode(), f"{name}: stdout") + hits(run.stderr.encode(), f"{name}: stderr")
    assert found == []


def test_no_secret_in_any_file_forge_wrote(campaign: dict, plant: dict) -> None:
    """Artifacts directory (reports, resolved recipe, cache entries, OCI layouts with every layer
    untarred) and the digest memo."""
    found, count = scan_tree(campaign["artifacts"])
    layouts = list(campaign["artifacts"].rglob("oci-layout"))
    assert layouts, "no OCI layout was built; the scan would prove little"
    assert count > 20
    memo = Path(plant["env"]["FORGE_DIGEST_MEMO"])
    if memo.exists():
        found += hits(memo.read_bytes(), "digest memo")
    assert found == []


def test_no_secret_in_what_the_registry_stored(campaign: dict, secret_registry: RegistryServer) -> None:
    """Every blob the registry holds: layers, image config, manifests, build report, provenance."""
    blobs = list((secret_registry.storage / "docker" / "registry" / "v2" / "blobs").rglob("data"))
    assert len(blobs) >= 5
    found = []
    for blob in blobs:
        found += scan_bytes(blob.read_bytes(), f"registry blob {blob.parent.name[:12]}")
    assert found == []


def test_image_config_carries_no_environment(campaign: dict) -> None:
    """The image's Env is what the serving spec says, never the build machine's environment."""
    configs = []
    for layout_dir in {p.parent for p in campaign["artifacts"].rglob("oci-layout")}:
        index = json.loads((layout_dir / "index.json").read_text())
        for entry in index["manifests"]:
            blobs = layout_dir / "blobs" / "sha256"
            manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_text())
            configs.append(json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text()))
    assert configs
    for config in configs:
        env = dict(e.split("=", 1) for e in config["config"].get("Env", []))
        assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "FORGE_REGISTRY_PASSWORD", "DOCKER_CONFIG"} & set(env)


def test_library_errors_reprs_and_logs_leak_nothing(
    secret_registry: RegistryServer, plant: dict, tmp_path: Path, caplog, monkeypatch
) -> None:
    """push_image with a wrong password (explicit, from the environment, from config.json) and
    through a token service: exception text, repr, traceback and DEBUG logs stay clean."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    layout_dir = make_base_layout(tmp_path / "layout")
    options = RegistryOptions(backoff_s=0.01, retries=1)
    texts = []

    def attempt(**kwargs) -> None:
        try:
            push_image(layout_dir, f"{secret_registry.host}/secrets/lib:v1", options=options, **kwargs)
        except InfraError as error:
            texts.extend([str(error), repr(error), "".join(traceback.format_exception(error))])

    attempt(credentials=Credentials(USER, WRONG_PASSWORD))
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", WRONG_PASSWORD)
    attempt()
    monkeypatch.delenv("FORGE_REGISTRY_USERNAME")
    monkeypatch.delenv("FORGE_REGISTRY_PASSWORD")
    wrong_config = tmp_path / "docker"
    wrong_config.mkdir()
    auth = base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode()
    (wrong_config / "config.json").write_text(json.dumps({"auths": {secret_registry.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(wrong_config))
    attempt()
    monkeypatch.setenv("DOCKER_CONFIG", str(plant["docker"]))
    result = push_image(layout_dir, f"{secret_registry.host}/secrets/lib:v1", options=options)
    texts += [repr(result), repr(resolve_credentials(secret_registry.host))]
    with running_token_registry(tmp_path / "token", username=USER, password=PASSWORD) as (server, _):
        try:
            push_image(layout_dir, f"{server.host}/secrets/tok:v1", options=options,
                       credentials=Credentials(USER, WRONG_PASSWORD))  # fmt: skip
        except InfraError as error:
            texts.append("".join(traceback.format_exception(error)))
        right = Credentials(USER, PASSWORD)
        texts.append(repr(push_image(layout_dir, f"{server.host}/secrets/tok:v1", options=options, credentials=right)))
    assert len(texts) >= 8
    found = []
    for i, text in enumerate(texts):
        found += hits(text.encode(), f"message {i}")
    found += hits(caplog.text.encode(), "log records")
    assert found == []
    assert any("authentication failed for user 'forge'" in t for t in texts)


class _FailingHub(http.server.BaseHTTPRequestHandler):
    """A hub endpoint that refuses everything (401, which huggingface_hub does not retry)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_hub_errors_do_not_print_the_token(plant: dict, tmp_path: Path) -> None:
    """A pinned hub source whose endpoint fails: exit 3, a message, and no HF_TOKEN in it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = write_recipe(tmp_path, {
            "name": "hub", "source": {"hub": {"repo": "org/model", "revision": "0" * 40}},
            "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}], "targets": [{"backend": "vllm", "gpus": ["H100"]}],
        })  # fmt: skip
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        env = {**plant["env"], "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
        done = run_forge("plan", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"), env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == EXIT_INFRA, done.stderr[-2000:]
    assert "source.hub" in done.stderr and "Traceback" not in done.stderr
    assert hits((done.stdout + done.stderr).encode(), "plan output") == []
    found, _ = scan_tree(tmp_path / "artifacts") if (tmp_path / "artifacts").exists() else ([], 0)
    assert found == []
