"""Release-pipeline integration: matrix / GitLab / Kubernetes renderers, CI summaries, report schema.

The example workflows must stay runnable, so every `forge` command line in them is parsed by the
real click CLI; the Kubernetes Jobs are checked against the Kubernetes API's own JSON schemas
(shipped offline by `kubernetes-validate`); the JUnit output is parsed back with xml.etree.
"""

from __future__ import annotations

import copy
import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from forge.build import build, tool_versions
from forge.ci import (
    GFD_PRODUCTS,
    GPU_STAGE_KINDS,
    github_matrix,
    gitlab_pipeline,
    k8s_jobs,
    k8s_name,
    render_matrix,
    runner_labels,
)
from forge.cli import main
from forge.plan import Plan
from forge.recipe import SCHEMA_PATH
from forge.report import render_junit, render_markdown_summary
from forge.stages.base import record_json
from tests.ci_helpers import matrix_recipe, plan_of, with_gpu_stages_deferred
from tests.conftest import REPO, tiny_recipe

TEMPLATES = REPO / "templates" / "ci"
REPORT_SCHEMA = REPO / "forge" / "build_report.schema.json"
BACKENDS = ("vllm", "tgi", "lmdeploy", "trtllm")


# ---------------------------------------------------------------- helpers


SHELL_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>&1"}


def forge_command_lines(script: str) -> list[list[str]]:
    """The argument lists of every `forge`/`.venv/bin/forge` invocation in a shell script."""
    commands = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if Path(token).name == "forge" and not token.startswith("-"):
                args = []
                for arg in tokens[i + 1 :]:
                    if arg in SHELL_OPERATORS:
                        break
                    args.append(arg)
                commands.append(args)
    return commands


