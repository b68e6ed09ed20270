"""Run a load sweep against an OpenAI-compatible endpoint and write what it measured.

`run_sweep` is the one entry point (`forge bench`, and the build's validate stage, call it): build
exact-length prompts → for each level: warm up, then drive closed- or open-loop load → per-request
JSONL → per-level summary → gates, cost, plots → summary.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forge.errors import InputError
from forge.eval.gates import GateResult, evaluate_gates
from forge.loadgen.client import (
    NOT_SENT_RUN_LIMIT,
    TIMEOUT_RUN_LIMIT,
    ConnectionPool,
    Endpoint,
    RequestRecord,
    probe_flavor,
    send_streaming_request,
)
from forge.loadgen.metrics import (
    CostEstimate,
    GpuCost,
    LevelSummary,
    SLOs,
    estimate_cost,
    evaluate_slo_gates,
    request_metrics,
    summarize_level,
)
from forge.loadgen.workload import (
    FLAVORS,
    MAX_LEVELS,
    MAX_OUTPUT_TOKENS,
    MAX_PROMPT_TOKENS,
    MAX_PROMPT_TOKENS_TOTAL,
    MAX_REQUESTS,
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
    """Everything a report needs about one sweep; `to_dict()` is JSON-ready.

    `requests_total` counts the measured requests of every level (warm-ups excluded), including
    those never sent because the run stopped early (`aborted` says why); `requests_failed` and
    `failed_kinds` count every one that did not complete. With `max_failed_pct` set, a
    `max_failed_pct` gate fails when more than that share of the requests failed.
    """

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
    requests_total: int = 0
    requests_failed: int = 0
    failed_pct: float = 0.0
    failed_kinds: dict[str, int] = field(default_factory=dict)
    max_failed_pct: float | None = None
    aborted: str | None = None

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def requests_completed(self) -> int:
        return self.requests_total - self.requests_failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gates_passed"] = self.gates_passed
        data["requests_completed"] = self.requests_completed
        return data


@dataclass
class LevelRun:
    """Raw outcome of one level before summarizing: records plus the measured window."""

    level: LoadLevel
    records: list[RequestRecord]
    start_s: float
    duration_s: float
    warmup: list[RequestRecord] = field(default_factory=list)

    @property
    def silent(self) -> bool:
        return answered_none([*self.warmup, *self.records])


def answered_none(records: Sequence[RequestRecord]) -> bool:
    """Requests were sent and the server answered none of them with an HTTP status (refused,
    reset, hung): the server is down, not merely failing requests."""
    tried = [r for r in records if not (r.error or "").startswith("not sent")]
    return bool(tried) and all(r.status is None for r in tried)


async def _closed_loop(
    pool: ConnectionPool,
    path: str,
    bodies: Sequence[bytes],
    records: list[RequestRecord],
    concurrency: int,
    timeout_s: float,
    deadline: float | None = None,
) -> None:
    """`concurrency` users, each sending its next request as soon as the previous one ends.

    A request is scheduled the moment its user is free, so its queue time is zero by construction.
    """
    pending = iter(range(len(records)))

    async def user() -> None:
        for i in pending:  # one shared iterator: each index goes to exactly one user
            records[i].scheduled_s = time.perf_counter()
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s, deadline)

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
    deadline: float | None = None,
) -> None:
    """Requests arrive on a precomputed schedule whatever the server does; a concurrency cap makes
    late ones wait, and that wait stays inside their TTFT (scheduled_s is the arrival time)."""
    offsets = arrival_offsets(len(records), level.request_rate, level.burstiness, rng)
    slots = asyncio.Semaphore(level.concurrency) if level.concurrency else None

    async def arrive(i: int) -> None:
        if slots is None:
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s, deadline)
            return
        async with slots:
            await send_streaming_request(pool, path, bodies[i], records[i], timeout_s, deadline)

    tasks = []
    for i, offset in enumerate(offsets):
        records[i].scheduled_s = start_s + offset
        if deadline is not None and records[i].scheduled_s >= deadline:
            records[i].error = NOT_SENT_RUN_LIMIT  # no sleeping past the run's limit
            continue
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
    deadline: float | None = None,
) -> LevelRun:
    """Warm up (results discarded), then measure one level. Never raises for request failures.

    When the server answers none of the warm-up requests (refused, reset, hung: no HTTP status at
    all), the measured requests are not sent: each would only wait out its own timeout.
    `deadline` (a `time.perf_counter()` instant) stops sending at the run's time limit.
    """
    pool = ConnectionPool(endpoint)
    path = endpoint.api_path(api)
    try:
        warm = [RequestRecord(-1 - i, prompt_tokens, output_tokens) for i in range(len(warmup_bodies))]
        if warm:
            await _closed_loop(pool, path, warmup_bodies, warm, level.concurrency or 1, timeout_s, deadline)
        records = [RequestRecord(i, prompt_tokens, output_tokens) for i in range(len(bodies))]
        start = time.perf_counter()
        if answered_none(warm):
            for record in records:
                record.error = f"not sent: the server answered none of {len(warm)} warm-up requests"
            return LevelRun(level, records, start, 0.0, warm)
        if level.request_rate is None:
            await _closed_loop(pool, path, bodies, records, level.concurrency or 1, timeout_s, deadline)
        else:
            rng = random.Random(seed)
            await _open_loop(pool, path, bodies, records, level, timeout_s, rng, start, deadline)
        # Duration runs from the first arrival to the last response, as in vLLM serve.py.
        return LevelRun(level, records, start, time.perf_counter() - start, warm)
    finally:
        await pool.aclose()


def not_sent_level(level: LoadLevel, n: int, prompt_tokens: int, output_tokens: int, why: str) -> LevelRun:
    """A level skipped after the server went silent: its requests count as failed, never sent."""
    records = [RequestRecord(i, prompt_tokens, output_tokens, error=f"not sent: {why}") for i in range(n)]
    return LevelRun(level, records, time.perf_counter(), 0.0)


def first_errors(records: Sequence[RequestRecord]) -> str:
    """The distinct errors of some records, most frequent first, for one-line messages."""
    counts = Counter(r.error for r in records if r.error)
    return "; ".join(f"{n}× {error}" for error, n in counts.most_common(3))


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
        "sent_s": record.sent_s - start_s if record.sent_s else None,  # None: never sent
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


def check_sweep_size(
    levels: Sequence[int | LoadLevel], prompt_tokens: int, output_tokens: int, requests: int, warmup: int
) -> None:
    """Refuse a sweep too large to finish: the bounds are in `forge.loadgen.workload`."""
    for name, value, high in (
        ("prompt_tokens", prompt_tokens, MAX_PROMPT_TOKENS),
        ("output_tokens", output_tokens, MAX_OUTPUT_TOKENS),
        ("requests_per_level", requests, MAX_REQUESTS),
    ):
        if not 1 <= value <= high:
            raise InputError(f"{name}: must be in 1..{high}, got {value}")
    if not 0 <= warmup <= MAX_REQUESTS:
        raise InputError(f"warmup_requests: must be in 0..{MAX_REQUESTS}, got {warmup}")
    if not 1 <= len(levels) <= MAX_LEVELS:
        raise InputError(f"levels: give 1 to {MAX_LEVELS} load levels, got {len(levels)}")
    for level in levels:
        as_level(level)  # concurrency, rate and burstiness within bounds
    built = prompt_tokens * (requests + warmup) * len(levels)
    if built > MAX_PROMPT_TOKENS_TOTAL:
        raise InputError(
            f"prompt_tokens: {prompt_tokens} tokens × {requests + warmup} requests × {len(levels)} levels is "
            f"{built:,} prompt tokens to build; the limit is {MAX_PROMPT_TOKENS_TOTAL:,}"
        )


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
    run_timeout_s: float | None = None,
    max_failed_pct: float | None = None,
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

    Each request may take `request_timeout_s`; with `run_timeout_s` the whole sweep stops sending at
    that limit (prompt building included) and what was not sent counts as failed. After a level in
    which the server answered no request at all, the later levels are not sent either.
    """
    started = time.perf_counter()
    deadline = None if run_timeout_s is None else started + run_timeout_s
    check_sweep_size(levels, prompt_tokens, output_tokens, requests_per_level, warmup_requests)
    if api not in ("completions", "chat"):
        raise InputError(f"api: {api!r} is not 'completions' or 'chat'")
    if flavor != "auto" and flavor not in FLAVORS:
        raise InputError(f"flavor: {flavor!r} is not auto or one of {', '.join(FLAVORS)}")
    for name, value in (("request_timeout_s", request_timeout_s), ("run_timeout_s", run_timeout_s)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"{name}: must be a finite number of seconds > 0, got {value}")
    if max_failed_pct is not None and not 0 <= max_failed_pct <= 100:
        raise InputError(f"max_failed_pct: must be a percentage in 0..100, got {max_failed_pct}")
    if tokenizer_dir is None:
        if not Path(model).is_dir():
            raise InputError(f"tokenizer_dir: model {model!r} is not a local directory; pass the tokenizer directory")
        tokenizer_dir = Path(model)
    parsed = Endpoint.parse(endpoint)
    load_levels = [as_level(lv) for lv in levels]
    tokenizer = load_tokenizer(tokenizer_dir)
    try:  # only once the arguments are known good, so a refused sweep leaves nothing behind
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"out_dir: cannot create {out_dir}: {exc.strerror or exc}") from None
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    per_level = requests_per_level + warmup_requests
    prompts = build_prompts(tokenizer, api, per_level * len(load_levels), prompt_tokens, dataset, seed)
    if flavor == "auto":  # asked of the server only once every argument is known good
        flavor = probe_flavor(parsed, model, api, FLAVORS, timeout_s=request_timeout_s)
    bodies = [request_body(api, model, p, output_tokens, flavor) for p in prompts]

    aborted = None

    async def sweep() -> list[LevelRun]:
        nonlocal aborted
        runs: list[LevelRun] = []
        for i, level in enumerate(load_levels):
            if aborted:
                runs.append(not_sent_level(level, requests_per_level, prompt_tokens, output_tokens, aborted))
                continue
            chunk = bodies[i * per_level : (i + 1) * per_level]
            logger.info("level %s: %d requests after %d warm-up", level.label, requests_per_level, warmup_requests)
            run = await run_level(
                parsed,
                api,
                level,
                chunk[warmup_requests:],
                chunk[:warmup_requests],
                prompt_tokens=prompt_tokens,
                output_tokens=output_tokens,
                timeout_s=request_timeout_s,
                seed=seed + i,
                deadline=deadline,
            )
            runs.append(run)
            if run.silent:
                sent = [r for r in (*run.warmup, *run.records) if not (r.error or "").startswith("not sent")]
                aborted = f"the server answered none of the {len(sent)} requests of level {level.label}"
                logger.warning("%s (%s): not sending the later levels", aborted, first_errors(sent))
                aborted += f" ({first_errors(sent)})"
        return runs

    runs = asyncio.run(sweep())
    if any(r.error in (NOT_SENT_RUN_LIMIT, TIMEOUT_RUN_LIMIT) for run in runs for r in (*run.warmup, *run.records)):
        aborted = f"the run's time limit of {run_timeout_s:g} s was reached" + (f"; {aborted}" if aborted else "")

    summaries, warnings, files = [], [], {}
    for run in runs:
        fill_missing_output_tokens(run.records, tokenizer)
        path = out_dir / f"requests-{run.level.label}.jsonl"
        write_records(path, run)
        summary = summarize_level(run.level, run.records, run.duration_s, slos)
        summary.records_path = str(path)
        summaries.append(summary)
        warnings += level_warnings(summary, run.records, output_tokens)

    gates = evaluate_slo_gates(summaries, slos) if slos is not None else []
    total = sum(lv.requests for lv in summaries)
    failed = sum(lv.errors for lv in summaries)
    failed_pct = 100.0 * failed / total if total else 0.0
    if max_failed_pct is not None:  # over every request of the sweep, not one level
        gates += evaluate_gates({"max_failed_pct": max_failed_pct}, {"failed_pct": failed_pct}, level="all")
    if aborted:
        warnings.insert(0, f"stopped early: {aborted}")
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
        requests_total=total,
        requests_failed=failed,
        failed_pct=failed_pct,
        failed_kinds=dict(sum((Counter(lv.error_kinds) for lv in summaries), Counter())),
        max_failed_pct=max_failed_pct,
        aborted=aborted,
    )
    if plots:
        from forge.loadgen.plots import plot_latency, plot_throughput

        title = f"{model} · /v1/{api} · {prompt_tokens} prompt → {output_tokens} output tokens"
        files["throughput_plot"] = str(plot_throughput(summaries, out_dir / "throughput.png", title))
        files["latency_plot"] = str(plot_latency(summaries, out_dir / "latency.png", slos, title))
    files["summary"] = str(out_dir / "summary.json")
    (out_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
