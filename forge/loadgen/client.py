"""A minimal HTTP/1.1 + server-sent-events client on asyncio streams, built for timing.

Why not httpx or aiohttp: the load generator must never be the bottleneck of a fast GPU server
(target: ≥ 50,000 SSE chunks/s parsed on one core, < 1 ms added to TTFT; `bench/bench_sse.py`
measures both against httpx). A request here is one `write`; every read is timestamped once, in the
protocol callback that received it, and its framing (chunked transfer coding, SSE events) is parsed
in bulk right there.

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
import re
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from forge.errors import InputError

# A response head larger than this is not an OpenAI-compatible server.
_MAX_HEAD_BYTES = 64 * 1024
# One SSE line, and one SSE event (its `data:` lines together), may not exceed this: a real chunk is
# ~200 bytes, and a server that never ends a line must not grow a buffer per connection without end.
MAX_LINE_BYTES = 1024 * 1024
# A chunk-size line is a hex number and optional extensions (RFC 9112 §7.1.1); servers send a few
# bytes. Kept small because the decoder re-joins a partial line with each read.
MAX_CHUNK_LINE_BYTES = 4096
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# How much of an error body to keep in the record.
_ERROR_BODY_CHARS = 300
# `json.loads` on bytes sniffs the encoding and regex-skips whitespace around the document; SSE is
# UTF-8 by definition and `data:` payloads are one compact JSON object, so go straight to the scanner
# and fall back to the full decoder only if that fails.
_json = json.JSONDecoder()


def _decode_json(data: bytes) -> dict:
    text = data.decode("utf-8")
    try:
        obj, end = _json.raw_decode(text)
        if end == len(text):
            return obj
    except ValueError:
        pass
    return _json.decode(text)


class ProtocolError(ValueError):
    """The server broke HTTP/1.1 or SSE framing (or a size cap): the request fails, the connection closes."""


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens; `base_path` is whatever precedes `/v1` in the URL."""

    host: str
    port: int
    base_path: str = ""
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Accept `http://host:port`, `http://host:port/v1` or a full `.../v1/completions` URL.

        Anything else is refused here rather than failing every request later: a port outside
        1-65535, a query or fragment (never sent), credentials (never sent; use OPENAI_API_KEY),
        and whitespace or control characters, which would break the request line.
        """
        problem = f"endpoint: {url!r} is not an http(s)://host[:port][/path] URL"
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise InputError(f"{problem}: it contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError for a port that is not a number in 0-65535
        except ValueError as exc:
            raise InputError(f"{problem}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(problem)
        if port == 0:
            raise InputError(f"{problem}: port 0 cannot be connected to")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise InputError(f"{problem}: a query or fragment would not be sent")
        if parts.username is not None or parts.password is not None:
            raise InputError(f"{problem}: credentials in the URL are not sent; set OPENAI_API_KEY")
        path = parts.path.rstrip("/")
        for suffix in ("/v1/chat/completions", "/v1/completions", "/v1"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
                break
        tls = parts.scheme == "https"
        return cls(parts.hostname, port if port is not None else (443 if tls else 80), path, tls)

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
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._need_crlf = False
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > MAX_CHUNK_LINE_BYTES:
                    raise ProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes")
                break
            if end - pos > MAX_CHUNK_LINE_BYTES:
                raise ProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes")
            size_text = buf[pos:end].split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise ProtocolError(f"bad chunk size {size_text[:40]!r}")
            size = int(size_text, 16)
            pos = end + 2
            if size == 0:
                self.done = True
                # No trailers: the last chunk is followed by one empty line. If that line has not
                # arrived yet the data is still complete; only the connection is not reused.
                self.clean_end = buf[pos : pos + 2] == b"\r\n"
                pos = n
                break
            self._remaining = size
        self._buf = buf[pos:]
        return b"".join(out) if len(out) != 1 else out[0]


class _StreamParser:
    """Splits an SSE byte stream into events and folds them into a RequestRecord.

    SSE framing per the WHATWG spec (https://html.spec.whatwg.org/multipage/server-sent-events.html):
    lines end in LF or CRLF, `data:` lines (one optional space after the colon) accumulate, a blank
    line dispatches; comments (`:`) and other fields are ignored. TGI writes `data:{...}` without the
    space, sse-starlette uses CRLF; both parse.

    An unfinished line is kept as a list of pieces and joined only once its newline arrives, so a
    line trickled in many reads costs linear time; a line or event over `MAX_LINE_BYTES` fails the
    request. So does a stream with more token chunks than `max_chunks` (each chunk carries at least
    one token, so more than the tokens asked for means a broken or hostile server).
    """

    __slots__ = ("_record", "_tail", "_tail_bytes", "_data", "_data_bytes", "_max_chunks", "done")

    def __init__(self, record: RequestRecord) -> None:
        self._record = record
        self._tail: list[bytes] = []
        self._tail_bytes = 0
        self._data: list[bytes] = []
        self._data_bytes = 0
        # Slack for servers that split a multi-byte character or a tool call over two chunks.
        self._max_chunks = 2 * record.output_tokens_requested + 16 if record.output_tokens_requested > 0 else None
        self.done = False

    def feed(self, payload: bytes, t: float) -> None:
        if b"\n" not in payload:
            if payload:
                self._tail_bytes += len(payload)
                if self._tail_bytes > MAX_LINE_BYTES:
                    raise ProtocolError(f"SSE line longer than {MAX_LINE_BYTES} bytes")
                self._tail.append(payload)
            return
        if self._tail:
            self._tail.append(payload)
            payload = b"".join(self._tail)
            self._tail.clear()
        lines = payload.split(b"\n")
        tail = lines.pop()
        self._tail_bytes = len(tail)
        if tail:
            if self._tail_bytes > MAX_LINE_BYTES:
                raise ProtocolError(f"SSE line longer than {MAX_LINE_BYTES} bytes")
            self._tail.append(tail)
        data = self._data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    self._data_bytes = 0
                    self._event(data[0] if len(data) == 1 else b"\n".join(data), t)
                    data.clear()
            elif line[:5] == b"data:":
                if len(line) > MAX_LINE_BYTES:
                    raise ProtocolError(f"SSE line longer than {MAX_LINE_BYTES} bytes")
                self._data_bytes += len(line)
                if self._data_bytes > MAX_LINE_BYTES:
                    raise ProtocolError(f"SSE event larger than {MAX_LINE_BYTES} bytes")
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
            obj = _decode_json(data)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
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
                if self._max_chunks is not None and len(record.chunk_times_s) > self._max_chunks:
                    raise ProtocolError(
                        f"more than {self._max_chunks} token chunks for {record.output_tokens_requested} tokens asked"
                    )
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


class _StaleConnection(Exception):
    """A pooled keep-alive connection the server had already closed; retried once, not an error."""


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


class _ResponseProtocol(asyncio.Protocol):
    """One keep-alive connection, parsing each response inside `data_received`.

    Why a Protocol and not StreamReader: the timestamp is taken in the very callback that received
    the bytes and the events are parsed right there, so a chunk's time is not delayed by an extra
    event-loop iteration (StreamReader wakes the reading coroutine one iteration later) and no
    buffer is copied. The result of each exchange is a future: True when the connection can carry
    the next request.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._done: asyncio.Future[bool] | None = None
        self._reset(None, False)

    def _reset(self, record: RequestRecord | None, reused: bool) -> None:
        self._record = record
        self._reused = reused
        self._received_any = False
        self._head = b""
        self._status: int | None = None
        self._error_body = b""
        self._error_limit = 0
        self._parser: _StreamParser | None = None
        self._decoder: _ChunkedDecoder | None = None
        self._remaining = -1
        self._keep_alive = True

    # --- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is None or self._done.done():
            return
        t = time.perf_counter()
        if self._parser is not None:
            try:
                self._parser.finish(t)
            except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
                # Raised here, the exception would only be logged by asyncio and the request would
                # wait for its timeout.
                self._fail(exc if isinstance(exc, ValueError) else ValueError(f"unexpected response: {exc!r}"))
                return
        if self._reused and not self._received_any:
            self._fail(_StaleConnection())
        elif self._status is not None and self._status != 200:
            self._finish_error_body()
        elif self._parser is None:
            self._fail(ConnectionError("connection closed before the response head"))
        elif self._decoder is not None or self._remaining > 0:
            self._fail(ConnectionError("connection closed mid-stream"))
        elif not (self._parser.done or self._record.finish_reason):
            # A close-delimited body: only a finish_reason or [DONE] tells a clean end from a drop.
            self._fail(ConnectionError("connection closed mid-stream (no finish_reason)"))
        else:
            self._done.set_result(False)

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        done = self._done
        if done is None or done.done():
            return  # bytes after a finished response: the connection will not be reused
        self._received_any = True
        try:
            if self._parser is None:
                data = self._read_head(data)
                if self._parser is None:
                    return
            if not data:
                return
            if self._decoder is not None:
                self._parser.feed(self._decoder.feed(data), t)
                if self._decoder.done:
                    self._parser.finish(t)
                    done.set_result(self._keep_alive and self._decoder.clean_end)
            else:
                self._parser.feed(data, t)
                if self._remaining > 0:
                    self._remaining -= len(data)
                    if self._remaining <= 0:
                        self._parser.finish(t)
                        done.set_result(self._keep_alive and self._remaining == 0)
        except (ValueError, ConnectionError) as exc:
            self._fail(exc)
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            # JSON of an unexpected shape: a failed request, never a hang until the timeout.
            self._fail(ValueError(f"unexpected response: {exc!r}"))

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost settles the exchange

    # --- one exchange ---------------------------------------------------------------------------

    def begin(self, record: RequestRecord, reused: bool) -> asyncio.Future[bool]:
        self._reset(record, reused)
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def abandon(self) -> None:
        """Stop caring about the exchange in flight (timed out): close without a stray exception."""
        if self._done is not None and not self._done.done():
            self._done.cancel()
        if self.transport is not None:
            self.transport.close()

    def _read_head(self, data: bytes) -> bytes:
        """Accumulate the response head; return the body bytes that came with it."""
        if self._status is not None:  # collecting a non-200 body
            self._error_body += data
            if len(self._error_body) >= self._error_limit:
                self._finish_error_body()
            return b""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD_BYTES:
                raise ConnectionError("response head too large")
            return b""
        status, headers = _parse_head(self._head[:end])
        rest = self._head[end + 4 :]
        self._status = self._record.status = status
        if status != 200:
            length = headers.get("content-length")
            self._error_limit = min(int(length), 4096) if length else 4096
            return self._read_head(rest)
        self._parser = _StreamParser(self._record)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._decoder = _ChunkedDecoder()
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
        self._keep_alive = headers.get("connection", "").lower() != "close"
        return rest

    def _finish_error_body(self) -> None:
        detail = self._error_body.decode("utf-8", "replace")
        self._record.error = f"HTTP {self._status}: {detail[:_ERROR_BODY_CHARS]}"
        if self._done is not None and not self._done.done():
            self._done.set_result(False)

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)


