"""The load generator against a real OpenAI-compatible server: `transformers serve` on CPU serving
the tiny Llama. Checks what only a real stack can show: token counts agree with the server's usage
exactly, prompts are exactly as long as the server counts them, and the metrics are consistent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forge.loadgen import SLOs, launch_argv, run_sweep, serve_transformers
from forge.loadgen.server import process_alive
from tests.conftest import run_cli

pytestmark = pytest.mark.integration

PROMPT_TOKENS = 32
OUTPUT_TOKENS = 8
REQUESTS = 4


def _check_consistent(level) -> None:
    for stats in (level.ttft_ms, level.tpot_ms, level.e2el_ms):
        assert stats.count > 0 and 0 < stats.p50 <= stats.p90 <= stats.p99
    # Tokens that arrive in one chunk (a busy server flushes several at once) are 0 ms apart.
    assert level.itl_ms.count > 0 and 0 <= level.itl_ms.p50 <= level.itl_ms.p90 <= level.itl_ms.p99
    assert level.ttft_ms.p50 <= level.e2el_ms.p50
    assert level.output_tok_s == pytest.approx(level.total_output_tokens / level.duration_s)
    assert level.request_throughput_rps == pytest.approx(level.completed / level.duration_s)


def test_sweep_against_transformers_serve(tiny_model: Path, tmp_path: Path) -> None:
    with serve_transformers(tiny_model, tmp_path / "server.log") as server:
        argv = launch_argv(server)
        result = run_sweep(
            server.base_url, server.model, None, [1, 4], PROMPT_TOKENS, OUTPUT_TOKENS, REQUESTS,
            tmp_path / "completions", SLOs(max_ttft_p99_ms=60_000, max_tpot_p99_ms=10_000),
            flavor="transformers", warmup_requests=1, server_argv=argv, plots=False,
        )  # fmt: skip
        chat = run_sweep(
            server.base_url, server.model, None, [2], PROMPT_TOKENS, OUTPUT_TOKENS, 2, tmp_path / "chat",
            api="chat", flavor="transformers", warmup_requests=0, plots=False,
        )  # fmt: skip
        # `forge bench` without --flavor finds what this server accepts (it refuses vLLM's ignore_eos).
        code, output = run_cli("bench", "--endpoint", server.base_url, "--model", server.model, "--tokenizer",
                               str(tiny_model), "--concurrency", "1", "--requests", "2", "--prompt-tokens",
                               str(PROMPT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS), "--json", "--out",
                               str(tmp_path / "bench"))  # fmt: skip
    assert code == 0, output
    bench = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert bench["flavor"] == "transformers" and bench["levels"][0]["total_output_tokens"] == 2 * OUTPUT_TOKENS
    assert not process_alive(server.pid)
    assert "Uvicorn running" in (tmp_path / "server.log").read_text()
    assert argv[1:3] == ["serve", str(tiny_model.resolve())] and result.server_argv == argv

    for sweep in (result, chat):
        assert sweep.warnings == []
        for level in sweep.levels:
            assert level.errors == 0 and level.completed == level.requests
            lines = [json.loads(x) for x in Path(level.records_path).read_text().splitlines()]
            # Output tokens: the summary's total is exactly the server's own usage, and every request
            # produced exactly what it asked for (min_new_tokens held EOS back).
            assert all(x["output_tokens_source"] == "usage" for x in lines)
            assert level.total_output_tokens == sum(x["output_tokens"] for x in lines)
            assert level.total_output_tokens == level.requests * OUTPUT_TOKENS and level.short_outputs == 0
            # Prompts: exactly as long as the server's tokenizer (and chat template) counts them.
            assert {x["prompt_tokens"] for x in lines} == {PROMPT_TOKENS}
            assert level.total_input_tokens == level.requests * PROMPT_TOKENS
            _check_consistent(level)
    assert result.gates_passed and [g.name for g in result.gates] == ["max_ttft_p99_ms", "max_tpot_p99_ms"]


@pytest.mark.parametrize("early", [False, True], ids=["started-by-first-use", "launched-early"])
def test_one_shared_server_serves_each_model_in_turn(tiny_model: Path, tmp_path: Path, early: bool) -> None:
    """A build's CPU measurements share one `transformers serve`: each model directory is loaded
    before its measurement (by name: its path), unloaded after, and its part of the log is its own.
    Launched early (as a build does), the first measurement waits for it and logs its start-up."""
    import shutil

    from forge.errors import InfraError
    from forge.loadgen.server import SharedServer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "no-such"}')
    server = SharedServer()
    if early:
        server.launch()
    try:
        pids, logs = [], []
        for index, model in enumerate((tiny_model, copy, tiny_model)):
            with server.serving(model, tmp_path / f"log{index}") as up:
                assert up.model == str(model.resolve()) and up.argv[1:3] == ["serve", "--host"]  # nothing pinned
                result = run_sweep(up.base_url, up.model, None, [2], PROMPT_TOKENS, OUTPUT_TOKENS, 2,
                                   tmp_path / f"sweep{index}", flavor="transformers", warmup_requests=0,
                                   plots=False)  # fmt: skip
                assert [lv.errors for lv in result.levels] == [0]
                pids.append(up.pid)
            logs.append((tmp_path / f"log{index}").read_text())
        assert len(set(pids)) == 1 and process_alive(pids[0])
        # Each measurement's log holds its own load; the first model, unloaded after its turn, loads again.
        models = (tiny_model, copy, tiny_model)
        assert all(f"Loading {m.resolve()}@main" in log for m, log in zip(models, logs, strict=True))
        assert f"Loading {copy.resolve()}" not in logs[0] and "Uvicorn running" in logs[0]

        with pytest.raises(InfraError, match="could not load .*broken"):
            with server.serving(broken, tmp_path / "log-broken"):
                pass
        with server.serving(copy, tmp_path / "log-after"):  # the same server goes on after a model it cannot load
            assert server.proc.pid == pids[0]
    finally:
        server.close()
    assert not process_alive(pids[0])
    assert server.log_path.is_file()  # kept: a measurement failed while it served


def test_a_builds_measurements_share_one_dense_copy_of_an_export(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    """A variant's lm-eval tasks and load sweep serve the same weights: the export is made dense
    once per build (in the shared server's scratch directory, gone when the server closes)."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    from forge.formats import FORMATS
    from forge.loadgen.server import SCRATCH_PREFIX, SharedServer
    from forge.quant.presets import resolve_scheme
    from forge.quant.rtn import quantize_rtn
    from forge.stages import serve

    config = json.loads((tiny_model / "config.json").read_text())
    state = load_file(tiny_model / "model.safetensors")
    quantized = quantize_rtn(state, config, resolve_scheme("W4A16", group_size=64))
    export = tmp_path / "export"
    FORMATS["compressed-tensors"].write(quantized, tiny_model, export, {"recipe": "t", "variant": "v", "forge": "0"})
    made = []
    real = serve.dense_copy
    monkeypatch.setattr(serve, "dense_copy", lambda source, out: made.append(out) or real(source, out))
    cache = tmp_path / "cache"
    ended = subprocess.Popen(["true"])  # noqa: S607 - its process id, once waited for, names no process
    ended.wait()
    (killed := cache / f"{SCRATCH_PREFIX}{ended.pid}-a").mkdir(parents=True)  # a SIGKILLed build's
    (running := cache / f"{SCRATCH_PREFIX}{os.getppid()}-b").mkdir()  # another build's, still running
    server = SharedServer(scratch_root=cache)
    try:
        first = serve.shared_dense_copy(export, server)
        assert first.parent.parent == cache and not killed.exists() and running.exists()
        assert serve.shared_dense_copy(export, server) == first and len(made) == 1
        _, state = FORMATS["compressed-tensors"].read(export)
        served = load_file(first / "model.safetensors")
        assert served.keys() <= state.keys() and "model.layers.0.mlp.down_proj.weight" in served
        assert all(torch.equal(served[k], state[k].float()) for k in served)  # the export's weights, dense
    finally:
        server.close()
    assert not first.exists() and not first.parent.exists()
