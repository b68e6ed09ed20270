"""baseline: the source model's final hidden states on the evaluation windows, which every
accuracy stage compares its export against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.stages.base import Run, local

VERSION = 3  # 2: final hidden states + output projection instead of fp16 log-probs; 3: + the windows


@dataclass(frozen=True)
class Inputs:
    dataset_sha256: str
    window: int
    max_windows: int | None
    dataset: Path = local()  # the text whose digest is dataset_sha256


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `source` (the checkpoint)."""
    from forge.eval.perplexity import baseline_pass, build_model, load_windows
    from forge.source import read_dense

    source_dir = run.deps["source"] / "model"
    windows = load_windows(inputs.dataset, source_dir, inputs.window, inputs.max_windows)
    config, state = read_dense(source_dir)
    with run.progress.task("baseline perplexity", total=len(windows)) as advance:
        return baseline_pass(build_model(config, state), windows, run.out, progress=advance)
