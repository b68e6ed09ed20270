"""Hostile input: malformed recipes and arguments, untrusted models, template injection.

The contract (README, "Exit codes"): a user mistake exits 2 with one message (or one block) that
starts with the recipe key it is about, or names the YAML/file problem; never a traceback, and
nothing is written under the artifacts directory. Hypothesis generates the mistakes from a
complete, valid recipe (every key present, defaults written out), so every key at every depth
is a target: unknown keys, values of the wrong kind, enums given random text, numbers out of
range, required keys deleted, duplicate keys, random YAML, deep nesting, unicode and
`{{ jinja }}` text.

Inputs that currently crash forge are not generated here; each has its own deterministic test
marked `xfail(strict=True)` below, so that fixing the bug turns the test into a failure that
says "remove the xfail" (and the strategy can then be widened).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import string
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from forge.cli import main
from forge.gpus import GPUS, lookup_gpu
from forge.quant.presets import PRESETS
from forge.recipe import (
    BACKENDS,
    MAX_BATCH,
    MAX_CONCURRENCY,
    MAX_COUNT,
    MAX_TOKENS,
    MAX_WINDOW,
    Recipe,
    dump_recipe,
    parse_recipe,
)
from tests.conftest import REPO, tiny_recipe, write_recipe
from tests.strategies import HOSTILE_TEXT, JSONISH, SCALARS, TEMPLATE_TEXT, TEXT

# Hypothesis runs many examples through one test call; the autouse digest-memo fixture is
# function-scoped but stable across examples, so its health check does not apply.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FUZZ_PLAN = settings(FUZZ, max_examples=40)

KeyPath = tuple[str | int, ...]  # ("variants", 1, "group_size")


# ---------------------------------------------------------------- helpers


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_refused(result: Result, *, mentions: str | None = None) -> str:
    """Exit 2, a message and no traceback; returns the message."""
    output = result.output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{output}"
    )
    assert result.exit_code == 2, f"exit {result.exit_code}, wanted 2:\n{output}"
    assert output.strip(), "no message"
    if mentions is not None:
        assert mentions in output, f"message does not name {mentions!r}:\n{output}"
    return output


def key_path(path: KeyPath) -> str:
    """How forge spells a key path in messages: `variants[1].calibration.seq_len`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "recipe"


