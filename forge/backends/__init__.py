"""The serving backends, registered explicitly. Each module exposes the same few names:
`IMAGE`, `PORT`, `HEALTH_PATH`, `export_format(scheme, target)` and `serve_command(...)`."""

from __future__ import annotations

from types import ModuleType

from forge.backends import lmdeploy, tgi, vllm
from forge.quant.scheme import Scheme
from forge.recipe import Target

BACKENDS: dict[str, ModuleType] = {"vllm": vllm, "tgi": tgi, "lmdeploy": lmdeploy}


def trtllm_mode(target: Target) -> str:
    """engine for TensorRT-LLM ≤ 1.2.x (trtllm-build was removed after 1.2), pytorch after."""
    if target.trtllm.mode:
        return target.trtllm.mode
    major_minor = tuple(int(p) for p in target.trtllm.version.split(".")[:2])
    return "engine" if major_minor <= (1, 2) else "pytorch"


def export_format(backend: str, scheme: Scheme, target: Target) -> str:
    if backend == "trtllm":
        # engine mode builds from the legacy checkpoint; the PyTorch backend loads ModelOpt's export.
        return "trtllm-checkpoint" if trtllm_mode(target) == "engine" else "modelopt"
    return BACKENDS[backend].export_format(scheme, target)
