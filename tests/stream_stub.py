"""A small OpenAI-compatible streaming server on asyncio, for the edge cases a real server rarely
shows on demand: several tokens per chunk, empty first chunks, dropped connections, 5xx, stalls,
servers that ignore `ignore_eos`, streams without usage. Also the loopback peer of bench_sse.py.

Responses mimic vLLM's wire format (chunked transfer coding, `data: {...}\\n\\n`, a usage-only chunk
with `choices: []`, then `data: [DONE]`) unless a behaviour says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class StubBehavior:
    """How the stub answers every request.

    `tokens` defaults to the request's `max_tokens`. `stop_after` ends generation early whatever
    `ignore_eos` says (a server that ignores it). With `batch_step_s` set, one shared loop emits a
    chunk to every open stream per step, like a GPU decode step, instead of a sleep per stream.
    `fail_every` answers every n-th request (counted from 1, in arrival order) with HTTP 503.
    """

    tokens: int | None = None
    token_text: str = " tok"
    tokens_per_chunk: int = 1
    ttft_s: float = 0.0
    itl_s: float = 0.0
    batch_step_s: float | None = None
    empty_first_chunk: bool = False
    usage: bool = True
    usage_on_last_chunk: bool = False
    done_marker: bool = True
    drop_after_chunks: int | None = None
    status: int = 200
    fail_every: int | None = None
    hang: bool = False
    stop_after: int | None = None
    chunked: bool = True
    crlf: bool = False


@dataclass
class StubRequest:
    """What the stub saw of one request, for assertions and for the TTFT-overhead bench."""

    path: str
    body: dict
    request_id: str
    received_s: float
    first_chunk_s: float | None = None


@dataclass(eq=False)
class _Stream:
    writer: asyncio.StreamWriter
    frames: list[bytes]
    tail: list[bytes]
    done: asyncio.Future
    seen: StubRequest
    next_frame: int = 0


class StreamStub:
    def __init__(self, behavior: StubBehavior | None = None) -> None:
        self.behavior = behavior or StubBehavior()
        self.requests: list[StubRequest] = []
        self._server: asyncio.Server | None = None
        self._streams: set[_Stream] = set()
        self._ticker: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.behavior.batch_step_s is not None:
            self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self._server:
            self._server.close()
            for s in list(self._streams):
                s.writer.close()
            # Handlers still inside a `hang` or a stream: end them here, not when the loop closes.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # --- wire format -------------------------------------------------------------------------

    def _frame(self, obj: dict | str) -> bytes:
        text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        sep = "\r\n" if self.behavior.crlf else "\n"
        event = f"data: {text}{sep}{sep}".encode()
        if self.behavior.chunked:
            return f"{len(event):x}\r\n".encode() + event + b"\r\n"
        return event

    def _frames(self, path: str, body: dict) -> tuple[list[bytes], list[bytes]]:
        """Token frames (one per chunk) and the tail sent right after the last one."""
        b = self.behavior
        chat = path.endswith("/chat/completions")
        requested = b.tokens if b.tokens is not None else int(body.get("max_tokens") or 16)
        tokens = min(requested, b.stop_after) if b.stop_after is not None else requested
        # Field set and sizes like vLLM's chunks (~200 bytes), so parsing costs are realistic.
        base = {
            "id": "cmpl-6f1c2a9e0d8b4b7fa3e5c1d2b9a87f60",
            "created": 1767225600,
            "model": body.get("model", "stub"),
        }
        base["object"] = "chat.completion.chunk" if chat else "text_completion"

        def choice(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {"role": "assistant"} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        frames = []
        if b.empty_first_chunk:
            frames.append(self._frame({**base, "choices": [choice(None, None)]}))
        sent = 0
        while sent < tokens:
            n = min(b.tokens_per_chunk, tokens - sent)
            sent += n
            finish = ("length" if tokens == requested else "stop") if sent == tokens else None
            chunk = {**base, "choices": [choice(b.token_text * n, finish)]}
            if finish and b.usage and b.usage_on_last_chunk:
                chunk["usage"] = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
            frames.append(self._frame(chunk))
        tail = []
        if b.usage and not b.usage_on_last_chunk:
            usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
            tail.append(self._frame({**base, "choices": [], "usage": usage}))
        if b.done_marker:
            tail.append(self._frame("[DONE]"))
        if b.chunked:
            tail.append(b"0\r\n\r\n")
        return frames, tail

    # --- connection handling ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
                if path == "/stats":
                    # Server-side timestamps (perf_counter: CLOCK_MONOTONIC, comparable across
                    # processes) for the TTFT-overhead bench.
                    stats = json.dumps({r.request_id: [r.received_s, r.first_chunk_s] for r in self.requests})
                    payload = stats.encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                    continue
                seen = StubRequest(path, body, headers.get("x-request-id", ""), time.perf_counter())
                self.requests.append(seen)
                if not await self._respond(path, body, seen, writer):
                    return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _respond(self, path: str, body: dict, seen: StubRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open for the next one."""
        b = self.behavior
        if b.hang:
            await asyncio.sleep(3600)
        status = b.status
        if b.fail_every and len(self.requests) % b.fail_every == 0:
            status = 503
        if status != 200:
            payload = json.dumps({"error": {"message": "stub failure", "code": status}}).encode()
            writer.write(
                f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            return True
        framing = "Transfer-Encoding: chunked\r\n" if b.chunked else "Connection: close\r\n"
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{framing}\r\n".encode())
        frames, tail = self._frames(path, body)
        if b.drop_after_chunks is not None:
            frames, tail = frames[: b.drop_after_chunks], []
        if b.empty_first_chunk and frames:
            # Like transformers serve's role-only chat chunk: sent before any token exists.
            writer.write(frames.pop(0))
        if b.ttft_s:
            await asyncio.sleep(b.ttft_s)
        if b.batch_step_s is not None and frames:
            stream = _Stream(writer, frames, tail, asyncio.get_running_loop().create_future(), seen)
            self._streams.add(stream)
            await stream.done
        else:
            for i, frame in enumerate(frames):
                if i and b.itl_s:
                    await asyncio.sleep(b.itl_s)
                writer.write(frame)
                if seen.first_chunk_s is None:
                    seen.first_chunk_s = time.perf_counter()
            writer.write(b"".join(tail))
            await writer.drain()
        return b.chunked and b.drop_after_chunks is None

    async def _tick(self) -> None:
        """One decode step per `batch_step_s`: every open stream gets its next frame."""
        step = self.behavior.batch_step_s or 0.0
        while True:
            await asyncio.sleep(step)
            now = time.perf_counter()
            for s in list(self._streams):
                s.writer.write(s.frames[s.next_frame])
                if s.seen.first_chunk_s is None:
                    s.seen.first_chunk_s = now
                s.next_frame += 1
                if s.next_frame == len(s.frames):
                    # The usage chunk, [DONE] and the terminator follow the last token at once.
                    s.writer.write(b"".join(s.tail))
                    self._streams.discard(s)
                    s.done.set_result(None)


@contextlib.contextmanager
def running_stub(behavior: StubBehavior | None = None) -> Iterator[StreamStub]:
    """The stub on its own event loop in a thread, for code under test that runs its own loop."""
    stub = StreamStub(behavior)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(stub.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="stream-stub", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield stub
    finally:
        asyncio.run_coroutine_threadsafe(stub.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
