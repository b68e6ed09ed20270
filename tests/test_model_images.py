"""Model images: data-only OCI images of each artifact, built offline, read back by skopeo and
umoci, reproducible across directories; their Kubernetes and KServe manifests validated against
the real schemas (Kubernetes' own, via kubernetes-validate; KServe's CRD, vendored)."""

from __future__ import annotations

import copy
import gzip
import json
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from forge.build import build
from forge.oci.image import read_image
from tests import registry_server
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe
from tests.registry_server import make_base_layout, require

registry = registry_server.registry

KSERVE_SCHEMA = REPO / "tests" / "data" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
KUBERNETES = "1.35.0"  # image volumes: beta and on by default from 1.35


def model_image_recipe(model: Path, eval_text: Path, **package) -> dict:
    data = tiny_recipe(model, eval_text)
    data["variants"] = data["variants"][:1]
    data["targets"] = [{"backend": "vllm", "gpus": ["H100"]},
                       {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}]  # fmt: skip
    data["package"] = {"model_images": True, **package}
    return data


@pytest.fixture(scope="module")
def built(tiny_model, eval_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("model-images")
    report = build(write_recipe(root, model_image_recipe(tiny_model, eval_text)), artifacts_dir=root / "a").report
    return root, report


def image_of(report: dict, stage: str) -> dict:
    return next(m for m in report["model_images"] if m["stage"] == stage)


def test_each_servable_artifact_gets_a_data_only_image(built):
    _, report = built
    stages = {s["id"]: s for s in report["stages"]}
    assert stages["model-image/fp8/vllm/H100"]["status"] == "ran"
    # An engine-mode image must hold the engine: deferred with it, never built without it.
    engine_image = stages["model-image/fp8/trtllm-engine/H100"]
    assert engine_image["status"] == "deferred" and "engine/fp8/trtllm-engine/H100" in engine_image["reason"]
    assert [m["stage"] for m in report["model_images"]] == ["model-image/fp8/vllm/H100"]
    layout = Path(image_of(report, "model-image/fp8/vllm/H100")["layout"])
    assert layout == built[0] / "a" / "tiny" / "images" / "fp8" / "vllm" / "H100" / "layout"
    manifest, config = read_image(Path(image_of(report, "model-image/fp8/vllm/H100")["layout"]))
    assert "Entrypoint" not in config["config"] and "Cmd" not in config["config"]
    assert "org.opencontainers.image.base.digest" not in manifest["annotations"]  # no base at all
    for key, value in {"dev.forge.recipe": "tiny", "dev.forge.variant": "fp8", "dev.forge.backend": "vllm",
                       "dev.forge.gpu": "H100", "dev.forge.format": "compressed-tensors"}.items():  # fmt: skip
        assert config["config"]["Labels"][key] == value and manifest["annotations"][key] == value
    assert all(layer["mediaType"].endswith(".tar") for layer in manifest["layers"])  # uncompressed


def test_skopeo_and_umoci_read_the_image_and_it_holds_the_artifact(built, tmp_path):
    require("skopeo", "umoci")
    _, report = built
    image = image_of(report, "model-image/fp8/vllm/H100")
    ref = f"oci:{image['layout']}:{image['tag']}"
    inspected = json.loads(subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True,
                                          check=True).stdout)  # fmt: skip
    assert inspected["Digest"] == image["digest"] and inspected["Labels"]["dev.forge.model-image"] == "true"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{image['layout']}:{image['tag']}",
                    str(tmp_path / "bundle")], capture_output=True, check=True)  # fmt: skip
    rootfs = tmp_path / "bundle" / "rootfs"
    [artifact] = [a for a in report["artifacts"] if a["backend"] == "vllm"]
    for name in artifact["files"]:
        assert (rootfs / "models" / "model" / name).read_bytes() == (Path(artifact["path"]) / name).read_bytes()
    assert not (rootfs / "bin").exists()  # data only: no shell, no OS
    serve = (rootfs / "models" / "launch" / "serve.sh").read_text()
    argv = shlex.split(serve.splitlines()[-1])
    assert argv[:3] == ["exec", "vllm", "serve"] and argv[3] == "/models/model"


def test_the_same_artifact_gives_the_same_digest_in_another_directory(built, tiny_model, eval_text, tmp_path):
    _, report = built
    other = build(write_recipe(tmp_path / "elsewhere", model_image_recipe(tiny_model, eval_text)),
                  artifacts_dir=tmp_path / "other-artifacts").report  # fmt: skip
    assert [m["digest"] for m in other["model_images"]] == [m["digest"] for m in report["model_images"]]


