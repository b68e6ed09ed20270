"""The GPU release path as CI documents and backend tables: Kubernetes Jobs that need no Docker
daemon, GitLab child pipelines GitLab accepts, a GitHub workflow that carries GPU results to the
release, a paste-ready trtllm-build command, and each serving image's user from its backend.

No GPU, cluster or CI service runs here, so each test inspects the exact document forge writes.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from forge.backends import BACKENDS, trtllm
from forge.ci import FATAL_EXIT_CODES, gitlab_pipeline, render_matrix
from forge.quant.presets import resolve_scheme
from forge.serving import ENGINE_DIR, LAUNCH_DIR, MODEL_DIR, render_dockerfile, serve_spec
from tests.ci_helpers import matrix_recipe, plan_of, with_gpu_stages_deferred
from tests.conftest import REPO, tiny_recipe

TEMPLATES = REPO / "templates" / "ci"


def k8s_documents(plan, **options) -> list[dict]:
    text = render_matrix(plan, "k8s", "recipes/tiny.yaml", image="registry.local/forge:1", **options)
    return [d for d in yaml.safe_load_all(text) if d]


def containers_of(job: dict) -> list[dict]:
    pod = job["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


# ---------------------------------------------------------------- item 7: Kubernetes Jobs


def test_k8s_jobs_run_no_docker_and_use_the_backend_images(tiny_model, eval_text, tmp_path):
    plan = with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))
    documents = k8s_documents(plan, cache_claim="shared")
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    jobs = [d for d in documents if d["kind"] == "Job"]
    assert len(jobs) == sum(a.status == "planned" for a in plan.artifacts)
    for job in jobs:
        text = json.dumps(job)
        # A pod has no Docker daemon: nothing may shell out to docker, nor run `forge build`
        # (whose GPU stages call `docker run`).
        assert "docker" not in text
        for container in containers_of(job):
            assert container["command"][:2] != ["forge", "build"]
        pod = job["spec"]["template"]["spec"]
        assert pod["volumes"][0] == {"name": "forge", "persistentVolumeClaim": {"claimName": "shared"}}

    vllm = next(j for j in jobs if j["metadata"]["annotations"]["forge/cell"] == "awq/vllm/H100")
    (server,) = vllm["spec"]["template"]["spec"]["initContainers"]
    (loadgen,) = vllm["spec"]["template"]["spec"]["containers"]
    assert server["image"] == BACKENDS["vllm"].IMAGE and server["command"][:2] == ["vllm", "serve"]
    assert server["restartPolicy"] == "Always"  # a sidecar: stopped once the load generator is done
    assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert server["resources"]["limits"] == {"nvidia.com/gpu": 1}
    export = plan.stage(next(a for a in plan.artifacts if a.variant == "awq" and a.backend == "vllm").export_stage)
    model_mount = {"name": "forge", "mountPath": MODEL_DIR, "subPath": f"cache/export/{export.key}/model",
                   "readOnly": True}  # fmt: skip
    assert model_mount in server["volumeMounts"]  # the CPU build's export, in the cache on the PVC
    assert loadgen["image"] == "registry.local/forge:1" and loadgen["command"][:2] == ["forge", "bench"]
    argv = loadgen["command"]
    assert argv[argv.index("--endpoint") + 1] == "http://127.0.0.1:8000"
    assert argv[argv.index("--tokenizer") + 1] == f"/forge/cache/export/{export.key}/model"
    assert "resources" not in loadgen  # the load generator holds no GPU

    engine_job = next(j for j in jobs if j["metadata"]["annotations"]["forge/cell"] == "awq/trtllm-engine/H100")
    engine, server = engine_job["spec"]["template"]["spec"]["initContainers"]
    assert engine["image"] == trtllm.image(trtllm.DEFAULT_VERSION) and engine["command"][0] == "trtllm-build"
    assert engine["command"][engine["command"].index("--checkpoint_dir") + 1] == MODEL_DIR
    assert engine["command"][engine["command"].index("--output_dir") + 1] == ENGINE_DIR
    name = engine_job["metadata"]["name"]
    engine_mount = {"name": "forge", "mountPath": ENGINE_DIR, "subPath": f"artifacts/{name}/engine"}
    assert engine_mount in engine["volumeMounts"]
    assert {**engine_mount, "readOnly": True} in server["volumeMounts"]  # the server loads what was built
    assert server["image"] == trtllm.image(trtllm.DEFAULT_VERSION) and server["command"][0] == "trtllm-serve"
    # trtllm-serve's YAML comes from a ConfigMap of the same name, mounted where its argv points.
    config_map = next(d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)
    assert f"{LAUNCH_DIR}/trtllm-serve.yaml" in server["command"]
    assert yaml.safe_load(config_map["data"]["trtllm-serve.yaml"])["kv_cache_config"]
    assert {"name": "launch", "configMap": {"name": name}} in engine_job["spec"]["template"]["spec"]["volumes"]


def test_k8s_pod_failure_policy_names_real_containers_and_real_exit_codes(tiny_model, eval_text, tmp_path):
    """FailJob only for exit codes a retry repeats; `forge bench` exit 3 (server down) is retried."""
    plan = with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))
    for job in (d for d in k8s_documents(plan) if d["kind"] == "Job"):
        names = {c["name"] for c in containers_of(job)}
        rules = job["spec"]["podFailurePolicy"]["rules"]
        fail = {
            r["onExitCodes"]["containerName"]: r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob"
        }
        assert set(fail) <= names and fail  # every rule names a container of this pod
        assert fail.get("loadgen", [1, 2]) == [1, 2]  # forge bench: 1 gate failed, 2 bad arguments
        assert all(3 not in codes for codes in fail.values())
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert FATAL_EXIT_CODES["loadgen"] == [1, 2]


def test_k8s_engine_only_cell_runs_trtllm_build_as_its_container(tiny_model, eval_text, tmp_path):
    targets = [{"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}]
    plan = with_gpu_stages_deferred(plan_of(tiny_recipe(tiny_model, eval_text, targets=targets), tmp_path))
    jobs = [d for d in k8s_documents(plan) if d["kind"] == "Job"]
    assert jobs
    for job in jobs:
        assert job["metadata"]["annotations"]["forge/stages"].startswith("engine/")
        pod = job["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        (engine,) = pod["containers"]
        assert engine["name"] == "engine" and engine["command"][0] == "trtllm-build"
        assert engine["image"].startswith(trtllm.IMAGE_REPOSITORY)
        assert engine["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_k8s_tasks_run_lm_eval_against_the_sidecar_before_the_load_sweep(tiny_model, eval_text, tmp_path):
    data = matrix_recipe(tiny_model, eval_text)
    data["targets"] = [{"backend": "tgi", "gpus": ["H100"]}]
    data["validation"]["accuracy"]["tasks"] = ["forge_facts"]
    plan = with_gpu_stages_deferred(plan_of(data, tmp_path))
    job = next(
        d
        for d in k8s_documents(plan)
        if d["kind"] == "Job" and "tasks/" in d["metadata"]["annotations"]["forge/stages"]
    )
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["server", "tasks"]
    assert [c["name"] for c in pod["containers"]] == ["loadgen"]
    tasks = pod["initContainers"][1]["command"]
    assert tasks[:4] == [
        "python3",
        "-m",
        "lm_eval",
        "run",
    ] and "base_url=http://127.0.0.1:80/v1/completions" in ",".join(tasks)
    assert pod["initContainers"][0]["securityContext"] == {"runAsUser": 0}  # TGI's image runs as root


# ---------------------------------------------------------------- item 8: GitLab


def gitlab_blank_hidden_keys(pipeline: dict) -> list[str]:
    """GitLab's Entry::Hidden rule: a hidden (leading-dot) top-level key must not be blank."""
    return [k for k, v in pipeline.items() if k.startswith(".") and (v is None or v == [] or v == {} or v == "")]