def get(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def put(data: Any, path: KeyPath, value: Any) -> None:
    get(data, path[:-1])[path[-1]] = value


def full_recipe() -> dict:
    """A valid recipe with every key written out (defaults included), as plain YAML data."""
    return copy.deepcopy(_FULL)


def _full_recipe(model: str = "model", dataset: str = "eval.txt") -> dict:
    data = tiny_recipe(Path(model), Path(dataset))
    data["variants"].append({"name": "awq", "scheme": "AWQ_W4A16", "group_size": 64})
    data["targets"].append({"backend": "trtllm", "gpus": ["H100"], "variants": ["fp8"]})
    data["package"] = {"labels": {"team": "ml"}, "base_images": {"vllm": "vllm/vllm-openai:v0.9.0"}}
    data["validation"]["throughput"] = {"usd_per_hour": {"H100": 2.5}}
    return yaml.safe_load(dump_recipe(parse_recipe(yaml.safe_dump(data))))


_FULL = _full_recipe()

# Mappings whose keys are free (dict fields), as opposed to models with `extra="forbid"`.
FREE_MAPPINGS = {"labels", "base_images", "usd_per_hour", "min_recovery"}


def walk(data: Any, path: KeyPath = ()) -> list[tuple[KeyPath, Any]]:
    """Every (path, value) of the tree, root included."""
    found = [(path, data)]
    if isinstance(data, dict):
        for k, v in data.items():
            found += walk(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += walk(v, (*path, i))
    return found


BASE = full_recipe()
ALL_PATHS = [p for p, _ in walk(BASE) if p]
MODEL_MAPPINGS = [p for p, v in walk(BASE) if isinstance(v, dict) and (not p or p[-1] not in FREE_MAPPINGS)]
REQUIRED = [("name",), ("source",), ("variants",), ("targets",), ("variants", 0, "name"), ("variants", 1, "scheme"),
            ("targets", 0, "backend"), ("targets", 1, "gpus")]  # fmt: skip
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENUMS: dict[KeyPath, Any] = {
    ("name",): lambda s: not NAME_PATTERN.match(s),
    ("variants", 0, "name"): lambda s: not NAME_PATTERN.match(s),
    ("source", "dtype"): lambda s: s not in ("float32", "bfloat16", "float16"),
    ("variants", 1, "scheme"): lambda s: s not in PRESETS,
    ("variants", 0, "kv_cache_dtype"): lambda s: s not in ("auto", "fp8", "int8", "int4"),
    ("variants", 2, "dtype"): lambda s: s not in ("bfloat16", "float16"),
    ("targets", 0, "backend"): lambda s: s not in BACKENDS,
    ("targets", 1, "gpus", 0): lambda s: lookup_gpu(s) is None,
    ("targets", 2, "trtllm", "mode"): lambda s: s not in ("engine", "pytorch"),
    ("on_missing_hardware",): lambda s: s not in ("defer", "fail"),
    ("package", "builder"): lambda s: s not in ("daemonless", "docker"),
}
# (path, smallest allowed, largest allowed); None: unbounded on that side.
BOUNDS: list[tuple[KeyPath, float | None, float | None, type]] = [
    (("variants", 1, "calibration", "num_samples"), 1, 4096, int),
    (("variants", 1, "calibration", "seq_len"), 16, 32768, int),
    (("targets", 0, "tensor_parallel"), 1, 64, int),
    (("targets", 0, "max_batch_size"), 1, MAX_BATCH, int),
    (("targets", 1, "max_num_tokens"), 1, MAX_TOKENS, int),
    (("targets", 1, "max_seq_len"), 2, MAX_TOKENS, int),
    (("validation", "accuracy", "window"), 16, MAX_WINDOW, int),
    (("validation", "accuracy", "max_windows"), 1, MAX_COUNT, int),
    (("validation", "accuracy", "gates", "max_ppl_increase_pct"), 0, None, float),
    (("validation", "accuracy", "gates", "min_top1_agreement"), 0, 1, float),
    (("validation", "accuracy", "gates", "max_kl"), 0, None, float),
    (("validation", "throughput", "prompt_tokens"), 1, MAX_TOKENS, int),
    (("validation", "throughput", "output_tokens"), 1, MAX_TOKENS, int),
    (("validation", "throughput", "requests_per_level"), 1, MAX_COUNT, int),
    (("validation", "throughput", "concurrency", 0), 1, MAX_CONCURRENCY, int),
    (("validation", "throughput", "usd_per_hour", "H100"), 0, None, float),
]


# Printable keys (letters, marks, digits, punctuation, symbols): keys with control characters or
# line breaks are test_unknown_key_with_a_newline_stays_one_problem_line's; `function-…` parts
# are dropped from key paths by pydantic-loc cleanup in recipe._key_path.
KEY_TEXT = st.text(st.characters(categories=("L", "M", "N", "P", "S")), min_size=1, max_size=20).filter(
    lambda k: not k.startswith("function-")
)


def run_validate(tmp: Path, text: str) -> Result:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(text)
    return invoke("validate", str(recipe))


def run_plan(tmp: Path, text: str, *extra: str) -> tuple[Result, Path]:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(text)
    artifacts = tmp / "artifacts"
    return invoke("plan", str(recipe), "--artifacts-dir", str(artifacts), *extra), artifacts


def files_under(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def refused_everywhere(data: dict, *, mentions: str) -> None:
    """`forge validate` and `forge plan` both refuse, naming `mentions`, writing nothing."""
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        assert_refused(run_validate(Path(tmp), text), mentions=mentions)
        result, artifacts = run_plan(Path(tmp), text)
        assert_refused(result, mentions=mentions)
        assert files_under(artifacts) == []


# ---------------------------------------------------------------- schema-level mistakes


@FUZZ
@given(where=st.sampled_from(MODEL_MAPPINGS), key=KEY_TEXT, value=JSONISH)
def test_unknown_key_at_any_depth_is_refused(where: KeyPath, key: str, value: Any) -> None:
    data = full_recipe()
    assume(key not in get(data, where))
    assume(yaml.safe_load(yaml.safe_dump({key: 1}, allow_unicode=True)) == {key: 1})  # PyYAML folds NEL to a space
    get(data, where)[key] = value
    path = key_path((*where, key))
    refused_everywhere(data, mentions=f"{path}: unknown key")


def schema_keys() -> set[str]:
    keys: set[str] = set()
    for path, _ in walk(BASE):
        keys.update(p for p in path if isinstance(p, str))
    return keys


KNOWN_KEYS = schema_keys()


def swapped(value: Any) -> st.SearchStrategy:
    """A value of another kind: a scalar for a mapping or a list, a container for a scalar. An
    unset optional (None) gets a mapping of unknown keys, wrong for a scalar, a list or a model."""
    if value is None:
        return st.dictionaries(TEXT.filter(lambda k: k not in KNOWN_KEYS), SCALARS, min_size=1, max_size=2)
    if isinstance(value, dict):
        return st.one_of(st.lists(SCALARS, max_size=3), SCALARS.filter(lambda v: v is not None))
    if isinstance(value, list):
        return st.one_of(st.dictionaries(TEXT, SCALARS, max_size=2), SCALARS.filter(lambda v: v is not None))
    return st.one_of(st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, min_size=1, max_size=2))


@FUZZ
@given(data=st.data(), path=st.sampled_from(ALL_PATHS))
def test_value_of_the_wrong_kind_is_refused(data: st.DataObject, path: KeyPath) -> None:
    recipe = full_recipe()
    put(recipe, path, data.draw(swapped(get(recipe, path)), label="value"))
    # Free mappings are checked per value (`labels.team`); everything else at its own path.
    refused_everywhere(recipe, mentions=key_path(path))


@FUZZ
@given(path=st.sampled_from(REQUIRED))
def test_missing_required_key_is_refused(path: KeyPath) -> None:
    data = full_recipe()
    del get(data, path[:-1])[path[-1]]
    refused_everywhere(data, mentions=f"{key_path(path)}: required key is missing")


def test_source_needs_exactly_one_kind() -> None:
    data = full_recipe()
    data["source"]["path"] = None
    refused_everywhere(data, mentions="source: set exactly one of hub, path, gguf (got none)")
    data["source"]["path"] = "model"
    data["source"]["gguf"] = {"file": "x.gguf"}
    refused_everywhere(data, mentions="source: set exactly one of hub, path, gguf (got path, gguf)")


@FUZZ
@given(data=st.data(), path=st.sampled_from(sorted(ENUMS)))
def test_enum_given_random_text_is_refused(data: st.DataObject, path: KeyPath) -> None:
    value = data.draw(HOSTILE_TEXT.filter(ENUMS[path]), label="value")
    recipe = full_recipe()
    put(recipe, path, value)
    if path == ("variants", 0, "name"):
        recipe["targets"][2]["variants"] = None  # only the name's own error, not a dangling reference
    # An unknown GPU is reported on the list (`targets[1].gpus: unknown GPU 'x'`), not the item.
    refused_everywhere(recipe, mentions=key_path(path[:3] if "gpus" in path else path))


def out_of_range(low: float | None, high: float | None, kind: type) -> st.SearchStrategy:
    choices = []
    if low is not None:
        below = st.integers(max_value=int(low) - 1) if kind is int else st.floats(max_value=low, exclude_max=True)
        choices += [below, st.just(-(10**30))]
    if high is not None:
        above = st.integers(min_value=int(high) + 1) if kind is int else st.floats(min_value=high, exclude_min=True)
        choices += [above, st.just(10**30)]
    if kind is float:  # every float limit is finite: `.inf` would make a gate that cannot fail
        choices += [st.just(float("nan")), st.just(float("inf"))]
    else:
        choices.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)))
    return st.one_of(choices)