def scripts_of(node) -> list[str]:
    """Every `run:` (GitHub) and `script`/`before_script`/`after_script` (GitLab) text in a YAML tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "run" and isinstance(value, str):
                found.append(value)
            elif key in ("script", "before_script", "after_script"):
                found += [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
            else:
                found += scripts_of(value)
    elif isinstance(node, list):
        for item in node:
            found += scripts_of(item)
    return found


def _options(command: str) -> set[str]:
    cmd = main.commands.get(command)
    return {opt for param in cmd.params for opt in param.opts} if cmd else set()


# The CLI this issue asks the lead to add (forge/cli.py is not ours); command lines that use a
# piece still missing are reported as pending instead of failing the rest of the check.
PROPOSED_CLI = {
    ("plan", "--format"),
    ("plan", "--image"),
    ("plan", "--cache-claim"),
    ("plan", "--workdir"),
    ("build", "--only"),
    ("build", "--skip"),
    ("report", "--markdown"),
    ("report", "--junit"),
}


def missing_cli_pieces(args: list[str]) -> list[str]:
    if not args:
        return []
    command = args[0]
    if command == "report" and "report" not in main.commands:
        return ["forge report"]
    return [f"forge {command} {a}" for a in args[1:] if (command, a) in PROPOSED_CLI and a not in _options(command)]


def parse_forge_args(args: list[str]) -> click.Context:
    """Parse a command line with forge's click CLI without running it (raises click.UsageError)."""
    group_ctx = main.make_context("forge", list(args))
    command = main.get_command(group_ctx, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    return command.make_context(args[0], list(args[1:]), parent=group_ctx)


def check_command_lines(lines: list[list[str]]) -> list[str]:
    """Parse every line; return the proposed CLI pieces that are still missing (lines using them wait)."""
    pending: set[str] = set()
    for args in lines:
        missing = missing_cli_pieces(args)
        if missing:
            pending.update(missing)
            continue
        try:
            parse_forge_args(args)
        except click.ClickException as error:
            pytest.fail(f"forge {shlex.join(args)}: {error.format_message()}")
    return sorted(pending)


# ---------------------------------------------------------------- example workflows


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_example_workflows_are_valid_yaml_and_their_forge_commands_parse(name):
    workflow = yaml.safe_load((TEMPLATES / name).read_text())
    assert isinstance(workflow, dict)
    lines = [args for script in scripts_of(workflow) for args in forge_command_lines(script)]
    used = {args[0] for args in lines}
    assert {"validate", "plan", "build", "report"} <= used, used
    pending = check_command_lines(lines)
    if pending:
        pytest.xfail(f"waiting for the CLI wiring of {', '.join(pending)} (every other command line parses)")


def test_github_workflow_wires_the_matrix_and_gates_the_gpu_job():
    workflow = yaml.safe_load((TEMPLATES / "github-actions.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the bare key `on` as true
    assert {"pull_request", "push"} <= set(triggers)
    jobs = workflow["jobs"]
    assert jobs["build"]["runs-on"] == "ubuntu-latest"
    assert jobs["gpu"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.ci).matrix }}"
    assert jobs["gpu"]["runs-on"] == "${{ matrix.runs_on }}"
    assert "fromJSON(needs.plan.outputs.ci).jobs > 0" in jobs["gpu"]["if"]
    assert "refs/tags/" in jobs["release"]["if"]
    for job in ("build", "gpu", "release"):  # pull requests only validate and plan
        assert "pull_request" in jobs[job]["if"] or "refs/tags/" in jobs[job]["if"]


# ---------------------------------------------------------------- GitHub matrix


def test_github_matrix_matches_the_plan(tiny_model, eval_text, tmp_path):
    plan = plan_of(matrix_recipe(tiny_model, eval_text), tmp_path)
    impossible = {(a.variant, a.backend, a.gpu): a.reason for a in plan.artifacts if a.status == "impossible"}
    # vLLM and TGI serve FP8 on the A100 weight-only (FP8 Marlin); LMDeploy and TensorRT-LLM cannot.
    assert set(impossible) == {("fp8", b, "A100-80GB") for b in ("lmdeploy", "trtllm")} | {("fp8", "lmdeploy", "H100")}

    # As planned here: engine stages are deferred (no GPU) and dispatched; not-implemented ones are listed.
    today = github_matrix(plan)
    dispatched_cells = {
        (a.variant, a.backend, a.gpu) for a in plan.artifacts
        if any(plan.stage(sid).status in ("run", "deferred") for sid in a.stages)
    }  # fmt: skip
    assert today["jobs"] == len(dispatched_cells)
    assert {(e["variant"], e["backend"], e["gpu"]) for e in today["matrix"]["include"]} == dispatched_cells
    assert all(d["status"] == "not-implemented" and d["reason"] for d in today["not_dispatched"])

    deferred = with_gpu_stages_deferred(plan)
    text = render_matrix(deferred, "github-matrix", "recipe.yaml")
    assert text.count("\n") == 1  # one line: `echo "ci=$(...)" >> $GITHUB_OUTPUT`
    matrix = json.loads(text)
    planned = [a for a in plan.artifacts if a.status == "planned"]
    include = matrix["matrix"]["include"]
    assert len(include) == matrix["jobs"] == len(planned) == 13
    assert set(matrix["matrix"]) == {"include"}  # anything else would become a matrix dimension
    for entry, artifact in zip(include, planned, strict=True):
        assert (entry["variant"], entry["backend"], entry["gpu"]) == (
            artifact.variant,
            artifact.backend,
            artifact.gpu,
        )
        assert entry["name"] == artifact.cell  # TensorRT-LLM cells carry their mode: awq/trtllm-engine/H100
        assert entry["format"] == artifact.format
        assert entry["runs_on"] == ["self-hosted", "gpu", artifact.gpu.lower()]
        assert entry["stages"] == [s for s in artifact.stages if s.split("/")[0] in GPU_STAGE_KINDS]
        assert (entry["variant"], entry["backend"], entry["gpu"]) not in impossible
    trtllm = next(e for e in include if e["name"] == "awq/trtllm-engine/H100")
    assert trtllm["stages"] == ["engine/awq/trtllm-engine/H100", "throughput/awq/trtllm-engine/H100"]  # engine first
    assert {(e["variant"], e["backend"], e["gpu"]): e["reason"] for e in matrix["excluded"]} == impossible
    assert matrix["not_dispatched"] == [] and matrix["cpu_runner"] == "ubuntu-latest"


def test_tensor_parallel_asks_for_that_many_gpus(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"], "tensor_parallel": 2}])
    data["validation"]["throughput"] = {"enabled": True}
    plan = with_gpu_stages_deferred(plan_of(data, tmp_path))
    entries = github_matrix(plan)["matrix"]["include"]
    assert [e["runs_on"] for e in entries] == [["self-hosted", "gpu", "h100", "gpus-2"]] * 2
    assert runner_labels("L40S") == ["self-hosted", "gpu", "l40s"]
    jobs = k8s_jobs(plan, "recipe.yaml")
    # The GPUs go to the backend's server (a sidecar); the load generator holds none.
    assert [
        [c.get("resources", {}).get("limits") for c in [*pod["initContainers"], *pod["containers"]]]
        for pod in (j["spec"]["template"]["spec"] for j in jobs)
    ] == [[{"nvidia.com/gpu": 2}, None]] * 2


# ---------------------------------------------------------------- GitLab child pipeline


def test_gitlab_child_pipeline_has_one_job_per_gpu_cell(tiny_model, eval_text, tmp_path):
    plan = with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))
    text = render_matrix(plan, "gitlab", "recipes/tiny.yaml", image="registry.local/forge:1")
    pipeline = yaml.safe_load(text)
    jobs = {name: job for name, job in pipeline.items() if isinstance(job, dict) and "script" in job}
    planned = [a for a in plan.artifacts if a.status == "planned"]
    assert sorted(jobs) == sorted(f"gpu {a.cell}" for a in planned)
    h100 = jobs["gpu awq/trtllm-engine/H100"]
    assert h100["tags"] == ["gpu", "h100"]
    assert h100["needs"] == [{"pipeline": "$PARENT_PIPELINE_ID", "job": "build"}]
    assert h100["artifacts"]["reports"] == {"junit": "junit.xml"}
    assert pipeline["default"]["image"] == "registry.local/forge:1"
    assert len(pipeline[".forge-excluded"]) == 3  # hidden key: listed, never run
    check_command_lines([a for job in jobs.values() for s in scripts_of(job) for a in forge_command_lines(s)])
    engine_only = [a for s in scripts_of(h100) for a in forge_command_lines(s) if a[0] == "build"]
    assert engine_only == [
        [
            "build",
            "recipes/tiny.yaml",
            "--json",
            "--only",
            "engine/awq/trtllm-engine/H100",
            "--only",
            "throughput/awq/trtllm-engine/H100",
        ]
    ]

    # Nothing to dispatch still makes a valid pipeline (GitLab refuses one without a visible job).
    cpu_only = matrix_recipe(tiny_model, eval_text)
    cpu_only["targets"] = [t for t in cpu_only["targets"] if t["backend"] != "trtllm"]
    cpu_only["validation"]["throughput"] = {"enabled": False}
    empty = gitlab_pipeline(plan_of(cpu_only, tmp_path), "recipes/tiny.yaml")
    assert [k for k in empty if not k.startswith(".") and isinstance(empty[k], dict) and "script" in empty[k]] == [
        "no gpu work"
    ]