def test_gitlab_child_pipeline_has_no_blank_hidden_key(tiny_model, eval_text, tmp_path):
    # The default-like recipe: nothing impossible, nothing idle, so both lists are empty.
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["validation"]["throughput"] = {"enabled": True}
    plan = with_gpu_stages_deferred(plan_of(data, tmp_path))
    pipeline = yaml.safe_load(render_matrix(plan, "gitlab", "recipes/tiny.yaml"))
    assert gitlab_blank_hidden_keys(pipeline) == []
    assert any(k.startswith("gpu ") for k in pipeline)
    # The lists still appear when they have something to say.
    full = gitlab_pipeline(with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path)), "r.yaml")
    assert full[".forge-excluded"] and gitlab_blank_hidden_keys(full) == []


def test_gitlab_template_release_uses_forge_credentials_not_docker_login():
    workflow = yaml.safe_load((TEMPLATES / "gitlab-ci.yml").read_text())
    release = workflow["release"]
    text = json.dumps(release)
    assert "docker" not in text  # the forge image has no docker CLI; forge pushes without a daemon
    assert "FORGE_REGISTRY_USER " not in text + " " and 'FORGE_REGISTRY_USER"' not in text
    assert gitlab_blank_hidden_keys(workflow) == []


# ---------------------------------------------------------------- item 9: GitHub Actions


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def test_github_gpu_jobs_save_their_results_and_release_restores_them():
    workflow = yaml.safe_load((TEMPLATES / "github-actions.yml").read_text())
    jobs = workflow["jobs"]
    gpu, release = jobs["gpu"], jobs["release"]
    saves = steps_using(gpu, "actions/cache/save")
    assert saves and all(s.get("if") == "always()" for s in saves)
    assert "strategy.job-index" in saves[0]["with"]["key"]  # one entry per cell: keys cannot be overwritten
    uploads = [s for s in steps_using(gpu, "actions/upload-artifact") if "gpu-cache" in s["with"]["name"]]
    assert uploads
    downloads = steps_using(release, "actions/download-artifact")
    assert any(d["with"].get("pattern", "").startswith("forge-gpu-cache-") for d in downloads)
    release_script = "\n".join(s.get("run", "") for s in release["steps"])
    assert "tar" in release_script and "docker login" not in release_script
    push = next(s for s in release["steps"] if "--only push" in s.get("run", ""))
    assert set(push["env"]) >= {"FORGE_REGISTRY_USERNAME", "FORGE_REGISTRY_PASSWORD"}
    # Steps that unpack the GPU results come before the push.
    names = [s.get("run", "") + json.dumps(s.get("with", {})) for s in release["steps"]]
    unpack = next(i for i, n in enumerate(names) if "tar" in n)
    assert unpack < next(i for i, n in enumerate(names) if "--only push" in n)


