"""`forge bench` against hostile servers and hostile arguments, all on 127.0.0.1.

The contract (`forge bench --help`): every failed request is counted, per level and overall, in the
table and in summary.json; exit 1 when more than --max-failed-pct of the requests failed (or an SLO
gate failed), 3 when no request succeeded at all (server down, hung, or failing every request), 2
for a bad argument, named. Waiting is bounded by --request-timeout and --timeout, and a response
line that never ends is cut at a fixed size instead of being buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from forge.cli import main
from forge.loadgen import LoadLevel, run_level
from forge.loadgen.client import (
    MAX_CHUNK_LINE_BYTES,
    MAX_LINE_BYTES,
    NOT_SENT_RUN_LIMIT,
    ConnectionPool,
    Endpoint,
    ProtocolError,
    RequestRecord,
    _ChunkedDecoder,
    _StreamParser,
    send_streaming_request,
)
from tests.stream_stub import StubBehavior, running_stub
from tests.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    make_tokenizer(512).save_pretrained(directory)
    return directory


def bench(url: str, tokenizer_dir: Path, out: Path, *extra: str) -> Result:
    """`forge bench --json` with a small workload: 2 levels × 4 requests unless `extra` says otherwise."""
    args = ["bench", "--endpoint", url, "--model", "m", "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    # A fixed --flavor: these attacks count the stub's requests, which the auto probe would add to.
    defaults = {"--concurrency": "1,4", "--prompt-tokens": "16", "--output-tokens": "4", "--requests": "4",
                "--flavor": "vllm"}  # fmt: skip
    for option, value in defaults.items():
        if option not in extra:
            args += [option, value]
    return CliRunner().invoke(main, [*args, *extra])


def summary_of(result: Result) -> dict:
    """The JSON document printed on stdout (stderr, mixed into `output`, follows it)."""
    return json.JSONDecoder().raw_decode(result.output)[0]


def assert_no_crash(result: Result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- raw-socket servers: what a real server never does on purpose -------------------------------


@contextlib.contextmanager
def raw_server(respond: Callable[[socket.socket], None]) -> Iterator[tuple[str, threading.Event]]:
    """Accept connections; read each request, then hand the socket to `respond`. Yields the URL and
    an event set once a client closed a connection while `respond` was still writing."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed_by_client = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            try:
                respond(conn)
            except OSError:  # EPIPE / ECONNRESET: the client hung up on us
                closed_by_client.set()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", closed_by_client
    finally:
        listener.close()


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
ENOUGH = 64 * MAX_LINE_BYTES  # far more than any cap; a client without one buffers all of it


def endless_sse_line(conn: socket.socket) -> None:
    """A 200 stream whose first SSE line never ends: `data: {"choices":[{"text":"aaaa…`."""
    conn.sendall(CHUNKED_HEAD)
    piece = b"a" * 65536
    start = b'data: {"choices":[{"text":"'
    conn.sendall(b"%x\r\n%s\r\n" % (len(start), start))
    for _ in range(ENOUGH // len(piece)):
        conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.recv(1)  # then stall, the connection open, until the client gives up


def endless_chunk_size_line(conn: socket.socket) -> None:
    """A chunked 200 response whose first chunk-size line is hex digits without end."""
    conn.sendall(CHUNKED_HEAD)
    piece = b"f" * 65536
    for _ in range(ENOUGH // len(piece)):
        conn.sendall(piece)
    conn.recv(1)


async def one_request(url: str, timeout_s: float) -> RequestRecord:
    pool = ConnectionPool(Endpoint.parse(url))
    record = RequestRecord(0, 8, 4)
    record.scheduled_s = time.perf_counter()
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}).encode()
    try:
        return await send_streaming_request(pool, "/v1/completions", body, record, timeout_s)
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        (endless_sse_line, f"ProtocolError: SSE line longer than {MAX_LINE_BYTES} bytes"),
        (endless_chunk_size_line, f"ProtocolError: chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes"),
    ],
)
def test_a_line_without_end_fails_the_request_at_the_cap(respond, message: str) -> None:
    # The timeout is far away: the request must end because of the cap, not because of the clock.
    with raw_server(respond) as (url, closed_by_client):
        record = asyncio.run(one_request(url, timeout_s=60))
        assert record.error == message and record.status == 200
        # The client hung up: it did not keep reading (and buffering) what the server sent.
        assert closed_by_client.wait(10)


