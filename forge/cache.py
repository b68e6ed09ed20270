"""The content-addressed stage cache: one directory per (stage kind, key), complete or absent.

A stage writes into a temporary sibling directory and renames it into place only after it
finished, so an interrupted build leaves nothing that looks complete; `stage.json` inside an
entry records what the stage reported. A per-entry lock file keeps two concurrent builds of the
same recipe from computing one entry twice.

The cache is checked, not trusted. `stage.json` also holds the entry's manifest: the sha256 and
size of every file in it. A cached entry is verified against its manifest before it is served
(through the digest memo, so an unchanged file costs one stat; an entry's digests are memoized
as it is stored, so this holds from the first build that finds it); an entry that fails (a file
edited, added or removed since, e.g. through an artifact's hard link, or an entry from a forge
without manifests) is discarded and recomputed, and the build says so. The files of an entry are
made read-only (unless they are hard links to files outside it), so an in-place edit through an
artifact directory's hard link fails instead of editing the cache. What this cannot stop: a
writer that rewrites a file *and* its manifest; a shared cache must be writable only by trusted
builders.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from forge.digest import manifest_problem, memoize_written, settled_clock, tree_manifest
from forge.errors import ForgeError, InfraError, InputError

STAGE_JSON = "stage.json"


def warn_discarded(kind: str, key: str, problem: str) -> None:
    print(f"forge: cache entry {kind}/{key} failed verification ({problem}); discarded, recomputing", file=sys.stderr)


@dataclass(frozen=True)
class Cache:
    root: Path
    # Called with (kind, key, problem) when a cached entry fails verification and is discarded.
    on_discard: Callable[[str, str, str], None] = field(default=warn_discarded, compare=False, repr=False)

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / STAGE_JSON).is_file()

    def report(self, kind: str, key: str) -> dict:
        report = json.loads((self.entry(kind, key) / STAGE_JSON).read_text())
        report.pop("manifest", None)
        return report

    def problem(self, kind: str, key: str) -> str | None:
        """Why the complete entry cannot be served as it is, or None when it matches its manifest."""
        entry = self.entry(kind, key)
        if entry.is_symlink():
            return "the entry is a symbolic link"
        try:
            report = json.loads((entry / STAGE_JSON).read_text())
        except (OSError, ValueError) as error:
            return f"{STAGE_JSON} unreadable: {error}"
        if not isinstance(report, dict) or (report.get("kind"), report.get("key")) != (kind, key):
            return f"{STAGE_JSON} describes another entry"
        if not isinstance(report.get("manifest"), dict):
            return "no manifest (written by an older forge)"
        try:
            return manifest_problem(entry, report["manifest"], exclude=(STAGE_JSON,))
        except OSError as error:
            return f"unreadable: {error}"

    @contextmanager
    def _locked(self, kind: str, key: str) -> Iterator[None]:
        with lock_file(self.root / kind / f".{key}.lock"):
            yield

    def run(self, kind: str, key: str, produce: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
        """Return (entry dir, stage report, was_cached); run `produce(tmp_dir)` only when absent
        or when the entry fails verification.

        `produce` fills the directory and returns JSON-able facts; they are stored in
        `stage.json` with the seconds it took and the manifest of what it wrote.
        """
        final = self.entry(kind, key)
        with self._locked(kind, key):
            if self.has(kind, key):
                problem = self.problem(kind, key)
                if problem is None:
                    return final, self.report(kind, key), True
                self.on_discard(kind, key, problem)
                remove_entry(final)  # never left where `has` would still count it
            # Under the lock no one else writes this key, so any temporary directory of it is
            # what a killed build left behind (SIGKILL, OOM, power): reclaim the space.
            for stale in final.parent.glob(f".tmp-{key}-*"):
                remove(stale)
            tmp = final.parent / f".tmp-{key}-{os.getpid()}"
            tmp.mkdir(parents=True)
            started = time.monotonic()
            try:
                facts = produce(tmp)
                report = {"kind": kind, "key": key, "seconds": round(time.monotonic() - started, 3), **facts}
                stamps: dict[str, os.stat_result] = {}
                manifest = tree_manifest(tmp, stamps=stamps)
                (tmp / STAGE_JSON).write_text(
                    json.dumps({**report, "manifest": manifest}, indent=2, sort_keys=True) + "\n"
                )
                make_read_only(tmp)
                sync_tree(tmp)  # the bytes reach the disk before the name says "complete"
                clock = settled_clock(tmp)  # after the last chmod: for the memo, below
                remove_entry(final)  # an incomplete entry (no stage.json) from a foreign writer
                os.replace(tmp, final)
                sync_directory(final.parent)
            except BaseException:
                remove(tmp)
                raise
            # The next build verifies this entry through the digest memo: filled now, it reads no file.
            memoize_written(final, manifest, stamps, clock, exclude=(STAGE_JSON,))
            return final, report, False


@contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, created if absent. Never follows a symlink (one planted in a
    shared cache would make a plain `open(path, "w")` truncate its target) and never truncates."""
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as error:
        if os.path.islink(path):
            raise InfraError(f"{path}: the lock file is a symbolic link; forge never follows one (remove it)") from None
        raise storage_error(path, error) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InfraError(f"{path}: the lock file is not a regular file (remove it)")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_entry(entry: Path) -> None:
    """Take an entry away at once (a rename under the entry's lock), then delete it: a reader
    never finds half of it, and a kill mid-way leaves a `.tmp-` name the next run reclaims."""
    if os.path.lexists(entry):
        aside = entry.with_name(f".tmp-{entry.name}-old-{os.getpid()}")
        os.replace(entry, aside)
        remove(aside)


def remove(path: Path) -> None:
    """Remove a file, symlink or directory tree, whatever is there (nothing: fine)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        Path(path).unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def make_read_only(root: Path) -> None:
    """Clear the write bits of every regular file under `root` that has no other hard link: an
    in-place edit through an artifact directory's hard link then fails (for anyone but root;
    verification catches the rest). A file linked from elsewhere (a base image blob) is not
    forge's to change."""
    for here, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o222)


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
        tmp.unlink(missing_ok=True)  # a leftover, or a planted symlink: never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with open(fd, "w") as sink:
            sink.write(text)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, error) from None
