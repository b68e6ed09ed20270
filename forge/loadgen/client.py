"""A minimal HTTP/1.1 + server-sent-events client on asyncio streams, built for timing.

Why not httpx or aiohttp: the load generator must never be the bottleneck of a fast GPU server
(target: ≥ 50,000 SSE chunks/s parsed on one core, < 1 ms added to TTFT; `bench/bench_sse.py`
measures both against httpx). A request here is one `write` and a loop of `read`s; each read is
timestamped once, framing (chunked transfer coding, SSE events) is parsed in bulk, and nothing else
runs between the socket and the timestamp.

What counts as a token chunk follows vLLM `vllm/benchmarks/lib/endpoint_request_func.py` with one
deliberate difference: vLLM times the first chunk that carries `choices`, but `transformers serve`
sends a role-only chat chunk *before* prefill, which would make TTFT ~0. So a chunk counts only when
its first choice carries generated text (`text`, `delta.content`, `delta.reasoning_content`,
`delta.reasoning`) or tool calls. Trailing finish/usage chunks with empty text never count.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from forge.errors import InputError

# A response head larger than this is not an OpenAI-compatible server.
_MAX_HEAD_BYTES = 64 * 1024
# How much of an error body to keep in the record.
_ERROR_BODY_CHARS = 300
_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens; `base_path` is whatever precedes `/v1` in the URL."""

    host: str
    port: int
    base_path: str = ""
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Accept `http://host:port`, `http://host:port/v1` or a full `.../v1/completions` URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"endpoint: {url!r} is not an http(s)://host[:port] URL")
        path = parts.path.rstrip("/")
        for suffix in ("/v1/chat/completions", "/v1/completions", "/v1"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
                break
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), path, tls)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.base_path}"

    def api_path(self, api: str) -> str:
        """The request path for `api` ("completions" or "chat")."""
        return f"{self.base_path}/v1/{'chat/completions' if api == 'chat' else 'completions'}"


@dataclass
class RequestRecord:
    """Everything measured about one request; times are `time.perf_counter()` seconds.

    `scheduled_s` is when the workload wanted the request to start (its arrival time in an open
    loop); `sent_s` is when a concurrency slot let it go. TTFT and E2EL are measured from
    `scheduled_s`, so time spent waiting for a slot is counted (no coordinated omission, vLLM
    issue #54101).
    """

    index: int
    prompt_tokens_requested: int
    output_tokens_requested: int
    scheduled_s: float = 0.0
    sent_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens_source: str = "usage"
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class _ChunkedDecoder:
    """Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1)."""

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._need_crlf = False
        self.done = False
        self.clean_end = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while not self.done:
            if self._remaining:
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._need_crlf = True
            if self._need_crlf:
                if n - pos < 2:
                    break
                pos += 2
                self._need_crlf = False
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            size = int(buf[pos:end].split(b";", 1)[0], 16)
            pos = end + 2
            if size == 0:
                self.done = True
                # No trailers: the last chunk is followed by one empty line.
                self.clean_end = buf[pos : pos + 2] == b"\r\n"
                pos = n
                break
            self._remaining = size
        self._buf = buf[pos:]
        return b"".join(out) if len(out) != 1 else out[0]


class _StreamParser:
    """Splits an SSE byte stream into events and folds them into a RequestRecord.

    SSE framing per the WHATWG spec: lines end in LF or CRLF, `data:` lines (one optional space
    after the colon) accumulate, a blank line dispatches; comments (`:`) and other fields are
    ignored. TGI writes `data:{...}` without the space, sse-starlette uses CRLF; both parse.
    """

    __slots__ = ("_record", "_tail", "_data", "done")

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._tail = b""
        self._data: list[bytes] = []
        self.done = False

    def feed(self, payload: bytes, t: float) -> None:
        buf = self._tail + payload if self._tail else payload
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        data = self._data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    self._event(data[0] if len(data) == 1 else b"\n".join(data), t)
                    data.clear()
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])

    def finish(self, t: float) -> None:
        """A stream may end without the final blank line; dispatch what is pending."""
        if self._tail:
            self.feed(b"\n\n", t)
        elif self._data:
            self.feed(b"\n", t)

    def _event(self, data: bytes, t: float) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self._record.error = self._record.error or f"bad SSE payload: {data[:80]!r}"
            return
        record = self._record
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta is not None:
                text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                if not text and delta.get("tool_calls"):
                    text = json.dumps(delta["tool_calls"])
            else:
                text = choice.get("text")
            if text:
                record.chunk_times_s.append(t)
                record.text_parts.append(text)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
        elif obj.get("error") is not None:
            # vLLM and transformers serve report mid-stream failures as an `error` event.
            record.error = f"server error event: {str(obj['error'])[:_ERROR_BODY_CHARS]}"
        usage = obj.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                record.output_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                record.prompt_tokens = int(usage["prompt_tokens"])


