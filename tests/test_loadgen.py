"""Load generator: metric math, wire-format edge cases against a local stub, and the sweep's files.

Everything here runs in seconds on loopback; the real-server check is test_loadgen_server.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from forge.errors import InfraError, InputError
from forge.loadgen import GpuCost, LoadLevel, SLOs, run_level, run_sweep
from forge.loadgen.client import (
    ConnectionPool,
    Endpoint,
    RequestRecord,
    _ChunkedDecoder,
    _StreamParser,
    send_streaming_request,
)
from forge.loadgen.metrics import (
    cost_per_million_output_tokens,
    describe,
    error_kind,
    estimate_cost,
    evaluate_slo_gates,
    percentile,
    request_metrics,
    summarize_level,
)
from forge.loadgen.server import transformers_serve_argv, wait_healthy
from forge.loadgen.workload import (
    Prompt,
    PromptCounter,
    arrival_offsets,
    length_fields,
    load_tokenizer,
    random_prompts,
    request_body,
    text_prompts,
)
from tests.stream_stub import StreamStub, StubBehavior, running_stub
from tests.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny model's real BPE tokenizer (with its chat template), without the model."""
    directory = tmp_path_factory.mktemp("tok")
    make_tokenizer(512).save_pretrained(directory)
    return directory


def _record(chunks: list[float], out: int | None, scheduled: float = 0.0, sent: float = 0.0) -> RequestRecord:
    r = RequestRecord(0, 8, out or 0, scheduled_s=scheduled, sent_s=sent)
    r.chunk_times_s = list(chunks)
    r.output_tokens = out
    return r


# --- metric math ---------------------------------------------------------------------------------


