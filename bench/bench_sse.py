"""How fast forge's load-generator client parses SSE, and how much it adds to TTFT.

    .venv/bin/python bench/bench_sse.py [--streams 128] [--tokens 256] [--requests 384] [--skip-httpx]

Target: ≥ 50,000 SSE chunks/s parsed on one core, < 1 ms added to TTFT, so the
client is never the bottleneck of a fast GPU server. The peer is tests/stream_stub.py in its own
process, driven like a GPU server: one decode step every --step-ms writes the next chunk of every
open stream (vLLM-sized ~200-byte chunks, chunked transfer coding).

Reported:
- parser only: the framing + SSE + JSON code fed one event per call, no sockets (upper bound);
- client under load, against a stub that writes each response as fast as it can ("burst") and one
  paced by decode steps ("paced"): chunks per client CPU-second (time.process_time of this
  process, which runs nothing but the client) and the wall-clock rate the stub allowed;
- TTFT overhead: while the load runs, the same event loop sends short probe requests to a second,
  idle stub; overhead = probe TTFT − that stub's own (first chunk written − request read), i.e.
  what the client (and loopback) add, including waiting behind the load's parsing. Both clocks are
  CLOCK_MONOTONIC (time.perf_counter), comparable across processes;
- the same load through httpx (same SSE parser on `aiter_raw`), to justify the hand-written client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from forge.loadgen.client import (  # noqa: E402
    ConnectionPool,
    Endpoint,
    RequestRecord,
    _ChunkedDecoder,
    _StreamParser,
    send_streaming_request,
)
from forge.loadgen.metrics import describe  # noqa: E402
from forge.loadgen.runner import LevelRun, run_level  # noqa: E402
from forge.loadgen.workload import LoadLevel  # noqa: E402
from tests.stream_stub import StreamStub, StubBehavior  # noqa: E402


def _serve(behavior: dict, conn) -> None:
    async def main() -> None:
        stub = StreamStub(StubBehavior(**behavior))
        await stub.start()
        conn.send(stub.port)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def stub_process(**behavior) -> Iterator[str]:
    """The stub in a forked process, so it never shares a core's time with the client."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_serve, args=(behavior, child), daemon=True)
    proc.start()
    try:
        yield f"http://127.0.0.1:{parent.recv()}"
    finally:
        proc.terminate()
        proc.join(5)


def server_times(url: str) -> dict[str, list[float]]:
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
        return json.loads(response.read())


def bodies(n: int, tokens: int) -> list[bytes]:
    return [json.dumps({"model": "stub", "prompt": "x", "max_tokens": tokens, "stream": True}).encode()] * n


def parser_only(events: int) -> float:
    """Chunks/s of decoding chunked framing + SSE + JSON with no I/O at all."""
    with contextlib.redirect_stdout(None):
        stub = StreamStub(StubBehavior())
    frames, tail = stub._frames("/v1/completions", {"max_tokens": events, "model": "stub"})
    record = RequestRecord(0, 1, events)
    decoder, parser = _ChunkedDecoder(), _StreamParser(record)
    started = time.process_time()
    for frame in frames + tail:
        parser.feed(decoder.feed(frame), 0.0)
    seconds = time.process_time() - started
    assert len(record.chunk_times_s) == events and record.output_tokens == events
    return events / seconds


def overheads_ms(records: list[RequestRecord], stats: dict[str, list[float]]) -> list[float]:
    """Client TTFT minus the server's own time to first chunk, per request, in ms."""
    out = []
    for r in records:
        received, first = stats[str(r.index)]
        out.append(((r.chunk_times_s[0] - r.sent_s) - (first - received)) * 1e3)
    return out


async def _probe(url: str, n: int, gap_s: float) -> list[RequestRecord]:
    """Short requests to an idle stub, one every `gap_s`: their extra latency is the client's."""
    pool = ConnectionPool(Endpoint.parse(url))
    records = []
    for i in range(n):
        record = RequestRecord(i, 1, 4)
        record.scheduled_s = time.perf_counter()
        records.append(await send_streaming_request(pool, "/v1/completions", bodies(1, 4)[0], record, 30))
        await asyncio.sleep(gap_s)
    await pool.aclose()
    return records


