"""Run a load sweep against an OpenAI-compatible endpoint and write what it measured.

`run_sweep` is the one entry point (`forge bench`, and the build's validate stage, call it): build
exact-length prompts → for each level: warm up, then drive closed- or open-loop load → per-request
JSONL → per-level summary → gates, cost, plots → summary.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forge.errors import InputError
from forge.loadgen.client import ConnectionPool, Endpoint, RequestRecord, send_streaming_request
from forge.loadgen.metrics import (
    CostEstimate,
    GateResult,
    GpuCost,
    LevelSummary,
    SLOs,
    estimate_cost,
    evaluate_gates,
    request_metrics,
    summarize_level,
)
from forge.loadgen.workload import (
    FLAVORS,
    Api,
    LoadLevel,
    Prompt,
    arrival_offsets,
    as_level,
    load_tokenizer,
    random_prompts,
    request_body,
    text_prompts,
)

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """Everything a report needs about one sweep; `to_dict()` is JSON-ready."""

    endpoint: str
    model: str
    api: str
    flavor: str
    prompt_tokens: int
    output_tokens: int
    requests_per_level: int
    warmup_requests: int
    dataset: str | None
    started_at: str
    levels: list[LevelSummary]
    gates: list[GateResult]
    cost: CostEstimate | None
    warnings: list[str]
    server_argv: list[str] | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gates_passed"] = self.gates_passed
        return data


@dataclass
class LevelRun:
    """Raw outcome of one level before summarizing: records plus the measured window."""

    level: LoadLevel
    records: list[RequestRecord]
    start_s: float
    duration_s: float


async def _closed_loop(
    pool: ConnectionPool,
    path: str,
    bodies: Sequence[bytes],
    records: list[RequestRecord],
    concurrency: int,
    timeout_s: float,
) -> None:
    """`concurrency` users, each sending its next request as soon as the previous one ends.

    A request is scheduled the moment its user is free, so its queue time is zero by construction.
    """
    pending = iter(range(len(records)))

    async def user() -> None:
        for i in pending:  # one shared iterator: each index goes to exactly one user
            records[i].scheduled_s = time.perf_counter()
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s)

    await asyncio.gather(*(user() for _ in range(min(concurrency, len(records)))))


async def _open_loop(
    pool: ConnectionPool,
    path: str,
    bodies: Sequence[bytes],
    records: list[RequestRecord],
    level: LoadLevel,
    timeout_s: float,
    rng: random.Random,
    start_s: float,
) -> None:
    """Requests arrive on a precomputed schedule whatever the server does; a concurrency cap makes
    late ones wait, and that wait stays inside their TTFT (scheduled_s is the arrival time)."""
    offsets = arrival_offsets(len(records), level.request_rate, level.burstiness, rng)
    slots = asyncio.Semaphore(level.concurrency) if level.concurrency else None

    async def arrive(i: int) -> None:
        if slots is None:
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s)
            return
        async with slots:
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s)

    tasks = []
    for i, offset in enumerate(offsets):
        records[i].scheduled_s = start_s + offset
        delay = records[i].scheduled_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(arrive(i)))
    await asyncio.gather(*tasks)


async def run_level(
    endpoint: Endpoint,
    api: Api,
    level: LoadLevel,
    bodies: Sequence[bytes],
    warmup_bodies: Sequence[bytes] = (),
    *,
    prompt_tokens: int = 0,
    output_tokens: int = 0,
    timeout_s: float = 300.0,
    seed: int = 0,
) -> LevelRun:
    """Warm up (results discarded), then measure one level. Never raises for request failures."""
    pool = ConnectionPool(endpoint)
    path = endpoint.api_path(api)
    try:
        if warmup_bodies:
            warm = [RequestRecord(-1 - i, prompt_tokens, output_tokens) for i in range(len(warmup_bodies))]
            await _closed_loop(pool, path, warmup_bodies, warm, level.concurrency or 1, timeout_s)
        records = [RequestRecord(i, prompt_tokens, output_tokens) for i in range(len(bodies))]
        start = time.perf_counter()
        if level.request_rate is None:
            await _closed_loop(pool, path, bodies, records, level.concurrency or 1, timeout_s)
        else:
            await _open_loop(pool, path, bodies, records, level, timeout_s, random.Random(seed), start)
        # Duration runs from the first arrival to the last response, as in vLLM serve.py.
        return LevelRun(level, records, start, time.perf_counter() - start)
    finally:
        await pool.aclose()


def fill_missing_output_tokens(records: Sequence[RequestRecord], tokenizer: Any) -> None:
    """Servers that omit `usage` get their output re-tokenized (vLLM serve.py does the same);
    the record says so, because re-tokenized counts can differ from what was generated."""
    for record in records:
        if record.ok and record.output_tokens is None:
            if tokenizer is not None:
                record.output_tokens = len(tokenizer.encode(record.text, add_special_tokens=False))
                record.output_tokens_source = "retokenized"
            else:
                record.output_tokens = len(record.chunk_times_s)
                record.output_tokens_source = "chunks"


def record_line(record: RequestRecord, level: str, start_s: float) -> dict[str, Any]:
    """One JSONL line: raw times relative to the level start plus the derived latencies."""
    line: dict[str, Any] = {
        "level": level,
        "index": record.index,
        "scheduled_s": record.scheduled_s - start_s,
        "sent_s": record.sent_s - start_s,
        "prompt_tokens_requested": record.prompt_tokens_requested,
        "output_tokens_requested": record.output_tokens_requested,
        "prompt_tokens": record.prompt_tokens,
        "output_tokens": record.output_tokens,
        "output_tokens_source": record.output_tokens_source if record.ok else None,
        "chunks": len(record.chunk_times_s),
        "finish_reason": record.finish_reason,
        "status": record.status,
        "error": record.error,
    }
    if record.ok:
        m = request_metrics(record)
        line |= {
            "ttft_ms": m.ttft_s * 1e3,
            "tpot_ms": None if m.tpot_s is None else m.tpot_s * 1e3,
            "e2el_ms": m.e2el_s * 1e3,
            "queue_ms": m.queue_s * 1e3,
            "itl_ms": [x * 1e3 for x in m.itls_s],
        }
    return line


def write_records(path: Path, run: LevelRun) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in run.records:
            f.write(json.dumps(record_line(record, run.level.label, run.start_s)) + "\n")


def level_warnings(summary: LevelSummary, records: Sequence[RequestRecord], output_tokens: int) -> list[str]:
    """Problems that make a level's numbers misleading, worded for the report."""
    out = []
    if summary.errors:
        out.append(f"{summary.label}: {summary.errors} of {summary.requests} requests failed {summary.error_kinds}")
    if summary.short_outputs:
        out.append(
            f"{summary.label}: {summary.short_outputs} of {summary.completed} requests returned fewer than "
            f"{output_tokens} output tokens (min {summary.min_output_tokens}): the server ignores "
            "ignore_eos/min_tokens, so throughput is not comparable across runs"
        )
    prompt_counts = {r.prompt_tokens for r in records if r.ok and r.prompt_tokens is not None}
    wrong = sorted(n for n in prompt_counts if n != records[0].prompt_tokens_requested) if records else []
    if wrong:
        out.append(
            f"{summary.label}: server counted {wrong} prompt tokens, not "
            f"{records[0].prompt_tokens_requested}: is tokenizer_dir the served model's tokenizer?"
        )
    if summary.output_tokens_source.get("retokenized") or summary.output_tokens_source.get("chunks"):
        out.append(f"{summary.label}: no usage in the stream; output tokens estimated {summary.output_tokens_source}")
    return out