CURRENT_MAJORS = {  # checked 2026-11-30 on each action's releases page
    "actions/checkout": 7,
    "actions/setup-python": 7,
    "actions/cache": 6,
    "actions/cache/restore": 6,
    "actions/cache/save": 6,
    "actions/upload-artifact": 7,
    "actions/download-artifact": 8,
}


def test_github_action_pins_are_current_majors():
    workflow = yaml.safe_load((TEMPLATES / "github-actions.yml").read_text())
    pins = {s["uses"] for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s}
    assert pins
    for pin in pins:
        action, version = pin.split("@")
        assert version == f"v{CURRENT_MAJORS[action]}", pin


# ---------------------------------------------------------------- item 10: trtllm-build command


def test_deferred_trtllm_build_command_is_paste_ready(tmp_path, monkeypatch):
    scheme = resolve_scheme("FP8")
    limits = trtllm.Limits(8, 1024, 2048, 2048)
    checkpoint, engine = tmp_path / "cache" / "export" / "k" / "model", tmp_path / "engine"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = trtllm.engine_build_command(checkpoint, engine, limits, scheme, "1.2.1")
    argv = shlex.split(text)
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert mounts == [f"{checkpoint}:/forge/checkpoint:ro", f"{engine}:/forge/engine"]
    assert str(elsewhere) not in text
    assert argv[argv.index("trtllm-build") + 2] == "/forge/checkpoint"
    with pytest.raises(ValueError, match="absolute"):
        trtllm.engine_build_command(Path("CHECKPOINT_DIR"), engine, limits, scheme, "1.2.1")