async def _loop_lag(lags: list[float], period_s: float = 0.002) -> None:
    """How late the event loop runs a timer: a lower bound on what the client adds to any timestamp
    (a read that is ready waits just as long), independent of the OS scheduling the stubs."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append((time.perf_counter() - t0 - period_s) * 1e3)


def run_client(
    load_url: str, probe_url: str, streams: int, requests: int, tokens: int, probes: int
) -> tuple[float, float, int, list[float], list[float]]:
    """Drive closed-loop load with the forge client while probing TTFT overhead on the side.

    Returns (client CPU s, wall s, chunks parsed, probe TTFT overheads in ms, event-loop lags in ms).
    """

    lags: list[float] = []

    async def main() -> tuple[LevelRun, list[RequestRecord]]:
        level = LoadLevel(concurrency=streams)
        load = asyncio.create_task(
            run_level(Endpoint.parse(load_url), "completions", level, bodies(requests, tokens), timeout_s=300)
        )
        await asyncio.sleep(0.2)  # let every stream get going
        lag = asyncio.create_task(_loop_lag(lags))
        probed = await _probe(probe_url, probes, 0.01)
        lag.cancel()
        return await load, probed

    cpu0, wall0 = time.process_time(), time.perf_counter()
    run, probed = asyncio.run(main())
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    failed = [r.error for r in run.records + probed if not r.ok]
    if failed:
        sys.exit(f"forge client: {len(failed)} requests failed: {failed[:3]}")
    chunks = sum(len(r.chunk_times_s) for r in run.records)
    return cpu, wall, chunks, overheads_ms(probed, server_times(probe_url)), lags


def httpx_client(url: str, streams: int, requests: int, tokens: int) -> tuple[float, float, int]:
    """The same closed-loop load through httpx, parsed by the same SSE code."""
    import httpx

    async def main() -> int:
        limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
            pending = iter(bodies(requests, tokens))
            chunks = 0

            async def user() -> None:
                nonlocal chunks
                for body in pending:
                    record = RequestRecord(0, 1, tokens)
                    parser = _StreamParser(record)
                    async with client.stream("POST", "/v1/completions", content=body) as response:
                        async for data in response.aiter_raw():
                            parser.feed(data, time.perf_counter())
                    chunks += len(record.chunk_times_s)

            await asyncio.gather(*(user() for _ in range(streams)))
            return chunks

    cpu0, wall0 = time.process_time(), time.perf_counter()
    chunks = asyncio.run(main())
    return time.process_time() - cpu0, time.perf_counter() - wall0, chunks


def _rate(label: str, cpu: float, wall: float, chunks: int) -> str:
    return (
        f"{label:<34} {chunks / cpu:>9,.0f} chunks/CPU-s {chunks / wall:>9,.0f} chunks/s wall"
        f"   client CPU {cpu / wall:4.0%} of a core"
    )


def _latency(label: str, values_ms: list[float]) -> str:
    s = describe([x / 1e3 for x in values_ms])
    return f"{label:<34} mean {s.mean:6.3f} ms   p50 {s.p50:6.3f}   p90 {s.p90:6.3f}   p99 {s.p99:6.3f}   n={s.count}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=128, help="concurrent streams (default 128)")
    parser.add_argument("--tokens", type=int, default=256, help="chunks per request (default 256)")
    parser.add_argument("--requests", type=int, default=384, help="requests under load (default 384)")
    parser.add_argument("--step-ms", type=float, default=2.0, help="stub decode step when paced (default 2 ms)")
    parser.add_argument("--probes", type=int, default=100, help="TTFT probes per run (default 100)")
    parser.add_argument("--skip-httpx", action="store_true")
    args = parser.parse_args()
    offered = args.streams / (args.step_ms / 1e3)
    shape = (args.streams, args.requests, args.tokens)

    print(f"{'parser only (no sockets)':<34} {parser_only(200_000):>9,.0f} chunks/CPU-s")
    with stub_process(ttft_s=0.002) as probe_url:
        with stub_process(tokens=4) as idle_url:
            _, _, _, idle, lag = run_client(idle_url, probe_url, 1, 1, 4, args.probes)
        print(_latency("TTFT overhead, client idle", idle))
        print(_latency("event-loop lag, client idle", lag))
        with stub_process() as burst_url:
            cpu, wall, chunks, loaded, lag = run_client(burst_url, probe_url, *shape, args.probes)
        print(_rate(f"forge, {args.streams} streams, burst", cpu, wall, chunks))
        print(_latency("TTFT overhead, during burst", loaded))
        print(_latency("event-loop lag, during burst", lag))
        with stub_process(batch_step_s=args.step_ms / 1e3) as paced_url:
            cpu, wall, chunks, loaded, lag = run_client(paced_url, probe_url, *shape, args.probes)
        print(_rate(f"forge, paced (offered {offered:,.0f}/s)", cpu, wall, chunks))
        print(_latency("TTFT overhead, during paced load", loaded))
        print(_latency("event-loop lag, during paced load", lag))
    if not args.skip_httpx:
        import httpx

        with stub_process() as burst_url:
            print(_rate(f"httpx {httpx.__version__}, burst", *httpx_client(burst_url, *shape)))
        with stub_process(batch_step_s=args.step_ms / 1e3) as paced_url:
            print(_rate(f"httpx {httpx.__version__}, paced", *httpx_client(paced_url, *shape)))


if __name__ == "__main__":
    main()