@FUZZ
@given(data=st.data(), bound=st.sampled_from(BOUNDS))
def test_number_out_of_range_is_refused(data: st.DataObject, bound: tuple) -> None:
    path, low, high, kind = bound
    recipe = full_recipe()
    put(recipe, path, data.draw(out_of_range(low, high, kind), label="value"))
    refused_everywhere(recipe, mentions=key_path(path))


@FUZZ
@given(size=st.integers().filter(lambda n: n not in (32, 64, 128, 256)) | st.just(10**40))
def test_group_size_outside_the_supported_set_is_refused(size: int) -> None:
    recipe = full_recipe()
    recipe["variants"][1]["group_size"] = size
    refused_everywhere(recipe, mentions="variants[1].group_size")


@pytest.mark.parametrize(
    ("path", "value", "mentions"),
    [
        (("variants",), [], "variants: List should have at least 1 item"),
        (("targets",), [], "targets: List should have at least 1 item"),
        (("targets", 0, "gpus"), [], "targets[0].gpus"),
        (("targets", 0, "max_input_len"), 4096, "targets[0]: max_input_len must be smaller than max_seq_len"),
        (("variants", 1, "name"), "fp8", "variants: names must be unique"),
        (("targets", 2, "variants"), ["nope"], "targets[2].variants: no variant named 'nope'"),
        (("source", "hub"), {"repo": "org/m", "revision": "main"}, "source.hub.revision: must be a full 40"),
        (("package", "registry"), "127.0.0.1:5000", "package.repository is required"),
        (("package", "tags"), ["{variant}:{gpu}"], "is not a valid image tag"),
        (("package", "tags"), ["{nope}"], "only {variant}, {backend}, {gpu} and {mode} can be expanded"),
    ],
)
def test_cross_field_mistakes_name_their_key(path: KeyPath, value: Any, mentions: str) -> None:
    recipe = full_recipe()
    put(recipe, path, value)
    if path == ("source", "hub"):
        recipe["source"]["path"] = None
    refused_everywhere(recipe, mentions=mentions)


# ---------------------------------------------------------------- text-level mistakes


@FUZZ
@example(text="")
@example(text="- a\n- b\n")
@example(text="name: [unclosed\n")
@example(text="\t")
@example(text="name: !!python/object/apply:os.system ['touch /tmp/forge-pwned']\n")
@example(text="a: &x [*x]\n")
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=200))
def test_random_text_is_refused_with_a_yaml_or_key_message(text: str) -> None:
    assume(not has_unhashable_key(text))  # a known crash: see test_unhashable_yaml_key_is_an_input_error
    with tempfile.TemporaryDirectory() as tmp:
        result = run_validate(Path(tmp), text)
        message = assert_refused(result)
        first = message.splitlines()[0]
        origin = str(Path(tmp) / "recipe.yaml")
        assert first.startswith(f"forge: {origin}: ") or re.match(r"forge: \S.*?: ", first), message


def has_unhashable_key(text: str) -> bool:
    """YAML text with a mapping or sequence as a mapping key (`? [a]`, `{[a]: b}`), or nested
    deeper than PyYAML's recursion allows: both are known crashes with their own xfail tests."""
    try:
        yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        return "unhashable" in str(error)
    except RecursionError:
        return True
    except Exception:  # noqa: BLE001 - any other YAML or value error is forge's to report
        return False
    return False


@FUZZ
@given(data=JSONISH)
def test_random_structures_are_refused(data: Any) -> None:
    """Any YAML document that is not a recipe: scalars, lists, mappings of random keys."""
    assume(not (isinstance(data, dict) and {"name", "source", "variants", "targets"} <= set(data)))
    with tempfile.TemporaryDirectory() as tmp:
        result, artifacts = run_plan(Path(tmp), yaml.safe_dump(data, allow_unicode=True))
        assert_refused(result)
        assert not artifacts.exists()


def duplicate_key_text(draw_index: int) -> tuple[str, str]:
    """The full recipe as block YAML with one scalar key line repeated right after itself."""
    lines = dump_recipe(parse_recipe(yaml.safe_dump(full_recipe()))).splitlines()
    candidates = [i for i, line in enumerate(lines) if re.match(r"^\s*(- )?\w+: \S", line)]
    i = candidates[draw_index % len(candidates)]
    match = re.match(r"^(\s*)(- )?(\w+): ", lines[i])
    indent = len(match.group(1)) + (2 if match.group(2) else 0)
    lines.insert(i + 1, " " * indent + f"{match.group(3)}: duplicate")
    return "\n".join(lines) + "\n", match.group(3)


@FUZZ
@given(index=st.integers(min_value=0, max_value=10_000))
def test_duplicate_keys_at_any_depth_are_refused(index: int) -> None:
    text, key = duplicate_key_text(index)
    with tempfile.TemporaryDirectory() as tmp:
        assert_refused(run_validate(Path(tmp), text), mentions=f"duplicate key {key!r}")


@FUZZ
@given(depth=st.integers(min_value=1, max_value=100), flow=st.booleans(), mapping=st.booleans(),
       where=st.sampled_from(["description", "variants", "extra"]))  # fmt: skip
def test_deep_nesting_is_refused(depth: int, flow: bool, mapping: bool, where: str) -> None:
    """Nesting up to 100 deep (deeper crashes: test_very_deep_nesting_is_an_input_error)."""
    if flow:
        nested = ("{a: " * depth + "1" + "}" * depth) if mapping else ("[" * depth + "]" * depth)
    else:
        nested = "".join("\n" + "  " * (i + 1) + ("a:" if mapping else "-") for i in range(depth)) + " 1"
    text = yaml.safe_dump(full_recipe(), sort_keys=False).replace(f"\n{where}:", "\nold_" + where + ":", 1)
    text += f"{where}: {nested}\n"
    with tempfile.TemporaryDirectory() as tmp:
        assert_refused(run_validate(Path(tmp), text))


