"""Reproducible, uncompressed tar layers, streamed to disk and hashed in the same pass.

Model weights are already high-entropy, so gzip would cost minutes of CPU for a few percent; the
layers stay uncompressed (`application/vnd.oci.image.layer.v1.tar`), which also makes the blob
digest equal to the layer's diff_id (https://github.com/opencontainers/image-spec/blob/v1.1.0/config.md#layer-diffid).

Reproducibility follows https://reproducible-builds.org/docs/archives/: entries sorted by path,
mtime from SOURCE_DATE_EPOCH (else 0), uid/gid 0 with empty user/group names, fixed modes, and
PAX headers (POSIX.1-2001) only where ustar cannot hold a value, e.g. sizes ≥ 8 GiB.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from forge.errors import InputError

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755

# ustar stores the size in 11 octal digits, so 8**11 - 1 bytes (8 GiB - 1) is the largest plain
# header; bigger members need a PAX "size" record (https://pubs.opengroup.org/onlinepubs/9699919799/utilities/pax.html#tag_20_92_13_03).
USTAR_MAX_SIZE = 8**11 - 1

# Read/write unit when copying file contents into the tar; bounds memory per layer being written.
_COPY_BUFSIZE = 1 << 20

# Runtimes read `.wh.<name>` entries as deletions of `<name>` in lower layers
# (https://github.com/opencontainers/image-spec/blob/v1.1.0/layer.md#whiteouts), so a model file
# with that prefix would silently delete a file from the base image.
_WHITEOUT_PREFIX = ".wh."


@dataclass(frozen=True)
class Entry:
    """One member of a layer: `member` is its path inside the image (relative, no `..`);
    `source` is the file whose bytes it carries, or None for a directory."""

    member: str
    source: Path | None


@dataclass(frozen=True)
class Layer:
    """A layer blob written to disk. `digest` is `sha256:<hex>` of the tar, which is both the blob
    digest and the diff_id because the tar is not compressed."""

    path: Path
    digest: str
    size: int
    members: tuple[str, ...]


def source_date_epoch() -> int:
    """The timestamp for every mtime and `created` field: SOURCE_DATE_EPOCH if set, else 0, so
    the same inputs always give the same bytes (https://reproducible-builds.org/specs/source-date-epoch/)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return 0
    raw = raw.strip()
    if not raw.isdigit():
        raise InputError(f"SOURCE_DATE_EPOCH: {raw!r} is not a non-negative integer of seconds since 1970")
    return int(raw)


def sanitize_member(path: str) -> str:
    """A member path that cannot escape the root when extracted: leading `/` and `.` parts are
    dropped; `..`, empty paths, NUL bytes and whiteout names are refused rather than rewritten,
    because silently changing where a file lands would hide a packaging mistake."""
    if "\0" in path:
        raise InputError(f"layer path {path!r} contains a NUL byte")
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("/", ".")]
    if not parts:
        raise InputError(f"layer path {path!r} is empty after normalization")
    if ".." in parts:
        raise InputError(f"layer path {path!r} contains '..'; paths must stay inside the image")
    for part in parts:
        if part.startswith(_WHITEOUT_PREFIX):
            raise InputError(f"layer path {path!r}: names starting with '.wh.' are OCI whiteouts")
    return "/".join(parts)


def file_entries(source: Path, member: str) -> list[Entry]:
    """Entries placing one file at `member`. Symlinks are followed (Hugging Face snapshots are
    symlinks into a blob store), so the layer carries the bytes, never a dangling link."""
    resolved = Path(source).resolve()
    if not resolved.is_file():
        raise InputError(f"{source}: not a regular file")
    return [Entry(sanitize_member(member), resolved)]


def tree_entries(source_dir: Path, prefix: str) -> list[Entry]:
    """Entries for every file and directory under `source_dir`, placed under `prefix`."""
    root = Path(source_dir)
    if not root.is_dir():
        raise InputError(f"{source_dir}: not a directory")
    prefix = sanitize_member(prefix)
    entries = [Entry(prefix, None)]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                raise InputError(f"{here / name}: symlinked directories are not packaged; copy the target")
            rel = (here / name).relative_to(root).as_posix()
            entries.append(Entry(sanitize_member(f"{prefix}/{rel}"), None))
        for name in filenames:
            rel = (here / name).relative_to(root).as_posix()
            entries.extend(file_entries(here / name, f"{prefix}/{rel}"))
    return entries


def tarinfo_for(member: str, *, size: int, is_dir: bool, executable: bool, mtime: int) -> tarfile.TarInfo:
    """The normalized header for one member: owner root with no names, fixed modes, one mtime."""
    info = tarfile.TarInfo(member)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = DIR_MODE if is_dir else (EXEC_MODE if executable else FILE_MODE)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes, so the digest needs no second read."""

    def __init__(self, file) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Adds an entry for every missing parent directory so each layer is self-contained (a runtime
    would otherwise create the parents with its own default modes), then sorts by path."""
    by_member: dict[str, Entry] = {}
    for entry in entries:
        previous = by_member.get(entry.member)
        if previous is not None and previous != entry:
            raise InputError(f"layer path {entry.member!r} is given twice with different contents")
        by_member[entry.member] = entry
        parts = entry.member.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_member.setdefault(parent, Entry(parent, None))
            if existing.source is not None:
                raise InputError(f"layer path {parent!r} is both a file and a directory")
    return [by_member[m] for m in sorted(by_member)]


def write_layer(entries: Iterable[Entry], dest_dir: Path, *, mtime: int | None = None) -> Layer:
    """Writes the entries as one tar in `dest_dir`, named by its sha256 hex digest.

    The tar is written to a temporary file and renamed into place, so a crash never leaves a
    blob whose name does not match its contents. File bytes are copied in 1 MiB pieces, so memory
    stays flat whatever the file size."""
    mtime = source_date_epoch() if mtime is None else mtime
    members = _with_parents(entries)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".layer-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUFSIZE) as tar:
                for entry in members:
                    _add_entry(tar, entry, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        hexdigest = writer.hexdigest()
        final = dest_dir / hexdigest
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Layer(final, f"sha256:{hexdigest}", writer.size, tuple(e.member for e in members))


def _add_entry(tar: tarfile.TarFile, entry: Entry, mtime: int) -> None:
    if entry.source is None:
        tar.addfile(tarinfo_for(entry.member, size=0, is_dir=True, executable=True, mtime=mtime))
        return
    with open(entry.source, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{entry.source}: not a regular file")
        executable = bool(st.st_mode & 0o111)
        info = tarinfo_for(entry.member, size=st.st_size, is_dir=False, executable=executable, mtime=mtime)
        tar.addfile(info, f)


def write_file_layer(source: Path, member: str, dest_dir: Path, *, mtime: int | None = None) -> Layer:
    """One layer holding one file (plus its parent directories): the unit for model weights, so
    a changed shard re-uploads only that shard."""
    return write_layer(file_entries(source, member), dest_dir, mtime=mtime)


def write_tree_layer(source_dir: Path, prefix: str, dest_dir: Path, *, mtime: int | None = None) -> Layer:
    """One layer holding a whole directory tree under `prefix` (launch scripts, configs)."""
    return write_layer(tree_entries(source_dir, prefix), dest_dir, mtime=mtime)