def test_percentiles_match_numpy_linear() -> None:
    values = sorted(random.Random(1).uniform(0, 100) for _ in range(37))
    for p in (0, 1, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    stats = describe([0.001, 0.002, 0.003, 0.004])
    assert stats.mean == pytest.approx(2.5) and stats.p50 == pytest.approx(2.5) and stats.count == 4
    assert describe([]).p99 is None


def test_request_metrics_follow_vllm_definitions() -> None:
    # Scheduled at 1.0, sent at 1.2 (waited 200 ms for a slot), 3 chunks carrying 5 tokens.
    m = request_metrics(_record([1.5, 1.6, 1.9], out=5, scheduled=1.0, sent=1.2))
    assert m.ttft_s == pytest.approx(0.5)  # queue time stays inside TTFT
    assert m.e2el_s == pytest.approx(0.9)
    assert m.tpot_s == pytest.approx(0.4 / 4)  # (E2EL − TTFT) / (tokens − 1), tokens from usage
    assert m.itls_s == pytest.approx([0.1, 0.3])  # per chunk, not per token
    assert m.queue_s == pytest.approx(0.2)
    assert request_metrics(_record([0.3], out=1)).tpot_s is None


def test_level_summary_throughput_goodput_and_errors() -> None:
    good = [_record([0.1 * (i + 1), 0.1 * (i + 1) + 0.3], out=4) for i in range(3)]
    slow = _record([2.0, 2.3], out=4)  # TTFT 2 s breaks the 1 s SLO
    failed = RequestRecord(9, 8, 4, error="HTTP 503: overloaded")
    short = _record([0.1, 0.2], out=2)
    short.output_tokens_requested = 4
    records = [*good, slow, failed, short]
    s = summarize_level(LoadLevel(concurrency=4), records, duration_s=2.0, slos=SLOs(max_ttft_p99_ms=1000))
    assert (s.requests, s.completed, s.errors) == (6, 5, 1)
    assert s.error_kinds == {"http_5xx": 1}
    assert s.request_throughput_rps == pytest.approx(2.5)
    assert s.total_output_tokens == 18 and s.output_tok_s == pytest.approx(9.0)
    assert s.total_tok_s == pytest.approx((18 + 5 * 8) / 2.0)
    assert s.goodput_rps == pytest.approx(4 / 2.0)
    assert s.short_outputs == 1 and s.min_output_tokens == 2
    assert s.ttft_ms.count == 5 and s.itl_ms.count == 5


def test_error_kinds() -> None:
    assert error_kind("HTTP 500: x") == "http_5xx"
    assert error_kind("HTTP 422: x") == "http_4xx"
    assert error_kind("timeout after 1 s") == "timeout"
    assert error_kind("ConnectionError: connection closed mid-stream") == "connection"


def _level(concurrency: int, tok_s: float, ttft_p99: float, errors: int = 0):
    records = [_record([ttft_p99 / 1000, ttft_p99 / 1000 + 0.1], out=2) for _ in range(4)]
    s = summarize_level(LoadLevel(concurrency=concurrency), records, 1.0)
    s.output_tok_s, s.errors = tok_s, errors
    return s


def test_gates_and_cost_at_highest_load_meeting_slos() -> None:
    levels = [_level(1, 100.0, 50), _level(8, 700.0, 200), _level(32, 1500.0, 900)]
    slos = SLOs(max_ttft_p99_ms=500, min_output_tps=600, at_concurrency=8)
    gates = {g.name: g for g in evaluate_slo_gates(levels, slos)}
    assert gates["max_ttft_p99_ms"].passed and gates["max_ttft_p99_ms"].level == "c8"
    assert gates["min_output_tps"].passed and gates["min_output_tps"].measured == 700.0
    assert gates["min_output_tps"].metric == "output_tok_s" and gates["min_output_tps"].margin == 100.0
    # At the highest level (default) the TTFT gate fails.
    assert not evaluate_slo_gates(levels, SLOs(max_ttft_p99_ms=500))[0].passed
    with pytest.raises(InputError, match="at_concurrency"):
        evaluate_slo_gates(levels, SLOs(max_ttft_p99_ms=500, at_concurrency=3))

    assert cost_per_million_output_tokens(2.0, 8, 10_000) == pytest.approx(2.0 * 8 / (10_000 * 3600) * 1e6)
    cost = estimate_cost(levels, slos, GpuCost(usd_per_gpu_hour=3.6, gpus=2))
    assert cost is not None and cost.level == "c8"  # c32 breaks the TTFT SLO
    assert cost.usd_per_million_output_tokens == pytest.approx(3.6 * 2 / (700 * 3600) * 1e6)
    levels[1].errors = 1  # a level with failures is not sellable throughput
    assert estimate_cost(levels, slos, GpuCost(3.6, 2)).level == "c1"


def test_arrival_offsets_poisson_and_gamma() -> None:
    rng = random.Random(0)
    poisson = arrival_offsets(4000, 20.0, 1.0, rng)
    assert poisson[0] == 0.0 and poisson[-1] / 4000 == pytest.approx(1 / 20, rel=0.05)
    bursty = np.diff(arrival_offsets(4000, 20.0, 0.25, rng))
    steady = np.diff(arrival_offsets(4000, 20.0, 4.0, rng))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.1) and steady.mean() == pytest.approx(1 / 20, rel=0.1)
    assert bursty.std() > 3 * steady.std()  # coefficient of variation = 1/sqrt(burstiness)
    assert arrival_offsets(3, None, 1.0, rng) == [0.0, 0.0, 0.0]


# --- framing -------------------------------------------------------------------------------------


def test_chunked_decoder_and_sse_parser_survive_any_split() -> None:
    events = [{"choices": [{"index": 0, "text": f" t{i}"}]} for i in range(5)]
    events.append({"choices": [], "usage": {"completion_tokens": 5, "prompt_tokens": 3}})
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\n\n"
    wire = b"".join(f"{len(sse[i : i + 7]):x}\r\n".encode() + sse[i : i + 7] + b"\r\n" for i in range(0, len(sse), 7))
    wire += b"0\r\n\r\n"
    for step in (1, 3, 64, len(wire)):
        record = RequestRecord(0, 3, 5)
        decoder, parser = _ChunkedDecoder(), _StreamParser(record)
        for i in range(0, len(wire), step):
            parser.feed(decoder.feed(wire[i : i + step]), float(i))
        assert decoder.done and parser.done
        # A terminator split across reads only costs the keep-alive, never the data.
        assert decoder.clean_end or step < len(wire)
        assert record.text == " t0 t1 t2 t3 t4" and len(record.chunk_times_s) == 5
        assert (record.output_tokens, record.prompt_tokens) == (5, 3)


