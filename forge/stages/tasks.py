"""tasks: lm-evaluation-harness over the completions API against a served model: the source (the
baseline every recovery is judged against) or a variant's artifact. Recovery gates are applied
when the report is written."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from forge.stages.base import Run, local
from forge.stages.serve import Served, serve_artifact, served_as

VERSION = 2  # 2: lm_eval sends `lm_eval.CONCURRENT_REQUESTS` requests at a time, which the server batches


@dataclass(frozen=True)
class Inputs:
    served: Served
    tasks: tuple[str, ...]
    limit: int | None
    num_fewshot: int | None
    include_digests: dict | None  # the recipe's own task directory, file by file
    include: Path | None = local()  # that directory here

    @property
    def variant(self) -> str | None:
        return self.served.variant


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `model` (the source or the export), `engine` (TensorRT-LLM engine mode), `image` (the
    packaged image, when packaging is on)."""
    from forge.eval.lm_eval import parse_scores, run_lm_eval

    model_dir = run.deps["model"] / "model"
    engine = run.deps["engine"] / "engine" if "engine" in run.deps else None
    image = run.deps["image"] / "layout" if "image" in run.deps else None
    server = serve_artifact(inputs.served, model_dir, engine, run.out, image, run.server)
    with run.progress.task(f"lm-eval {inputs.served.label}: {', '.join(inputs.tasks)}", total=None), server as up:
        results = run_lm_eval(
            f"{up.base_url}/v1/completions", up.model, str(model_dir.resolve()), list(inputs.tasks),
            run.out / "lm_eval", cwd=inputs.include, include_path=inputs.include,
            num_fewshot=inputs.num_fewshot, limit=inputs.limit, worker=run.lm_eval,
        )  # fmt: skip
    shutil.rmtree(run.out / "served-model", ignore_errors=True)
    (run.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return {"variant": inputs.variant, "tasks": list(inputs.tasks), "scores": parse_scores(results),
            "served": served_as(inputs.served, image)}  # fmt: skip