@pytest.mark.parametrize(
    "text",
    [
        "description: " + "x" * 2_000_000 + "\n",
        "name: 1e999999\n",
        "name: .nan\n",
        "\ufeffname: x\n",
        "name: x\x00\n",
        "name: x\nname: y\n",
        "% invalid directive\n",
        "--- a\n--- b\n",
    ],
    ids=["2MB-string", "inf", "nan", "bom", "nul", "dup", "directive", "two-docs"],
)
def test_odd_documents_are_refused(text: str, tmp_path: Path) -> None:
    assert_refused(run_validate(tmp_path, text))


# ---------------------------------------------------------------- plan-time mistakes


@pytest.fixture(scope="module")
def plan_dir(tiny_model: Path, tiny_model_576: Path, eval_text: Path, tmp_path_factory) -> dict:
    return {"model": tiny_model, "model_576": tiny_model_576, "eval": eval_text,
            "tmp": tmp_path_factory.mktemp("hostile-plan")}  # fmt: skip


VARIANT = st.fixed_dictionaries(
    {"scheme": st.sampled_from(list(PRESETS))},
    optional={
        "group_size": st.sampled_from([32, 64, 128, 256]),
        "symmetric": st.booleans(),
        "kv_cache_dtype": st.sampled_from(["auto", "fp8", "int8", "int4"]),
        "ignore": st.lists(st.sampled_from(["lm_head", "re:.*q_proj", "re:model\\.layers\\.0\\..*", "nothing"])),
        "calibration": st.fixed_dictionaries(
            {}, optional={"sources": st.lists(st.sampled_from(["pydoc_topics", "missing.txt"]), min_size=1, max_size=2)}
        ),  # noqa: E501
    },
)
TARGET = st.fixed_dictionaries(
    {"backend": st.sampled_from(BACKENDS), "gpus": st.lists(st.sampled_from(list(GPUS)), min_size=1, max_size=3)},
    optional={
        "tensor_parallel": st.sampled_from([1, 2, 3, 4, 8, 64]),
        "trtllm": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["engine", "pytorch"]),
                                                      "version": st.sampled_from(["1.2.1", "1.3.0", "0.9"])}),
        "explicit": st.booleans(),
    },
)  # fmt: skip


@FUZZ_PLAN
@given(
    variants=st.lists(VARIANT, min_size=1, max_size=3),
    targets=st.lists(TARGET, min_size=1, max_size=3),
    shape=st.sampled_from(["model", "model_576"]),
    throughput=st.booleans(),
    package=st.booleans(),
    on_missing=st.sampled_from(["defer", "fail"]),
)
def test_any_combination_plans_or_is_refused_by_key(
    plan_dir: dict, variants: list, targets: list, shape: str, throughput: bool, package: bool, on_missing: str
) -> None:
    """Valid values in any combination: the plan either works, or refuses with exit 2 naming the
    key (`variants[i]…`, `targets[i]…`, `source…`), before any stage output is written."""
    recipe = tiny_recipe(plan_dir[shape], plan_dir["eval"])
    recipe["variants"] = [{"name": f"v{i}", **v} for i, v in enumerate(variants)]
    for t in targets:
        if t.pop("explicit", False):
            t["variants"] = ["v0"]
    recipe["targets"] = targets
    recipe["validation"]["throughput"] = {"enabled": throughput}
    recipe["package"] = {"enabled": package}
    recipe["on_missing_hardware"] = on_missing
    with tempfile.TemporaryDirectory(dir=plan_dir["tmp"]) as tmp:
        text = yaml.safe_dump(recipe, sort_keys=False)
        result, artifacts = run_plan(Path(tmp), text, "--json")
        if result.exit_code == 0:
            plan = json.loads(result.output)
            assert any(a["status"] == "planned" for a in plan["artifacts"])
            assert_planned_cells_pass_their_format(plan, text, plan_dir[shape])
        else:
            message = assert_refused(result)
            first = message.removeprefix("forge: ")
            assert re.match(r"(variants|targets|source|package|validation)\b", first), message
        # Planning never writes stage outputs; only the model-config memo may appear.
        assert [f for f in files_under(artifacts) if not f.startswith(".cache/model-config/")] == []


def assert_planned_cells_pass_their_format(plan: dict, text: str, model: Path) -> None:
    """Every planned cell passes the checks of the format its backend exports: the spec the writer
    refuses with (`forge.formats.specs`), so no planned cell can fail in the export stage."""
    from forge.compat import ModelShape
    from forge.formats.specs import SPECS
    from forge.plan import variant_scheme
    from forge.recipe import parse_recipe

    recipe = parse_recipe(text)
    schemes = {v.name: variant_scheme(v) for v in recipe.variants}
    config = json.loads((model / "config.json").read_text())
    shape = ModelShape.from_config(config)
    for cell in plan["artifacts"]:
        if cell["status"] == "planned":
            scheme, tp = schemes[cell["variant"]], cell["tensor_parallel"]
            problem = SPECS[cell["format"]].problem(scheme, shape, tp)
            assert problem is None, (cell, problem)
            if cell["format"] == "trtllm-checkpoint":  # its writer's layout rules read config.json itself
                from forge.formats.trtllm_checkpoint import layout_problems

                assert layout_problems(config, scheme, tp) == [], cell