def build_prompts(
    tokenizer: Any, api: Api, n: int, prompt_tokens: int, dataset: Path | None, seed: int
) -> list[Prompt]:
    if dataset is not None:
        return text_prompts(tokenizer, api, n, prompt_tokens, dataset, seed)
    return random_prompts(tokenizer, api, n, prompt_tokens, seed)


def run_sweep(
    endpoint: str,
    model: str,
    tokenizer_dir: Path | None,
    levels: Sequence[int | LoadLevel],
    prompt_tokens: int,
    output_tokens: int,
    requests_per_level: int,
    out_dir: Path,
    slos: SLOs | None = None,
    *,
    api: Api = "completions",
    flavor: str = "vllm",
    warmup_requests: int = 2,
    dataset: Path | None = None,
    request_timeout_s: float = 300.0,
    gpu_cost: GpuCost | None = None,
    server_argv: list[str] | None = None,
    plots: bool = True,
    seed: int = 0,
) -> SweepResult:
    """Measure throughput and latency at each load level and judge them against `slos`.

    `levels` are closed-loop concurrencies (ints) or `LoadLevel`s (open loop at a rate). Every
    request has exactly `prompt_tokens` prompt tokens as the served tokenizer counts them and asks
    for exactly `output_tokens` output tokens. `tokenizer_dir` defaults to `model` when that is a
    local directory (transformers serve names models by path). Writes `requests-<level>.jsonl`,
    `summary.json` and the plots into `out_dir`.
    """
    if api not in ("completions", "chat"):
        raise InputError(f"api: {api!r} is not 'completions' or 'chat'")
    if flavor not in FLAVORS:
        raise InputError(f"flavor: {flavor!r} is not one of {', '.join(FLAVORS)}")
    if prompt_tokens < 1 or output_tokens < 1 or requests_per_level < 1:
        raise InputError("prompt_tokens, output_tokens and requests_per_level must all be ≥ 1")
    if tokenizer_dir is None:
        if not Path(model).is_dir():
            raise InputError(f"tokenizer_dir: model {model!r} is not a local directory; pass the tokenizer directory")
        tokenizer_dir = Path(model)
    parsed = Endpoint.parse(endpoint)
    load_levels = [as_level(lv) for lv in levels]
    if not load_levels:
        raise InputError("levels: give at least one load level")
    out_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    tokenizer = load_tokenizer(tokenizer_dir)
    per_level = requests_per_level + warmup_requests
    prompts = build_prompts(tokenizer, api, per_level * len(load_levels), prompt_tokens, dataset, seed)
    bodies = [request_body(api, model, p, output_tokens, flavor) for p in prompts]

    async def sweep() -> list[LevelRun]:
        runs = []
        for i, level in enumerate(load_levels):
            chunk = bodies[i * per_level : (i + 1) * per_level]
            logger.info("level %s: %d requests after %d warm-up", level.label, requests_per_level, warmup_requests)
            runs.append(
                await run_level(
                    parsed,
                    api,
                    level,
                    chunk[warmup_requests:],
                    chunk[:warmup_requests],
                    prompt_tokens=prompt_tokens,
                    output_tokens=output_tokens,
                    timeout_s=request_timeout_s,
                    seed=seed + i,
                )
            )
        return runs

    runs = asyncio.run(sweep())

    summaries, warnings, files = [], [], {}
    for run in runs:
        fill_missing_output_tokens(run.records, tokenizer)
        path = out_dir / f"requests-{run.level.label}.jsonl"
        write_records(path, run)
        summary = summarize_level(run.level, run.records, run.duration_s, slos)
        summary.records_path = str(path)
        summaries.append(summary)
        warnings += level_warnings(summary, run.records, output_tokens)

    gates = evaluate_gates(summaries, slos) if slos is not None else []
    cost = estimate_cost(summaries, slos, gpu_cost) if gpu_cost is not None else None
    if gpu_cost is not None and cost is None:
        warnings.append("cost: no load level met the SLOs without errors, so none is priced")

    result = SweepResult(
        endpoint=parsed.url,
        model=model,
        api=api,
        flavor=flavor,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests_per_level=requests_per_level,
        warmup_requests=warmup_requests,
        dataset=None if dataset is None else str(dataset),
        started_at=started_at,
        levels=summaries,
        gates=gates,
        cost=cost,
        warnings=warnings,
        server_argv=server_argv,
        files=files,
    )
    if plots:
        from forge.loadgen.plots import plot_latency, plot_throughput

        title = f"{model} · /v1/{api} · {prompt_tokens} prompt → {output_tokens} output tokens"
        files["throughput_plot"] = str(plot_throughput(summaries, out_dir / "throughput.png", title))
        files["latency_plot"] = str(plot_latency(summaries, out_dir / "latency.png", slos, title))
    files["summary"] = str(out_dir / "summary.json")
    (out_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
