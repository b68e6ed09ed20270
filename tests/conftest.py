"""Shared fixtures: tiny real checkpoints, recipes written into tmp dirs, a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from forge.cli import main
from forge.datasets import resolve_dataset
from tests.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = resolve_dataset("wikitext-2", REPO)
# The forge that is installed (console script of this interpreter's environment), never a path into a venv.
FORGE = [sys.executable, "-m", "forge"]


def missing_requirement(reason: str) -> None:
    """A tool or extra the test drives is absent: skip on a developer machine, fail in CI.

    `.ci/run` sets FORGE_TESTS_STRICT=1, so a missing apt tool or package fails the run loudly
    instead of turning into a skip that looks like a pass.
    """
    if os.environ.get("FORGE_TESTS_STRICT") == "1":
        pytest.fail(f"{reason} (FORGE_TESTS_STRICT=1: CI must have it; run bash .ci/setup)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _isolated_digest_memo(tmp_path_factory, monkeypatch):
    # Keep tests from reading or writing the user's ~/.cache/forge memo.
    monkeypatch.setenv("FORGE_DIGEST_MEMO", str(tmp_path_factory.getbasetemp() / "digests.json"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama, hidden 128 (group 128 fits), with a real tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_576(tmp_path_factory) -> Path:
    """Shaped like SmolLM2 where it matters: hidden 192 = 3 × 64, so group 128 cannot divide it."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny576") / "model", hidden_size=192, intermediate_size=384, num_heads=3,
        num_kv_heads=1,
    )  # fmt: skip


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """A small evaluation text (the first 20 kB of wikitext-2 test) for fast accuracy stages."""
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text(WIKITEXT.read_text()[:20000])
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """Run the forge CLI in-process; an exception that escapes the CLI's own handling fails the test."""
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def write_recipe(directory: Path, data: dict | str, name: str = "recipe.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_recipe(model: Path, eval_text: Path, **overrides) -> dict:
    """A complete recipe for the tiny model: RTN int4 + FP8, vLLM/TGI, fast accuracy."""
    recipe = {
        "name": "tiny",
        "source": {"path": str(model)},
        "variants": [
            {"name": "fp8", "scheme": "FP8_DYNAMIC"},
            {"name": "int4", "scheme": "W4A16_ASYM", "group_size": 64},
        ],
        "targets": [{"backend": "vllm", "gpus": ["H100"]}, {"backend": "tgi", "gpus": ["H100"]}],
        "validation": {
            "accuracy": {
                "dataset": str(eval_text),
                "window": 64,
                "max_windows": 4,
                "gates": {"max_ppl_increase_pct": 50, "min_top1_agreement": 0.3},
            }
        },
    }
    recipe.update(overrides)
    return recipe


def pytest_terminal_summary(terminalreporter, config):
    """Print the random order's seed even under -q, so a failing order can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} (replay: --randomly-seed={seed})")
