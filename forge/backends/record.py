"""The one description each backend module gives of itself (`RECORD`): everything the rest of forge
asks about a serving stack, so that adding a backend is one module plus one line in
`forge.backends.MODULES`, and the recipe's `targets[].backend` choices, its JSON Schema and
`forge.backends.BACKENDS` all derive from the records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recipe imports the backends' names: no import of it at run time here
    from forge.gpus import GPUProfile
    from forge.quant.scheme import Scheme
    from forge.recipe import Target


@dataclass(frozen=True)
class BackendRecord:
    name: str  # the recipe's `targets[].backend`
    image: Callable[[Target], str]  # the official serving image for a target (TensorRT-LLM's follows its version)
    port: int  # what the server listens on inside its image
    health_path: str  # answers 200 once the model is loaded (readiness / startup probes)
    user: str  # what the official image can run the server as (`root` or `uid[:gid]`), from its Dockerfile
    trust_remote_code_flag: str | None  # the server's flag, None where it has none
    loadgen_flavor: str  # how forge's load generator fixes output lengths for it (forge.loadgen FLAVORS)
    export_format: Callable[[Scheme, Target], str]  # the forge.formats writer whose checkpoint it loads
    serve_command: Callable[[str, Scheme, Target], list[str]]  # the server's argv for a model path
    problems: Callable[[Scheme, GPUProfile, str | None], str | None]  # why it cannot serve (scheme, GPU, mode)


def compat_rule(name: str) -> Callable[[Scheme, GPUProfile, str | None], str | None]:
    """The backend's rule in `forge.compat.BACKEND_RULES`, looked up when called (compat imports the
    TensorRT-LLM module, so it cannot be imported while the backends load)."""

    def problems(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
        from forge.compat import BACKEND_RULES

        return BACKEND_RULES[name](scheme, gpu, mode)

    problems.__name__ = f"{name}_problems"
    return problems
