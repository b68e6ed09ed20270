"""Content digests for cache keys, cache manifests and reports.

Hashing a multi-GB checkpoint on every `forge build` would make warm rebuilds slow, so file
digests are memoized by (path, size, mtime_ns, ctime_ns, inode) in `~/.cache/forge/digests.json`
(`FORGE_DIGEST_MEMO` moves it); any change to the file invalidates its entry. A stale digest
would make a changed input look cached, so two holes are closed the way git closes them
(https://git-scm.com/docs/racy-git): ctime is part of the stamp, because tools restore mtime
(`touch -r`, `cp -p`, `tar x`) but nothing can set ctime; and a file changed within the last
`RACY_NS` is hashed but not memoized, because a second write within the same timestamp tick
would leave its whole stamp unchanged. A cache entry's files are the exception
(`memoize_written`): they are memoized as they are stored, racy or not by the wall clock, when
the filesystem's own clock has moved past their stamp, so the first build that finds the entry
cached reads none of them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from forge.errors import InputError

_CHUNK = 1 << 20
# Linux stamps files from a coarse clock (one jiffy, up to 10 ms) and some filesystems keep 1-2 s
# (FAT: 2 s); a file younger than this may still change without its stamp changing.
RACY_NS = 2_000_000_000
# Digests this process computed, by path and stamp: a stage's output is hashed for its report and
# again for its cache manifest a moment later; the second time is a lookup. Never persisted.
_HASHED: dict[tuple[str, str], str] = {}
# The memo as this process last read or wrote it, by memo file, with that file's stamp then: a
# warm build verifies every cached stage through the memo, and parses it again only when another
# process wrote it. Every entry is a fact about a stamp, so a stale copy can only miss.
_LOADED: dict[str, tuple[str, dict]] = {}


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _sha256(path: Path, max_bytes: int | None = None) -> tuple[str, int] | None:
    """(sha256, bytes read), or None past `max_bytes`: a size from stat can lie (/proc files say
    0; a symlink may point at something that never ends), so the bytes read are counted."""
    before = os.stat(path)
    digest = hashlib.sha256()
    read = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            read += len(chunk)
            if max_bytes is not None and read > max_bytes:
                return None
            digest.update(chunk)
    if _stamp(os.stat(path)) == _stamp(before):  # not changed while it was read
        _HASHED[(str(path), _stamp(before))] = digest.hexdigest()
    return digest.hexdigest(), read


def sha256_file(path: Path) -> str:
    return _sha256(path)[0]


def json_digest(value: object) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _memo_path() -> Path:
    default = Path.home() / ".cache" / "forge" / "digests.json"
    return Path(os.environ.get("FORGE_DIGEST_MEMO", default))


def file_digest(path: Path) -> str:
    """sha256 of a file, memoized by its stat so unchanged inputs are not re-read."""
    path = Path(path).resolve()
    return memoized_digests([path])[path]


def memoized_digests(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file through the memo, which is read and written once for all of them."""
    memo = _read_memo(_memo_path())
    digests, fresh = {}, {}
    for path in paths:
        st = path.stat()
        entry = memo.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == _stamp(st):
            digests[path] = entry["sha256"]
            continue
        digests[path] = sha256_file(path)
        if max(st.st_mtime_ns, st.st_ctime_ns) > time.time_ns() - RACY_NS or _stamp(path.stat()) != _stamp(st):
            continue  # racily clean, or changed while it was read: hash again next time
        fresh[str(path)] = {"stamp": _stamp(st), "sha256": digests[path]}
    _remember(fresh)
    return digests


def _read_memo(memo_file: Path) -> dict:
    """The memo's entries, parsed again only when its file changed since this process last saw it."""
    try:
        stamp = _stamp(os.stat(memo_file))
    except OSError:  # none yet, or a home we cannot read
        _LOADED.pop(str(memo_file), None)
        return {}
    loaded = _LOADED.get(str(memo_file))
    if loaded is not None and loaded[0] == stamp:
        return loaded[1]
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    _LOADED[str(memo_file)] = (stamp, memo)
    return memo


def _remember(fresh: dict[str, dict]) -> None:
    """Add `fresh` entries to the memo: read (if another process changed it), merged, replaced."""
    if not fresh:
        return
    memo_file = _memo_path()
    memo = {**_read_memo(memo_file), **fresh}
    tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, memo_file)
        _LOADED[str(memo_file)] = (_stamp(os.stat(memo_file)), memo)
    except OSError:  # a read-only home: the digests stand, they are just computed again next time
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_digests(directory: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# Directories no recipe input lives in directly; hashing one would read much of the machine.
SYSTEM_DIRECTORIES = frozenset(
    Path(d) for d in ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/mnt", "/opt", "/proc",
                      "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var")
)  # fmt: skip


