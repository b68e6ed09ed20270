"""The content-addressed stage cache: one directory per (stage kind, key), complete or absent.

A stage writes into a temporary sibling directory and renames it into place only after it
finished, so an interrupted build leaves nothing that looks complete; `stage.json` inside an
entry records what the stage reported. A per-entry lock file keeps two concurrent builds of the
same recipe from computing one entry twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from forge.errors import ForgeError, InfraError, InputError

DEFAULT_ROOT = Path("artifacts/.cache")


@dataclass(frozen=True)
class Cache:
    root: Path

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / "stage.json").is_file()

    def report(self, kind: str, key: str) -> dict:
        return json.loads((self.entry(kind, key) / "stage.json").read_text())

    @contextmanager
    def _locked(self, kind: str, key: str) -> Iterator[None]:
        lock_path = self.root / kind / f".{key}.lock"
        make_dirs(lock_path.parent)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def run(self, kind: str, key: str, produce: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
        """Return (entry dir, stage report, was_cached); run `produce(tmp_dir)` only when absent.

        `produce` fills the directory and returns JSON-able facts; they are stored in
        `stage.json` with the seconds it took.
        """
        final = self.entry(kind, key)
        with self._locked(kind, key):
            if self.has(kind, key):
                return final, self.report(kind, key), True
            # Under the lock no one else writes this key, so any temporary directory of it is
            # what a killed build left behind (SIGKILL, OOM, power): reclaim the space.
            for stale in final.parent.glob(f".tmp-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".tmp-{key}-{os.getpid()}"
            tmp.mkdir(parents=True)
            started = time.monotonic()
            try:
                facts = produce(tmp)
                report = {"kind": kind, "key": key, "seconds": round(time.monotonic() - started, 3), **facts}
                (tmp / "stage.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
                sync_tree(tmp)  # the bytes reach the disk before the name says "complete"
                shutil.rmtree(final, ignore_errors=True)  # a stale incomplete entry
                os.replace(tmp, final)
                sync_directory(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final, report, False


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so a rename published after it survives a
    power loss with its contents (rename alone orders nothing on ext4/xfs data=ordered)."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                _fsync(os.path.join(directory, name), os.O_RDONLY)
        sync_directory(Path(directory))


def sync_directory(directory: Path) -> None:
    _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> None:
    """mkdir -p, with a one-line error instead of a traceback: a path given as the artifacts or
    cache directory that is a file is the user's mistake (exit 2); anything else (permissions, a
    full disk) is the machine's (exit 3)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(directory, error) from None


def storage_error(path: Path, error: OSError) -> ForgeError:
    if isinstance(error, NotADirectoryError | FileExistsError):
        return InputError(f"{path}: a file is in the way of this directory (check --artifacts-dir / --cache-dir)")
    return InfraError(f"cannot write {path}: {error.strerror or error}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and a rename, so readers see the old or the new
    file, never a torn one."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as sink:
            sink.write(text)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, error) from None
