"""The GPU release path, end to end as far as a CPU machine can prove it: deferred gates are their own
state (report, Markdown, JUnit, verify, push), a TensorRT-LLM image waits for its engine and carries
it, serving limits fit the model, and the GPU serving stages run exactly the image that is released.

No GPU or Docker engine exists here: where a test needs one, a stand-in `nvidia-smi` / `docker` /
`skopeo` script on PATH reports a GPU or records its argv, so the test inspects the exact commands.
"""

from __future__ import annotations

import json
import os
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from forge.provenance import recipe_digest, verify_documents
from forge.recipe import parse_recipe
from forge.report import render_junit, render_markdown_summary
from forge.serving import ENGINE_DIR, MODEL_DIR
from tests import registry_server
from tests.ci_helpers import plan_of
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe


def fast_recipe(model: Path, eval_text: Path, **overrides) -> dict:
    """One FP8 variant, accuracy on 2 windows: the quickest CPU build that still has gates."""
    data = tiny_recipe(model, eval_text, variants=[{"name": "fp8", "scheme": "FP8_DYNAMIC"}], **overrides)
    data["validation"]["accuracy"]["max_windows"] = 2
    return data


def base_layout(root: Path) -> str:
    """A small base image as an OCI layout (tests/registry_server.py), so packaging needs no network."""
    return f"oci:{registry_server.make_base_layout(root / 'base')}:latest"


def gpu_gated_recipe(model: Path, eval_text: Path, root: Path) -> dict:
    """vLLM on an H100 with GPU throughput gates, packaged and pushed: the gates cannot run here."""
    data = fast_recipe(model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["validation"]["throughput"] = {"enabled": True, "cpu": False, "max_ttft_p99_ms": 500, "min_output_tps": 100}
    data["package"] = {"enabled": True, "registry": "127.0.0.1:9", "repository": "ml/tiny",
                       "base_images": {"vllm": base_layout(root)}}  # fmt: skip
    return data


# ---------------------------------------------------------------- deferred gates are their own state


@pytest.fixture(scope="module")
def deferred_build(tiny_model, eval_text, tmp_path_factory):
    """A build whose GPU throughput gates are all deferred (built once: it quantizes and measures)."""
    root = tmp_path_factory.mktemp("deferred")
    recipe = write_recipe(root, gpu_gated_recipe(tiny_model, eval_text, root))
    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(root / "artifacts"))
    return root, recipe, code, output


