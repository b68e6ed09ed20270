"""`forge build` end to end on the tiny model: stages, cache reuse, report, gates, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forge.build import build
from forge.errors import GateFailed, InputError
from forge.formats import FORMATS
from forge.quant.model import load_quantized
from tests.conftest import run_cli, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def built(tiny_model, eval_text, tmp_path_factory):
    """One cold build of the tiny recipe, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("build")
    recipe = write_recipe(root, tiny_recipe(tiny_model, eval_text))
    result = build(recipe, artifacts_dir=root / "artifacts")
    return root, recipe, result


def rebuild(built, recipe: Path, tmp_path: Path):
    """Build into the test's own artifacts directory, reusing the shared build's stage cache."""
    return build(recipe, artifacts_dir=tmp_path / "artifacts", cache_dir=built[0] / "artifacts" / ".cache")


def cli_rebuild(built, recipe: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    cache = str(built[0] / "artifacts" / ".cache")
    return run_cli("build", str(recipe), *args, "--artifacts-dir", str(tmp_path / "artifacts"), "--cache-dir", cache)


def statuses(report: dict) -> dict[str, str]:
    return {s["id"]: s["status"] for s in report["stages"]}


def test_cold_build_runs_every_stage_and_reports(built):
    root, _, result = built
    report = result.report
    assert set(statuses(report).values()) == {"ran"}
    assert result.report_path == root / "artifacts" / "tiny" / "build.json"
    assert json.loads(result.report_path.read_text()) == report
    assert report["tools"]["torch"].startswith("2.")
    assert report["inputs"]["source"]["kind"] == "path"
    # Every artifact directory holds exactly the files the report lists, with their digests.
    for artifact in report["artifacts"]:
        directory = Path(artifact["path"])
        on_disk = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        assert on_disk == sorted(artifact["files"])
        assert "config.json" in artifact["files"]
    gates = report["validation"]["accuracy"]
    assert {g["name"] for g in gates} == {"max_ppl_increase_pct", "min_top1_agreement"}
    assert all(g["passed"] for g in gates)


def test_accuracy_is_measured_on_the_exported_bytes(built):
    _, _, result = built
    accuracy = {s["id"]: s for s in result.report["stages"] if s["kind"] == "accuracy"}
    fp8 = accuracy["accuracy/fp8/compressed-tensors"]
    int4 = accuracy["accuracy/int4/compressed-tensors"]
    # int4 strays further from the baseline than fp8 on the same windows; neither equals it exactly.
    assert 0 < abs(fp8["ppl_increase_pct"]) < int4["ppl_increase_pct"]
    assert int4["top1_agreement"] < fp8["top1_agreement"] < 1.0
    assert 0 < fp8["mean_kl"] < int4["mean_kl"]


def test_second_build_is_fully_cached(built, tmp_path):
    _, recipe, first = built
    second = rebuild(built, recipe, tmp_path)
    assert set(statuses(second.report).values()) == {"cached"}
    strip = [{k: v for k, v in a.items() if k != "path"} for a in first.report["artifacts"]]
    assert [{k: v for k, v in a.items() if k != "path"} for a in second.report["artifacts"]] == strip


def test_changing_a_gate_reuses_every_stage(built, tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"]["gates"]["min_top1_agreement"] = 0.99999
    recipe = write_recipe(tmp_path, data, name="strict.yaml")
    with pytest.raises(GateFailed) as failure:
        rebuild(built, recipe, tmp_path)
    report = failure.value.result.report
    assert set(statuses(report).values()) == {"cached"}
    assert "min_top1_agreement" in str(failure.value)
    assert json.loads((tmp_path / "artifacts" / "tiny" / "build.json").read_text()) == report


def test_gate_failure_exits_1_with_a_table(built, tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"]["gates"] = {"max_ppl_increase_pct": 0.0001}
    recipe = write_recipe(tmp_path, data)
    code, output = cli_rebuild(built, recipe, tmp_path)
    assert code == 1, output
    assert "validation gates failed" in output and "max_ppl_increase_pct" in output


def test_a_new_variant_reuses_the_others(built, tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text)
    data["variants"].append({"name": "int4-sym", "scheme": "W4A16", "group_size": 32})
    report = rebuild(built, write_recipe(tmp_path, data, name="more.yaml"), tmp_path).report
    ran = {sid for sid, status in statuses(report).items() if status == "ran"}
    assert ran == {"quantize/int4-sym", "export/int4-sym/compressed-tensors", "accuracy/int4-sym/compressed-tensors"}


def test_damaged_artifact_fails_its_gate(built, tiny_model, eval_text, tmp_path):
    """Scrambled scales in an export are caught by re-reading the export, not assumed."""
    root, _, result = built
    export_stage = next(s for s in result.report["stages"] if s["id"] == "export/int4/compressed-tensors")
    entry = root / "artifacts" / ".cache" / "export" / export_stage["key"] / "model"
    damaged = tmp_path / "damaged"
    qm = load_quantized(root / "artifacts" / ".cache" / "quantize" / next(
        s["key"] for s in result.report["stages"] if s["id"] == "quantize/int4"))  # fmt: skip
    for linear in qm.linears.values():
        linear.scale = linear.scale.flip(0)  # scales of other output rows
    FORMATS["compressed-tensors"].write(qm, entry, damaged, {"damaged": True})
    from forge.eval.gates import evaluate_gates
    from forge.eval.perplexity import build_model, compare_pass, load_windows

    baseline = next(s for s in result.report["stages"] if s["id"] == "baseline")
    baseline_dir = root / "artifacts" / ".cache" / "baseline" / baseline["key"]
    windows = load_windows(eval_text, damaged, 64, 4)
    config, state = FORMATS["compressed-tensors"].read(damaged)
    metrics = compare_pass(build_model(config, state), windows, baseline_dir)
    healthy = next(s for s in result.report["stages"] if s["id"] == "accuracy/int4/compressed-tensors")
    assert metrics["top1_agreement"] < healthy["top1_agreement"]
    gates = evaluate_gates({"min_top1_agreement": healthy["top1_agreement"] - 0.01}, metrics)
    assert not gates[0].passed


def test_bad_input_leaves_no_artifacts(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text)
    data["variants"][0]["calibration"] = {"sources": ["missing.txt"]}
    data["variants"][0]["scheme"] = "AWQ_W4A16"
    data["variants"][0]["group_size"] = 64
    with pytest.raises(InputError, match=r"calibration.sources\[0\]"):
        build(write_recipe(tmp_path, data), artifacts_dir=tmp_path / "artifacts")
    assert not (tmp_path / "artifacts" / "tiny").exists()


def test_build_json_flag_prints_the_report(built, tmp_path):
    code, output = cli_rebuild(built, built[1], tmp_path, "--json")
    assert code == 0
    assert json.loads(output)["recipe"]["name"] == "tiny"


def test_trtllm_engine_is_deferred_with_its_command(built, tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "trtllm", "gpus": ["H100"], "variants": ["fp8"],
                                                        "trtllm": {"mode": "engine", "version": "1.2.1"}}])  # fmt: skip
    recipe = write_recipe(tmp_path, data, name="trtllm.yaml")
    report = rebuild(built, recipe, tmp_path).report
    stages = {s["id"]: s for s in report["stages"]}
    assert stages["export/fp8/trtllm-checkpoint-tp1"]["status"] == "ran"
    assert stages["accuracy/fp8/trtllm-checkpoint-tp1"]["status"] == "ran"  # re-read from rank0.safetensors
    engine = stages["engine/fp8/trtllm-engine/H100"]
    assert engine["status"] == "deferred" and "no NVIDIA GPU" in engine["reason"]
    assert f"forge build {recipe} --only engine/fp8/trtllm-engine/H100" in engine["command"]
    assert "trtllm-build --checkpoint_dir" in engine["command"]
    # Asked for explicitly on a machine without the GPU: exit 3, saying why and what would run.
    code, output = cli_rebuild(built, recipe, tmp_path, "--only", "engine")
    assert code == 3, output
    assert "engine build deferred" in output and "trtllm-build" in output


def test_on_missing_hardware_fail_stops_before_any_work(tiny_model, eval_text, tmp_path):
    engine_target = {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}
    data = tiny_recipe(tiny_model, eval_text, targets=[engine_target], on_missing_hardware="fail")
    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 3 and "on_missing_hardware: fail" in output and "engine/fp8/trtllm-engine/H100" in output
    assert not (tmp_path / "a" / ".cache" / "source").exists()


@pytest.mark.integration
def test_throughput_serves_each_variant_on_cpu_and_defers_gpus(built, tiny_model, eval_text, tmp_path):
    """The real `transformers serve` serves the compressed-tensors export; GPU cells are deferred."""
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = data["variants"][1:]
    data["validation"]["throughput"] = {
        "enabled": True, "concurrency": [1, 4], "prompt_tokens": 16, "output_tokens": 8, "requests_per_level": 4,
        "min_output_tps": 0.1, "usd_per_hour": {"cpu": 0.1},
    }  # fmt: skip
    report = rebuild(built, write_recipe(tmp_path, data, name="load.yaml"), tmp_path).report
    stages = {s["id"]: s for s in report["stages"]}
    gpu = stages["throughput/int4/vllm/H100"]
    assert gpu["status"] == "deferred" and "vllm serve /models/model" in gpu["command"]
    [sweep] = report["validation"]["throughput"]
    assert sweep["stage"] == "throughput/int4/cpu" and stages[sweep["stage"]]["status"] == "ran"
    assert [lv["label"] for lv in sweep["levels"]] == ["c1", "c4"]
    assert all(lv["completed"] == 4 and lv["errors"] == 0 for lv in sweep["levels"])
    assert all(lv["total_output_tokens"] == 4 * 8 for lv in sweep["levels"])  # the server's usage totals
    assert all(g["passed"] for g in sweep["gates"]) and sweep["cost"]["usd_per_gpu_hour"] == 0.1
    assert sweep["server_argv"][1] == "serve"
    assert sweep["files"] and all(Path(f).is_file() for f in sweep["files"].values())
    assert any(f.endswith(".png") for f in sweep["files"].values())

    # A stricter threshold re-gates the cached sweep: nothing is measured again, the gate fails.
    data["validation"]["throughput"]["min_output_tps"] = 1e9
    with pytest.raises(GateFailed) as failed:
        rebuild(built, write_recipe(tmp_path, data, name="load.yaml"), tmp_path)
    stages = {s["id"]: s for s in failed.value.result.report["stages"]}
    assert stages["throughput/int4/cpu"]["status"] == "cached"
    [regated] = failed.value.result.report["validation"]["throughput"]
    assert [g["passed"] for g in regated["gates"]] == [False] and regated["gates"][0]["limit"] == 1e9
    assert regated["gates"][0]["measured"] == sweep["gates"][0]["measured"]
    assert regated["gates"][0]["name"] == "min_output_tps"  # the recipe's name for the gate

    # A new price re-prices the cached sweep when the report is written: nothing is measured again.
    data["validation"]["throughput"]["min_output_tps"] = 0.1
    data["validation"]["throughput"]["usd_per_hour"] = {"cpu": 0.4}
    repriced = rebuild(built, write_recipe(tmp_path, data, name="load.yaml"), tmp_path).report
    assert {s["id"]: s["status"] for s in repriced["stages"]}["throughput/int4/cpu"] == "cached"
    [again] = repriced["validation"]["throughput"]
    assert again["levels"] == sweep["levels"]
    assert again["cost"]["usd_per_gpu_hour"] == 0.4
    assert again["cost"]["usd_per_million_output_tokens"] == pytest.approx(
        4 * sweep["cost"]["usd_per_million_output_tokens"]
    )


def test_skipping_a_stage_that_a_selected_stage_needs_is_bad_input(tiny_model, eval_text, tmp_path):
    """`--skip export` with accuracy on: the accuracy stages read the exports, so say so before any work."""
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model, eval_text))
    code, output = run_cli("build", str(recipe), "--skip", "export", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert "--skip export: export/fp8/compressed-tensors is needed by accuracy/fp8/compressed-tensors" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert not list((tmp_path / "a").rglob("stage.json"))  # refused before any stage ran
    code, output = run_cli("build", str(recipe), "--only", "accuracy/fp8", "--skip", "baseline",
                           "--artifacts-dir", str(tmp_path / "a"))  # fmt: skip
    assert code == 2 and "--skip baseline: baseline is needed by accuracy/fp8/compressed-tensors" in output, output


def test_accuracy_numbers_are_reported_without_gates(built, tiny_model, eval_text, tmp_path):
    from forge.report import render_markdown_summary

    data = tiny_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"]["gates"] = {}
    recipe = write_recipe(tmp_path, data, name="ungated.yaml")
    code, output = cli_rebuild(built, recipe, tmp_path)
    assert code == 0, output
    report = json.loads((tmp_path / "artifacts" / "tiny" / "build.json").read_text())
    assert report["validation"]["accuracy"] == []  # nothing gated...
    fp8 = next(s for s in report["stages"] if s["id"] == "accuracy/fp8/compressed-tensors")
    markdown = render_markdown_summary(report)  # ...and still every measured number
    assert "### Accuracy (measured on the exported weights)" in markdown
    assert f"| fp8/compressed-tensors | {fp8['perplexity']:.4g} |" in markdown
    assert "accuracy (measured on the exported weights)" in output and "fp8/compressed-tensors" in output


def test_markdown_headline_shows_the_builds_own_time(built, tmp_path):
    from forge.report import render_markdown_summary

    _, recipe, first = built
    second = rebuild(built, recipe, tmp_path).report
    own = sum(s["seconds"] for s in first.report["stages"])
    assert all(s["status"] == "cached" for s in second["stages"]) and second["seconds"] < own
    headline = render_markdown_summary(second).splitlines()[2]
    stages = len(second["stages"])
    assert f"built in {own:.3g} s; this run {second['seconds']:.3g} s, {stages} of {stages} stages cached" in headline


def test_cpu_serving_keeps_every_tokenizer_file(built, tmp_path):
    """The dense copy `transformers serve` loads on the CPU carries each side file the export has."""
    from forge.formats.model_dir import SOURCE_FILES
    from forge.stages import dense_copy

    root, _, result = built
    export = next(s for s in result.report["stages"] if s["id"] == "export/fp8/compressed-tensors")
    export_dir = tmp_path / "export"
    for path in (root / "artifacts" / ".cache" / "export" / export["key"] / "model").iterdir():
        (export_dir / path.name).parent.mkdir(exist_ok=True)
        (export_dir / path.name).write_bytes(path.read_bytes())
    for name in SOURCE_FILES:  # every side file a checkpoint may carry, each with its own content
        if not (export_dir / name).exists():
            (export_dir / name).write_text(json.dumps({"side_file": name}) + "\n")
    served = dense_copy(export_dir, tmp_path / "served")
    for name in SOURCE_FILES:
        assert (served / name).read_bytes() == (export_dir / name).read_bytes(), name
    assert {"added_tokens.json", "chat_template.json"} <= {p.name for p in served.iterdir()}


def test_time_table_says_where_this_runs_time_went(built, tmp_path):
    _, recipe, first = built
    cold = first.report["timing"]
    ran = {s["id"] for s in first.report["stages"] if s["status"] == "ran"}
    assert {t["stage"] for t in cold["stages"]} == ran and {t["status"] for t in cold["stages"]} == {"ran"}
    # This run's clock: the stages and the time outside them add up to the run, by kind too.
    assert sum(t["seconds"] for t in cold["stages"]) + cold["outside_stages"] == pytest.approx(
        first.report["seconds"], abs=0.01
    )
    assert sum(cold["by_kind"].values()) == pytest.approx(sum(t["seconds"] for t in cold["stages"]), abs=0.01)
    slowest = max(cold["stages"], key=lambda t: t["seconds"])
    assert slowest["kind"] in ("quantize", "accuracy", "baseline", "export")

    code, output = cli_rebuild(built, recipe, tmp_path)  # every stage cached: the table says so
    assert code == 0, output
    report = json.loads((tmp_path / "artifacts" / "tiny" / "build.json").read_text())
    warm = report["timing"]
    assert {t["status"] for t in warm["stages"]} == {"cached"}
    lines = output[output.index("time: ") :].splitlines()
    assert lines[0] == f"time: {report['seconds']:.1f} s in this run"
    assert lines[1].split() == ["stage", "status", "seconds", "share"]
    stage_rows = [line.split() for line in lines[2 : 2 + len(warm["stages"])]]
    assert [row[0] for row in stage_rows] == [t["stage"] for t in sorted(warm["stages"], key=lambda t: -t["seconds"])]
    assert all(row[1] == "cached" for row in stage_rows)
    assert lines[2 + len(warm["stages"])].startswith("(planning, artifact directories, report)")


def test_forge_threads_sets_torch_and_the_servers_threads(tiny_model, eval_text, tmp_path, monkeypatch):
    """FORGE_THREADS sizes torch's pool here and, through OMP_NUM_THREADS, the servers forge starts;
    a bad value is exit 2 naming it, before any work."""
    import torch

    from forge.cpu import use_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("FORGE_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        assert use_cpu_threads() == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("FORGE_THREADS", "two")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model, eval_text))
    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert output.strip() == "forge: FORGE_THREADS: 'two' is not a positive whole number of threads"
    assert not (tmp_path / "a").exists()


def test_a_tuned_awq_variant_builds_every_format_and_reports_each_layers_tuning(tiny_model, eval_text, tmp_path):
    """AWQ_TUNED_W4A16 through the whole build: quantized once, exported as AutoAWQ GEMM for TGI and
    compressed-tensors for vLLM, evaluated, and its quantize stage records every layer's
    calibration error before and after tuning."""
    data = tiny_recipe(tiny_model, eval_text)
    data["variants"] = [{"name": "tuned", "scheme": "AWQ_TUNED_W4A16", "group_size": 64,
                         "calibration": {"num_samples": 4, "seq_len": 64}}]  # fmt: skip
    report = build(write_recipe(tmp_path, data), artifacts_dir=tmp_path / "artifacts").report
    stages = {s["id"]: s for s in report["stages"]}
    quantize = stages["quantize/tuned"]
    assert quantize["status"] == "ran" and quantize["algorithm"] == "awq_tuned"
    errors = quantize["tuned_output_error"]
    assert sorted(errors) == ["0", "1"] and all(after <= before for before, after in errors.values())
    for fmt in ("awq-gemm", "compressed-tensors"):
        assert stages[f"accuracy/tuned/{fmt}"]["status"] == "ran"