def test_kubernetes_manifests_mount_the_image_and_validate(built):
    _, report = built
    image = image_of(report, "model-image/fp8/vllm/H100")
    deployment, service = yaml.safe_load_all((Path(image["deploy"]) / "kubernetes.yaml").read_text())
    for document in (deployment, service):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    [volume] = pod["volumes"]
    assert volume["image"]["reference"] == image["reference"] == "localhost:5000/tiny:fp8-vllm-H100-model"
    [container] = pod["containers"]
    assert container["volumeMounts"][0] == {"name": volume["name"], "mountPath": "/models", "subPath": "models",
                                            "readOnly": True}  # fmt: skip
    assert [container["command"][0], *container["args"]][:3] == ["vllm", "serve", "/models/model"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert service["spec"]["ports"][0]["port"] == 8000
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["volumes"][0]["image"]["referense"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator bites on a typo
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def strict(schema: dict) -> dict:
    """KServe's CRD schema as the API server applies it with strict field validation: an object
    that lists its properties and does not preserve unknown fields refuses any other field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def test_kserve_inference_service_validates_against_the_crd(built):
    _, report = built
    image = image_of(report, "model-image/fp8/vllm/H100")
    isvc = yaml.safe_load((Path(image["deploy"]) / "kserve.yaml").read_text())
    # OpenAPI v3 schemas are JSON Schema draft-4/7 in shape; the validator is built without checking
    # the 640 kB schema itself against the metaschema (jsonschema.validate would: ~13 s).
    validator = jsonschema.Draft7Validator(strict(json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes()))))
    validator.validate(isvc)
    [container] = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert {"name": "STORAGE_URI", "value": f"oci://{image['reference']}"} in container["env"]
    assert container["args"][1] == "/mnt/models/model"  # where KServe links the image's /models
    assert "package.modelcar_base" in isvc["metadata"]["annotations"]["forge.dev/modelcar"]
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["containerz"] = []
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_modelcar_base_adds_the_shell_kserve_runs(tiny_model, eval_text, tmp_path):
    base = make_base_layout(tmp_path / "busybox")
    data = model_image_recipe(tiny_model, eval_text, modelcar_base=f"oci:{base}:latest")
    report = build(write_recipe(tmp_path, data), artifacts_dir=tmp_path / "a").report
    image = image_of(report, "model-image/fp8/vllm/H100")
    assert image["modelcar_ready"]
    manifest, config = read_image(Path(image["layout"]))
    assert manifest["annotations"]["org.opencontainers.image.base.digest"].startswith("sha256:")
    assert len(manifest["layers"]) == image["layers"] + 1  # the base's one layer under forge's
    isvc = yaml.safe_load((Path(image["deploy"]) / "kserve.yaml").read_text())
    assert "annotations" not in isvc["metadata"]


def test_model_images_push_to_a_registry_with_the_serving_gates(registry_for_push, tiny_model, eval_text, tmp_path):
    """With package.registry set, every model image is pushed beside the build report's rule: after
    the gates, to package.repository under its `-model` tag; skopeo reads it back; a second push
    uploads nothing."""
    registry, monkeypatch = registry_for_push
    data = model_image_recipe(tiny_model, eval_text, registry=registry.host, repository="forge/model-images")
    data["targets"] = data["targets"][:1]
    recipe = write_recipe(tmp_path, data)
    report = build(recipe, artifacts_dir=tmp_path / "a").report
    [pushed] = report["pushed"]
    assert pushed["stage"] == "push/fp8/vllm/H100/model-image" and pushed["bytes_uploaded"] > 0
    assert pushed["digest"] == image_of(report, "model-image/fp8/vllm/H100")["digest"]
    inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", registry.creds,
                                f"docker://{registry.host}/forge/model-images:fp8-vllm-H100-model"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(inspected.stdout)["Digest"] == pushed["digest"]
    again = build(recipe, artifacts_dir=tmp_path / "a").report
    assert again["pushed"][0]["bytes_uploaded"] == 0


@pytest.fixture()
def registry_for_push(registry, monkeypatch):
    require("skopeo")
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    return registry, monkeypatch


def test_push_to_a_local_layout_collects_every_image(tiny_model, eval_text, tmp_path):
    require("skopeo")
    data = model_image_recipe(tiny_model, eval_text)
    data["targets"] = [{"backend": "vllm", "gpus": ["H100"]}, {"backend": "tgi", "gpus": ["H100"]}]
    recipe = write_recipe(tmp_path, data)
    code, output = run_cli("push", str(recipe), "--to", f"oci:{tmp_path / 'out'}", "--json",
                           "--artifacts-dir", str(tmp_path / "a"))  # fmt: skip
    assert code == 0, output
    copied = json.loads(output[output.index("[") :])
    assert sorted(c["tag"] for c in copied) == ["fp8-tgi-H100-model", "fp8-vllm-H100-model"]
    for image in copied:
        done = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / 'out'}:{image['tag']}"], capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert json.loads(done.stdout)["Digest"] == image["digest"]
    code, output = run_cli("push", str(recipe), "--to", "registry.example.com", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "--to" in output
