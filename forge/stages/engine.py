"""engine: `trtllm-build` of a TensorRT-LLM checkpoint for one GPU architecture, locally or in the
release container (an engine runs only on the architecture that built it)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from forge.backends.trtllm import Limits
from forge.digest import file_digests
from forge.quant.scheme import Scheme
from forge.stages.base import Run

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    variant: str
    gpu: str  # the GPU profile it is built for
    gpu_sm: str  # that profile's architecture, the one thing of it the engine depends on
    limits: Limits
    scheme: Scheme
    trtllm_version: str


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `export` (the legacy TensorRT-LLM checkpoint for this tensor-parallel degree)."""
    from forge.backends import trtllm
    from forge.gpus import lookup_gpu

    with run.progress.task(f"trtllm-build {inputs.variant} for {inputs.gpu}", total=None):
        built = trtllm.build_engine(run.deps["export"] / "model", run.out / "engine", inputs.limits, inputs.scheme,
                                    lookup_gpu(inputs.gpu), inputs.trtllm_version)  # fmt: skip
    # The command as one shell line, as every other stage record's `command` is (reports print it).
    return {"runner": built.runner, "command": shlex.join(built.command), "engine_key": built.key,
            "files": file_digests(run.out)}  # fmt: skip