def test_build_reports_deferred_gates_as_deferred_not_passed(deferred_build):
    root, _, code, output = deferred_build
    assert code == 0, output  # deferring is what a CPU build does; it is not a failure
    report = json.loads((root / "artifacts" / "tiny" / "build.json").read_text())
    assert report["status"] == "gates-deferred"
    schema = json.loads((REPO / "forge" / "build_report.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)  # the published schema knows the state
    deferred = report["validation"]["deferred"]
    assert {g["name"] for g in deferred} == {"max_ttft_p99_ms", "min_output_tps"}  # the recipe's names
    assert all(g["state"] == "deferred" and "--only throughput/fp8/vllm/H100" in g["command"] for g in deferred)
    passed = sum(g["passed"] for g in report["validation"]["accuracy"])
    assert report["gates"] == {"passed": passed, "failed": 0, "deferred": 2}
    # Nothing is published unmeasured: the push is deferred, with why.
    [push] = [s for s in report["stages"] if s["kind"] == "push"]
    assert push["status"] == "deferred" and "throughput/fp8/vllm/H100" in push["reason"]
    assert "pushed" not in report

    markdown = render_markdown_summary(report)
    assert f"gates: {passed} passed, 2 deferred to a GPU builder" in markdown
    assert f"{passed + 2}/{passed + 2} gates passed" not in markdown and "gates passed" not in markdown
    assert "### Gates deferred to a GPU builder" in markdown

    junit = ET.fromstring(render_junit(report))
    cases = [c for c in junit.iter("testcase") if c.get("classname") == "forge.throughput.fp8/vllm/H100"]
    assert len(cases) == 2
    for case in cases:
        skipped = case.find("skipped")
        assert skipped is not None and case.find("failure") is None
        assert "forge build" in skipped.text and "--only throughput/fp8/vllm/H100" in skipped.text


def test_push_refuses_deferred_gates_before_any_work(deferred_build, tmp_path):
    root, recipe, _, _ = deferred_build
    code, output = run_cli("push", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == 1, output
    assert "push/fp8/vllm/H100" in output and "allow-deferred-gates" in output
    assert not list((tmp_path / "artifacts").rglob("stage.json"))  # refused before any stage ran


def test_verify_counts_deferred_gates_and_fails_them_unless_allowed(deferred_build):
    root, recipe_path, _, _ = deferred_build
    report = json.loads((root / "artifacts" / "tiny" / "build.json").read_text())
    recipe = parse_recipe(recipe_path.read_text())
    digest = "sha256:" + "a" * 64

    def gates_check(report: dict):
        data = json.dumps(report).encode()
        import hashlib

        statement = {
            "_type": "https://in-toto.io/Statement/v1",
            "predicateType": "https://slsa.dev/provenance/v1",
            "subject": [{"digest": {"sha256": "a" * 64}}],
            "predicate": {
                "buildDefinition": {"externalParameters": {"recipe": {"sha256": recipe_digest(recipe)}}},
                "runDetails": {
                    "byproducts": [{"name": "build.json", "digest": {"sha256": hashlib.sha256(data).hexdigest()}}]
                },
            },
        }
        return next(c for c in verify_documents(digest, recipe, statement, data) if c.name == "gates passed")

    check = gates_check(report)
    assert not check.passed and "2 deferred to a GPU builder" in check.detail and "0/0" not in check.detail
    allowed = gates_check({**report, "allow_deferred_gates": True})
    assert allowed.passed and "allow_deferred_gates" in allowed.detail


# ---------------------------------------------------------------- item 1: engine-mode images wait for the engine


def engine_recipe(model: Path, eval_text: Path, root: Path, **package) -> dict:
    data = fast_recipe(
        model, eval_text, targets=[{"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}]
    )
    data["package"] = {"enabled": True, "base_images": {"trtllm": base_layout(root)}, **package}
    return data


def test_engine_mode_package_is_deferred_with_its_engine(tiny_model, eval_text, tmp_path):
    plan = plan_of(engine_recipe(tiny_model, eval_text, tmp_path), tmp_path)
    [engine] = plan.of_kind("engine")
    [package] = plan.of_kind("package")
    assert engine.status == "deferred"
    assert package.status == "deferred" and engine.id in package.reason and engine.id in package.needs
    assert f"--only {package.id}" in package.command


def test_push_of_an_engine_image_is_refused_without_building_the_engine(tiny_model, eval_text, tmp_path):
    """`forge push` used to try the deferred engine build and exit 3 from trtllm; it now refuses up front."""
    data = engine_recipe(tiny_model, eval_text, tmp_path, registry="127.0.0.1:9", repository="ml/t")
    recipe = write_recipe(tmp_path, data)
    code, output = run_cli("push", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == 3, output
    assert "its image is deferred" in output and "engine/" in output and "trtllm-build failed" not in output
    assert not list((tmp_path / "artifacts").rglob("stage.json"))


registry = registry_server.registry  # a real distribution registry (htpasswd), one per module


def test_push_publishes_what_exists_and_lists_the_deferred_engine_image(tiny_model, eval_text, tmp_path, registry,
                                                                         monkeypatch):  # fmt: skip
    """vLLM's image exists and is pushed; TensorRT-LLM's waits for its engine: it is listed with its
    command (output and build.json), the rest still goes out, and the exit status is 0."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", registry.password)
    data = engine_recipe(tiny_model, eval_text, tmp_path, registry=registry.host, repository="ml/partial",
                         allow_deferred_gates=True)  # fmt: skip
    data["targets"].insert(0, {"backend": "vllm", "gpus": ["H100"]})
    data["package"]["base_images"]["vllm"] = data["package"]["base_images"]["trtllm"]
    data["validation"]["accuracy"]["enabled"] = False
    recipe = write_recipe(tmp_path, data)
    artifacts = tmp_path / "artifacts"
    code, output = run_cli("push", str(recipe), "--json", "--artifacts-dir", str(artifacts))
    assert code == 0, output
    pushed, deferred = ([e for e in json.loads(output) if e["status"] == s] for s in ("pushed", "deferred"))
    assert [p["stage"] for p in pushed] == ["push/fp8/vllm/H100"] and pushed[0]["digest"].startswith("sha256:")
    assert [d["stage"] for d in deferred] == ["push/fp8/trtllm-engine/H100"]
    assert "its image is deferred" in deferred[0]["reason"] and deferred[0]["command"].startswith("forge push ")
    report = json.loads((artifacts / "tiny" / "build.json").read_text())
    stages = {s["id"]: s for s in report["stages"]}
    assert stages["push/fp8/vllm/H100"]["status"] == "ran"
    engine_push = stages["push/fp8/trtllm-engine/H100"]
    assert engine_push["status"] == "deferred" and engine_push["command"]
    assert stages["package/fp8/trtllm-engine/H100"]["status"] == "deferred"
    assert [p["stage"] for p in report["pushed"]] == ["push/fp8/vllm/H100"]

    code, text = run_cli("push", str(recipe), "--artifacts-dir", str(artifacts))
    assert code == 0, text
    assert f"{registry.host}/ml/partial:fp8-vllm-H100 sha256:" in text and "(0 bytes uploaded)" in text
    assert "deferred push/fp8/trtllm-engine/H100: its image is deferred" in text and "\n  run: forge push " in text


# ---------------------------------------------------------------- stand-ins for a GPU builder's tools

FAKE_DOCKER = r'''#!/usr/bin/env python3
"""Stand-in for docker: records its argv; `info` answers; `run … trtllm-build` writes an engine into
the host directory mounted at --output_dir; any other `run` (a server) exits 1 at once."""
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_TOOLS_LOG"], "a") as log:
    log.write(json.dumps(["docker", *argv]) + "\n")
if argv[:1] == ["info"]:
    print("27.0.0")
    sys.exit(0)
if argv[:1] == ["run"] and "trtllm-build" in argv:
    mounts = dict(reversed(a.split(":")[:2]) for a in (argv[i + 1] for i, x in enumerate(argv) if x == "-v"))
    engine = Path(mounts[argv[argv.index("--output_dir") + 1]])
    (engine / "rank0.engine").write_bytes(b"engine bytes")
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    sys.exit(0)
print("no GPU here: a stand-in docker", file=sys.stderr)
sys.exit(1)
'''

FAKE_SKOPEO = r"""#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_TOOLS_LOG"], "a") as log:
    log.write(json.dumps(["skopeo", *sys.argv[1:]]) + "\n")
"""


@pytest.fixture
def gpu_host(tmp_path, monkeypatch) -> Path:
    """PATH with an `nvidia-smi` that reports one H100, and recording `docker` / `skopeo`; returns the log."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    scripts = {
        "nvidia-smi": "#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 9.0, 81559'\n",
        "docker": FAKE_DOCKER,
        "skopeo": FAKE_SKOPEO,
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "tools.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TOOLS_LOG", str(log))
    return log


def recorded(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def layer_members(layout: Path) -> set[str]:
    """Every path the image's forge layers add (the base's layers are gzip; forge's are tar)."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    members = set()
    for layer in manifest["layers"]:
        path = blobs / layer["digest"].split(":")[1]
        with tarfile.open(path) as tar:
            members |= {"/" + m.name.lstrip("/") for m in tar.getmembers() if m.isfile()}
    return members


def test_engine_mode_image_carries_the_engine_as_layers(tiny_model, eval_text, tmp_path, gpu_host):
    data = engine_recipe(tiny_model, eval_text, tmp_path)
    data["validation"]["accuracy"]["enabled"] = False
    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    report = json.loads((tmp_path / "a" / "tiny" / "build.json").read_text())
    [image] = report["images"]
    members = layer_members(Path(image["layout"]))
    assert {f"{ENGINE_DIR}/rank0.engine", f"{ENGINE_DIR}/config.json"} <= members
    assert f"{MODEL_DIR}/config.json" in members  # the tokenizer side beside it
    assert [c for c in recorded(gpu_host) if "trtllm-build" in c]  # built here, by the (stand-in) release image
    dockerfile = (Path(image["layout"]).parent / "context" / "Dockerfile").read_text()
    copied = {line.split()[2] for line in dockerfile.splitlines() if line.startswith("COPY engine/")}
    assert copied == {m for m in members if m.startswith(ENGINE_DIR + "/")}  # buildx gets the same engine
    entrypoint = json.loads(dockerfile.split("ENTRYPOINT ")[1])
    assert entrypoint[1] == ENGINE_DIR  # trtllm-serve loads what the image holds
    for path in container_paths(entrypoint):  # the engine, its tokenizer, trtllm-serve's YAML: all in the image
        assert any(m == path or m.startswith(path + "/") for m in members), path


# ---------------------------------------------------------------- item 2: serving limits fit the model


def limit_flags(backend: str, argv: list[str]) -> list[int]:
    """The values of every flag in a backend's argv that bounds a sequence or prompt length."""
    flags = {"vllm": ["--max-model-len"], "tgi": ["--max-input-tokens", "--max-total-tokens"],
             "lmdeploy": ["--session-len"], "trtllm": ["--max_seq_len"]}[backend]  # fmt: skip
    return [int(argv[argv.index(flag) + 1]) for flag in flags]


@pytest.mark.parametrize("backend", ["vllm", "tgi", "lmdeploy", "trtllm"])
def test_default_limits_fit_the_models_positions_for_every_backend(backend, tiny_model, eval_text, tmp_path):
    from forge.backends import trtllm
    from forge.serving import serve_spec

    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": backend, "gpus": ["H100"]}])
    data["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 128, "symmetric": True}]
    plan = plan_of(data, tmp_path)
    assert plan.model_config["max_position_embeddings"] == 512
    [target] = plan.targets
    spec = serve_spec(plan.recipe, "awq", plan.schemes["awq"], target, "H100", "")
    assert limit_flags(backend, spec.argv) and all(v <= 512 for v in limit_flags(backend, spec.argv))
    if backend == "trtllm":
        argv = trtllm.build_argv("C", "E", trtllm.Limits.from_target(target), plan.schemes["awq"])
        assert int(argv[argv.index("--max_seq_len") + 1]) == 512
        assert int(argv[argv.index("--max_input_len") + 1]) < 512


@pytest.mark.parametrize(
    ("key", "limits"),
    [("max_seq_len", {"max_seq_len": 1024, "max_input_len": 256}), ("max_input_len", {"max_input_len": 1024})],
)
def test_explicit_limits_beyond_the_model_are_refused_naming_the_key(key, limits, tiny_model, eval_text, tmp_path):
    target = {"backend": "vllm", "gpus": ["H100"], **limits}
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "tgi", "gpus": ["H100"]}, target])
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert output.startswith(f"forge: targets[1].{key}: 1024 "), output


def test_rope_scaling_stretches_the_limit_as_vllm_derives_it():
    from forge.plan import position_limit

    assert position_limit({"max_position_embeddings": 4096}) == 4096
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert position_limit({"max_position_embeddings": 32768, "rope_scaling": yarn}) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert position_limit({"max_position_embeddings": 131072, "rope_scaling": llama3}) == 131072
    assert position_limit({"max_position_embeddings": 2048, "rope_scaling": {"type": "linear", "factor": 2}}) == 4096


# ---------------------------------------------------------------- items 3 and 4: what a GPU stage serves


def container_paths(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("/")]


@pytest.mark.parametrize(("backend", "mode"), [("vllm", None), ("tgi", None), ("lmdeploy", None),
                                               ("trtllm", "engine"), ("trtllm", "pytorch")])  # fmt: skip
def test_every_container_path_of_every_backend_is_mounted(backend, mode, tiny_model, eval_text, tmp_path):
    from forge.serving import LAUNCH_DIR, container_mounts, serve_spec

    target = {"backend": backend, "gpus": ["H100"], **({"trtllm": {"mode": mode}} if mode else {})}
    data = tiny_recipe(tiny_model, eval_text, targets=[target])
    data["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 128, "symmetric": True}]
    plan = plan_of(data, tmp_path)
    spec = serve_spec(plan.recipe, "awq", plan.schemes["awq"], plan.targets[0], "H100", "")
    dirs = {MODEL_DIR: tmp_path / "m", ENGINE_DIR: tmp_path / "e" if mode == "engine" else None, LAUNCH_DIR: tmp_path}
    mounted = [container for _, container in container_mounts(spec.argv, dirs)]
    for path in container_paths(spec.argv):
        assert any(path == m or path.startswith(m + "/") for m in mounted), (path, mounted)
    if mode == "engine":  # the engine, its tokenizer and trtllm-serve's YAML: all three
        assert sorted(mounted) == sorted([MODEL_DIR, ENGINE_DIR, LAUNCH_DIR])


def docker_runs(log: Path) -> list[list[str]]:
    return [c for c in recorded(log) if c[:2] == ["docker", "run"] and "trtllm-build" not in c]


def test_gpu_stage_with_packaging_off_mounts_what_its_command_reads(tiny_model, eval_text, tmp_path, gpu_host):
    from forge.errors import InfraError
    from forge.stages import serve_artifact

    data = engine_recipe(tiny_model, eval_text, tmp_path)
    data["package"] = {"enabled": False}
    data["validation"]["throughput"] = {"enabled": True, "cpu": False}
    plan = plan_of(data, tmp_path)
    [stage] = plan.of_kind("throughput")
    assert stage.status == "run"  # the stand-in nvidia-smi reports an H100
    (tmp_path / "model").mkdir()
    (tmp_path / "engine").mkdir()
    with pytest.raises(InfraError, match="exited with code 1"):
        with serve_artifact(stage.inputs.served, tmp_path / "model", tmp_path / "engine", tmp_path / "out"):
            pass
    [run] = docker_runs(gpu_host)
    volumes = {run[i + 1].rsplit(":", 2)[1]: run[i + 1].split(":")[0] for i, a in enumerate(run) if a == "-v"}
    assert volumes == {ENGINE_DIR: str(tmp_path / "engine"), MODEL_DIR: str(tmp_path / "model"),
                       "/models/launch": str(tmp_path / "out" / "launch")}  # fmt: skip
    assert (tmp_path / "out" / "launch" / "trtllm-serve.yaml").is_file()  # the YAML its argv names
    assert "--entrypoint" in run and (tmp_path / "out" / "server.log").is_file()


def test_gpu_stage_serves_the_packaged_image_itself(tiny_model, eval_text, tmp_path, gpu_host):
    """With packaging on, the throughput stage loads the built image with skopeo and runs it as
    built: no bind mount, no entrypoint or user override, the image's own tag."""
    data = fast_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["validation"]["accuracy"]["enabled"] = False
    data["validation"]["throughput"] = {"enabled": True, "cpu": False}
    data["package"] = {"enabled": True, "base_images": {"vllm": base_layout(tmp_path)}}
    recipe = write_recipe(tmp_path, data)
    plan = plan_of(data, tmp_path)
    [throughput] = plan.of_kind("throughput")
    assert "package/fp8/vllm/H100" in throughput.needs
    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 3, output  # the stand-in docker serves nothing
    calls = recorded(gpu_host)
    [load] = [c for c in calls if c[0] == "skopeo"]
    [package] = plan.of_kind("package")
    layout, tag = tmp_path / "a" / ".cache" / "package" / package.key / "layout", package.inputs.tag
    assert load == ["skopeo", "copy", f"oci:{layout}:{tag}", f"docker-daemon:forge.local/tiny:{tag}"]
    [run] = docker_runs(gpu_host)
    assert calls.index(load) < calls.index(run)
    assert run[-1] == f"forge.local/tiny:{tag}"  # the image as built: nothing after it, nothing mounted
    assert "-v" not in run and "--entrypoint" not in run and "--user" not in run
    report = json.loads((tmp_path / "a" / "tiny" / "build.json").read_text())
    stages = {s["id"]: s for s in report["stages"]}
    assert (
        stages["package/fp8/vllm/H100"]["status"] == "ran" and stages["throughput/fp8/vllm/H100"]["status"] == "failed"
    )


def test_the_record_says_what_was_served():
    from forge.stages import served_as
    from forge.stages.serve import Served

    served = Served("a", "H100", image="forge.local/r:a", image_stage="package/a/vllm/H100")
    assert "packaged image (package/a/vllm/H100)" in served_as(served, Path("layout"))
    assert "base image with the artifact mounted" in served_as(served, None) and "package.enabled" in served_as(
        served, None
    )


# ---------------------------------------------------------------- a base image given as a local OCI layout

FAKE_BUILDX = r'''#!/usr/bin/env python3
"""Stand-in for docker buildx: records its argv and the Dockerfile it was given, writes an OCI archive."""
import io, json, os, sys, tarfile
from pathlib import Path
argv = sys.argv[1:]
context = Path(argv[-1])
with open(os.environ["FAKE_TOOLS_LOG"], "a") as log:
    log.write(json.dumps(["docker", *argv]) + "\n")
    log.write(json.dumps(["Dockerfile", (context / "Dockerfile").read_text()]) + "\n")
dest = next(a for a in argv if a.startswith("type=oci,")).split("dest=")[1].split(",")[0]
index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "0" * 64}]}).encode()
with tarfile.open(dest, "w") as tar:
    info = tarfile.TarInfo("index.json")
    info.size = len(index)
    tar.addfile(info, io.BytesIO(index))
'''


def test_docker_builder_binds_an_oci_base_as_a_named_context(tiny_model, eval_text, tmp_path, gpu_host):
    """`FROM oci:…` is no Dockerfile: the Dockerfile says `FROM forge-base` and buildx gets the layout
    as `--build-context forge-base=oci-layout://ABSOLUTE:TAG` (the path anchored at the recipe)."""
    from forge.package import package_artifact, resolve_base
    from forge.serving import serve_spec

    (Path(os.environ["PATH"].split(":")[0]) / "docker").write_text(FAKE_BUILDX)
    project = tmp_path / "project"
    registry_server.make_base_layout(project / "bases" / "vllm")
    data = fast_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["package"] = {"enabled": True, "builder": "docker", "base_images": {"vllm": "oci:bases/vllm:latest"}}
    plan = plan_of(data, project)
    [package] = plan.of_kind("package")
    assert package.inputs.base == resolve_base("oci:bases/vllm:latest", plan.recipe_dir)
    spec = serve_spec(plan.recipe, "fp8", plan.schemes["fp8"], plan.targets[0], "H100", "rev")
    out = tmp_path / "out"
    out.mkdir()
    facts = package_artifact(spec, tiny_model, out, "fp8", package.id, "docker", package.inputs.base)
    assert facts["builder"] == "docker"
    build, (_, dockerfile) = recorded(gpu_host)
    assert build[:3] == ["docker", "buildx", "build"]
    contexts = [build[i + 1] for i, a in enumerate(build) if a == "--build-context"]
    assert contexts == [f"forge-base=oci-layout://{(plan.recipe_dir / 'bases' / 'vllm').resolve()}:latest"]
    froms = [line for line in dockerfile.splitlines() if line.startswith("FROM")]
    assert froms == ["FROM forge-base"]


def test_docker_builder_pins_a_registry_base_to_the_digest_the_plan_resolved(tiny_model, tmp_path, gpu_host):
    from dataclasses import replace

    from forge.package import package_artifact
    from forge.serving import ServeSpec

    (Path(os.environ["PATH"].split(":")[0]) / "docker").write_text(FAKE_BUILDX)
    spec = ServeSpec("vllm", "registry.example/vllm:v1", ["vllm", "serve", MODEL_DIR], 8000, "/health", "root")
    digest = "sha256:" + "a" * 64
    base = {"image": f"registry.example/vllm:v1@{digest}", "digest": digest, "note": None, "unreachable": None}
    out = tmp_path / "out"
    out.mkdir()
    package_artifact(replace(spec), tiny_model, out, "t", "package/x", "docker", base)
    build, (_, dockerfile) = recorded(gpu_host)
    assert "--build-context" not in build
    assert [line for line in dockerfile.splitlines() if line.startswith("FROM")] == [f"FROM {base['image']}"]


def test_gpu_stage_with_packaging_off_loads_an_oci_base_into_docker_first(tiny_model, eval_text, tmp_path, gpu_host):
    """`docker run oci:…` is no command: the layout is copied into the engine with skopeo and the
    served container runs that name, the artifact mounted as usual."""
    from forge.errors import InfraError
    from forge.stages import serve_artifact

    project = tmp_path / "project"
    registry_server.make_base_layout(project / "bases" / "vllm")
    data = fast_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["package"] = {"enabled": False, "base_images": {"vllm": "oci:bases/vllm:latest"}}
    data["validation"]["throughput"] = {"enabled": True, "cpu": False}
    plan = plan_of(data, project)
    [stage] = plan.of_kind("throughput")
    (tmp_path / "model").mkdir()
    with pytest.raises(InfraError, match="exited with code 1"):
        with serve_artifact(stage.inputs.served, tmp_path / "model", None, tmp_path / "out"):
            pass
    calls = recorded(gpu_host)
    [load] = [c for c in calls if c[0] == "skopeo"]
    layout = (plan.recipe_dir / "bases" / "vllm").resolve()
    assert load == ["skopeo", "copy", f"oci:{layout}:latest", "docker-daemon:forge.local/base-vllm:latest"]
    [run] = docker_runs(gpu_host)
    assert calls.index(load) < calls.index(run)
    assert not any(a.startswith("oci:") for a in run)
    image_at = run.index("--entrypoint") + 2
    assert run[image_at] == "forge.local/base-vllm:latest" and f"{tmp_path / 'model'}:{MODEL_DIR}:ro" in run


def test_gpu_stage_waits_for_a_deferred_image_even_with_its_gpu_here(tiny_model, eval_text, tmp_path, gpu_host):
    """An H100 is here, but the packaged image cannot be built (its base is unreachable): the
    throughput stage that would serve that image is deferred after it, not run against nothing."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as closed:
        base = f"127.0.0.1:{closed.getsockname()[1]}/gone/vllm:v1"
    data = fast_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["validation"]["throughput"] = {"enabled": True, "cpu": False}
    data["package"] = {"enabled": True, "base_images": {"vllm": base}}
    plan = plan_of(data, tmp_path)
    package, throughput = plan.stage("package/fp8/vllm/H100"), plan.stage("throughput/fp8/vllm/H100")
    assert package.status == "deferred" and "cannot be reached" in package.reason
    assert throughput.status == "deferred" and package.id in throughput.reason and package.id in throughput.needs
    assert throughput.command == f"forge build RECIPE --only {throughput.id}  # after {package.id}"