def refuse_system_directory(directory: Path, key: str) -> None:
    """InputError at `key` when `directory` resolves to a system directory or the home directory."""
    if directory.resolve() in SYSTEM_DIRECTORIES | {Path.home().resolve()}:
        raise InputError(f"{key}: {directory.resolve()} is a system directory; point it at your task YAMLs")


def bounded_file_digests(
    directory: Path, key: str, max_files: int = 20_000, max_bytes: int = 512 << 20
) -> dict[str, dict]:
    """`file_digests` of a directory a recipe names, refused (InputError at `key`) when it is a
    system directory or the home directory, or as soon as it has more than `max_files` files or
    `max_bytes` bytes, so a recipe pointing at `/` cannot make `forge plan` read the whole
    filesystem. Directory symlinks are not followed; file symlinks are, within the byte budget."""
    refuse_system_directory(directory, key)
    too_big = f"{key}: {directory} holds more than {max_files} files or {max_bytes} bytes; point it at your task YAMLs"
    found: list[Path] = []
    for here, dirs, files in os.walk(directory):
        dirs.sort()
        found += [Path(here) / name for name in sorted(files)]
        if len(found) > max_files:
            raise InputError(too_big)
    digests, left = {}, max_bytes
    for path in found:
        if not path.is_file():
            continue  # a socket, a FIFO, a dangling link: not task content
        hashed = _sha256(path, left)
        if hashed is None:
            raise InputError(too_big)
        digests[str(path.relative_to(directory))] = {"sha256": hashed[0], "bytes": hashed[1]}
        left -= hashed[1]
    return digests


# ---------------------------------------------------------------- cache entry manifests


def tree_manifest(
    root: Path, exclude: tuple[str, ...] = (), stamps: dict[str, os.stat_result] | None = None
) -> dict[str, dict]:
    """Every non-directory under `root`: relative path → sha256 and bytes (a symlink: its
    target; links are never followed). For output just written: a file this process already
    hashed with the same stamp is not read again. `stamps`, when given, receives the lstat of
    each file as it was hashed (for `memoize_written`)."""
    manifest = {}
    for path, st in _walk(root, exclude):
        if stat.S_ISLNK(st.st_mode):
            manifest[_name(path, root)] = {"symlink": os.readlink(path)}
        else:
            sha256 = _HASHED.get((str(path), _stamp(st))) or sha256_file(path)
            manifest[_name(path, root)] = {"sha256": sha256, "bytes": st.st_size}
            if stamps is not None:
                stamps[_name(path, root)] = st
    return manifest


def settled_clock(root: Path, marker: Path | None = None, wait_s: float = 0.05) -> int | None:
    """A reading of the clock that stamps the files under `root` (the mtime of `marker`, a file
    created on the same filesystem, then removed; by default in `root`) that is later than every
    file's last change (ctime), so any change after this call gives a file a stamp it never had
    before. Retried for up to `wait_s` while that clock still shows the tick of the last change
    (the kernel's coarse clock ticks every 1-10 ms); None when it has not moved on, as on
    filesystems with 1-2 s timestamps, or on error."""
    try:
        newest = max((st.st_ctime_ns for _path, st in _walk(root, ())), default=0)
        marker = marker or Path(root) / f".clock-{os.getpid()}"
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                now = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
                os.unlink(marker)
            if now > newest:
                return now
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)
    except OSError:
        return None


