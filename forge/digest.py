"""Content digests for cache keys and reports.

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

import hashlib
import json
import os
import time
from pathlib import Path

_CHUNK = 1 << 20
# Linux stamps files from a coarse clock (one jiffy, up to 10 ms) and some filesystems keep 1-2 s
# (FAT: 2 s); a file younger than this may still change without its stamp changing.
RACY_NS = 2_000_000_000


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    value = sha256_file(path)
    if max(st.st_mtime_ns, st.st_ctime_ns) > time.time_ns() - RACY_NS:
        return value  # racily clean: hash again next time
    memo[str(path)] = {"stamp": stamp, "sha256": value}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
    os.replace(tmp, memo_file)
    return value


def file_digests(directory: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