class _Connection:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Keep-alive connections to one endpoint, so TTFT does not pay a TCP handshake each time."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if endpoint.tls else None

    async def acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.reused = True
                return conn
            conn.close()
        reader, writer = await asyncio.open_connection(
            self.endpoint.host, self.endpoint.port, ssl=self._ssl, limit=_READ_SIZE
        )
        return _Connection(reader, writer)

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A pooled keep-alive connection the server had already closed; retried once, not an error."""


def build_request_head(endpoint: Endpoint, path: str, body_len: int, request_id: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {endpoint.host}:{endpoint.port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {body_len}",
        f"X-Request-Id: {request_id}",
    ]
    # Same convention as `vllm bench serve`: an API key in the environment becomes a bearer token.
    if api_key := os.environ.get("OPENAI_API_KEY"):
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_error_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.read(min(int(headers["content-length"]), 4096))
    return await reader.read(4096)


async def _exchange(
    conn: _Connection, head: bytes, body: bytes, record: RequestRecord
) -> bool:
    """Send one request and consume its response into `record`; return whether the connection can
    be reused."""
    reader = conn.reader
    conn.writer.write(head + body)
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if conn.reused and not exc.partial:
            raise _StaleConnection from exc
        raise ConnectionError("connection closed before the response head") from exc
    except asyncio.LimitOverrunError as exc:
        raise ConnectionError("response head too large") from exc
    if len(raw_head) > _MAX_HEAD_BYTES:
        raise ConnectionError("response head too large")
    status, headers = _parse_head(raw_head[:-4])
    record.status = status
    if status != 200:
        detail = (await _read_error_body(reader, headers)).decode("utf-8", "replace")
        record.error = f"HTTP {status}: {detail[:_ERROR_BODY_CHARS]}"
        return False

    parser = _StreamParser(record)
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    decoder = _ChunkedDecoder() if chunked else None
    remaining = int(headers["content-length"]) if "content-length" in headers and not chunked else -1
    keep_alive = headers.get("connection", "").lower() != "close"
    perf_counter = time.perf_counter
    while True:
        data = await reader.read(_READ_SIZE)
        t = perf_counter()
        if not data:
            parser.finish(t)
            if decoder is not None or remaining > 0:
                raise ConnectionError("connection closed mid-stream")
            # Close-delimited body: only a finish_reason or [DONE] tells a clean end from a drop.
            if not (parser.done or record.finish_reason):
                raise ConnectionError("connection closed mid-stream (no finish_reason)")
            return False
        if decoder is not None:
            parser.feed(decoder.feed(data), t)
            if decoder.done:
                parser.finish(t)
                return keep_alive and decoder.clean_end
        else:
            parser.feed(data, t)
            if remaining > 0:
                remaining -= len(data)
                if remaining <= 0:
                    parser.finish(t)
                    return keep_alive and remaining == 0


async def send_streaming_request(
    pool: ConnectionPool,
    path: str,
    body: bytes,
    record: RequestRecord,
    timeout_s: float,
) -> RequestRecord:
    """POST `body` to `path`, stream the SSE response into `record`, never raise.

    Every failure — a non-200 status, a dropped connection, a stalled server past `timeout_s`, a
    mid-stream error event — ends up in `record.error` so the sweep counts it and moves on.
    """
    record.sent_s = time.perf_counter()
    head = build_request_head(pool.endpoint, path, len(body), str(record.index))
    conn: _Connection | None = None
    reusable = False
    try:
        async with asyncio.timeout(timeout_s):
            for _attempt in range(2):
                conn = await pool.acquire()
                try:
                    reusable = await _exchange(conn, head, body, record)
                    break
                except _StaleConnection:
                    conn.close()
                    conn = None
    except TimeoutError:
        record.error = f"timeout after {timeout_s:g} s"
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_BODY_CHARS]
    finally:
        if conn is not None:
            pool.release(conn, reusable and record.error is None)
    if record.error is None and not record.chunk_times_s:
        record.error = "stream ended without any generated text"
    return record
