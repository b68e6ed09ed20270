"""A variant's storage scheme, kept free of torch so planning and cache checks start fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightFormat = Literal["int4", "fp8"]
Activations = Literal["none", "dynamic_token", "static_tensor"]
KVCacheDtype = Literal["auto", "fp8", "int8", "int4"]  # int8/int4: LMDeploy online KV quantization


@dataclass(frozen=True)
class Scheme:
    """How a variant's linear weights are stored, resolved from a preset plus recipe overrides."""

    preset: str  # FP8_DYNAMIC, FP8, W4A16, W4A16_ASYM, GPTQ_W4A16, AWQ_W4A16
    weight_format: WeightFormat
    group_size: int | None  # int4: input columns per scale; None for fp8
    symmetric: bool
    weight_granularity: Literal["tensor", "channel", "group"]
    activations: Activations
    kv_cache_dtype: KVCacheDtype = "auto"
    ignore: tuple[str, ...] = ("lm_head",)  # module names kept dense
    dtype: str = "bfloat16"  # dtype of the tensors that stay dense (norms, embeddings, lm_head)

    @property
    def scale_dtype(self):  # -> torch.dtype; torch is imported lazily to keep planning fast
        import torch

        # int4 scales are fp16 in AutoAWQ GEMM and TurboMind; fp8 scales are fp32 in vLLM/ModelOpt.
        return torch.float16 if self.weight_format == "int4" else torch.float32