def test_the_plans_deferred_engine_command_is_paste_ready(tiny_model, eval_text, tmp_path, monkeypatch):
    """The line `forge plan` prints for a deferred engine names the cached export and an engine
    directory by absolute path, so it means the same wherever it is pasted."""
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "trtllm", "gpus": ["H100"],
                                                        "trtllm": {"mode": "engine"}}])  # fmt: skip
    plan = plan_of(data, tmp_path)
    [engine] = [s for s in plan.stages if s.kind == "engine" and s.inputs.variant == "fp8"]
    export = plan.stage(engine.deps["export"])
    line = engine.command.split("# or run: ", 1)[1]
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(line)
    mounts = [argv[i + 1].split(":")[0] for i, a in enumerate(argv) if a == "-v"]
    assert mounts[0] == str((tmp_path / "cache" / "export" / export.key / "model").resolve())
    assert all(Path(m).is_absolute() for m in mounts) and "CHECKPOINT_DIR" not in line


# ---------------------------------------------------------------- item 5 / 11: backend records


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_serving_user_comes_from_the_backend_record(backend, tiny_model, eval_text, tmp_path):
    module = BACKENDS[backend]
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": backend, "gpus": ["H100"]}])
    data["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 128}]
    if backend == "trtllm":
        data["variants"][0]["symmetric"] = True
    plan = plan_of(data, tmp_path)
    target = plan.recipe.targets[0]
    spec = serve_spec(plan.recipe, "awq", plan.schemes["awq"], target, "H100", "rev")
    assert spec.user == module.USER and spec.port == module.PORT
    dockerfile = render_dockerfile(spec, ["config.json"], "awq/x/H100")
    assert f"USER {module.USER}\n" in dockerfile and "1000:1000" not in dockerfile
    assert f"EXPOSE {module.PORT}\n" in dockerfile


def test_tgi_record_runs_as_root_on_port_80_with_an_upstream_citation():
    source = (REPO / "forge" / "backends" / "tgi.py").read_text()
    assert BACKENDS["tgi"].USER == "root" and BACKENDS["tgi"].PORT == 80
    assert "https://github.com/huggingface/text-generation-inference/blob/" in source


@pytest.mark.parametrize(
    ("backend", "old"), [("vllm", "v0.11.2"), ("lmdeploy", "v0.10.2"), ("tgi", ":3.3.6")]
)  # fmt: skip
def test_base_images_moved_to_releases_checked_upstream(backend, old):
    source = (REPO / "forge" / "backends" / f"{backend}.py").read_text()
    assert old not in BACKENDS[backend].IMAGE
    assert "2026-11-30" in source and "https://github.com/" in source


# ---------------------------------------------------------------- Kubernetes Jobs serve the packaged image


def packaged_recipe(model: Path, eval_text: Path, root: Path, **package) -> dict:
    """vLLM and TensorRT-LLM (engine) on an H100, packaged to registry.local:5000; vLLM's base is a local
    layout, TensorRT-LLM's the default (FORGE_OFFLINE keeps the plan from asking its registry)."""
    from tests.registry_server import make_base_layout

    data = matrix_recipe(model, eval_text)
    data["variants"] = data["variants"][:1]
    data["targets"] = [{"backend": "vllm", "gpus": ["H100"]},
                       {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}]  # fmt: skip
    base = f"oci:{make_base_layout(root / 'base')}:latest"
    data["package"] = {"enabled": True, "registry": "registry.local:5000", "repository": "ml/tiny",
                       "base_images": {"vllm": base}, **package}  # fmt: skip
    return data


def test_k8s_jobs_serve_the_packaged_image_as_built(tiny_model, eval_text, tmp_path, monkeypatch):
    """Packaging on: the server sidecar is the cell's packaged image from package.registry, run as
    built (no command, no env, nothing mounted), pinned to its digest once the package stage is
    cached; the Job says how the image gets there. An engine this pod builds is in no image yet:
    that cell serves the TensorRT-LLM image with the engine mounted, and says so."""
    monkeypatch.setenv("FORGE_OFFLINE", "1")
    plan = with_gpu_stages_deferred(plan_of(packaged_recipe(tiny_model, eval_text, tmp_path), tmp_path))
    documents = k8s_documents(plan)
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    jobs = {j["metadata"]["annotations"]["forge/cell"]: j for j in documents if j["kind"] == "Job"}
    vllm = jobs["fp8/vllm/H100"]
    server = next(c for c in containers_of(vllm) if c["name"] == "server")
    assert server["image"] == "registry.local:5000/ml/tiny:fp8-vllm-H100-candidate"
    assert "command" not in server and "volumeMounts" not in server and "env" not in server
    assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert server["securityContext"] == {"runAsUser": 0} and server["resources"]["limits"] == {"nvidia.com/gpu": 1}
    package = plan.stage("package/fp8/vllm/H100")
    annotations = vllm["metadata"]["annotations"]
    assert annotations["forge/image"] == server["image"]
    assert annotations["forge/image-staging"] == (
        f"skopeo copy --preserve-digests oci:/forge/cache/package/{package.key}/layout:fp8-vllm-H100 "
        "docker://registry.local:5000/ml/tiny:fp8-vllm-H100-candidate"
    )
    loadgen = next(c for c in containers_of(vllm) if c["name"] == "loadgen")
    assert loadgen["command"][loadgen["command"].index("--model") + 1] == MODEL_DIR  # the path the image serves

    trt = jobs["fp8/trtllm-engine/H100"]
    trt_server = next(c for c in containers_of(trt) if c["name"] == "server")
    assert trt_server["image"] == trtllm.image(trtllm.DEFAULT_VERSION) and trt_server["command"][0] == "trtllm-serve"
    assert "carries the engine this pod builds" in trt["metadata"]["annotations"]["forge/served"]

    # Once the CPU build has made the image, the Job pins its digest.
    digest = "sha256:" + "b" * 64
    entry = plan.cache.entry(package.kind, package.key)
    entry.mkdir(parents=True)
    (entry / "stage.json").write_text(json.dumps({"digest": digest, "tag": "fp8-vllm-H100"}))
    package.status = "cached"
    pinned = next(j for j in k8s_documents(plan) if j["metadata"]["annotations"].get("forge/cell") == "fp8/vllm/H100")
    pinned_server = next(c for c in containers_of(pinned) if c["name"] == "server")
    assert pinned_server["image"] == f"registry.local:5000/ml/tiny@{digest}"


def test_k8s_jobs_refuse_what_a_node_cannot_pull(tiny_model, eval_text, tmp_path):
    from forge.errors import InputError

    data = packaged_recipe(tiny_model, eval_text, tmp_path)
    data["targets"] = data["targets"][:1]
    del data["package"]["registry"], data["package"]["repository"]
    plan = with_gpu_stages_deferred(plan_of(data, tmp_path))
    with pytest.raises(InputError, match=r"^package.registry: Kubernetes Jobs serve the image"):
        k8s_documents(plan)
    data["package"]["enabled"] = False  # the base image then, which is a local layout here
    plan = with_gpu_stages_deferred(plan_of(data, tmp_path))
    with pytest.raises(InputError, match=r"^package.base_images.vllm: oci:.* is a local OCI layout"):
        k8s_documents(plan)