def memoize_written(
    root: Path, manifest: dict[str, dict], stamps: dict[str, os.stat_result], clock_ns: int | None,
    exclude: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Memoize the digests of a cache entry just stored at `root`, under the paths and stamps its
    verification will see, so the first build that finds it cached reads none of its files.

    Its files were hashed for `manifest` (as `stamps` says) before their write bits were cleared
    and their directory renamed into place: both change what the memo keys on (the chmod the
    ctime, the rename the path), so without this every file was read again on the next build.
    A file is memoized only when its size, mtime and inode are those it was hashed with and its
    stamp is older than `clock_ns`, a reading of the filesystem's own clock taken after the chmod
    (`settled_clock`): any later change, even within the same tick, gives it a ctime of at least
    `clock_ns`, so the memo never vouches for bytes it did not hash (git's racy-clean rule, with the
    filesystem's clock in place of the index file's mtime). Between the hash and the chmod the
    entry is still being written under its lock, where a change could as well have come before
    the hash and be in the manifest."""
    if clock_ns is None:
        return
    root = Path(os.path.abspath(root))
    try:
        found = _walk(root, exclude)
    except OSError:  # the entry stands; it is hashed once more when next verified
        return
    fresh = {}
    for path, st in found:
        name, hashed = _name(path, root), stamps.get(_name(path, root))
        if (
            hashed is not None
            and stat.S_ISREG(st.st_mode)
            and "sha256" in manifest.get(name, {})
            and (st.st_size, st.st_mtime_ns, st.st_ino) == (hashed.st_size, hashed.st_mtime_ns, hashed.st_ino)
            and max(st.st_mtime_ns, st.st_ctime_ns) < clock_ns
        ):
            fresh[str(path)] = {"stamp": _stamp(st), "sha256": manifest[name]["sha256"]}
    _remember(fresh)


def regular_files(root: Path) -> dict[str, os.stat_result]:
    """Absolute path → lstat of every regular file under `root` (for `keep_memoized`)."""
    found = {}
    for here, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.abspath(os.path.join(here, name))
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found[path] = st
    return found


def keep_memoized(before: dict[str, os.stat_result], clock_ns: int | None) -> None:
    """Carry memo entries over a change of stamp that cannot change a file's bytes: hard-linking
    a cache entry's file into an artifact directory (`forge.build.link_tree`) gives it a new ctime,
    and without this the next build read every exported file again (the model-image stage links
    and unlinks them too). `before` maps each file's
    absolute path to its lstat just before the links. An entry moves to the new stamp only when it
    vouched for the old one and size, mtime and inode are unchanged, and the new stamp is older
    than `clock_ns` (`settled_clock`, read after the links), so a later change still shows."""
    if clock_ns is None:
        return
    memo = _read_memo(_memo_path())
    fresh = {}
    for name, old in before.items():
        entry = memo.get(name)
        if not isinstance(entry, dict) or entry.get("stamp") != _stamp(old):
            continue
        try:
            st = os.lstat(name)
        except OSError:
            continue
        unchanged = (st.st_size, st.st_mtime_ns, st.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
        if unchanged and max(st.st_mtime_ns, st.st_ctime_ns) < clock_ns:
            fresh[name] = {"stamp": _stamp(st), "sha256": entry["sha256"]}
    _remember(fresh)


def manifest_problem(root: Path, manifest: dict[str, dict], exclude: tuple[str, ...] = ()) -> str | None:
    """Why `root` no longer holds exactly what `manifest` lists, or None. Names, kinds, sizes
    and symlink targets first; then contents through the digest memo, so an unchanged file
    (same size, mtime, ctime, inode) is not read again and any edited one is re-hashed."""
    root = Path(os.path.abspath(root))  # the memo's keys: one file, whatever the working directory
    found = {_name(path, root): (path, st) for path, st in _walk(root, exclude)}
    if extra := sorted(set(found) - set(manifest)):
        return f"{extra[0]}: not in the entry's manifest (added)"
    if missing := sorted(set(manifest) - set(found)):
        return f"{missing[0]}: in the entry's manifest but missing"
    regular = {}
    for name, (path, st) in sorted(found.items()):
        expected = manifest[name]
        if stat.S_ISLNK(st.st_mode):
            if expected.get("symlink") != os.readlink(path):
                return f"{name}: symbolic link differs from the entry's manifest"
        elif not stat.S_ISREG(st.st_mode) or "sha256" not in expected:
            return f"{name}: not the kind of file the entry's manifest lists"
        elif st.st_size != expected.get("bytes"):
            return f"{name}: {st.st_size} bytes, the entry's manifest says {expected.get('bytes')}"
        else:
            regular[name] = path
    digests = memoized_digests(list(regular.values()))
    for name, path in regular.items():
        if digests[path] != manifest[name]["sha256"]:
            return f"{name}: content differs from the entry's manifest (sha256)"
    return None


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _walk(root: Path, exclude: tuple[str, ...]) -> list[tuple[Path, os.stat_result]]:
    """(path, lstat) of every non-directory under `root` but `exclude`d names, symlinks to
    directories included as links (os.walk lists them among directories and does not enter)."""
    out = []
    for here, dirs, files in os.walk(root):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(here, d))]
        for name in sorted(files) + links:
            path = Path(here) / name
            if _name(path, root) not in exclude:
                out.append((path, path.lstat()))
    return out
