"""The serving backends, registered explicitly. Each module exposes the same few names:
`USER` (the user its official image can run the server as, from that image's Dockerfile), `PORT`,
`HEALTH_PATH`, `METRICS_PATH`, `TRUST_REMOTE_CODE_FLAG`, `export_format(scheme, target)`, `serve_command(...)`,
and an image (`IMAGE`, or `image(version)` for TensorRT-LLM whose tag follows the recipe)."""

from __future__ import annotations

from types import ModuleType

from forge.backends import lmdeploy, tgi, trtllm, vllm
from forge.quant.scheme import Scheme
from forge.recipe import Target

BACKENDS: dict[str, ModuleType] = {"vllm": vllm, "tgi": tgi, "lmdeploy": lmdeploy, "trtllm": trtllm}


def trtllm_mode(target: Target) -> str:
    """engine for TensorRT-LLM ≤ 1.2.x (trtllm-build was removed after 1.2), pytorch after."""
    return trtllm.resolve_mode(target.trtllm.mode, target.trtllm.version)


def export_format(backend: str, scheme: Scheme, target: Target) -> str:
    return BACKENDS[backend].export_format(scheme, target)


def base_image(backend: str, target: Target) -> str:
    module = BACKENDS[backend]
    return module.image(target.trtllm.version) if backend == "trtllm" else module.IMAGE
