"""Recipes: schema, loading, malformed input (exit 2 naming the key), plan-time refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from forge.compat import SUPPORTED_ARCHITECTURES
from forge.recipe import SCHEMA_PATH, dump_recipe, load_recipe, parse_recipe, schema_text
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_plans_and_round_trips(path: Path, tmp_path: Path, monkeypatch):
    """Every recipe validates and survives dump → load and plans offline (hub recipes pin their shape);
    every shipped recipe names an architecture forge quantizes (Llama, Mistral, Qwen2 among them)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = load_recipe(path)
    assert parse_recipe(dump_recipe(recipe)) == recipe
    code, output = run_cli("validate", str(path))
    assert code == 0, output
    code, output = run_cli("plan", str(path), "--json", "--artifacts-dir", str(tmp_path))
    architecture = recipe.source.hub.config.architectures[0] if recipe.source.hub else "LlamaForCausalLM"
    assert architecture in SUPPORTED_ARCHITECTURES
    assert code == 0, output
    plan = json.loads(output)
    assert any(a["status"] == "planned" for a in plan["artifacts"])
    if path.parent.name == "examples":  # written for their GPUs: every cell builds
        assert all(a["status"] == "planned" for a in plan["artifacts"]), plan["artifacts"]
    if recipe.source.hub:
        assert plan["model"]["config"].startswith("pinned in source.hub.config")
    assert not list(tmp_path.glob("*/build.json"))  # planning builds nothing


def hub_recipe(tmp_path: Path, **config) -> Path:
    example = yaml.safe_load((REPO / "recipes" / "examples" / "llama-3.1-8b-fp8-trtllm.yaml").read_text())
    if config:
        example["source"]["hub"]["config"].update(config)
    else:
        del example["source"]["hub"]["config"]
    return write_recipe(tmp_path, example)


def test_hub_recipe_without_pinned_shape_plans_what_the_recipe_decides_offline(tmp_path, monkeypatch):
    """No hub and no pinned shape: the cells the recipe alone decides are listed (FP8 on a T4 is
    impossible whatever the model), the rest wait for config.json, and the plan says how to finish."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = hub_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["targets"].append({"backend": "vllm", "gpus": ["T4", "H100"]})
    recipe = write_recipe(tmp_path, data)
    code, output = run_cli("plan", str(recipe), "--json", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    plan = json.loads(output[output.index("{") :])
    assert plan["complete"] is False and "pin the shape in source.hub.config" in plan["reason"]
    cells = {(c["backend"], c["gpu"]): c for c in plan["artifacts"]}
    assert cells["vllm", "T4"]["status"] == "impossible" and "FP8" in cells["vllm", "T4"]["reason"]
    assert cells["vllm", "H100"]["status"] == "pending" and cells["vllm", "H100"]["format"] == "compressed-tensors"
    assert "tensor parallelism against the heads" in plan["waiting_for_config"]
    code, output = run_cli("plan", str(recipe), "--format", "github-matrix", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 3 and "the hub is not reachable" in output  # CI jobs need the whole plan


def test_pinned_shape_must_match_the_hub_config(tmp_path, monkeypatch):
    """With the hub reachable (its answer stands in here: no hub on this machine), a pin that
    disagrees with the revision's config.json is refused, naming the pinned key."""
    import forge.source

    real = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
            "max_position_embeddings": 131072}  # fmt: skip
    monkeypatch.setattr(forge.source, "hub_json", lambda source, name, required: real if name == "config.json" else {})
    code, output = run_cli("plan", str(hub_recipe(tmp_path, hidden_size=4096)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    code, output = run_cli("plan", str(hub_recipe(tmp_path, hidden_size=2048)), "--artifacts-dir", str(tmp_path / "b"))
    assert code == 2 and "source.hub.config.hidden_size: pinned 2048" in output and "has 4096" in output


def test_committed_schema_is_current():
    assert SCHEMA_PATH.read_text() == schema_text(), "regenerate: forge schema > forge/recipe.schema.json"
    code, output = run_cli("schema", "--check")
    assert code == 0, output


def test_schema_describes_every_field():
    schema = json.loads(schema_text())

    def walk(node: dict, path: str):
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}.{name} has no description"
        for name, sub in node.get("$defs", {}).items():
            walk(sub, name)

    walk(schema, "recipe")


def test_round_trip_of_a_full_recipe(tiny_model, eval_text):
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(tiny_model, eval_text)))
    again = parse_recipe(dump_recipe(recipe))
    assert again == recipe
    assert again.variants[1].group_size == 64


