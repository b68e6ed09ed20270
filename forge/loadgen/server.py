"""Launch `transformers serve` for a local model directory: the real OpenAI-compatible server that
runs on a CPU-only machine (https://huggingface.co/docs/transformers/main/en/serving), so sweeps
and tests exercise a real stack.

Facts from transformers 5.17 `transformers/cli/serve.py` and `cli/serving/`:
- `transformers serve [FORCE_MODEL]`: a local directory works as FORCE_MODEL and is preloaded
  before the server listens, so `/health` answering 200 means the model is loaded.
- With a forced model, requests must name that exact string (or omit `model`); anything else is
  rejected with 400 "Server is pinned to ...". So the model name to send is the path as passed.
- `/v1/models` scans the HF cache and does not list a forced local directory: poll `/health`.
- `--host` defaults to localhost, `--port` to 8000; `--continuous-batching`, `--device cpu`.
- Needs the `serving` extra: fastapi, uvicorn, openai (`is_serve_available`).
- With `--continuous-batching` and no `--cb-num-blocks`, the paged KV cache is sized from a fraction
  of *device* memory; on CPU that is system RAM, and a 2-layer test model grabbed 21 GB RSS on a
  24 GB machine. So CPU launches always pass an explicit, small cache (`cpu_cache_tokens`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from forge.errors import InfraError, InputError

_SERVING_MODULES = ("fastapi", "uvicorn", "openai")
# Paged-cache shape for CPU launches: small blocks so a few short test requests fit many times over.
_CPU_BLOCK_SIZE = 32
_CPU_MAX_BATCH_TOKENS = 1024
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class RunningServer:
    """A server forge started: where to send requests, what to call the model, how it was launched."""

    base_url: str
    model: str
    argv: list[str]
    log_path: Path
    pid: int


def launch_argv(server: RunningServer) -> list[str]:
    """The exact command line of a running server, for the report."""
    return list(server.argv)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process could still race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def transformers_cli() -> str:
    """The `transformers` console script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("transformers")
    found = str(beside) if beside.exists() else shutil.which("transformers")
    if not found:
        raise InfraError(
            "transformers serve: the `transformers` command is not installed (pip install 'transformers[serving]')"
        )
    return found