# ---------------------------------------------------------------- Kubernetes


def test_k8s_jobs_validate_against_the_kubernetes_api_schema(tiny_model, eval_text, tmp_path):
    plan = with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))
    text = render_matrix(plan, "k8s", "recipes/tiny.yaml", image="registry.local/forge:1", cache_claim="shared")
    documents = list(yaml.safe_load_all(text))
    manifests = [d for d in documents if d["kind"] == "Job"]
    assert len(manifests) == sum(a.status == "planned" for a in plan.artifacts)
    version = kubernetes_validate.latest_version()
    for document in documents:
        # strict: the schema variant that refuses unknown fields, so a typo fails here, not in kubectl
        kubernetes_validate.validate(document, version, strict=True)
    for manifest in manifests:
        spec = manifest["spec"]
        pod = spec["template"]["spec"]
        assert manifest["apiVersion"] == "batch/v1"
        assert len(manifest["metadata"]["name"]) <= 63
        assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] == 2
        (server,) = [c for c in pod["initContainers"] if c["name"] == "server"]
        assert server["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert pod["volumes"][0] == {"name": "forge", "persistentVolumeClaim": {"claimName": "shared"}}
        (loadgen,) = pod["containers"]
        assert loadgen["image"] == "registry.local/forge:1"
        assert {"name": "FORGE_CACHE_DIR", "value": "/forge/cache"} in loadgen["env"]
        assert loadgen["command"][:2] == ["forge", "bench"]
        argv = loadgen["command"][1:]
        assert argv[argv.index("--tokenizer") + 1].startswith("/forge/cache/export/")
        argv[argv.index("--tokenizer") + 1] = str(tmp_path)  # click checks the directory exists
        check_command_lines([argv])  # the real CLI parses it
        gpu = manifest["metadata"]["labels"]["forge/gpu"]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": list(GFD_PRODUCTS[gpu])}
        ]
    h100 = next(m for m in manifests if m["metadata"]["annotations"]["forge/cell"] == "awq/trtllm-engine/H100")
    assert "NVIDIA-H100-80GB-HBM3" in json.dumps(h100)
    stages = "engine/awq/trtllm-engine/H100 throughput/awq/trtllm-engine/H100"
    assert h100["metadata"]["annotations"]["forge/stages"] == stages
    assert [c["name"] for c in h100["spec"]["template"]["spec"]["initContainers"]] == ["engine", "server"]


