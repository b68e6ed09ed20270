"""The serving backends: one module each, describing itself in one `RECORD` (`forge.backends.record`:
image, port, health path, container user, trust-remote-code flag, load-generator flavour, export
format, serve command, what it cannot serve). Adding a backend is its module plus one entry in
MODULES; the recipe's `targets[].backend` choices (and so its JSON Schema) come from BACKEND_NAMES."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from forge.backends import lmdeploy, tgi, trtllm, vllm
from forge.backends.record import BackendRecord

if TYPE_CHECKING:
    from forge.quant.scheme import Scheme
    from forge.recipe import Target

MODULES: tuple[ModuleType, ...] = (vllm, tgi, lmdeploy, trtllm)
RECORDS: dict[str, BackendRecord] = {module.RECORD.name: module.RECORD for module in MODULES}
BACKEND_NAMES: tuple[str, ...] = tuple(RECORDS)
# name → module, for the module-level helpers a backend has beyond its record (TensorRT-LLM's engine build).
BACKENDS: dict[str, ModuleType] = {module.RECORD.name: module for module in MODULES}


def trtllm_mode(target: Target) -> str | None:
    """TensorRT-LLM's way of serving: engine for ≤ 1.2.x (trtllm-build was removed after 1.2),
    pytorch after; None for the other backends, which have one."""
    if target.backend != "trtllm":
        return None
    return trtllm.resolve_mode(target.trtllm.mode, target.trtllm.version)


def export_format(backend: str, scheme: Scheme, target: Target) -> str:
    return RECORDS[backend].export_format(scheme, target)


def base_image(backend: str, target: Target) -> str:
    return RECORDS[backend].image(target)
