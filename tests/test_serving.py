"""Serving launch specs and rendered Dockerfiles (golden files), one per backend."""

from __future__ import annotations

import json

import pytest

from forge.plan import variant_scheme
from forge.recipe import parse_recipe
from forge.serving import render_dockerfile, serve_spec
from tests.golden import assert_golden

RECIPE = parse_recipe(json.dumps({
    "name": "golden",
    "description": "golden-file recipe",
    "source": {"path": "model"},
    "variants": [
        {"name": "fp8", "scheme": "FP8_DYNAMIC", "kv_cache_dtype": "fp8"},
        {"name": "awq", "scheme": "AWQ_W4A16", "group_size": 128},
        {"name": "awq-kv8", "scheme": "AWQ_W4A16", "group_size": 128, "kv_cache_dtype": "int8"},
    ],
    "targets": [
        {"backend": "vllm", "gpus": ["H100"], "tensor_parallel": 2, "max_seq_len": 8192},
        {"backend": "tgi", "gpus": ["H100"]},
        {"backend": "lmdeploy", "gpus": ["A100"]},
    ],
    "package": {"labels": {"team": "ml-platform \"core\""}},
}))  # fmt: skip
CASES = [("vllm", "fp8", 0), ("vllm", "awq", 0), ("tgi", "fp8", 1), ("tgi", "awq", 1), ("lmdeploy", "awq-kv8", 2)]
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def spec_for(backend: str, variant: str, target_index: int):
    v = next(v for v in RECIPE.variants if v.name == variant)
    return serve_spec(RECIPE, variant, variant_scheme(v), RECIPE.targets[target_index], "H100", "abc123")


@pytest.mark.parametrize("backend, variant, target", CASES)
def test_dockerfile_golden(backend, variant, target, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    spec = spec_for(backend, variant, target)
    text = render_dockerfile(spec, MODEL_FILES, f"golden/{variant}/{backend}")
    assert_golden(f"serving/{backend}-{variant}.Dockerfile", text)


def test_launch_flags_follow_the_recipe():
    vllm = spec_for("vllm", "fp8", 0).argv
    assert vllm[:3] == ["vllm", "serve", "/models/model"]
    assert vllm[vllm.index("--tensor-parallel-size") + 1] == "2"
    assert vllm[vllm.index("--max-model-len") + 1] == "8192"
    assert "--kv-cache-dtype" in vllm
    assert "--kv-cache-dtype" not in spec_for("vllm", "awq", 0).argv
    tgi = spec_for("tgi", "awq", 1).argv
    assert tgi[tgi.index("--quantize") + 1] == "awq"
    assert (
        spec_for("tgi", "fp8", 1).argv[spec_for("tgi", "fp8", 1).argv.index("--quantize") + 1] == "compressed-tensors"
    )
    lmdeploy = spec_for("lmdeploy", "awq-kv8", 2).argv
    assert lmdeploy[lmdeploy.index("--quant-policy") + 1] == "8"


def test_created_label_comes_from_source_date_epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert spec_for("vllm", "fp8", 0).labels["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert spec_for("vllm", "fp8", 0).labels["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"


def test_recipe_text_is_never_executed_as_a_template():
    hostile = RECIPE.model_copy(update={"description": "{{ 7 * 7 }} {% raw %}"})
    spec = serve_spec(hostile, "fp8", variant_scheme(RECIPE.variants[0]), RECIPE.targets[0], "H100", "r")
    text = render_dockerfile(spec, MODEL_FILES, "x")
    assert "{{ 7 * 7 }} {% raw %}" in text and "49" not in text
