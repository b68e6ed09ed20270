"""Image signatures: a real ECDSA P-256 key made in the test, images pushed to a real registry,
signed cosign's way, checked by `forge verify --key` and, independently, by openssl on the bytes
skopeo reads back from the registry."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from forge.build import build
from forge.oci import layout
from forge.oci.registry import (
    BUILD_REPORT_TYPE,
    Credentials,
    Registry,
    RegistryOptions,
    _repository_scope,
    fetch_manifest,
    put_manifest,
)
from forge.oci.signing import (
    SIGNATURE_ANNOTATION,
    SIMPLE_SIGNING,
    load_public_key,
    signature_tag,
    verify_signature,
)
from tests import registry_server
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.signing_keys import key_pair

registry = registry_server.registry


@pytest.fixture()
def signed(registry, tiny_model, eval_text, tmp_path, monkeypatch):
    """A build pushed and signed with a fresh key; returns (report, recipe, public key, repository)."""
    registry_server.require("skopeo", "openssl")
    private, public = key_pair(tmp_path)
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    monkeypatch.setenv("FORGE_SIGNING_KEY", str(private))
    base = registry_server.make_base_layout(tmp_path / "base")
    repository = f"forge/signed-{tmp_path.name.lower().replace('_', '-')}"
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = data["variants"][:1]
    data["package"] = {"enabled": True, "base_images": {"vllm": f"oci:{base}:latest"}, "registry": registry.host,
                       "repository": repository}  # fmt: skip
    recipe = write_recipe(tmp_path, data)
    report = build(recipe, artifacts_dir=tmp_path / "artifacts").report
    return report, recipe, public, repository


def test_push_signs_and_verify_checks_signature_provenance_and_report(registry, signed, tmp_path):
    report, recipe, public, repository = signed
    [pushed] = report["pushed"]
    assert pushed["signature"]["tag"] == signature_tag(pushed["digest"])
    code, output = run_cli("verify", f"{registry.host}/{repository}@{pushed['digest']}", "--recipe", str(recipe),
                           "--key", str(public))  # fmt: skip
    assert code == 0, output
    assert "ok   signature: signed for" in output and "ok   build report untampered" in output

    (tmp_path / "other").mkdir()
    _, other_public = key_pair(tmp_path / "other")
    code, output = run_cli("verify", f"{registry.host}/{repository}@{pushed['digest']}", "--recipe", str(recipe),
                           "--key", str(other_public))  # fmt: skip
    assert code == 1 and "FAIL signature" in output, output


def test_openssl_verifies_the_signature_skopeo_reads_back(registry, signed, tmp_path):
    """Independent of forge's reader: skopeo copies the `.sig` manifest out of the registry and
    openssl checks its annotation against its payload with the public key."""
    report, _, public, repository = signed
    digest = report["pushed"][0]["digest"]
    copy = tmp_path / "sig-layout"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", registry.creds,
                    f"docker://{registry.host}/{repository}:{signature_tag(digest)}", f"oci:{copy}:sig"],
                   check=True, capture_output=True)  # fmt: skip
    manifest = json.loads(layout.read_blob(copy, layout.resolve_tag(copy, "sig").digest))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == SIMPLE_SIGNING
    payload = layout.blob_path(copy, layer["digest"])
    assert json.loads(payload.read_bytes())["critical"]["image"]["docker-manifest-digest"] == digest
    (tmp_path / "sig.der").write_bytes(base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION]))
    done = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public), "-signature",
                           str(tmp_path / "sig.der"), str(payload)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "Verified OK" in done.stdout, done.stderr


def test_a_signature_moved_to_another_image_does_not_verify(registry, signed, tmp_path):
    """An attacker copies a valid `.sig` manifest (payload and signature of image A) to image B's
    signature tag: the signature is genuine, but it names A, so B stays unsigned."""
    report, _, public, repository = signed
    [pushed] = report["pushed"]
    image_b = pushed["referrers"][BUILD_REPORT_TYPE]  # another manifest in the same repository
    options = RegistryOptions()
    with Registry(registry.host, credentials=Credentials(registry.username, registry.password), options=options) as reg:
        reg.authenticate([_repository_scope(repository, "pull,push")])
        stolen = fetch_manifest(reg, repository, signature_tag(pushed["digest"])).data
        put_manifest(reg, repository, signature_tag(image_b), stolen, layout.MANIFEST)
    key = load_public_key(public)
    genuine = verify_signature(f"{registry.host}/{repository}@{pushed['digest']}", pushed["digest"], key, tmp_path,
                               options=options)  # fmt: skip
    moved = verify_signature(f"{registry.host}/{repository}@{image_b}", image_b, key, tmp_path, options=options)
    assert genuine.passed and not moved.passed and "none of 1 signature(s)" in moved.detail


def test_an_unusable_signing_key_pushes_nothing(registry, tiny_model, eval_text, tmp_path, monkeypatch):
    bad = tmp_path / "key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("FORGE_SIGNING_KEY", str(bad))
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    base = registry_server.make_base_layout(tmp_path / "base")
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = data["variants"][:1]
    data["package"] = {"enabled": True, "base_images": {"vllm": f"oci:{base}:latest"}, "registry": registry.host,
                       "repository": "forge/bad-key"}  # fmt: skip
    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "FORGE_SIGNING_KEY" in output and "not a key" not in output, output
    assert not (tmp_path / "a" / "tiny").exists()  # refused before any stage ran
    found = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", registry.creds,
                            f"docker://{registry.host}/forge/bad-key:fp8-vllm-H100"], capture_output=True)  # fmt: skip
    assert found.returncode != 0