def test_k8s_schema_check_catches_a_broken_job(tiny_model, eval_text, tmp_path):
    plan = with_gpu_stages_deferred(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))
    job = k8s_jobs(plan, "recipe.yaml")[0]
    version = kubernetes_validate.latest_version()
    typo = copy.deepcopy(job)
    typo["spec"]["backofLimit"] = typo["spec"].pop("backoffLimit")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["command"] = "forge bench"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, version, strict=True)


def test_k8s_names_are_dns_labels_and_distinct():
    long = k8s_name("forge", "a-very-long-recipe-name-for-a-model", "awq-w4a16-g64-calibrated", "trtllm", "A100-80GB")
    other = k8s_name("forge", "a-very-long-recipe-name-for-a-model", "awq-w4a16-g64-calibrated", "trtllm", "A100-40GB")
    assert len(long) <= 63 and long != other
    assert k8s_name("forge", "tiny", "fp8", "vllm", "H100") == "forge-tiny-fp8-vllm-h100"
    assert k8s_name("forge", "Tiny.Model", "x") == "forge-tiny-model-x"


def test_every_gpu_profile_has_a_gfd_product_label():
    from forge.gpus import GPUS

    assert set(GFD_PRODUCTS) == set(GPUS)
    assert all(" " not in p for products in GFD_PRODUCTS.values() for p in products)


def test_unknown_format_is_an_input_error(tiny_model, eval_text, tmp_path):
    from forge.errors import InputError

    with pytest.raises(InputError, match="--format"):
        render_matrix(plan_of(tiny_recipe(tiny_model, eval_text), tmp_path), "jenkins", "recipe.yaml")


# ---------------------------------------------------------------- build reports


def sample_report(plan: Plan, recipe_file: str = "recipe.yaml") -> dict:
    """A report with exactly the keys forge/build.py `build()` writes, built from a real plan.

    It covers what a tiny CPU build cannot produce (failed gates, impossible cells, idle GPU
    stages); `test_real_build_report_*` checks a report from a real build against the same schema.
    """
    records = {}
    for s in plan.stages:
        if s.status in ("run", "cached"):
            facts = {"kind": s.kind, "key": s.key, "seconds": 0.25, **record_json(s.inputs)}
            if s.kind == "accuracy":
                facts.update(perplexity=21.5, baseline_perplexity=20.0, ppl_increase_pct=7.5, top1_agreement=0.82)
            records[s.id] = {"status": "ran", **facts}
        elif s.status in ("deferred", "not-implemented", "disabled"):
            records[s.id] = {"status": s.status, "reason": s.reason, "command": s.command}
    gates = []
    for s in plan.of_kind("accuracy"):
        artifact = s.id.removeprefix("accuracy/")
        gates.append(
            {
                "artifact": artifact,
                "name": "max_ppl_increase_pct",
                "metric": "ppl_increase_pct",
                "limit": 5.0,
                "measured": 7.5,
                "passed": False,
                "margin": -2.5,
            }
        )
        gates.append(
            {
                "artifact": artifact,
                "name": "min_top1_agreement",
                "metric": "top1_agreement",
                "limit": 0.7,
                "measured": 0.82,
                "passed": True,
                "margin": 0.12,
            }
        )
    files = {
        "config.json": {"sha256": "0" * 64, "bytes": 812},
        "model.safetensors": {"sha256": "a" * 64, "bytes": 4096},
    }
    return {
        "forge_version": "0.1.0",
        "recipe": plan.recipe.model_dump(mode="json"),
        "recipe_file": recipe_file,
        "inputs": {"source": plan.source_identity, "model_config": plan.model_config},
        "tools": tool_versions(),
        "stages": [{"id": s.id, "kind": s.kind, "key": s.key, **records.get(s.id, {})} for s in plan.stages],
        "artifacts": [
            {
                "variant": a.variant,
                "backend": a.backend,
                "gpu": a.gpu,
                "format": a.format,
                "path": f"artifacts/{plan.recipe.name}/{a.variant}/{a.backend}",
                "files": files,
                "stages": a.stages,
            }
            for a in plan.artifacts
            if a.status == "planned"
        ],
        "impossible": [
            {"variant": a.variant, "backend": a.backend, "gpu": a.gpu, "reason": a.reason}
            for a in plan.artifacts
            if a.status == "impossible"
        ],
        "validation": {"accuracy": gates},
        "seconds": 12.5,
    }