def test_sse_line_trickled_in_small_reads_costs_linear_time() -> None:
    """Re-joining the unfinished line on every read is quadratic: 1 MiB in 64-byte reads copies
    ~8 GiB and takes seconds; pieces kept in a list take milliseconds."""
    parser = _StreamParser(RequestRecord(0, 8, 4))
    parser.feed(b'data: {"choices":[{"text":"', 0.0)
    piece = b"a" * 64
    start = time.process_time()
    with pytest.raises(ProtocolError, match="SSE line longer"):
        for _ in range(2 * MAX_LINE_BYTES // len(piece)):
            parser.feed(piece, 0.0)
    assert time.process_time() - start < 2.0


def test_an_event_of_many_data_lines_is_capped_too() -> None:
    parser = _StreamParser(RequestRecord(0, 8, 4))
    line = b"data: " + b"x" * 1000 + b"\n"
    with pytest.raises(ProtocolError, match="SSE event larger"):
        for _ in range(2 * MAX_LINE_BYTES // len(line)):
            parser.feed(line, 0.0)


def test_a_server_sending_more_chunks_than_tokens_asked_is_cut_off() -> None:
    record = RequestRecord(0, 8, 4)
    parser = _StreamParser(record)
    event = b'data: {"choices":[{"text":"x"}]}\n\n'
    with pytest.raises(ProtocolError, match="token chunks for 4 tokens"):
        for _ in range(1000):
            parser.feed(event, 0.0)
    assert len(record.chunk_times_s) < 100


@pytest.mark.parametrize("wire", [b"-5\r\nhello", b"0x10\r\n", b"1_0\r\n", b"+a\r\n", b"3\r\nabcXY0\r\n\r\n"])
def test_malformed_chunk_framing_is_an_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        _ChunkedDecoder().feed(wire)


def test_open_loop_sends_nothing_past_the_run_deadline() -> None:
    """Arrivals scheduled after the run's limit are not waited for: 1 request/s for 20 requests
    would take 19 s; with 0.5 s left only the first arrival is sent."""

    async def main():
        with running_stub(StubBehavior(tokens=2)) as stub:
            body = json.dumps({"model": "m", "max_tokens": 2}).encode()
            level = LoadLevel(request_rate=1.0, burstiness=1000.0)  # near-regular arrivals, 1 s apart
            deadline = time.perf_counter() + 0.5
            return await run_level(Endpoint.parse(stub.url), "completions", level, [body] * 20, deadline=deadline)

    start = time.monotonic()
    run = asyncio.run(main())
    assert time.monotonic() - start < 10
    assert run.records[0].ok
    assert all(r.error == NOT_SENT_RUN_LIMIT and r.sent_s == 0.0 for r in run.records[1:])


# --- the command line against dead, hung and failing servers -------------------------------------


def test_server_down_exits_3_and_counts_every_request(tokenizer_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    result = bench(f"http://127.0.0.1:{free_port()}", tokenizer_dir, tmp_path / "out", "--json")
    assert_no_crash(result)
    assert result.exit_code == 3, result.output
    summary = summary_of(result)
    assert [(lv["label"], lv["requests"], lv["completed"], lv["errors"]) for lv in summary["levels"]] == [
        ("c1", 4, 0, 4),
        ("c4", 4, 0, 4),
    ]
    assert (summary["requests_total"], summary["requests_failed"], summary["failed_pct"]) == (8, 8, 100.0)
    # The warm-ups were refused, so nothing else was sent: no timeout per request on a dead server.
    assert summary["failed_kinds"] == {"not_sent": 8}
    assert "answered none" in summary["aborted"] and "ConnectionRefusedError" in summary["aborted"]
    assert "8 of 8 requests failed" in result.output and "ConnectionRefusedError" in result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["requests_failed"] == 8
    assert time.monotonic() - start < 60


def test_every_request_500_exits_3_and_counts_them(tokenizer_dir: Path, tmp_path: Path) -> None:
    with running_stub(StubBehavior(status=500)) as stub:
        result = bench(stub.url, tokenizer_dir, tmp_path / "out", "--json")
        sent = len(stub.requests)
    assert_no_crash(result)
    assert result.exit_code == 3, result.output
    summary = summary_of(result)
    # The server answered (with 500s), so every level was measured: 2 warm-up + 4 requests each.
    assert sent == 12 and summary["aborted"] is None
    assert [lv["error_kinds"] for lv in summary["levels"]] == [{"http_5xx": 4}, {"http_5xx": 4}]
    assert summary["failed_kinds"] == {"http_5xx": 8} and summary["requests_completed"] == 0
    assert "HTTP 500" in result.output


def test_some_requests_failing_is_a_gate(tokenizer_dir: Path, tmp_path: Path) -> None:
    # One level, 2 warm-up + 6 measured requests; the stub fails its 4th and 8th: 2 measured ones.
    args = ("--concurrency", "1", "--requests", "6")
    with running_stub(StubBehavior(fail_every=4)) as stub:
        strict = bench(stub.url, tokenizer_dir, tmp_path / "a", *args, "--json")
    with running_stub(StubBehavior(fail_every=4)) as stub:
        lenient = bench(stub.url, tokenizer_dir, tmp_path / "b", *args, "--max-failed-pct", "50")
    assert_no_crash(strict)
    assert strict.exit_code == 1, strict.output
    summary = summary_of(strict)
    level = summary["levels"][0]
    assert (level["requests"], level["completed"], level["errors"], level["error_kinds"]) == (6, 4, 2, {"http_5xx": 2})
    assert (summary["requests_failed"], summary["failed_pct"]) == (2, pytest.approx(100 * 2 / 6))
    gate = next(g for g in summary["gates"] if g["name"] == "max_failed_pct")
    assert gate["limit"] == 0 and not gate["passed"]
    assert "throughput gates failed: max_failed_pct" in strict.output
    # Within the threshold: exit 0, and the text summary still counts the failures.
    assert lenient.exit_code == 0, lenient.output
    assert "2 of 6 requests failed (33.3%, http_5xx: 2)" in lenient.output
    assert "4/2" in lenient.output  # the table's ok/err column of level c1


def test_early_close_mid_stream_is_counted(tokenizer_dir: Path, tmp_path: Path) -> None:
    with running_stub(StubBehavior(drop_after_chunks=2)) as stub:
        result = bench(stub.url, tokenizer_dir, tmp_path / "out", "--json")
    assert_no_crash(result)
    assert result.exit_code == 3, result.output
    summary = summary_of(result)
    assert summary["failed_kinds"] == {"connection": 8}
    assert all(lv["errors"] == 4 for lv in summary["levels"])


def test_hung_server_is_bounded_by_the_request_timeout(tokenizer_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    with running_stub(StubBehavior(hang=True)) as stub:
        result = bench(stub.url, tokenizer_dir, tmp_path / "out", "--json", "--request-timeout", "0.3")
    assert_no_crash(result)
    assert result.exit_code == 3, result.output
    summary = summary_of(result)
    # Two warm-up requests time out; nothing more is sent to a server that answers nothing.
    assert len(stub.requests) == 2
    assert summary["failed_kinds"] == {"not_sent": 8} and "timeout after 0.3 s" in summary["aborted"]
    assert time.monotonic() - start < 60


def test_the_whole_run_is_bounded_by_its_timeout(tokenizer_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    with running_stub(StubBehavior(hang=True)) as stub:
        result = bench(stub.url, tokenizer_dir, tmp_path / "out", "--json", "--request-timeout", "600",
                       "--timeout", "1")  # fmt: skip
    assert_no_crash(result)
    assert result.exit_code == 3, result.output
    assert "time limit of 1 s" in summary_of(result)["aborted"]
    assert time.monotonic() - start < 60


def test_run_timeout_keeps_what_was_measured(tokenizer_dir: Path, tmp_path: Path) -> None:
    # 100 requests of ≥ 50 ms each, one at a time, cannot fit in 2 s: some complete, the rest
    # are not sent, and all of them are counted.
    with running_stub(StubBehavior(ttft_s=0.05)) as stub:
        result = bench(stub.url, tokenizer_dir, tmp_path / "out", "--json", "--concurrency", "1", "--requests",
                       "100", "--timeout", "2")  # fmt: skip
    assert_no_crash(result)
    assert result.exit_code == 1, result.output
    summary = summary_of(result)
    level = summary["levels"][0]
    assert level["requests"] == 100 and 0 < level["completed"] < 100
    assert level["errors"] == summary["requests_failed"] == 100 - level["completed"]
    assert set(summary["failed_kinds"]) <= {"not_sent", "timeout"} and summary["failed_kinds"]["not_sent"] > 0


# --- bad arguments: exit 2, the option named, nothing written ------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--endpoint", "http://127.0.0.1:99999"], "--endpoint"),
        (["--endpoint", "http://127.0.0.1:0"], "--endpoint"),
        (["--endpoint", "http://[::1"], "--endpoint"),
        (["--endpoint", "localhost:8000"], "--endpoint"),
        (["--endpoint", "http://127.0.0.1:8000/v1 x"], "--endpoint"),
        (["--endpoint", "http://127.0.0.1:8000/v1?key=1"], "--endpoint"),
        (["--endpoint", "http://user:pw@127.0.0.1:8000"], "--endpoint"),
        (["--prompt-tokens", "100000000"], "--prompt-tokens"),
        (["--prompt-tokens", "0"], "--prompt-tokens"),
        (["--prompt-tokens", "131072", "--requests", "1000"], "--prompt-tokens"),
        (["--output-tokens", "0"], "--output-tokens"),
        (["--output-tokens", "100000000"], "--output-tokens"),
        (["--requests", "0"], "--requests"),
        (["--requests", "100000000"], "--requests"),
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "1,100000"], "--concurrency"),
        (["--concurrency", "4,4"], "--concurrency"),
        (["--concurrency", ","], "--concurrency"),
        (["--concurrency", ",".join(str(n) for n in range(1, 100))], "--concurrency"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--request-timeout", "nan"], "--request-timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--timeout", "-1"], "--timeout"),
        (["--max-failed-pct", "101"], "--max-failed-pct"),
        (["--max-failed-pct", "nan"], "--max-failed-pct"),
        (["--ttft-p99-ms", "nan"], "--ttft-p99-ms"),
        (["--gpu-usd-per-hour", "-1"], "--gpu-usd-per-hour"),
        (["--gpus", "0"], "--gpus"),
    ],
)
def test_bad_argument_exits_2_naming_the_option(tokenizer_dir: Path, tmp_path: Path, args, option: str) -> None:
    base = {"--endpoint": f"http://127.0.0.1:{free_port()}", "--concurrency": "1", "--requests": "4"}
    base.update({"--model": "m", "--tokenizer": str(tokenizer_dir), "--out": str(tmp_path / "out")})
    for name in args[::2]:
        base.pop(name, None)
    result = CliRunner().invoke(main, ["bench", *[x for kv in base.items() for x in kv], *args])
    assert_no_crash(result)
    assert result.exit_code == 2, result.output
    assert option in result.output and "No such option" not in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(tokenizer_dir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        result = bench(f"http://127.0.0.1:{free_port()}", tokenizer_dir, out)
        assert_no_crash(result)
        assert result.exit_code == 2 and "--out" in result.output, result.output
    assert a_file.read_text() == "x"


def test_missing_tokenizer_exits_2_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for extra in (["--tokenizer", str(tmp_path / "absent")], [], ["--tokenizer", str(tmp_path)]):
        args = ["bench", "--endpoint", url, "--model", "not-a-dir", "--out", str(tmp_path / "out"), *extra]
        result = CliRunner().invoke(main, args)
        assert_no_crash(result)
        assert result.exit_code == 2 and "--tokenizer" in result.output, result.output


def test_help_documents_failures_timeouts_and_exit_codes() -> None:
    text = CliRunner().invoke(main, ["bench", "--help"]).output
    for needle in ("--max-failed-pct", "--request-timeout", "--timeout", "Exit codes", "no request succeeded"):
        assert needle in text
