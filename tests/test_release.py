"""The release path end to end: build → package (daemonless) → push to a real registry →
referrers (build report, SLSA provenance) → `forge verify`; checked with skopeo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile

import pytest
import yaml

from forge.build import build
from forge.digest import sha256_file
from forge.errors import GateFailed
from forge.oci import layout
from forge.oci.registry import BUILD_REPORT_TYPE, Credentials, attach_referrer
from tests import registry_server
from tests.conftest import run_cli, tiny_recipe, write_recipe

registry = registry_server.registry


def repository_of(tmp_path) -> str:
    """One repository per test: tests share the module's registry and run in any order, so a
    test that counts uploaded bytes must not find another test's blobs there."""
    return "forge/" + re.sub(r"[^a-z0-9]+", "-", tmp_path.name.lower()).strip("-")


@pytest.fixture()
def release(registry, tiny_model, eval_text, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    base = registry_server.make_base_layout(tmp_path / "base")
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = data["variants"][:1]
    data["package"] = {
        "enabled": True,
        "base_images": {"vllm": f"oci:{base}:latest"},
        "registry": registry.host,
        "repository": repository_of(tmp_path),
        "tags": ["{variant}-{backend}-{gpu}", "latest"],
    }
    return write_recipe(tmp_path, data), tmp_path / "artifacts"


def test_build_pushes_verifiable_images(registry, release, tmp_path):
    recipe, artifacts = release
    report = build(recipe, artifacts_dir=artifacts).report
    pushed = report["pushed"][0]
    assert pushed["tags"] == ["fp8-vllm-H100", "latest"]
    assert pushed["bytes_uploaded"] > 0
    image = report["images"][0]
    assert image["digest"] == pushed["digest"] and image["builder"] == "daemonless"

    # skopeo (code forge did not write) reads the image back; every model file is the artifact's.
    ref = f"docker://{registry.host}/{repository_of(tmp_path)}:fp8-vllm-H100"
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", registry.creds, ref],
                                     capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert info["Digest"] == pushed["digest"]
    assert info["Labels"]["dev.forge.variant"] == "fp8"
    assert info["Labels"]["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"
    copy = tmp_path / "copy"
    skopeo_copy = ["skopeo", "copy", "--src-tls-verify=false", "--src-creds", registry.creds,
                   "--dest-oci-accept-uncompressed-layers", ref, f"oci:{copy}:x"]  # fmt: skip
    subprocess.run(skopeo_copy, check=True, capture_output=True)
    manifest = json.loads(layout.read_blob(copy, layout.resolve_tag(copy, "x").digest))
    found = {}
    for desc in manifest["layers"]:
        with tarfile.open(layout.blob_path(copy, desc["digest"]), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith("models/model/"):
                    tmp = copy / "file"
                    tmp.write_bytes(tar.extractfile(member).read())
                    found[member.name.removeprefix("models/model/")] = sha256_file(tmp)
    artifact = report["artifacts"][0]
    assert found == {name: f["sha256"] for name, f in artifact["files"].items()}

    # Provenance and report verify against the recipe; a second build re-uploads nothing.
    code, output = run_cli("verify", f"{registry.host}/{repository_of(tmp_path)}:latest", "--recipe", str(recipe))
    assert code == 0, output
    assert "ok   build report untampered" in output
    code, output = run_cli("push", str(recipe), "--json", "--artifacts-dir", str(artifacts))
    assert code == 0, output
    again = json.loads(output)[0]
    assert again["digest"] == pushed["digest"] and again["bytes_uploaded"] == 0


def test_verify_fails_for_a_tampered_report_or_another_recipe(registry, release, tiny_model, eval_text, tmp_path):
    recipe, artifacts = release
    report = build(recipe, artifacts_dir=artifacts).report
    digest = report["pushed"][0]["digest"]
    other = write_recipe(tmp_path / "other", tiny_recipe(tiny_model, eval_text))
    code, output = run_cli("verify", f"{registry.host}/{repository_of(tmp_path)}@{digest}", "--recipe", str(other))
    assert code == 1 and "FAIL recipe matches" in output

    tampered = dict(report, validation={"accuracy": [], "throughput": []})
    creds = Credentials(registry.username, registry.password)
    attach_referrer(f"{registry.host}/{repository_of(tmp_path)}@{digest}", json.dumps(tampered).encode(),
                    artifact_type=BUILD_REPORT_TYPE, credentials=creds)  # fmt: skip
    code, output = run_cli("verify", f"{registry.host}/{repository_of(tmp_path)}@{digest}", "--recipe", str(recipe))
    assert code == 1, output
    assert "FAIL build report untampered" in output


def test_failed_gate_publishes_nothing(registry, release):
    recipe, artifacts = release
    data = yaml.safe_load(recipe.read_text())
    data["package"]["repository"] = "forge/never"
    data["validation"]["accuracy"]["gates"] = {"min_top1_agreement": 1.0}  # fp8 never agrees everywhere
    strict = write_recipe(recipe.parent, data, name="strict.yaml")
    with pytest.raises(GateFailed) as failure:
        build(strict, artifacts_dir=artifacts)
    report = failure.value.result.report
    assert "pushed" not in report
    push = next(s for s in report["stages"] if s["kind"] == "push")
    assert push["status"] == "disabled" and "gate failed" in push["reason"]
    inspect = ["skopeo", "inspect", "--tls-verify=false", "--creds", registry.creds,
               f"docker://{registry.host}/forge/never:latest"]  # fmt: skip
    found = subprocess.run(inspect, capture_output=True, text=True)
    assert found.returncode != 0


def test_rendered_build_context_is_complete(release):
    recipe, artifacts = release
    report = build(recipe, artifacts_dir=artifacts).report
    context = (artifacts / ".cache" / "package").glob("*/context")
    context = next(iter(context))
    dockerfile = (context / "Dockerfile").read_text()
    for name in report["artifacts"][0]["files"]:
        assert f"COPY model/{name} /models/model/{name}" in dockerfile
        assert (context / "model" / name).is_file()
    assert shutil.which("skopeo")


def test_push_without_a_registry_is_bad_input(tiny_model, eval_text, tmp_path):
    code, output = run_cli(
        "push", str(write_recipe(tmp_path, tiny_recipe(tiny_model, eval_text))), "--artifacts-dir", str(tmp_path / "a")
    )
    assert code == 2 and "package.registry: nothing to push" in output