def test_endpoint_parse() -> None:
    assert Endpoint.parse("http://127.0.0.1:8000/v1").api_path("chat") == "/v1/chat/completions"
    e = Endpoint.parse("https://gw.example/proxy/v1/completions")
    assert (e.host, e.port, e.tls, e.api_path("completions")) == (
        "gw.example",
        443,
        True,
        "/proxy/v1/completions",
    )
    with pytest.raises(InputError):
        Endpoint.parse("localhost:8000")


# --- edge cases against the stub -----------------------------------------------------------------


async def _one(behavior: StubBehavior, api: str = "completions", max_tokens: int = 8, timeout_s: float = 5.0):
    stub = StreamStub(behavior)
    await stub.start()
    try:
        pool = ConnectionPool(Endpoint.parse(stub.url))
        records = []
        for i in range(2):  # the second request reuses the kept-alive connection when allowed
            body = json.dumps({"model": "m", "max_tokens": max_tokens, "stream": True}).encode()
            record = RequestRecord(i, 8, max_tokens)
            record.scheduled_s = time.perf_counter()
            records.append(await send_streaming_request(pool, pool.endpoint.api_path(api), body, record, timeout_s))
        await pool.aclose()
        return records, stub
    finally:
        await stub.stop()


def test_plain_stream_counts_tokens_from_usage() -> None:
    records, stub = asyncio.run(_one(StubBehavior(ttft_s=0.02)))
    for r in records:
        assert r.ok and r.output_tokens == 8 and r.prompt_tokens == 8 and len(r.chunk_times_s) == 8
        assert request_metrics(r).ttft_s >= 0.02
    assert [s.request_id for s in stub.requests] == ["0", "1"]


def test_several_tokens_per_chunk() -> None:
    records, _ = asyncio.run(_one(StubBehavior(tokens_per_chunk=3, itl_s=0.01), max_tokens=8))
    r = records[0]
    assert r.ok and len(r.chunk_times_s) == 3 and r.output_tokens == 8
    m = request_metrics(r)
    assert m.tpot_s == pytest.approx((m.e2el_s - m.ttft_s) / 7)
    assert len(m.itls_s) == 2


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_empty_first_chunk_does_not_count_as_first_token(api: str) -> None:
    records, _ = asyncio.run(_one(StubBehavior(empty_first_chunk=True, ttft_s=0.05), api=api))
    assert all(r.ok for r in records)
    assert request_metrics(records[0]).ttft_s >= 0.05


def test_usage_on_last_choice_chunk_close_delimited_crlf() -> None:
    behavior = StubBehavior(usage_on_last_chunk=True, done_marker=False, chunked=False, crlf=True)
    records, _ = asyncio.run(_one(behavior))
    assert all(r.ok and r.output_tokens == 8 and r.finish_reason == "length" for r in records)


def test_dropped_connection_is_an_error_not_a_hang() -> None:
    records, _ = asyncio.run(_one(StubBehavior(drop_after_chunks=3)))
    assert all(not r.ok and error_kind(r.error) == "connection" for r in records)
    assert len(records[0].chunk_times_s) == 3


def test_http_500_is_counted() -> None:
    records, stub = asyncio.run(_one(StubBehavior(status=500)))
    assert all(r.status == 500 and error_kind(r.error) == "http_5xx" for r in records)
    assert len(stub.requests) == 2


def test_stalled_server_times_out() -> None:
    records, _ = asyncio.run(_one(StubBehavior(hang=True), timeout_s=0.3))
    assert all(r.error == "timeout after 0.3 s" for r in records)


