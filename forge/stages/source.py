"""source: the checkpoint as a Hugging Face model directory (a local copy, a pinned hub revision,
or a GGUF file dequantized once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.digest import file_digests
from forge.stages.base import Run, local

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    identity: dict  # what the checkpoint is: its files' digests, or the hub repo and pinned revision
    source: Any = local()  # the recipe's `source` section: where to read it
    recipe_dir: Path = local()  # relative paths in `source` are relative to it


def produce(inputs: Inputs, run: Run) -> dict:
    from forge.source import materialize_source

    facts = materialize_source(inputs.source, inputs.recipe_dir, run.out / "model")
    return {**facts, "files": file_digests(run.out / "model")}
