"""Planning: the compatibility table, impossible combinations, stage keys and statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from forge.cache import Cache
from forge.errors import InputError
from forge.plan import make_plan
from forge.recipe import parse_recipe
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.registry_server import make_base_layout


def plan_for(data: dict, tmp_path: Path):
    recipe = parse_recipe(json.dumps(data))
    return make_plan(recipe, tmp_path, Cache(tmp_path / "cache"))


def test_plan_expands_matrix_and_dedupes_exports(tiny_model, eval_text, tmp_path):
    plan = plan_for(tiny_recipe(tiny_model, eval_text), tmp_path)
    ids = [s.id for s in plan.stages]
    assert ids[:2] == ["source", "baseline"]
    # vLLM and TGI both load compressed-tensors for FP8 and RTN int4: one export each, shared.
    assert ids.count("export/fp8/compressed-tensors") == 1
    assert {a.backend for a in plan.artifacts} == {"vllm", "tgi"}
    assert all(s.status == "run" for s in plan.stages)
    assert len({s.key for s in plan.stages}) == len(plan.stages)


def test_keys_follow_inputs(tiny_model, eval_text, tmp_path):
    base = tiny_recipe(tiny_model, eval_text)
    first = plan_for(base, tmp_path)
    changed = tiny_recipe(tiny_model, eval_text)
    changed["variants"][1]["group_size"] = 32
    second = plan_for(changed, tmp_path)
    key = lambda plan, sid: plan.stage(sid).key  # noqa: E731
    assert key(first, "source") == key(second, "source")
    assert key(first, "quantize/fp8") == key(second, "quantize/fp8")
    assert key(first, "quantize/int4") != key(second, "quantize/int4")
    assert key(first, "export/int4/compressed-tensors") != key(second, "export/int4/compressed-tensors")


def test_report_time_settings_are_in_no_key(tiny_model, eval_text, tmp_path):
    """Prices and pure thresholds are applied when the report is written: changing them keeps every
    key (a cached sweep is re-priced and re-gated, not measured again); the load and the latency
    SLOs shape a sweep, so they key the throughput stages and nothing else."""

    def planned(**throughput) -> dict[str, str]:
        data = tiny_recipe(tiny_model, eval_text)
        data["validation"]["throughput"] = {"enabled": True, **throughput}
        return {s.id: s.key for s in plan_for(data, tmp_path).stages}

    first = planned()
    assert planned(usd_per_hour={"H100": 1.0, "cpu": 0.1}, min_output_tps=5, min_goodput=1) == first
    slower = planned(max_ttft_p99_ms=500)
    changed = {sid for sid in first if first[sid] != slower[sid]}
    assert changed and all(sid.startswith("throughput/") for sid in changed)


def test_every_stage_kind_is_a_module_with_a_frozen_inputs_record():
    """A kind is data: its version, the record its key is made of, and the one function that reads it."""
    import dataclasses
    import inspect

    from forge.plan import STAGE_ORDER
    from forge.stages import KINDS

    assert tuple(KINDS) == STAGE_ORDER
    for kind, module in KINDS.items():
        assert isinstance(module.VERSION, int), kind
        assert dataclasses.is_dataclass(module.Inputs) and module.Inputs.__dataclass_params__.frozen, kind
        if kind != "push":
            assert list(inspect.signature(module.produce).parameters) == ["inputs", "run"], kind


def test_implicit_impossible_cells_are_listed_not_fatal(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100", "T4"]}])
    plan = plan_for(data, tmp_path)
    impossible = [a for a in plan.artifacts if a.status == "impossible"]
    assert [(a.variant, a.gpu) for a in impossible] == [("fp8", "T4"), ("int4", "T4")]
    assert "cannot run FP8 (needs ≥ 8.9" in impossible[0].reason


@pytest.mark.parametrize("backend", ["vllm", "tgi"])
def test_fp8_on_ampere_is_planned_as_weight_only_where_the_backend_has_fp8_marlin(
    tiny_model, eval_text, tmp_path, backend
):
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": backend, "gpus": ["A100", "A10G", "H100"]}])
    cells = {(a.variant, a.gpu): a for a in plan_for(data, tmp_path).artifacts}
    for gpu in ("A100-80GB", "A10G"):
        assert cells["fp8", gpu].status == "planned" and cells["fp8", gpu].reason.startswith("W8A16 on Ampere")
    assert cells["fp8", "H100"].reason == "" and cells["int4", "A100-80GB"].reason == ""  # nothing to say
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--json", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    notes = {(a["variant"], a["gpu"]): a["reason"] for a in json.loads(output)["artifacts"]}
    assert notes["fp8", "A10G"].startswith("W8A16 on Ampere") and notes["fp8", "H100"] == ""


@pytest.mark.parametrize(
    ("backend", "gpu", "mode"),
    [
        ("lmdeploy", "A100", None),  # TurboMind has no FP8 Marlin path
        ("trtllm", "A100", "pytorch"),
        ("trtllm", "A10G", "engine"),
        ("vllm", "T4", None),  # FP8 Marlin needs compute capability 8.0
        ("tgi", "T4", None),
    ],
)
def test_fp8_without_fp8_math_stays_impossible_elsewhere(backend, gpu, mode):
    from forge.compat import BACKEND_RULES, combination_note, gpu_problem
    from forge.gpus import lookup_gpu
    from forge.quant.presets import resolve_scheme

    scheme, profile = resolve_scheme("FP8_DYNAMIC"), lookup_gpu(gpu)
    problem = gpu_problem(scheme, profile, backend) or BACKEND_RULES[backend](scheme, profile, mode)
    assert problem and "FP8" in problem and combination_note(scheme, backend, profile) == ""


@pytest.mark.parametrize(
    "target, variants, expected",
    [
        ({"backend": "vllm", "gpus": ["T4"], "variants": ["fp8"]}, None, "cannot run FP8 (needs ≥ 8.9"),
        ({"backend": "vllm", "gpus": ["T4"], "variants": ["int4"]}, None, "no fast int4 kernels"),
        ({"backend": "lmdeploy", "gpus": ["H100"], "variants": ["fp8"]}, None, "TurboMind takes FP8 only as 128×128"),
        ({"backend": "lmdeploy", "gpus": ["H100"], "variants": ["int4"]}, None, "group_size 128 (got 64)"),
        ({"backend": "vllm", "gpus": ["H100"], "variants": ["nv"]}, [{"name": "nv", "scheme": "NVFP4"}],
         "NVFP4 cannot be produced"),
        ({"backend": "trtllm", "gpus": ["H100"], "variants": ["int4"], "trtllm": {"mode": "pytorch"}}, None,
         "takes int4 only as ModelOpt W4A16_AWQ (symmetric)"),
        ({"backend": "vllm", "gpus": ["H100"], "variants": ["int4"], "tensor_parallel": 3}, None,
         "4 attention heads cannot be split over 3 GPUs"),
        ({"backend": "vllm", "gpus": ["H100"], "variants": ["kv8"]},
         [{"name": "kv8", "scheme": "FP8_DYNAMIC", "kv_cache_dtype": "int8"}], "vLLM has no int8 KV cache"),
    ],
)  # fmt: skip
def test_explicit_impossible_combination_exits_2(tiny_model, eval_text, tmp_path, target, variants, expected):
    data = tiny_recipe(tiny_model, eval_text, targets=[target])
    if variants:
        data["variants"] = variants
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert "targets[0]" in output or "variants[0]" in output
    assert expected in output


def test_group_size_must_divide_model_dims(tiny_model_576, eval_text, tmp_path):
    data = tiny_recipe(tiny_model_576, eval_text)
    data["variants"] = [{"name": "g128", "scheme": "AWQ_W4A16", "group_size": 128}]
    with pytest.raises(
        InputError, match=r"variants\[0\].group_size: group size 128 does not divide .* = 192; use group_size 64"
    ):
        plan_for(data, tmp_path)
    data["variants"][0]["group_size"] = 64
    assert plan_for(data, tmp_path).artifacts[0].status == "planned"


def test_tensor_parallel_group_size_per_rank(tiny_model, eval_text, tmp_path):
    # intermediate 256 / tp 4 = 64 per rank: group 128 no longer divides down_proj's input.
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"], "tensor_parallel": 2}])
    data["variants"] = [{"name": "g128", "scheme": "W4A16", "group_size": 128}]
    data["targets"][0]["variants"] = ["g128"]
    with pytest.raises(InputError, match="does not divide o_proj .* = 64 per rank at tensor_parallel 2"):
        plan_for(data, tmp_path)


def test_missing_inputs_are_named(tiny_model, eval_text, tmp_path):
    missing_model = tiny_recipe(tmp_path / "no-such-model", eval_text)
    with pytest.raises(InputError, match="source.path: .* is not a Hugging Face checkpoint"):
        plan_for(missing_model, tmp_path)
    missing_data = tiny_recipe(tiny_model, eval_text)
    missing_data["validation"]["accuracy"]["dataset"] = "nope.txt"
    with pytest.raises(InputError, match="validation.accuracy.dataset: .*nope.txt does not exist"):
        plan_for(missing_data, tmp_path)
    missing_cal = tiny_recipe(tiny_model, eval_text)
    missing_cal["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 64,
                                "calibration": {"sources": ["cal.txt"]}}]  # fmt: skip
    with pytest.raises(InputError, match=r"calibration.sources\[0\]: .*cal.txt does not exist"):
        plan_for(missing_cal, tmp_path)


def test_pickle_weights_need_opt_in(tiny_model, eval_text, tmp_path):
    import torch

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save(load_file(tiny_model / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(InputError, match="only pickle weights .* set source.allow_pickle: true"):
        plan_for(tiny_recipe(pickled, eval_text), tmp_path)
    opted_in = tiny_recipe(pickled, eval_text)
    opted_in["source"]["allow_pickle"] = True
    assert plan_for(opted_in, tmp_path).stage("source").status == "run"


@pytest.mark.parametrize("allow_pickle", [True, False])
def test_hub_pickle_weights_are_converted_only_when_opted_in(allow_pickle, tiny_model, tmp_path, monkeypatch):
    """The hub cannot be reached here, so `snapshot_download` copies a local "repository" with
    the same `allow_patterns` filtering; what forge does with the download is the real code."""
    import fnmatch
    import shutil

    import huggingface_hub
    import torch

    from forge.recipe import Source
    from forge.source import download_hub

    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text((tiny_model / "config.json").read_text())
    state = load_file(tiny_model / "model.safetensors")
    torch.save(state, published / "pytorch_model.bin")

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for file in published.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, Path(local_dir) / file.name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = Source(hub={"repo": "org/model", "revision": "a" * 40}, allow_pickle=allow_pickle)
    out = tmp_path / "out"
    if not allow_pickle:
        with pytest.raises(InputError, match="no weight files"):  # the .bin was never downloaded
            download_hub(source, out)
        return
    download_hub(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    converted = load_file(out / "model.safetensors")
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_unsupported_architecture(tiny_model, eval_text, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    save_file(load_file(tiny_model / "model.safetensors"), other / "model.safetensors")
    with pytest.raises(InputError, match="source: architecture MambaForCausalLM is not supported"):
        plan_for(tiny_recipe(other, eval_text), tmp_path)


def test_tasks_add_a_served_baseline_run_and_one_per_variant(tiny_model, eval_text, tmp_path, monkeypatch):
    from forge.eval import lm_eval

    (tmp_path / "tasks").mkdir()
    data = tiny_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"].update(tasks=["forge_facts"], task_include_path="tasks")
    plan = plan_for(data, tmp_path)
    tasks = {s.id: s for s in plan.of_kind("tasks")}
    assert set(tasks) == {"tasks/baseline", "tasks/fp8/cpu", "tasks/int4/cpu", "tasks/fp8/vllm/H100",
                          "tasks/int4/vllm/H100", "tasks/fp8/tgi/H100", "tasks/int4/tgi/H100"}  # fmt: skip
    assert tasks["tasks/fp8/cpu"].needs == ["export/fp8/compressed-tensors", "tasks/baseline"]
    # Each GPU artifact is measured in its backend's container on that GPU: deferred here, with the command.
    gpu = tasks["tasks/int4/tgi/H100"]
    assert gpu.status == "deferred" and gpu.needs[-1] == "tasks/baseline"
    assert gpu.command.startswith("forge build RECIPE --only tasks/int4/tgi/H100") and "text-generation" in gpu.command
    data["validation"]["accuracy"]["task_include_path"] = "missing"
    with pytest.raises(InputError, match="task_include_path: .*missing is not a directory"):
        plan_for(data, tmp_path)
    monkeypatch.setattr(lm_eval, "lm_eval_available", lambda: False)
    with pytest.raises(InputError, match="validation.accuracy.tasks: lm-evaluation-harness is not installed"):
        plan_for(data, tmp_path)


def test_two_trtllm_modes_on_one_gpu_are_two_cells(tiny_model, eval_text, tmp_path):
    """An engine and the PyTorch backend on the same GPU are different artifacts: their stage ids,
    artifact directories and CI jobs carry the mode, and their image tags can (`{mode}`)."""
    data = tiny_recipe(tiny_model, eval_text, targets=[
        {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine", "version": "1.2.1"}},
        {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "pytorch", "version": "1.2.1"}},
        {"backend": "vllm", "gpus": ["H100"]},
    ])  # fmt: skip
    data["variants"] = [{"name": "fp8", "scheme": "FP8_DYNAMIC"}]
    make_base_layout(tmp_path / "base")
    data["package"] = {"enabled": True, "base_images": {"trtllm": "oci:base:latest", "vllm": "oci:base:latest"}}
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "package.tags: 'fp8-trtllm-H100' names both fp8/trtllm-engine/H100 and" in output, output
    assert "{mode}" in output

    data["package"]["tags"] = ["{variant}-{backend}-{mode}-{gpu}"]
    plan = plan_for(data, tmp_path)
    assert [a.cell for a in plan.artifacts] == ["fp8/trtllm-engine/H100", "fp8/trtllm-pytorch/H100", "fp8/vllm/H100"]
    ids = {s.id for s in plan.stages}
    assert {"engine/fp8/trtllm-engine/H100", "package/fp8/trtllm-pytorch/H100"} <= ids
    assert not any(i.endswith("/trtllm/H100") for i in ids) and len(ids) == len(plan.stages)
    tags = {s.id: list(s.inputs.tags) for s in plan.of_kind("package")}
    assert tags["package/fp8/trtllm-engine/H100"] == ["fp8-trtllm-engine-H100"]
    assert tags["package/fp8/trtllm-pytorch/H100"] == ["fp8-trtllm-pytorch-H100"]
    assert tags["package/fp8/vllm/H100"] == ["fp8-vllm--H100"]  # {mode} is empty for one-mode backends


def test_an_unknown_tag_placeholder_names_the_ones_there_are(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text, package={"enabled": True, "tags": ["{variant}-{flavour}"]})
    code, output = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert code == 2 and "package.tags" in output and "{variant}, {backend}, {gpu} and {mode}" in output, output


def test_two_trtllm_modes_build_into_two_artifact_directories(tiny_model, eval_text, tmp_path):
    data = tiny_recipe(tiny_model, eval_text, targets=[
        {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine", "version": "1.2.1"}},
        {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "pytorch", "version": "1.2.1"}},
    ])  # fmt: skip
    data["variants"] = [{"name": "fp8", "scheme": "FP8_DYNAMIC"}]
    data["validation"]["accuracy"]["enabled"] = False
    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--json", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    report = json.loads((tmp_path / "a" / "tiny" / "build.json").read_text())
    paths = {(a["mode"], a["format"]): Path(a["path"]) for a in report["artifacts"]}
    assert set(paths) == {("engine", "trtllm-checkpoint"), ("pytorch", "modelopt")}
    assert paths["engine", "trtllm-checkpoint"].name == "trtllm-engine"
    assert (paths["engine", "trtllm-checkpoint"] / "rank0.safetensors").is_file()
    assert (paths["pytorch", "modelopt"] / "hf_quant_config.json").is_file()


def test_a_model_image_push_waits_for_its_cells_deferred_gates(tiny_model, eval_text, tmp_path):
    """The model image is published under the same gates as the serving image: while its cell's
    GPU measurements are deferred, its push is too (the cell comes from the graph, not the id)."""
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["validation"]["throughput"] = {"enabled": True}
    data["package"] = {"enabled": False, "model_images": True, "registry": "registry.example", "repository": "m"}
    plan = plan_for(data, tmp_path)
    push = plan.stage("push/fp8/vllm/H100/model-image")
    assert push.deps == {"image": "model-image/fp8/vllm/H100"}
    assert push.status == "deferred" and push.inputs.deferred_gates == ("throughput/fp8/vllm/H100",)
    assert "throughput/fp8/cpu" in push.after and "accuracy/fp8/compressed-tensors" in push.after


def test_tgi_awq_with_an_fp8_kv_cache_is_refused_at_plan_time(tiny_model, eval_text, tmp_path):
    """TGI loads AWQ_W4A16 as AutoAWQ GEMM, which has no KV-cache scales: the plan asks that format's
    spec and refuses the cell naming the key, instead of the export stage refusing after quantizing."""
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "tgi", "gpus": ["H100"], "variants": ["awq"]}])
    data["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 32, "kv_cache_dtype": "fp8"}]
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert "targets[0] (awq on H100): kv_cache_dtype: awq-gemm (AutoAWQ GEMM) has no KV-cache scales" in output
    data["targets"].append({"backend": "vllm", "gpus": ["H100"]})  # compressed-tensors holds the scales
    del data["targets"][0]["variants"]
    plan = plan_for(data, tmp_path)
    assert [(a.backend, a.status, a.format) for a in plan.artifacts] == [
        ("tgi", "impossible", None), ("vllm", "planned", "compressed-tensors")
    ]  # fmt: skip


def test_every_format_spec_is_what_its_writer_refuses_with():
    """The plan's spec and the codec's `unsupported_reason` are one rule, for every preset and KV dtype."""
    from dataclasses import replace

    from forge.formats import FORMATS, SPECS
    from forge.quant.presets import PRESETS, resolve_scheme

    assert set(FORMATS) == set(SPECS)
    for preset in PRESETS:
        for kv in ("auto", "fp8", "int8", "int4"):
            scheme = replace(resolve_scheme(preset), kv_cache_dtype=kv)
            for name, fmt in FORMATS.items():
                assert (SPECS[name].scheme_problem(scheme) is None) == (fmt.unsupported_reason(scheme) is None), (
                    name, preset, kv
                )  # fmt: skip


def test_a_build_launches_its_cpu_server_and_lm_eval_worker_only_for_measurements_it_will_run(
    tiny_model, eval_text, tmp_path
):
    from forge.build import start_cpu_measurers
    from forge.cache import STAGE_JSON

    (tmp_path / "tasks").mkdir()
    data = tiny_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"].update(tasks=["forge_facts"], task_include_path="tasks")
    data["validation"]["throughput"] = {"enabled": True}
    plan = plan_for(data, tmp_path)
    cache = Cache(tmp_path / "cache")
    started: list[str] = []

    class Recorder:  # stands for the server and the worker: which of them the build starts
        def launch(self) -> None:
            started.append("server")

        def start(self) -> None:
            started.append("lm_eval")

    def starts(ids) -> list[str]:
        started.clear()
        start_cpu_measurers(plan, set(ids), cache, Recorder(), Recorder())
        return sorted(started)

    every = [s.id for s in plan.stages]
    assert starts(every) == ["lm_eval", "server"]
    assert starts(s for s in every if not s.startswith("tasks/")) == ["server"]  # a load sweep: no lm_eval
    assert starts(s for s in every if s.endswith("/H100")) == []  # GPU measurements: deferred, not this CPU's
    cpu = [s for s in plan.stages if s.kind in ("tasks", "throughput") and s.id.endswith(("/cpu", "baseline"))]
    assert cpu
    for stage in cpu:  # every CPU measurement in the cache: a warm build starts nothing
        (cache.entry(stage.kind, stage.key) / STAGE_JSON).parent.mkdir(parents=True)
        (cache.entry(stage.kind, stage.key) / STAGE_JSON).write_text("{}")
    assert starts(every) == []