@pytest.mark.parametrize(
    ("edit", "mentions"),
    [
        (lambda r, d: r["variants"][1].update(group_size=128), "variants[1].group_size: "),
        (lambda r, d: r["targets"].append({"backend": "vllm", "gpus": ["T4"], "variants": ["fp8"]}),
         "targets[2] (fp8 on T4): "),
        (lambda r, d: r["validation"]["accuracy"].update(dataset=str(d / "nope.txt")), "validation.accuracy.dataset: "),
        (lambda r, d: r["variants"][1].update(scheme="AWQ_W4A16", calibration={"sources": ["nope.txt"]}),
         "calibration.sources[0]: "),
        (lambda r, d: r["source"].update(path=str(d / "nope")), "source.path: "),
        (lambda r, d: r.update(source={"gguf": {"file": "nope.gguf"}}), "source.gguf.file: "),
        (lambda r, d: r.update(source={"gguf": {"file": "x.gguf", "package": "no_such_pkg_forge"}}),
         "source.gguf.package: "),
    ],
    ids=["group-size", "fp8-on-ampere", "dataset", "calibration", "path", "gguf", "gguf-package"],
)  # fmt: skip
def test_plan_time_refusals_name_their_key(edit, mentions: str, plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model_576"], plan_dir["eval"])
    edit(recipe, tmp_path)
    result, artifacts = run_plan(tmp_path, yaml.safe_dump(recipe))
    assert_refused(result, mentions=mentions)
    assert not (artifacts / recipe["name"]).exists()
    assert [f for f in files_under(artifacts) if not f.startswith(".cache/model-config/")] == []


def test_plan_time_refusal_leaves_nothing_at_all(plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model_576"], plan_dir["eval"])
    recipe["variants"][1]["group_size"] = 128
    result, artifacts = run_plan(tmp_path, yaml.safe_dump(recipe))
    assert_refused(result, mentions="variants[1].group_size")
    assert files_under(artifacts) == []


# ---------------------------------------------------------------- malformed arguments


@pytest.fixture(scope="module")
def selectors(plan_dir: dict) -> set[str]:
    """Every stage id and kind of the tiny recipe's plan: what `--only`/`--skip` accept."""
    from forge.cache import Cache
    from forge.plan import make_plan
    from forge.recipe import load_recipe

    recipe = write_recipe(plan_dir["tmp"] / "args", tiny_recipe(plan_dir["model"], plan_dir["eval"]))
    plan = make_plan(load_recipe(recipe), recipe.parent, Cache(plan_dir["tmp"] / "args-cache"))
    return {s.id for s in plan.stages} | {s.kind for s in plan.stages}


OPTION_NAMES = st.sampled_from(["--json", "--artifacts-dir", "--cache-dir", "--only", "--skip", "--format", "--image",
                                "--bogus", "-x", "--", "--json=yes", "--format=", "--only="])  # fmt: skip


@FUZZ_PLAN
@given(command=st.sampled_from(["validate", "plan", "build"]), junk=st.lists(st.one_of(OPTION_NAMES, TEXT), max_size=4),
       bad=st.sampled_from(["--bogus", "--format=yaml", "--only", "--skip=zz-no-stage", "--only=zz nothing",
                            "missing-recipe.yaml", "--json --format k8s"]))  # fmt: skip
def test_malformed_arguments_exit_2_without_building(
    plan_dir: dict, selectors: set[str], command: str, junk: list[str], bad: str
) -> None:
    """Random option soup after one sure mistake: exit 2, a message, no build output. It runs in
    an empty working directory, since junk may name relative output directories."""
    recipe = write_recipe(plan_dir["tmp"] / "args", tiny_recipe(plan_dir["model"], plan_dir["eval"]))
    args = [command, *bad.split(" "), str(recipe), *junk]
    # The mistake must stay a mistake: junk may not complete `--only` into a real stage or ask for help.
    assume(not any(a in ("-h", "--help") for a in args))
    assume(not any(a.split("=", 1)[-1] in selectors or (i and args[i - 1] in ("--only", "--skip") and a in selectors)
                   for i, a in enumerate(args)))  # fmt: skip
    with tempfile.TemporaryDirectory(dir=plan_dir["tmp"]) as tmp, CliRunner().isolated_filesystem(tmp):
        result = CliRunner().invoke(main, args)
        assert_refused(result)
        assert [f for f in files_under(Path(tmp)) if "/.cache/model-config/" not in f] == []


@pytest.mark.parametrize("command", ["validate", "plan", "build"])
def test_recipe_path_mistakes(command: str, tmp_path: Path) -> None:
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe\x80")
    (tmp_path / "dir.yaml").mkdir()
    for path, says in [(tmp_path / "nope.yaml", "file not found"), (tmp_path / "binary.yaml", "cannot read"),
                       (tmp_path / "dir.yaml", "cannot read"), (Path("/dev/null"), "the recipe is empty")]:  # fmt: skip
        extra = [] if command == "validate" else ["--artifacts-dir", str(tmp_path / "artifacts")]
        assert_refused(invoke(command, str(path), *extra), mentions=says)
    assert not (tmp_path / "artifacts").exists()


# ---------------------------------------------------------------- known crashes (xfail until fixed)


def test_unhashable_yaml_key_is_an_input_error(tmp_path: Path) -> None:
    assert_refused(run_validate(tmp_path, "name: x\n? [a, b]\n: c\n"), mentions="invalid YAML")


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000])
def test_very_deep_nesting_is_an_input_error(nested: str, tmp_path: Path) -> None:
    assert_refused(run_validate(tmp_path, f"name: x\ndescription: {nested}\n"), mentions="too deep")


def test_integer_literal_beyond_python_limit_is_an_input_error(tmp_path: Path) -> None:
    assert_refused(run_validate(tmp_path, "name: " + "9" * 5000 + "\n"), mentions="invalid YAML")


def test_unknown_key_with_a_newline_stays_one_problem_line(tmp_path: Path) -> None:
    recipe = full_recipe()
    recipe["variants"][0]["x\nvariants[0].scheme: fine"] = 1
    message = assert_refused(run_validate(tmp_path, yaml.safe_dump(recipe)))
    assert len(message.strip().splitlines()) == 1, message


def test_tag_with_attribute_access_is_an_input_error() -> None:
    recipe = full_recipe()
    recipe["package"]["tags"] = ["{variant.x}"]
    refused_everywhere(recipe, mentions="package.tags")


def test_bad_ignore_regex_is_refused_by_validate() -> None:
    recipe = full_recipe()
    recipe["variants"][1]["ignore"] = ["re:("]
    refused_everywhere(recipe, mentions="variants[1].ignore[0]")


def test_target_with_an_empty_variant_list_is_refused() -> None:
    recipe = full_recipe()
    recipe["targets"][0]["variants"] = []
    refused_everywhere(recipe, mentions="targets[0].variants")