def check_serving_installed() -> None:
    missing = [m for m in _SERVING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise InfraError(
            f"transformers serve: missing {', '.join(missing)}; install with pip install 'transformers[serving]'"
        )


def transformers_serve_argv(
    model_dir: Path | None,
    port: int,
    *,
    host: str = "127.0.0.1",
    device: str = "cpu",
    continuous_batching: bool = True,
    cpu_cache_tokens: int = 8192,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv for `transformers serve` pinned to one local model directory (None: any model a request names).

    `cpu_cache_tokens` bounds the continuous-batching KV cache on CPU (see the module doc); it must
    hold concurrency × (prompt + output) tokens of the sweep.
    """
    pinned = [] if model_dir is None else [str(model_dir)]
    argv = [transformers_cli(), "serve", *pinned, "--host", host, "--port", str(port)]
    argv += ["--device", device]
    if not continuous_batching:
        return argv + ["--no-continuous-batching", *extra_args]
    argv.append("--continuous-batching")
    if device == "cpu":
        argv += ["--cb-block-size", str(_CPU_BLOCK_SIZE)]
        argv += ["--cb-num-blocks", str(max(1, cpu_cache_tokens // _CPU_BLOCK_SIZE))]
        argv += ["--cb-max-batch-tokens", str(_CPU_MAX_BATCH_TOKENS)]
    return argv + list(extra_args)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    # Progress bars rewrite one line with \r; keep only what the last rewrite left.
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(cleaned[-lines:])


def kept_log(log_path: Path) -> Path:
    """Where a dead server's log survives: a log inside a cache entry being made (`.tmp-…`) is
    removed with it when the stage fails, so it is copied first to $FORGE_CRASH_DIR (default: the
    temporary directory), where forge's crash reports go. Returns the path to name in the error."""
    if not any(part.startswith(".tmp-") for part in log_path.parts) or not log_path.is_file():
        return log_path
    directory = Path(os.environ.get("FORGE_CRASH_DIR") or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"forge-server-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".log", dir=directory)
    with os.fdopen(fd, "wb") as kept, log_path.open("rb") as log:
        shutil.copyfileobj(log, kept)
    return Path(name)


def wait_healthy(
    base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float,
    health_path: str = "/health", name: str = "transformers serve",
) -> None:  # fmt: skip
    """Poll the health path until it answers 200; fail fast if the process exits, with its log tail."""
    import urllib.error
    import urllib.request  # http.client, email, ssl: only once a server runs, not in every build

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InfraError(
                f"{name} exited with code {proc.returncode} before becoming healthy; "
                f"log {kept_log(log_path)}:\n{log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}{health_path}", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise InfraError(
        f"{name} did not answer {base_url}{health_path} within {timeout_s:g} s; "
        f"log {kept_log(log_path)}:\n{log_tail(log_path)}"
    )


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers past `grace_s`.

    The server runs in its own session (start_new_session), so the group is exactly what we started.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGTERM when `parent` dies, SIGKILL included, so a killed
    build leaves no server behind (Linux `prctl(2)` PR_SET_PDEATHSIG; elsewhere nothing). The signal
    follows the thread that forked; forge starts servers from its main thread."""

    def arm() -> None:
        if sys.platform != "linux":
            return
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def start_server(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start a server in its own session (so `stop_process` stops exactly its process group), its
    output appended to `log_path`, with plain output: no colour codes in the kept log. The server
    dies with this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509 - only prctl and getppid run there
            env={**os.environ, "NO_COLOR": "1", "TERM": "dumb"},
        )


def model_directory(model_dir: Path) -> Path:
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model: {model_dir} is not a model directory (no config.json)")
    return model_dir


@contextlib.contextmanager
def serve_transformers(
    model_dir: Path,
    log_path: Path,
    *,
    device: str = "cpu",
    continuous_batching: bool = True,
    cpu_cache_tokens: int = 8192,
    startup_timeout_s: float = 180.0,
    extra_args: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Run `transformers serve` on a free 127.0.0.1 port for the duration of the block.

    The log file is kept after the server stops: it is the first thing to read when a sweep
    reports errors. Raises InfraError (exit 3) with the log tail if the server dies or never
    becomes healthy.
    """
    model_dir = model_directory(model_dir)
    check_serving_installed()
    host = "127.0.0.1"
    port = free_port(host)
    argv = transformers_serve_argv(
        model_dir,
        port,
        host=host,
        device=device,
        continuous_batching=continuous_batching,
        cpu_cache_tokens=cpu_cache_tokens,
        extra_args=extra_args,
    )
    log_path.unlink(missing_ok=True)
    base_url = f"http://{host}:{port}"
    proc = start_server(argv, log_path)
    try:
        wait_healthy(base_url, proc, log_path, startup_timeout_s)
        yield RunningServer(base_url=base_url, model=str(model_dir), argv=argv, log_path=log_path, pid=proc.pid)
        check_running(proc, log_path)
    finally:
        stop_process(proc)


def check_running(proc: subprocess.Popen, log_path: Path) -> None:
    if proc.poll() is not None:
        raise InfraError(
            f"transformers serve died during the run (exit {proc.returncode}); "
            f"log {kept_log(log_path)}:\n{log_tail(log_path)}"
        )


SCRATCH_PREFIX = ".tmp-served-"  # + the owning process id


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SharedServer:
    """One `transformers serve` for every CPU measurement of a build (lm-eval tasks, load sweeps).

    Starting the server costs about as much as loading a small model (Python, torch and FastAPI
    imports: 5-10 s here), and a build measures up to five models, so the server starts once, with
    no pinned model, and each measurement names its model directory: transformers serve loads the
    model a request names, a local path included (`ModelManager.load_model_and_processor`).
    `POST /load_model` loads it before the measurement, so no measured request waits for a load,
    and `POST /reset` unloads it after, so one model is in memory at a time. Each measurement's
    part of the server log is copied to its own log file, as a server of its own would have written.
    """

    def __init__(self, startup_timeout_s: float = 180.0, scratch_root: Path | None = None):
        self.startup_timeout_s = startup_timeout_s
        self.scratch_root = scratch_root  # None: the temporary directory
        self.log_path: Path | None = None  # in a temporary directory made at the first start
        self.keep_log = False  # a measurement failed while served: `close` leaves the log for reading
        self.proc: subprocess.Popen | None = None
        self.healthy = False  # the running server has answered its health path
        self.scratch_dir: Path | None = None
        self.base_url, self.argv = "", []

    def launch(self) -> None:
        """Start the server without waiting for it (its imports then overlap the build's own work);
        `serving` waits until it answers. Nothing to do while one runs."""
        if self.proc is not None and self.proc.poll() is None:
            return
        check_serving_installed()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="forge-serve-")) / "transformers-serve.log"
        host = "127.0.0.1"
        port = free_port(host)
        self.argv = transformers_serve_argv(None, port, host=host)
        self.base_url = f"http://{host}:{port}"
        self.proc = start_server(self.argv, self.log_path)
        self.healthy = False

    @contextlib.contextmanager
    def serving(self, model_dir: Path, log_path: Path) -> Iterator[RunningServer]:
        """The server with `model_dir` loaded, for the duration of the block; its log lines of
        that time land in `log_path`."""
        model_dir = model_directory(model_dir)
        starting = self.proc is not None and self.proc.poll() is None and not self.healthy  # launched early
        offset = 0 if self.log_path is None or starting else self.log_path.stat().st_size
        self.launch()  # first use, or a previous measurement killed it: its start-up lines go to this log
        if not self.healthy:
            wait_healthy(self.base_url, self.proc, self.log_path, self.startup_timeout_s)
            self.healthy = True
        try:
            self.post("/load_model", model_dir, stream=True)
            yield RunningServer(self.base_url, str(model_dir), list(self.argv), self.log_path, self.proc.pid)
            check_running(self.proc, self.log_path)
        except BaseException:
            self.keep_log = True
            raise
        finally:
            try:
                if self.proc.poll() is None:
                    self.post("/reset", model_dir)
            except InfraError:  # a server that cannot unload is not reused: the next measurement starts afresh
                stop_process(self.proc)
            with self.log_path.open("rb") as shared, log_path.open("wb") as own:
                shared.seek(offset)
                shutil.copyfileobj(shared, own)

    def post(self, path: str, model_dir: Path, stream: bool = False) -> None:
        """POST `{"model": model_dir}`; for `/load_model`, read its event stream to the end and fail
        on an `error` event (a model the server cannot load) with the server's log tail."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.base_url}{path}", data=json.dumps({"model": str(model_dir)}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.startup_timeout_s) as response:
                events = [line.removeprefix(b"data: ") for line in response if line.startswith(b"data: ")]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise InfraError(f"transformers serve: {path} failed ({error}); log {kept_log(self.log_path)}:\n"
                             f"{log_tail(self.log_path)}") from None  # fmt: skip
        errors = [e for e in map(json.loads, events) if e.get("status") == "error"] if stream else []
        if errors:
            raise InfraError(f"transformers serve could not load {model_dir}: {errors[0].get('message')}; "
                             f"log {kept_log(self.log_path)}:\n{log_tail(self.log_path)}")  # fmt: skip

    def scratch(self) -> Path:
        """A directory for what the build's measurements share (a model they all serve), removed
        by `close`: under `scratch_root` (the build's cache), named by this process, so the first
        scratch made there also reclaims what a killed build left (its process is gone)."""
        if self.scratch_dir is None:
            root = self.scratch_root or Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"{SCRATCH_PREFIX}*"):
                owner = stale.name.removeprefix(SCRATCH_PREFIX).partition("-")[0]
                if owner.isdigit() and not process_alive(int(owner)):
                    shutil.rmtree(stale, ignore_errors=True)
            self.scratch_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))
        return self.scratch_dir

    def close(self) -> None:
        """Stop the server; its log goes too unless a measurement failed while it served."""
        if self.proc is not None:
            stop_process(self.proc)
        if self.log_path is not None and not self.keep_log:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
            self.scratch_dir = None
