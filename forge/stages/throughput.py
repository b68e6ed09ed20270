"""throughput: serve the artifact and sweep the recipe's load (forge.loadgen). Only the load and
the latency SLOs shape the measurement (goodput counts the requests within them); the pure
thresholds and the price are applied when the report is written (forge.stages.gates), so changing
them re-gates and re-prices the cached sweep instead of measuring again."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from forge.stages.base import Run
from forge.stages.serve import Served, serve_artifact, served_as

VERSION = 1


@dataclass(frozen=True)
class Load:
    concurrency: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    requests_per_level: int
    max_ttft_p99_ms: float | None
    max_tpot_p99_ms: float | None


@dataclass(frozen=True)
class Inputs:
    served: Served
    load: Load
    flavor: str  # how the load generator fixes output lengths for this server (forge.loadgen FLAVORS)
    machine: dict | None = None  # the CPU measured on (a GPU's profile is `served.gpu`)

    @property
    def variant(self) -> str | None:
        return self.served.variant


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `model` (the export), `engine` (TensorRT-LLM engine mode), `image` (the packaged image)."""
    from forge.loadgen import SLOs, run_sweep

    load, out = inputs.load, run.out
    slos = SLOs(max_ttft_p99_ms=load.max_ttft_p99_ms, max_tpot_p99_ms=load.max_tpot_p99_ms)
    model_dir = run.deps["model"] / "model"
    engine = run.deps["engine"] / "engine" if "engine" in run.deps else None
    image = run.deps["image"] / "layout" if "image" in run.deps else None
    server = serve_artifact(inputs.served, model_dir, engine, out, image, run.server)
    with run.progress.task(f"load sweep {inputs.served.label}", total=None), server as up:
        result = run_sweep(
            up.base_url, up.model, model_dir, list(load.concurrency), load.prompt_tokens, load.output_tokens,
            load.requests_per_level, out / "sweep", slos, flavor=inputs.flavor, server_argv=up.argv,
        )  # fmt: skip
    shutil.rmtree(out / "served-model", ignore_errors=True)
    sweep = result.to_dict()
    # Paths relative to the cache entry: `out` is a temporary directory renamed once complete.
    sweep["files"] = {name: str(Path(path).relative_to(out)) for name, path in sweep["files"].items()}
    for level in sweep["levels"]:
        level["records_path"] = level["records_path"] and str(Path(level["records_path"]).relative_to(out))
    return {"variant": inputs.variant, "gpu": inputs.served.gpu, "sweep": sweep,
            "served": served_as(inputs.served, image)}  # fmt: skip