def test_seed_beyond_64_bits_is_refused_by_validate() -> None:
    recipe = full_recipe()
    recipe["variants"][1]["calibration"]["seed"] = 2**64
    refused_everywhere(recipe, mentions="variants[1].calibration.seed")


@pytest.mark.parametrize("where", ["source.path", "source.gguf.file", "validation.accuracy.dataset"])
def test_nul_byte_in_a_path_is_an_input_error(where: str, plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model"], plan_dir["eval"])
    if where == "source.path":
        recipe["source"]["path"] = "model\0x"
    elif where == "source.gguf.file":
        recipe["source"] = {"gguf": {"file": "a\0.gguf"}}
    else:
        recipe["validation"]["accuracy"]["dataset"] = "eval\0.txt"
    result, _ = run_plan(tmp_path, yaml.safe_dump(recipe))
    assert_refused(result, mentions=where)


def test_dotted_gguf_package_imports_nothing(plan_dir: dict, tmp_path: Path) -> None:
    import sys

    recipe = tiny_recipe(plan_dir["model"], plan_dir["eval"])
    recipe["source"] = {"gguf": {"file": "x.gguf", "package": "this.x"}}  # `import this` prints the Zen
    sys.modules.pop("this", None)
    result, _ = run_plan(tmp_path, yaml.safe_dump(recipe))
    assert "this" not in sys.modules, "the recipe made forge import a module"
    assert_refused(result, mentions="source.gguf.package")


def test_file_that_is_not_gguf_is_an_input_error(plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model"], plan_dir["eval"])
    recipe["source"] = {"gguf": {"file": str(plan_dir["eval"])}}
    result, _ = run_plan(tmp_path, yaml.safe_dump(recipe))
    assert_refused(result, mentions="source.gguf")


@pytest.mark.parametrize("command", ["plan", "build"])
@pytest.mark.parametrize("option", ["--artifacts-dir", "--cache-dir"])
def test_output_dir_that_is_a_file(command: str, option: str, plan_dir: dict, tmp_path: Path) -> None:
    """A file where the artifacts or cache directory should be: exit 2 naming it (cache.make_dirs)."""
    recipe = write_recipe(tmp_path, tiny_recipe(plan_dir["model"], plan_dir["eval"]))
    (tmp_path / "a-file").write_text("x")
    result = invoke(command, str(recipe), option, str(tmp_path / "a-file"))
    assert_refused(result, mentions=f"{tmp_path / 'a-file'}/")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("document", ["[]", '{"stages": 1}', '{"stages": [1]}', '"text"'])
def test_report_of_a_non_report_is_an_input_error(document: str, tmp_path: Path) -> None:
    (tmp_path / "build.json").write_text(document)
    assert_refused(invoke("report", str(tmp_path / "build.json"), "--markdown"), mentions="build.json")


@pytest.mark.parametrize("epoch", ["", "yesterday"])
def test_bad_source_date_epoch_in_plan(epoch: str, plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model"], plan_dir["eval"])
    recipe["package"] = {"enabled": True}
    path = write_recipe(tmp_path, recipe)
    result = invoke("plan", str(path), "--artifacts-dir", str(tmp_path / "a"), env={"SOURCE_DATE_EPOCH": epoch})
    assert_refused(result, mentions="SOURCE_DATE_EPOCH")


# ---------------------------------------------------------------- untrusted models


def test_pickle_weights_are_refused_by_the_cli(plan_dir: dict, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((plan_dir["model"] / "config.json").read_text())
    torch.save(load_file(plan_dir["model"] / "model.safetensors"), pickled / "pytorch_model.bin")
    result, artifacts = run_plan(tmp_path, yaml.safe_dump(tiny_recipe(pickled, plan_dir["eval"])))
    assert_refused(result, mentions="source.allow_pickle: true")
    assert not artifacts.exists()


class _Payload:
    """A pickle that runs code when loaded: creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_opted_in_pickle_still_cannot_run_code(plan_dir: dict, tmp_path: Path) -> None:
    """allow_pickle loads with `weights_only=True`: a pickle carrying code is refused, not run."""
    import torch

    from forge.build import build

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((plan_dir["model"] / "config.json").read_text())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, evil / "pytorch_model.bin")
    recipe = tiny_recipe(evil, plan_dir["eval"])
    recipe["source"]["allow_pickle"] = True
    with pytest.raises(Exception) as caught:  # noqa: B017 - which error is the next test's business
        build(write_recipe(tmp_path, recipe), artifacts_dir=tmp_path / "artifacts", only=("source",))
    assert not marker.exists(), "loading the pickle ran its code"
    assert not list((tmp_path / "artifacts" / ".cache").glob("source/[!.]*")), "a failed source left a cache entry"
    assert "weights_only" in str(caught.value) or "Unpickl" in type(caught.value).__name__, caught.value


def test_opted_in_hostile_pickle_is_an_input_error(plan_dir: dict, tmp_path: Path) -> None:
    import torch

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((plan_dir["model"] / "config.json").read_text())
    torch.save({"w": _Payload(tmp_path / "pwned")}, evil / "pytorch_model.bin")
    recipe = tiny_recipe(evil, plan_dir["eval"])
    recipe["source"]["allow_pickle"] = True
    path = write_recipe(tmp_path, recipe)
    result = invoke("build", str(path), "--artifacts-dir", str(tmp_path / "artifacts"), "--only", "source")
    assert_refused(result, mentions="source")
    assert not (tmp_path / "pwned").exists()


def test_forge_never_passes_trust_remote_code_true() -> None:
    """No call in forge/ passes `trust_remote_code=True` (or anything but the recipe's own field)."""
    offenders = []
    for path in sorted((REPO / "forge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code":
                        value = ast.unparse(kw.value)
                        if not value.endswith("source.trust_remote_code"):
                            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: trust_remote_code={value}")
                    if kw.arg is None:  # **kwargs: check the dict literal when there is one
                        text = ast.unparse(kw.value)
                        if "trust_remote_code" in text and "source.trust_remote_code" not in text:
                            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: **{text}")
    assert offenders == []


@pytest.mark.parametrize("backend", ["vllm", "tgi", "lmdeploy", "trtllm"])
def test_serving_trusts_checkpoint_code_only_when_the_recipe_says_so(backend: str) -> None:
    from forge.quant.presets import resolve_scheme
    from forge.recipe import Recipe, Target
    from forge.serving import serve_spec

    def argv(trust: bool) -> list[str]:
        recipe = Recipe.model_validate({
            "name": "t", "source": {"path": "m", "trust_remote_code": trust},
            "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}], "targets": [{"backend": backend, "gpus": ["H100"]}],
        })  # fmt: skip
        target = Target(backend=backend, gpus=["H100"])
        return serve_spec(recipe, "fp8", resolve_scheme("FP8_DYNAMIC"), target, "H100", "rev").argv

    assert not [a for a in argv(False) if "trust" in a.lower()]
    trusted = [a for a in argv(True) if "trust" in a.lower()]
    # LMDeploy has no flag (it always trusts), which is why the plan refuses such checkpoints without opt-in.
    assert trusted == ({"vllm": ["--trust-remote-code"], "tgi": ["--trust-remote-code"],
                        "trtllm": ["--trust_remote_code"]}.get(backend, []))  # fmt: skip


def hostile_remote_code_model(model: Path, directory: Path, marker: Path) -> Path:
    """The tiny model plus `auto_map` entries pointing at a module that creates `marker` on import."""
    import shutil

    shutil.copytree(model, directory)
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    (directory / "evil_model.py").write_text(code + "class EvilForCausalLM: pass\nclass EvilConfig: pass\n")
    (directory / "evil_tok.py").write_text(code + "class EvilTokenizer: pass\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    tok = json.loads((directory / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok))
    return directory


def test_model_code_in_the_checkpoint_is_never_run(plan_dir: dict, tmp_path: Path) -> None:
    """A checkpoint whose config/tokenizer `auto_map` names its own Python code: every loader forge
    uses (layerwise model, perplexity and calibration tokenizers, the source stage) works from
    transformers' own Llama code, and the checkpoint's module is never imported."""
    from forge.eval.perplexity import load_windows
    from forge.quant.calibration import load_calibration
    from forge.quant.layerwise import load_float_model

    marker = tmp_path / "remote-code-ran"
    model = hostile_remote_code_model(plan_dir["model"], tmp_path / "model", marker)
    for load in (
        lambda: load_float_model(model),
        lambda: load_windows(plan_dir["eval"], model, 64, 1),
        lambda: load_calibration(["pydoc_topics"], model, 2, 16),
    ):
        try:
            load()
        except Exception as error:  # noqa: BLE001 - refusing is fine; running the code is not
            assert "trust_remote_code" in str(error) or "remote code" in str(error), error
        assert not marker.exists()
    from forge.build import build

    recipe = tiny_recipe(model, plan_dir["eval"])
    recipe["variants"] = [{"name": "int4", "scheme": "W4A16_ASYM", "group_size": 64}]
    recipe["targets"] = [{"backend": "vllm", "gpus": ["H100"]}]
    path = write_recipe(tmp_path, recipe)
    result = invoke("plan", str(path), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert_refused(result, mentions="source.trust_remote_code")  # not without the recipe's consent
    recipe["source"]["trust_remote_code"] = True  # consent covers the servers; forge still never runs it
    build(write_recipe(tmp_path, recipe), artifacts_dir=tmp_path / "artifacts", only=("export",))
    assert not marker.exists()


@pytest.mark.parametrize("selection", [("--only", "quantize"), ("--only", "source"), ("--skip", "export")])
def test_build_of_a_subset_without_exports(selection: tuple[str, str], plan_dir: dict, tmp_path: Path) -> None:
    recipe = tiny_recipe(plan_dir["model"], plan_dir["eval"])
    recipe["variants"] = [{"name": "int4", "scheme": "W4A16_ASYM", "group_size": 64}]
    recipe["targets"] = [{"backend": "vllm", "gpus": ["H100"]}]
    recipe["validation"]["accuracy"]["enabled"] = False
    path = write_recipe(tmp_path, recipe)
    result = invoke("build", str(path), "--artifacts-dir", str(tmp_path / "artifacts"), *selection)
    assert result.exit_code == 0, result.output + repr(result.exception)


# ---------------------------------------------------------------- tar members and templates


@settings(max_examples=300, deadline=None)
@given(path=st.text(st.sampled_from("ab./\\\x00-.wh") | st.characters(exclude_categories=("Cs",)), max_size=40))
@example(path="../etc/passwd")
@example(path="/abs/../../x")
@example(path="a/./b//c/")
@example(path="a\\..\\..\\b")
def test_sanitized_member_paths_stay_inside(path: str) -> None:
    from forge.errors import InputError
    from forge.oci.layers import sanitize_member

    try:
        member = sanitize_member(path)
    except InputError:
        return
    parts = PurePosixPath(member).parts
    assert member and not member.startswith("/") and "\0" not in member and "\\" not in member
    assert ".." not in parts and "." not in parts and "" not in member.split("/")
    assert not any(p.startswith(".wh.") for p in parts)


def test_layer_with_hostile_names_extracts_inside_its_root(tmp_path: Path) -> None:
    """Files whose names try to escape still land inside the extraction root (tarfile's `data`
    filter would refuse anything else)."""
    from forge.oci.layers import Entry, sanitize_member, write_layer

    source = tmp_path / "f"
    source.write_bytes(b"weights")
    names = ["/etc/cron.d/x", "./a/./b", "models//m/config.json", "c/d/e"]
    layer = write_layer([Entry(sanitize_member(n), source) for n in names], tmp_path / "blobs")
    root = tmp_path / "root"
    with tarfile.open(layer.path) as tar:
        tar.extractall(root, filter="data")
        members = tar.getnames()
    for name in members:
        assert (root / name).resolve().is_relative_to(root.resolve())
    assert (root / "etc" / "cron.d" / "x").read_bytes() == b"weights"


LABEL_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
) | TEMPLATE_TEXT.filter(lambda t: "\x00" not in t)  # NUL is refused by the recipe


def check_recipe_text_is_quoted(description: str, values: list[str]) -> None:
    """Description and label values are data: the Dockerfile has exactly the instructions the
    template writes, each LABEL value decodes back to the recipe's text, nothing is evaluated."""
    from forge.plan import variant_scheme
    from forge.serving import render_dockerfile, serve_spec

    labels = {f"org.example.l{i}": v for i, v in enumerate(values)}
    recipe = Recipe.model_validate({  # not through YAML, which refuses some characters (\\x7f) outright
        "name": "t", "description": description, "source": {"path": "m"},
        "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}], "targets": [{"backend": "vllm", "gpus": ["H100"]}],
        "package": {"labels": labels},
    })  # fmt: skip
    spec = serve_spec(recipe, "fp8", variant_scheme(recipe.variants[0]), recipe.targets[0], "H100", "rev")
    found = dockerfile_labels(render_dockerfile(spec, ["config.json"], "t/fp8/vllm"))
    for key, value in labels.items():
        assert found[key] == value
    assert found["org.opencontainers.image.description"] == (description or "t served by vllm")


@settings(max_examples=150, deadline=None)
@given(description=LABEL_TEXT, values=st.lists(LABEL_TEXT, min_size=1, max_size=3))
@example(description="{{ 7 * 7 }}", values=['x"\nRUN touch /pwned\nLABEL y="z', "{% raw %}"])
def test_recipe_text_reaches_the_dockerfile_only_as_quoted_data(description: str, values: list[str]) -> None:
    check_recipe_text_is_quoted(description, values)


def test_every_printable_ascii_label_value_round_trips() -> None:
    """A cheap exhaustive companion to the hypothesis test: each ASCII character alone."""
    for ch in string.printable:
        check_recipe_text_is_quoted(ch, [ch, ch * 3])


DOCKERFILE_INSTRUCTIONS = {"FROM", "LABEL", "COPY", "ENV", "EXPOSE", "HEALTHCHECK", "USER", "ENTRYPOINT", "CMD",
                           "WORKDIR", "ARG", "RUN", "SHELL"}  # fmt: skip


def dockerfile_labels(text: str) -> dict[str, str]:
    """LABEL key=<json> lines decoded; fails on any line that is not one of the template's."""
    labels = {}
    lines = text.split("\n")  # Docker's parser splits on \n only (not on U+2028, NEL, …)
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#") or (i and lines[i - 1].endswith("\\")):
            continue
        instruction = line.split(" ", 1)[0]
        assert instruction in DOCKERFILE_INSTRUCTIONS - {"RUN", "SHELL", "ARG"}, f"unexpected line {line!r}"
        if instruction == "LABEL":
            key, _, value = line.removeprefix("LABEL ").partition("=")
            labels[key] = json.loads(value)
    return labels


@pytest.mark.parametrize("where", ["label-key", "base-image", "trtllm-version"])
def test_recipe_text_cannot_add_dockerfile_instructions(where: str) -> None:
    from forge.plan import variant_scheme
    from forge.serving import render_dockerfile, serve_spec

    data = {"name": "t", "source": {"path": "m"}, "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}],
            "targets": [{"backend": "vllm", "gpus": ["H100"]}], "package": {}}  # fmt: skip
    injected = "\nRUN touch /pwned\n"
    if where == "label-key":
        data["package"]["labels"] = {f"a{injected}LABEL b": "c"}
    elif where == "base-image":
        data["package"]["base_images"] = {"vllm": f"vllm/vllm-openai:v0.9.0{injected}"}
    else:
        data["targets"] = [{"backend": "trtllm", "gpus": ["H100"], "trtllm": {"version": f"1.2.1{injected}"}}]
    try:
        recipe = parse_recipe(json.dumps(data))
    except Exception as error:  # noqa: BLE001 - refusing the recipe is the fix
        assert type(error).__name__ == "InputError"
        return
    target = recipe.targets[0]
    spec = serve_spec(recipe, "fp8", variant_scheme(recipe.variants[0]), target, "H100", "rev")
    text = render_dockerfile(spec, ["config.json"], "t/fp8/x")
    assert "\nRUN touch /pwned" not in text, "recipe text added a Dockerfile instruction"


# ---------------------------------------------------------------- the resolved recipe


FREE_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30
) | TEMPLATE_TEXT.filter(lambda t: "\x00" not in t)
LABEL_KEYS = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?", fullmatch=True)  # what recipe.py accepts


@settings(max_examples=100, deadline=None)
@given(description=FREE_TEXT, labels=st.dictionaries(LABEL_KEYS, FREE_TEXT, max_size=3),
       sources=st.lists(FREE_TEXT.filter(bool), min_size=1, max_size=2))  # fmt: skip
def test_resolved_recipe_round_trips_any_text(description: str, labels: dict, sources: list[str]) -> None:
    """`recipe.resolved.yaml` (dump_recipe) loads back into the same recipe whatever the free
    text holds, so its digest (provenance, `forge verify`) is the recipe's own."""
    recipe = Recipe.model_validate({
        "name": "t", "description": description, "source": {"path": "m"},
        "variants": [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 64, "calibration": {"sources": sources}}],
        "targets": [{"backend": "vllm", "gpus": ["H100"]}], "package": {"labels": labels},
    })  # fmt: skip
    assert parse_recipe(dump_recipe(recipe)) == recipe


@pytest.mark.parametrize("separator", ["\x85", "\u2028", "\u2029"])
def test_resolved_recipe_round_trips_unicode_line_separators(separator: str) -> None:
    recipe = Recipe.model_validate({
        "name": "t", "description": f"a{separator}b", "source": {"path": "m"},
        "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}], "targets": [{"backend": "vllm", "gpus": ["H100"]}],
    })  # fmt: skip
    assert parse_recipe(dump_recipe(recipe)) == recipe
