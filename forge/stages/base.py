"""What every stage kind shares: its inputs record's key, and the `Run` its function gets.

A stage kind is one module of this package with a `VERSION`, a frozen `Inputs` dataclass and a
function `produce(inputs, run) -> facts`. The record is what the plan decides for the stage and
what is hashed into its cache key, together with the keys of the entries it reads (its
dependencies, by role); the function reads nothing else, so the key cannot drift from the reads.

A field marked `local()` is excluded from the key: it says *where* something is on this machine
(a path, a registry to pull from, a stage id for messages), never *what*: the digest of what it
locates is a keyed field of the same record. Keys are therefore the same on every builder that
shares a cache (a CPU runner and the GPU builder after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from forge.cache import Cache
from forge.digest import json_digest
from forge.eval.lm_eval import Worker
from forge.loadgen.server import SharedServer
from forge.progress import Progress

LOCAL = "local"


def local(default: Any = None) -> Any:
    """A field that locates or labels what a keyed field identifies: left out of the cache key."""
    return field(default=default, metadata={LOCAL: True})


@dataclass(frozen=True)
class Run:
    """What a stage function gets besides its inputs: the entry directory of each dependency by
    role, the directory to write (renamed into the cache once it returns), the progress display,
    the cache (for a measurement shared between entries, as the accuracy stage does) and the
    build's CPU server, shared by every stage that serves a model on this CPU, and its lm_eval
    worker, shared by every stage that runs lm_eval."""

    out: Path
    deps: dict[str, Path]
    progress: Progress
    cache: Cache
    server: SharedServer | None = None  # None: each CPU measurement starts a server of its own
    lm_eval: Worker | None = None  # None: each lm_eval run starts from scratch


def plain(value: Any) -> Any:
    """A record field as JSON-able data (nested dataclasses as dicts, paths and tuples as JSON)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):  # a recipe section (pydantic)
        return value.model_dump(mode="json")
    return value


def key_material(inputs: Any) -> dict:
    """The keyed fields of an inputs record."""
    return {f.name: plain(getattr(inputs, f.name)) for f in fields(inputs) if not f.metadata.get(LOCAL)}


def record_json(inputs: Any) -> dict:
    """Every field of an inputs record, local ones too (`forge plan --json` shows them)."""
    return plain(inputs) if inputs is not None else {}


def stage_key(kind: str, version: int, inputs: Any, deps: dict[str, str]) -> str:
    """The digest of the kind, its code's version, the record's keyed fields and the keys of the
    entries it reads by role."""
    return json_digest({"stage": kind, "version": version, "inputs": key_material(inputs), "deps": deps})
