"""Content digests for cache keys, cache manifests and reports.

Hashing a multi-GB checkpoint on every `forge build` would make warm rebuilds slow, so file
digests are memoized by (path, size, mtime_ns, ctime_ns, inode) in `~/.cache/forge/digests.json`
(`FORGE_DIGEST_MEMO` moves it); any change to the file invalidates its entry. A stale digest
would make a changed input look cached, so two holes are closed the way git closes them
(https://git-scm.com/docs/racy-git): ctime is part of the stamp, because tools restore mtime
(`touch -r`, `cp -p`, `tar x`) but nothing can set ctime; and a file changed within the last
`RACY_NS` is hashed but not memoized, because a second write within the same timestamp tick
would leave its whole stamp unchanged.
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
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    digests, changed = {}, False
    for path in paths:
        st = path.stat()
        entry = memo.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == _stamp(st):
            digests[path] = entry["sha256"]
            continue
        digests[path] = sha256_file(path)
        if max(st.st_mtime_ns, st.st_ctime_ns) > time.time_ns() - RACY_NS or _stamp(path.stat()) != _stamp(st):
            continue  # racily clean, or changed while it was read: hash again next time
        memo[str(path)] = {"stamp": _stamp(st), "sha256": digests[path]}
        changed = True
    if changed:
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
            os.replace(tmp, memo_file)
        except OSError:  # a read-only home: the digests stand, they are just computed again next time
            with contextlib.suppress(OSError):
                tmp.unlink()
    return digests


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


def tree_manifest(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every non-directory under `root`: relative path → sha256 and bytes (a symlink: its
    target; links are never followed). For output just written: a file this process already
    hashed with the same stamp is not read again."""
    manifest = {}
    for path, st in _walk(root, exclude):
        if stat.S_ISLNK(st.st_mode):
            manifest[_name(path, root)] = {"symlink": os.readlink(path)}
        else:
            sha256 = _HASHED.get((str(path), _stamp(st))) or sha256_file(path)
            manifest[_name(path, root)] = {"sha256": sha256, "bytes": st.st_size}
    return manifest


def manifest_problem(root: Path, manifest: dict[str, dict], exclude: tuple[str, ...] = ()) -> str | None:
    """Why `root` no longer holds exactly what `manifest` lists, or None. Names, kinds, sizes
    and symlink targets first; then contents through the digest memo, so an unchanged file
    (same size, mtime, ctime, inode) is not read again and any edited one is re-hashed."""
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