def test_open_loop_counts_time_waiting_for_a_slot() -> None:
    """Coordinated omission: 6 requests arrive at once-ish but only one slot is free; the server
    takes 50 ms each, so the last one's TTFT must include ~250 ms of waiting."""

    async def main():
        stub = StreamStub(StubBehavior(ttft_s=0.05, tokens=2))
        await stub.start()
        try:
            body = json.dumps({"model": "m", "max_tokens": 2}).encode()
            level = LoadLevel(concurrency=1, request_rate=1000.0)
            return await run_level(Endpoint.parse(stub.url), "completions", level, [body] * 6, output_tokens=2)
        finally:
            await stub.stop()

    run = asyncio.run(main())
    metrics = [request_metrics(r) for r in run.records]
    assert all(r.ok for r in run.records)
    assert metrics[-1].queue_s > 0.2 and metrics[-1].ttft_s > 0.25
    # What is left after the queue is the server's own 50 ms (plus scheduling noise on a busy CI box).
    assert 0.045 < metrics[-1].ttft_s - metrics[-1].queue_s < 0.25


# --- prompts and request bodies ------------------------------------------------------------------


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_prompts_have_exact_server_side_length(tokenizer_dir: Path, tmp_path: Path, api: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    counter = PromptCounter(tok, api)
    for p in random_prompts(tok, api, 5, 40, seed=3):
        assert counter.count(p.text) == 40
    dataset = tmp_path / "text.txt"
    dataset.write_text("The quick brown fox jumps over the lazy dog. Perplexity measures surprise. " * 40)
    prompts = text_prompts(tok, api, 4, 33, dataset, seed=0)
    assert [counter.count(p.text) for p in prompts] == [33] * 4
    assert len({p.text for p in prompts}) > 1
    if api == "chat":  # the template alone is longer than the prompt asked for
        with pytest.raises(InputError, match="prompt_tokens"):
            random_prompts(tok, api, 1, counter.overhead, seed=0)


def test_length_fields_per_flavor() -> None:
    assert length_fields("vllm", 64) == {"max_tokens": 64, "min_tokens": 64, "ignore_eos": True}
    tf = length_fields("transformers", 64)
    assert "ignore_eos" not in tf and json.loads(tf["generation_config"])["min_new_tokens"] == 64
    body = json.loads(request_body("chat", "m", Prompt("hi", 3), 5, "openai"))
    assert body["messages"][0]["content"] == "hi" and body["stream_options"] == {"include_usage": True}
    with pytest.raises(InputError, match="flavor"):
        length_fields("tgi", 4)


# --- the sweep end to end ------------------------------------------------------------------------


def test_sweep_writes_records_summary_and_plots(tokenizer_dir: Path, tmp_path: Path) -> None:
    with running_stub(StubBehavior(ttft_s=0.01, itl_s=0.002)) as stub:
        result = run_sweep(
            stub.url, "stub-model", tokenizer_dir, [1, 4, LoadLevel(concurrency=4, request_rate=200.0)],
            prompt_tokens=24, output_tokens=6, requests_per_level=8, out_dir=tmp_path,
            slos=SLOs(max_ttft_p99_ms=5000, max_tpot_p99_ms=1000, min_output_tps=1, min_goodput=0.1),
            gpu_cost=GpuCost(2.0, 1), warmup_requests=1,
        )  # fmt: skip
        sent = [s.body for s in stub.requests]
    assert len(sent) == 3 * 9
    assert all(b["ignore_eos"] and b["min_tokens"] == 6 and b["model"] == "stub-model" for b in sent)
    assert [lv.label for lv in result.levels] == ["c1", "c4", "rate200-c4"]
    assert all(lv.completed == 8 and lv.total_output_tokens == 48 for lv in result.levels)
    assert result.gates_passed and len(result.gates) == 4 and result.cost is not None
    lines = [json.loads(x) for x in (tmp_path / "requests-c4.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(x["output_tokens"] == 6 and len(x["itl_ms"]) == 5 for x in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["levels"][1]["ttft_ms"]["p99"] == pytest.approx(result.levels[1].ttft_ms.p99)
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_sweep_reports_ignored_ignore_eos_and_missing_usage(tokenizer_dir: Path, tmp_path: Path) -> None:
    # " the" is one token of the tiny tokenizer, so re-tokenizing the text recovers the count.
    with running_stub(StubBehavior(stop_after=3, usage=False, token_text=" the")) as stub:
        result = run_sweep(
            stub.url, "m", tokenizer_dir, [2], prompt_tokens=16, output_tokens=8, requests_per_level=4,
            out_dir=tmp_path, warmup_requests=0, plots=False,
        )  # fmt: skip
    level = result.levels[0]
    assert level.short_outputs == 4 and level.output_tokens_source == {"retokenized": 4}
    assert any("ignores ignore_eos" in w for w in result.warnings)
    assert any("no usage" in w for w in result.warnings)


def test_sweep_counts_failures_and_finishes(tokenizer_dir: Path, tmp_path: Path) -> None:
    with running_stub(StubBehavior(drop_after_chunks=2)) as stub:
        result = run_sweep(
            stub.url, "m", tokenizer_dir, [2], prompt_tokens=16, output_tokens=8, requests_per_level=4,
            out_dir=tmp_path, warmup_requests=0, gpu_cost=GpuCost(1.0), slos=SLOs(max_ttft_p99_ms=100),
        )  # fmt: skip
    assert result.levels[0].errors == 4 and result.levels[0].error_kinds == {"connection": 4}
    assert not result.gates_passed and result.cost is None
    assert result.to_dict()["gates_passed"] is False


# --- server launcher failure paths ---------------------------------------------------------------


def test_launcher_argv_bounds_cpu_cache(tmp_path: Path) -> None:
    argv = transformers_serve_argv(tmp_path, 8123, cpu_cache_tokens=4096)
    assert argv[1:4] == ["serve", str(tmp_path), "--host"] and "--continuous-batching" in argv
    assert argv[argv.index("--cb-num-blocks") + 1] == "128"


def test_wait_healthy_reports_a_dead_server_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"], stdout=f)
    with pytest.raises(InfraError, match="(?s)exited with code 3.*CUDA out of memory"):
        wait_healthy("http://127.0.0.1:9", proc, log, timeout_s=30)


def test_wait_healthy_times_out(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(InfraError, match="did not answer"):
            wait_healthy("http://127.0.0.1:9", proc, tmp_path / "none.log", timeout_s=0.5)
    finally:
        proc.kill()
        proc.wait()


def test_a_started_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A build killed with SIGKILL runs no cleanup; the server it started must not outlive it."""
    starter = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from forge.loadgen.server import start_server\n"
        "proc = start_server([sys.executable, '-c', 'import time; time.sleep(120)'], Path(sys.argv[1]))\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "server.log")], stdout=subprocess.PIPE)
    server = int(parent.stdout.readline())
    assert _running(server)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(server):
        time.sleep(0.1)
    assert not _running(server), "the server outlived the process that started it"


def test_a_served_container_dies_with_the_build_that_started_it(tmp_path: Path) -> None:
    """The GPU path's `docker run` client too: it gets SIGTERM when the build is killed, which it
    proxies to the container. A stand-in `docker` (no engine here) records its pid and sleeps."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'docker.pid'}\nexec sleep 120\n")
    docker.chmod(0o755)
    starter = (
        "import sys\n"
        "from pathlib import Path\n"
        "from forge.serving import ServeSpec, serve_command\n"
        "spec = ServeSpec('vllm', 'img', ['vllm', 'serve'], 8000, '/health', 'vllm')\n"
        "with serve_command(lambda port: ['docker', 'run', 'img'], spec, Path(sys.argv[1]), 'img'):\n"
        "    pass\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    parent = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "server.log")], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (tmp_path / "docker.pid").is_file():
        time.sleep(0.1)
    client = int((tmp_path / "docker.pid").read_text())
    assert _running(client) and parent.poll() is None  # waiting for a health check that never answers
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(client):
        time.sleep(0.1)
    assert not _running(client), "the docker client outlived the build that started it"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for whoever reaps orphans here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