@pytest.fixture
def report(tiny_model, eval_text, tmp_path) -> dict:
    return sample_report(plan_of(matrix_recipe(tiny_model, eval_text), tmp_path))


def report_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_sample_report_validates_against_the_published_schema(report):
    report_validator().validate(report)
    jsonschema.validate(report["recipe"], json.loads(SCHEMA_PATH.read_text()))  # the resolved recipe too
    broken = copy.deepcopy(report)
    broken["artifacts"][0]["files"]["config.json"]["sha256"] = "not-a-digest"
    del broken["stages"]
    errors = sorted(report_validator().iter_errors(broken), key=lambda e: list(e.path))
    assert {tuple(e.path)[:1] for e in errors} == {(), ("artifacts",)}


def test_real_build_report_validates_against_the_published_schema(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(
        tiny_model,
        eval_text,
        variants=[{"name": "fp8", "scheme": "FP8_DYNAMIC"}],
        targets=[{"backend": "vllm", "gpus": ["H100"]}],
    )
    data["validation"]["accuracy"]["max_windows"] = 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = build(recipe, artifacts_dir=tmp_path / "artifacts")
    report = json.loads(result.report_path.read_text())
    report_validator().validate(report)
    gates = report["validation"]["accuracy"]
    assert len(ET.fromstring(render_junit(report)).findall(".//testcase")) == len(gates) > 0
    assert "### Accuracy gates" in render_markdown_summary(report)


# ---------------------------------------------------------------- Markdown and JUnit


def test_junit_has_one_testcase_per_gate_and_per_idle_stage(report):
    xml = render_junit(report)
    root = ET.fromstring(xml)
    gates = report["validation"]["accuracy"]
    idle = [s for s in report["stages"] if s.get("status") in ("deferred", "not-implemented", "disabled")]
    assert idle  # throughput, engine: not implemented yet
    cases = root.findall(".//testcase")
    assert len(cases) == len(gates) + len(idle)
    assert int(root.get("tests")) == len(cases)
    accuracy = root.find("testsuite[@name='forge.accuracy']")
    assert len(accuracy.findall("testcase")) == len(gates)
    failures = accuracy.findall("testcase/failure")
    assert len(failures) == sum(not g["passed"] for g in gates) == int(root.get("failures"))
    assert "measured 7.5, limit: maximum 5" in failures[0].get("message")
    skipped = root.findall("testsuite[@name='forge.stages']/testcase/skipped")
    assert len(skipped) == len(idle) == int(root.get("skipped"))
    assert all(s.get("message").startswith(("not-implemented: ", "deferred: ")) for s in skipped)


def test_junit_reports_an_unmeasured_gate_and_deferred_command():
    report = {
        "recipe": {"name": "r"},
        "stages": [
            {
                "id": "engine/a/trtllm-engine/H100",
                "kind": "engine",
                "key": None,
                "status": "deferred",
                "reason": "needs an NVIDIA H100 GPU",
                "command": "forge build r.yaml --only engine/a/trtllm-engine/H100",
            }
        ],
        "validation": {
            "accuracy": [
                {
                    "artifact": "a/modelopt",
                    "name": "max_kl",
                    "metric": "mean_kl",
                    "limit": 0.3,
                    "measured": None,
                    "passed": False,
                    "margin": None,
                }
            ]
        },
    }
    root = ET.fromstring(render_junit(report))
    assert "was not measured" in root.find(".//failure").get("message")
    assert root.find(".//skipped").text == "run later with: forge build r.yaml --only engine/a/trtllm-engine/H100"


def test_markdown_summary_has_the_gate_table(report):
    text = render_markdown_summary(report)
    assert text.startswith("## forge build: tiny")
    assert "| artifact | gate | metric | limit | measured | margin | result |" in text
    assert (
        "| fp8/compressed-tensors | max_ppl_increase_pct | ppl_increase_pct | 5 | 7.5 | -2.5 "
        "| ❌ FAIL: 2.5 above the maximum (50.0% of the limit) |" in text
    )
    assert "| fp8/compressed-tensors | min_top1_agreement | top1_agreement | 0.7 | 0.82 | 0.12 | ✅ pass |" in text
    assert "### Artifacts" in text and "### Impossible combinations" in text and "### Stages" in text
    assert "LMDeploy TurboMind takes FP8 only" in text


def test_markdown_summary_tolerates_missing_and_extra_sections(report):
    assert render_markdown_summary({}).startswith("## forge build: ?")
    assert "### Accuracy gates" not in render_markdown_summary({"recipe": {"name": "x"}, "validation": {}})
    assert render_junit({}).startswith('<?xml version="1.0"')

    extended = copy.deepcopy(report)
    level = {
        "label": "c16",
        "request_throughput_rps": 3.2,
        "output_tok_s": 410.0,
        "goodput_rps": None,
        "errors": 0,
        "ttft_ms": {"p99": 180.0},
        "tpot_ms": {"p99": 22.5},
    }
    extended["validation"]["throughput"] = [
        {
            "artifact": "fp8/vllm/H100",
            "levels": [level],
            "gates": [
                {"name": "ttft_p99_ms", "limit": 200.0, "measured": 180.0, "passed": True, "level": "c16"},
                {
                    "name": "min_output_tok_s",
                    "limit": 500.0,
                    "measured": 410.0,
                    "passed": False,
                    "level": "c16",
                },
            ],
            "cost": {
                "level": "c16",
                "output_tok_s": 410.0,
                "usd_per_gpu_hour": 4.5,
                "gpus": 1,
                "usd_per_million_output_tokens": 3.05,
            },
        },
    ]
    extended["images"] = [{"variant": "fp8", "backend": "vllm", "reference": "reg/x:fp8", "digest": "sha256:ab"}]
    report_validator().validate(extended)
    text = render_markdown_summary(extended)
    assert "### Throughput" in text and "| fp8/vllm/H100 | c16 | 3.2 | 410 | 180 | 22.5 | — | 0 |" in text
    assert "min_output_tok_s" in text and "❌ FAIL: 90 below the minimum" in text
    assert "USD per 1M output tokens" in text and "3.05" in text
    assert "### Images" in text and "reg/x:fp8" in text
    root = ET.fromstring(render_junit(extended))
    throughput = root.find("testsuite[@name='forge.throughput']")
    assert len(throughput.findall("testcase")) == 2 and len(throughput.findall("testcase/failure")) == 1


def test_markdown_summary_lists_task_scores_with_recovery(report):
    extended = copy.deepcopy(report)
    extended["validation"]["tasks"] = [
        {"stage": "tasks/baseline", "variant": None, "scores": {"facts": {"exact_match": 0.6}}},
        {"stage": "tasks/fp8/cpu", "variant": "fp8", "scores": {"facts": {"exact_match": 0.5}},
         "recovery": {"recovery.facts.exact_match": 0.5 / 0.6}},
    ]  # fmt: skip
    text = render_markdown_summary(extended)
    assert "| baseline | facts | exact_match | 0.6 | — |" in text
    assert "| fp8 | facts | exact_match | 0.5 | 0.8333 |" in text


def test_undefined_measurements_are_strict_json_and_say_why(report):
    import json

    from forge.build import finite_json
    from forge.stages import gate_failure_message

    gate = {"artifact": "fp8/cpu", "name": "min_recovery.facts", "metric": "recovery.facts.exact_match",
            "limit": 0.9, "measured": float("nan"), "passed": False, "margin": float("nan"),
            "reason": "the baseline scored 0 on this metric, so recovery is undefined"}  # fmt: skip
    extended = copy.deepcopy(report)
    extended["validation"]["accuracy"] = [gate]
    strict = finite_json(extended)
    json.loads(json.dumps(strict, allow_nan=False))  # raises on NaN/Infinity
    assert strict["validation"]["accuracy"][0]["measured"] is None
    assert "FAIL: the baseline scored 0" in render_markdown_summary(strict)
    assert "fp8/cpu: min_recovery.facts [recovery.facts.exact_match] the baseline scored 0" in gate_failure_message(
        [gate]
    )
