"""What a build prints and keeps: no second style of progress bar from transformers, no repeated
tokenizer notice, and a dead server's log that outlives the cache entry it was written in."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forge.errors import InfraError
from forge.loadgen.server import wait_healthy
from forge.progress import Progress
from tests.tiny import make_tiny_llama


def test_transformers_bars_are_silenced_once_a_build_shows_progress(tmp_path: Path, capfd) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny"))
    capfd.readouterr()
    Progress(enabled=False)  # what `forge build` creates before any stage runs
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").is_file()
    assert "Writing model shards" not in capfd.readouterr().err


def test_the_bpe_cleanup_notice_is_dropped_and_other_warnings_are_not(tmp_path: Path, caplog) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "tiny"))
    Progress(enabled=False)
    caplog.set_level(logging.WARNING, logger="transformers")
    tokenizer.decode(tokenizer("Hello , world .")["input_ids"], clean_up_tokenization_spaces=True)
    assert not any("clean_up_tokenization_spaces" in r.getMessage() for r in caplog.records)
    logging.getLogger("transformers.tokenization_utils_tokenizers").warning("a real problem")
    assert any(r.getMessage() == "a real problem" for r in caplog.records)


def test_a_dead_servers_log_survives_its_staging_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORGE_CRASH_DIR", str(tmp_path / "crash"))
    staging = tmp_path / "cache" / "throughput" / ".tmp-abc123-42"  # a cache entry being made
    staging.mkdir(parents=True)
    log = staging / "server.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"], stdout=f)
    with pytest.raises(InfraError) as raised:
        wait_healthy("http://127.0.0.1:9", proc, log, timeout_s=30)
    shutil.rmtree(staging)  # what the cache does with a failed stage's directory
    named = Path(re.search(r"log (\S+):", str(raised.value)).group(1))
    assert named.parent == tmp_path / "crash" and "CUDA out of memory" in named.read_text()


def test_a_log_outside_the_cache_is_named_where_it_is(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FORGE_CRASH_DIR", str(tmp_path / "crash"))
    log = tmp_path / "bench" / "server.log"
    log.parent.mkdir()
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"], stdout=f)
    with pytest.raises(InfraError, match=f"log {re.escape(str(log))}:"):
        wait_healthy("http://127.0.0.1:9", proc, log, timeout_s=30)
    assert not (tmp_path / "crash").exists()


def test_plan_and_build_outside_a_terminal_print_one_whole_line_per_stage(tiny_model, eval_text, tmp_path):
    from tests.conftest import run_cli, tiny_recipe, write_recipe

    data = tiny_recipe(tiny_model, eval_text, targets=[{"backend": "tgi", "gpus": ["H100", "A100"]}])
    data["validation"]["throughput"] = {"enabled": True, "cpu": False}
    recipe = write_recipe(tmp_path, data)
    code, output = run_cli("plan", str(recipe), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    lines = output.splitlines()
    deferred = [line for line in lines if line.startswith("throughput/int4/tgi/A100-80GB ")]
    assert len(deferred) == 1 and "--only throughput/int4/tgi/A100-80GB  # serves" in deferred[0]
    assert deferred[0].rstrip().endswith("--num-shard 1")  # the whole command, not cut at a column
    note = next(line for line in lines if line.startswith("fp8      tgi      A100-80GB"))
    assert "W8A16 on Ampere" in note and note.rstrip().endswith("Ada or Hopper)")
    assert not any(c in output for c in "┃│…")  # no table borders, nothing ellipsised

    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    assert any(re.fullmatch(r"export/int4/compressed-tensors +ran +[0-9.]+", line) for line in output.splitlines())


def test_awq_reports_progress_within_a_layer(tmp_path: Path) -> None:
    """A layer of a large model takes minutes under AWQ: the bar moves after each scale group and
    each linear, never backwards, and ends on whole layers."""
    from forge.quant.calibration import load_calibration
    from forge.quant.presets import resolve_scheme
    from forge.quant.run import quantize_checkpoint

    model = make_tiny_llama(tmp_path / "tiny", num_layers=2)
    calls: list[tuple[str, float, int]] = []
    calibration = load_calibration(["pydoc_topics"], model, 2, 32)
    quantize_checkpoint(model, resolve_scheme("AWQ_W4A16", group_size=64), "awq", calibration,
                        progress=lambda what, done, total: calls.append((what, done, total)))  # fmt: skip
    done = [d for what, d, _ in calls if what == "awq"]
    assert {total for *_, total in calls} == {2} and done == sorted(done)
    assert any(0 < d < 1 for d in done) and any(1 < d < 2 for d in done)  # inside each layer
    assert done[-1] == 2
