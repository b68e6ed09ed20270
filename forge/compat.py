"""What can run where: the backend × scheme × GPU × model-shape rules, as one readable table.

Checked at plan time, before any download or quantization. Each rule returns the reason a
combination is impossible (naming what would work instead) or None when it is fine.
Sources: ../shared/REFERENCE.md §1 (vLLM, TGI, LMDeploy TurboMind and TensorRT-LLM loaders).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from forge.backends.trtllm import check_trtllm_support
from forge.gpus import GPUProfile
from forge.quant.scheme import Scheme


@dataclass(frozen=True)
class ModelShape:
    """The dimensions quantization and tensor parallelism must divide."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        )

    def input_dims(self, tp: int = 1) -> dict[str, int]:
        """Per-rank input width of each projection kind (row-parallel layers are split by tp)."""
        return {
            "q/k/v/gate/up_proj (hidden_size)": self.hidden_size,
            "o_proj (heads × head_dim / tp)": self.num_heads * self.head_dim // tp,
            "down_proj (intermediate_size / tp)": self.intermediate_size // tp,
        }


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def group_size_problem(scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
    if scheme.weight_format != "int4" or scheme.group_size is None:
        return None
    for layer, width in shape.input_dims(tp).items():
        if width % scheme.group_size:
            fits = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in shape.input_dims(tp).values())]
            hint = f"use group_size {fits[0]}" if fits else "no standard group size fits"
            rank = f" per rank at tensor_parallel {tp}" if tp > 1 else ""
            return f"group size {scheme.group_size} does not divide {layer} = {width}{rank}; {hint}"
    return None


def tensor_parallel_problem(shape: ModelShape, tp: int) -> str | None:
    if shape.num_heads % tp:
        return f"{shape.num_heads} attention heads cannot be split over {tp} GPUs"
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        return f"{shape.num_kv_heads} KV heads can neither be split nor replicated over {tp} GPUs"
    if shape.intermediate_size % tp:
        return f"intermediate_size {shape.intermediate_size} cannot be split over {tp} GPUs"
    return None


def gpu_problem(scheme: Scheme, gpu: GPUProfile) -> str | None:
    cc = ".".join(map(str, gpu.compute_capability))
    if scheme.weight_format == "fp8" and not gpu.fp8:
        return (
            f"{gpu.name} (compute capability {cc}) cannot run FP8 (needs ≥ 8.9: L4, L40S, H100, H200, B200); "
            "use an int4 preset such as AWQ_W4A16"
        )
    if scheme.weight_format == "fp4" and not gpu.fp4:
        return f"{gpu.name} (compute capability {cc}) cannot serve NVFP4 (Blackwell only: B200)"
    if scheme.weight_format == "int4" and gpu.compute_capability < (8, 0):
        return f"{gpu.name} (compute capability {cc}) has no fast int4 kernels (needs Ampere ≥ 8.0)"
    if scheme.kv_cache_dtype == "fp8" and not gpu.fp8:
        return f"{gpu.name} cannot hold an fp8 KV cache efficiently (needs ≥ 8.9); use kv_cache_dtype: auto"
    return None


def vllm_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    if scheme.kv_cache_dtype in ("int8", "int4"):
        return f"vLLM has no {scheme.kv_cache_dtype} KV cache; use kv_cache_dtype fp8 or auto"
    return None


def tgi_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    if scheme.kv_cache_dtype in ("int8", "int4"):
        return f"TGI has no {scheme.kv_cache_dtype} KV cache; use kv_cache_dtype fp8 or auto"
    return None


def lmdeploy_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    # TurboMind: AWQ/GPTQ int4 with group 128 only; FP8 only as 128×128 blocks; KV by --quant-policy.
    if scheme.weight_format == "fp8":
        return "LMDeploy TurboMind takes FP8 only as 128×128 blocks, not per-tensor/per-channel; use AWQ_W4A16"
    if scheme.weight_format == "int4" and scheme.group_size != 128:
        return f"LMDeploy TurboMind takes int4 only with group_size 128 (got {scheme.group_size})"
    if scheme.kv_cache_dtype == "fp8":
        return "LMDeploy quantizes the KV cache online (kv_cache_dtype int8 or int4), not with fp8 scales"
    return None


def trtllm_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    return check_trtllm_support(scheme, gpu, mode or "pytorch")


# backend → its rule; each backend module picks its formats, this table says what it can load.
BACKEND_RULES: dict[str, Callable[[Scheme, GPUProfile, str | None], str | None]] = {
    "vllm": vllm_problem,
    "tgi": tgi_problem,
    "lmdeploy": lmdeploy_problem,
    "trtllm": trtllm_problem,
}


def combination_problem(
    scheme: Scheme, backend: str, gpu: GPUProfile, shape: ModelShape, tp: int, trtllm_mode: str | None
) -> str | None:
    """Why (scheme, backend, gpu, tp) cannot be built or served, or None when it can."""
    return (
        gpu_problem(scheme, gpu)
        or BACKEND_RULES[backend](scheme, gpu, trtllm_mode)
        or tensor_parallel_problem(shape, tp)
        or group_size_problem(scheme, shape, tp)
    )
