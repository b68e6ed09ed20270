"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1 for registry tests.

It sits in front of a real registry (tests/registry_server.py) and, per request, forwards it or
applies the first matching `Fault`: cut the connection before or part-way through the request
body, answer a 5xx/429 itself without forwarding, stall or slow the answer, or forward the
request and then cut the connection instead of relaying the registry's answer (the registry did
the work; the client never hears of it). Requests are framed by Content-Length (forge never
sends chunked bodies); responses by Content-Length or chunked encoding.

Every request is logged (`ProxyLog`) with what crossed the proxy, so tests can assert how many
bytes of a blob were sent in all, which is how "resumed" is told apart from "started over".
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# SO_LINGER with a zero timeout: close() sends RST, as a crashed peer or a middlebox would.
_RST = struct.pack("ii", 1, 0)
_IO = 1 << 16


@dataclass
class Fault:
    """What to do to requests matching `method` and `path` (a regex searched in the path, query
    excluded). `skip` matching requests pass untouched first; then the next `times` matching
    requests get `action` (times=None: all of them, e.g. a registry that stays down).

    Actions: `reset` (cut before forwarding), `cut_body` (forward `after_bytes` of the body, then
    cut), `status` (answer `status` without forwarding, with `retry_after` if set), `stall`
    (wait `seconds`, then forward), `throttle` (forward the body at `bytes_per_s`), `corrupt`
    (flip one bit of the body at `after_bytes`), `lose_answer` (forward, wait for the registry's
    answer, then cut instead of relaying it)."""

    action: str
    method: str = ".*"
    path: str = ".*"
    times: int | None = 1
    skip: int = 0
    status: int = 503
    retry_after: str | None = None
    after_bytes: int = 0
    seconds: float = 0.0
    bytes_per_s: float = 0.0
    min_length: int = 0  # only requests whose body is at least this long
    seen: int = 0
    applied: int = 0

    def matches(self, method: str, path: str, length: int) -> bool:
        return (
            re.fullmatch(self.method, method) is not None
            and re.search(self.path, path) is not None
            and length >= self.min_length
        )


@dataclass
class Entry:
    method: str
    path: str
    length: int  # Content-Length of the request
    forwarded: int  # request body bytes that reached the registry
    action: str  # "forward" or the fault applied
    status: int | None = None  # what the client was told (None: connection cut)


@dataclass
class ProxyLog:
    entries: list[Entry] = field(default_factory=list)

    def body_bytes(self, method: str, path: str = ".*") -> int:
        """Request body bytes of `method` requests that reached the registry."""
        return sum(e.forwarded for e in self.entries if e.method == method and re.search(path, e.path))

    def faults(self) -> list[Entry]:
        return [e for e in self.entries if e.action != "forward"]


class FaultProxy:
    """`with FaultProxy("127.0.0.1:5000", [Fault("status", "PUT", times=3)]) as proxy:` then talk
    to `proxy.host`. Faults can be added or replaced while it runs (`proxy.faults = [...]`)."""

    def __init__(self, target: str, faults: list[Fault] | None = None) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.faults = list(faults or [])
        self.log = ProxyLog()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for s in list(self._sockets):
                try:
                    s.close()
                except OSError:
                    pass

    # -- plumbing

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault_for(self, method: str, path: str, length: int) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if not fault.matches(method, path, length):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    return None
                if fault.times is not None and fault.applied >= fault.times:
                    continue
                fault.applied += 1
                return fault
        return None

    def _record(self, entry: Entry) -> None:
        with self._lock:
            self.log.entries.append(entry)

    @staticmethod
    def _cut(*socks: socket.socket | None) -> None:
        for s in socks:
            if s is None:
                continue
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                s.close()
            except OSError:
                pass

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            while not self._closed:
                head = reader.head()
                if head is None:
                    break
                method, target, headers = _parse_request(head)
                path = target.split("?", 1)[0]
                length = int(headers.get("content-length", "0"))
                fault = self._fault_for(method, path, length)
                action = fault.action if fault else "forward"
                entry = Entry(method, path, length, 0, action)
                if action == "reset":
                    self._record(entry)
                    return self._cut(client, upstream)
                if action == "status":
                    reader.skip(length)
                    entry.status = fault.status
                    self._record(entry)
                    client.sendall(_error_response(fault.status, fault.retry_after))
                    continue
                if action == "stall":
                    time.sleep(fault.seconds)
                if upstream is None:
                    upstream = socket.create_connection(self.target)
                    with self._lock:
                        self._sockets.add(upstream)
                upstream.sendall(head)
                limit = fault.after_bytes if action == "cut_body" else None
                rate = fault.bytes_per_s if action == "throttle" else 0.0
                flip = fault.after_bytes if action == "corrupt" else None
                entry.forwarded = reader.relay(upstream, length, limit, rate, flip)
                if action == "cut_body":
                    self._record(entry)
                    return self._cut(client, upstream)
                answer = _read_response(_Reader(upstream), method)
                if action == "lose_answer":
                    self._record(entry)
                    return self._cut(client, upstream)
                entry.status = int(answer.split(b" ", 2)[1])
                self._record(entry)
                client.sendall(answer)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass


class _Reader:
    """Buffered reads from a socket: a head up to CRLFCRLF, then exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(_IO)
        self.buf += data
        return bool(data)

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise OSError("connection closed mid-line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise OSError("connection closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def skip(self, n: int) -> None:
        while n:
            if not self.buf and not self._fill():
                raise OSError("connection closed mid-body")
            piece = min(n, len(self.buf))
            self.buf = self.buf[piece:]
            n -= piece

    def relay(self, dest: socket.socket, n: int, limit: int | None, bytes_per_s: float, flip: int | None) -> int:
        """Copy `n` body bytes to `dest`, stopping after `limit` and inverting the low bit of byte
        `flip`; returns how many were sent."""
        sent = 0
        started = time.monotonic()
        while sent < n:
            if not self.buf and not self._fill():
                raise OSError("connection closed mid-body")
            piece = self.buf[: min(n - sent, len(self.buf), 1 << 14 if bytes_per_s else _IO)]
            if limit is not None and sent + len(piece) >= limit:
                dest.sendall(piece[: limit - sent])
                return limit
            if flip is not None and sent <= flip < sent + len(piece):
                at = flip - sent
                piece = piece[:at] + bytes([piece[at] ^ 1]) + piece[at + 1 :]
                self.buf = piece + self.buf[len(piece) :]
            dest.sendall(piece)
            self.buf = self.buf[len(piece) :]
            sent += len(piece)
            if bytes_per_s:
                ahead = sent / bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        return sent


def _parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _read_response(reader: _Reader, method: str) -> bytes:
    """One whole response (head and body) from the registry, as bytes to relay."""
    head = reader.head()
    if head is None:
        raise OSError("registry closed the connection")
    _, _, headers = _parse_request(head)  # a status line splits like a request line
    status = int(head.split(b" ", 2)[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return head
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = reader.line()
            size = int(size_line.split(b";")[0], 16)
            body += size_line + reader.take(size + 2)
            if size == 0:
                return head + body
    return head + reader.take(int(headers.get("content-length", "0")))


def _error_response(status: int, retry_after: str | None) -> bytes:
    """What an overloaded registry or load balancer answers (dist-spec error body)."""
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by fault_proxy"}]}'
    lines = [f"HTTP/1.1 {status} Injected", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