BASE = {
    "name": "bad",
    "source": {"path": "model"},
    "variants": [{"name": "a", "scheme": "W4A16_ASYM", "group_size": 64}],
    "targets": [{"backend": "vllm", "gpus": ["H100"]}],
}


def with_(path: str, value):
    """BASE with one key (dotted path, [i] for list items) set to `value`."""
    data = json.loads(json.dumps(BASE))
    node = data
    parts = path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def without(key: str) -> dict:
    data = json.loads(json.dumps(BASE))
    del data[key]
    return data


SCHEMA_ERRORS = [
    ("unknown top-level key", with_("colour", "blue"), "colour: unknown key"),
    ("unknown nested key", with_("variants[0].grup_size", 64), "variants[0].grup_size: unknown key"),
    ("wrong type", with_("variants[0].group_size", "sixty-four"), "variants[0].group_size"),
    ("unknown preset", with_("variants[0].scheme", "INT3"), "variants[0].scheme: unknown preset 'INT3'"),
    ("unsupported group size", with_("variants[0].group_size", 48), "variants[0].group_size: 48"),
    ("missing source", without("source"), "source: required key is missing"),
    ("two sources", with_("source.hub", {"repo": "a/b", "revision": "0" * 40}), "source: set exactly one"),
    ("unpinned hub revision", {**without("source"), "source": {"hub": {"repo": "a/b", "revision": "main"}}},
     "source.hub.revision: must be a full 40-character commit"),
    ("no variants", with_("variants", []), "variants:"),
    ("unknown gpu", with_("targets[0].gpus", ["H1000"]), "targets[0].gpus: unknown GPU 'H1000'"),
    ("unknown backend", with_("targets[0].backend", "llamacpp"), "targets[0].backend"),
    ("target names unknown variant", with_("targets[0].variants", ["nope"]), "targets[0].variants: no variant"),
    ("duplicate variant names", with_("variants", [{"name": "a", "scheme": "FP8"}] * 2), "names must be unique"),
    ("input longer than sequence", with_("targets[0].max_input_len", 9000), "targets[0]: max_input_len"),
    ("zero calibration samples", with_("variants[0].calibration", {"num_samples": 0}),
     "variants[0].calibration.num_samples"),
    ("bad recipe name", with_("name", "My Recipe!"), "name:"),
    ("negative tensor parallel", with_("targets[0].tensor_parallel", -2), "targets[0].tensor_parallel"),
    ("bad kv cache dtype", with_("variants[0].kv_cache_dtype", "fp4"), "variants[0].kv_cache_dtype"),
    ("bad on_missing_hardware", with_("on_missing_hardware", "ignore"), "on_missing_hardware"),
]  # fmt: skip

TEXT_ERRORS = [
    ("empty file", "", "the recipe is empty"),
    ("comment-only file", "# nothing here\n", "the recipe is empty"),
    ("yaml syntax error", "name: x\nvariants: [a, b\n", "invalid YAML (line"),
    ("duplicate key", "name: a\nname: b\n", "duplicate key 'name'"),
    ("not a mapping", "- a\n- b\n", "a recipe is a YAML mapping"),
    ("tabs", "name:\n\t- x\n", "invalid YAML"),
]


@pytest.mark.parametrize(
    "data, expected", [c[1:] for c in SCHEMA_ERRORS + TEXT_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS + TEXT_ERRORS]
)
def test_malformed_recipe_exits_2_naming_the_key(data, expected, tmp_path: Path):
    path = write_recipe(tmp_path, data)
    artifacts = tmp_path / "artifacts"
    for args in (["validate", str(path)], ["plan", str(path), "--artifacts-dir", str(artifacts)]):
        code, output = run_cli(*args)
        assert code == 2, output
        assert expected in output, output
        assert "Traceback" not in output
    assert not (artifacts / "bad").exists()


def test_missing_recipe_file(tmp_path: Path):
    code, output = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "file not found" in output


def test_several_problems_reported_at_once(tmp_path: Path):
    data = with_("colour", "blue")
    data["variants"][0]["scheme"] = "INT3"
    code, output = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert code == 2
    assert "colour: unknown key" in output and "variants[0].scheme" in output


def test_unknown_architecture_is_refused_by_name(tmp_path, monkeypatch):
    """An architecture outside forge's table is refused at plan time, naming what forge maps."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = hub_recipe(tmp_path, architectures=["FalconForCausalLM"])
    code, output = run_cli("plan", str(recipe), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "architecture FalconForCausalLM is not supported yet" in output, output
    assert "Qwen3MoeForCausalLM" in output and "Traceback" not in output