class ConnectionPool:
    """Keep-alive connections to one endpoint, so TTFT does not pay a TCP handshake each time."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[_ResponseProtocol] = []
        self._ssl = ssl.create_default_context() if endpoint.tls else None

    async def acquire(self) -> tuple[_ResponseProtocol, bool]:
        """A connection and whether it was reused (a reused one may turn out stale)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_ResponseProtocol, self.endpoint.host, self.endpoint.port, ssl=self._ssl)
        return conn, False

    def release(self, conn: _ResponseProtocol, reusable: bool) -> None:
        if reusable and not conn.closed:
            self._idle.append(conn)
        else:
            conn.abandon()

    async def aclose(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


def probe_flavor(endpoint: Endpoint, model: str, api: str, flavors: tuple[str, ...], timeout_s: float = 60.0) -> str:
    """The first of `flavors` whose length fields the server accepts, asked with one short
    non-streaming request each: `transformers serve` refuses vLLM's `ignore_eos` / `min_tokens`
    with 422, vLLM takes them. A refusal (400/422) tries the next; anything else is the answer
    (2xx) or an error that no flavor will fix (a 401, a 404 model, a server down: exit 3)."""
    from http.client import HTTPException
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    from forge.errors import InfraError
    from forge.loadgen.workload import length_fields

    url = endpoint.url.removesuffix(endpoint.base_path) + endpoint.api_path(api)
    headers = {"Content-Type": "application/json"}
    if api_key := os.environ.get("OPENAI_API_KEY"):  # as every measured request sends it
        headers["Authorization"] = f"Bearer {api_key}"
    refused = []
    for flavor in flavors:
        body = {"model": model, "max_tokens": 1, "temperature": 0.0, **length_fields(flavor, 1)}
        body |= {"messages": [{"role": "user", "content": "Hi"}]} if api == "chat" else {"prompt": "Hi"}
        try:
            with urlopen(Request(url, json.dumps(body).encode(), headers), timeout=timeout_s):
                return flavor  # the status decides; the one token is not needed
        except HTTPError as error:
            if error.code not in (400, 422):
                raise InfraError(f"bench: {url} answered {error.code} to a one-token request: {error.reason}") from None
            refused.append(f"{flavor}: {error.code}")
        except (URLError, OSError, HTTPException) as error:
            raise InfraError(f"bench: {url} could not be reached to detect --flavor: {error}") from None
    raise InfraError(f"bench: {url} refused every --flavor ({', '.join(refused)})")


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


# How a request that the run's time limit kept from being sent, or cut short, is recorded.
NOT_SENT_RUN_LIMIT = "not sent: the run's time limit was reached"
TIMEOUT_RUN_LIMIT = "timeout: the run's time limit was reached mid-request"


async def send_streaming_request(
    pool: ConnectionPool,
    path: str,
    body: bytes,
    record: RequestRecord,
    timeout_s: float,
    deadline: float | None = None,
) -> RequestRecord:
    """POST `body` to `path`, stream the SSE response into `record`, never raise.

    Every failure — a non-200 status, a dropped connection, a stalled server past `timeout_s`, a
    mid-stream error event, a framing violation — ends up in `record.error` so the sweep counts it
    and moves on. `deadline` (a `time.perf_counter()` instant) is the whole run's limit: a request
    is not sent after it, and one in flight is cut at it.
    """
    budget = timeout_s
    if deadline is not None:
        budget = min(timeout_s, deadline - time.perf_counter())
        if budget <= 0:
            record.error = NOT_SENT_RUN_LIMIT
            return record
    record.sent_s = time.perf_counter()
    head = build_request_head(pool.endpoint, path, len(body), str(record.index))
    conn: _ResponseProtocol | None = None
    reusable = False
    try:
        async with asyncio.timeout(budget):
            for _attempt in range(2):
                conn, reused = await pool.acquire()
                done = conn.begin(record, reused)
                conn.transport.write(head + body)
                try:
                    reusable = await done
                    break
                except _StaleConnection:
                    conn = None
    except TimeoutError:
        record.error = f"timeout after {timeout_s:g} s" if budget == timeout_s else TIMEOUT_RUN_LIMIT
    except (OSError, ConnectionError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_BODY_CHARS]
    finally:
        if conn is not None:
            pool.release(conn, reusable and record.error is None)
    if record.error is None and not record.chunk_times_s:
        record.error = "stream ended without any generated text"
    return record
