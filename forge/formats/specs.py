"""What each export format can hold, without torch: the one set of rules the plan and the writers share.

The plan (through `forge.compat.combination_problem`) asks the spec of the format each backend
picks, and every writer in `forge/formats/` refuses with the same spec before it packs a tensor,
so a cell the plan accepts is one its writer takes. A spec says which schemes the format stores
(`scheme_problem`) and what a model's shape must satisfy to be laid out in it (`layout_problem`:
int4 groups tiling every input, packed dimensions a multiple of the codes per word). Messages
start with the recipe key to change (`kv_cache_dtype`, `group_size`, `scheme`).

Adding a format is its codec module (`write` / `read`, importing torch) plus one `FormatSpec`
entry here and one line in `forge.formats.FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forge.quant.scheme import Scheme

if TYPE_CHECKING:  # compat imports this module; the shape is only read here
    from forge.compat import ModelShape

# The side files every export copies from its source byte for byte when present (tokenizer, chat
# template, generation config); torch-free, so planning and serving read the one list. An explicit
# list rather than "everything but the weights", so a stale quantization file in the source
# (hf_quant_config.json, quant_config.json) never leaks in.
SOURCE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# Group sizes forge suggests, largest first (the ones int4 kernels are built for).
GROUP_SIZES = (256, 128, 64, 32)


def group_size_problem(group: int | None, widths: Mapping[str, int], where: str = "") -> str | None:
    """The one int4 group-size rule: `group` must divide every quantized input width.

    `widths` names each input (a projection kind at plan time, one linear at export) with the
    width a serving rank sees; `where` says which ranks (" per rank at tensor_parallel 2"). vLLM
    refuses `input_size_per_partition % group_size` (`AWQLinearMethod.create_weights`,
    https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/awq.py).
    """
    for layer, width in widths.items():
        if not group or width % group:
            fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
            hint = f"use group_size {fits[0]}" if fits else "no standard group size fits"
            return f"group size {group} does not divide {layer} = {width}{where}; {hint}"
    return None


def int4_group_problem(scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
    """`group_size_problem` over a model's projection kinds, per rank at tensor parallelism `tp`."""
    if scheme.weight_format != "int4" or scheme.group_size is None:
        return None
    rank = f" per rank at tensor_parallel {tp}" if tp > 1 else ""
    return group_size_problem(scheme.group_size, shape.input_dims(tp), rank)


@dataclass(frozen=True)
class FormatSpec:
    """One export format as the plan sees it: its name, the `quant_method` its config.json carries,
    which schemes it stores, and how many int4 codes it packs along each weight dimension."""

    name: str
    quant_method: str
    scheme_problem: Callable[[Scheme], str | None]  # why the format cannot store a scheme, or None
    int4_out_multiple: int = 1  # int4 codes packed along the output dimension (rows per word)
    int4_in_multiple: int = 1  # ... and along the input dimension

    def layout_problem(self, scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
        """Why a model of `shape` cannot be laid out in this format at tensor parallelism `tp`."""
        if scheme.weight_format != "int4":
            return None
        for label, multiple, dims in (
            ("output", self.int4_out_multiple, shape.output_dims()),
            ("input", self.int4_in_multiple, shape.input_dims()),
        ):
            for layer, width in dims.items():
                if width % multiple:
                    return (
                        f"source: {self.name} packs int4 codes {multiple} to a word along each weight's {label} "
                        f"dimension, and {layer} = {width} is not a multiple of {multiple}"
                    )
        return int4_group_problem(scheme, shape, tp)

    def problem(self, scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
        """Everything the plan asks of a cell's format: the scheme, then the layout."""
        return self.scheme_problem(scheme) or self.layout_problem(scheme, shape, tp)


def _compressed_tensors(scheme: Scheme) -> str | None:
    if scheme.weight_format not in ("int4", "fp8"):
        return f"scheme: compressed-tensors as forge writes it holds int4 and fp8 weights, not {scheme.preset}"
    return None


def _awq_gemm(scheme: Scheme) -> str | None:
    # AutoAWQ GEMM: int4 weights, float16 scales, no KV-cache scales
    # (https://github.com/casper-hansen/AutoAWQ/blob/main/awq/modules/linear/gemm.py).
    if scheme.weight_format != "int4":
        return (
            f"scheme: awq-gemm (AutoAWQ GEMM) stores int4 weights only, not {scheme.weight_format} "
            f"({scheme.preset}); fp8 is exported as compressed-tensors or modelopt"
        )
    if scheme.kv_cache_dtype != "auto":
        return (
            f"kv_cache_dtype: awq-gemm (AutoAWQ GEMM) has no KV-cache scales, so kv_cache_dtype "
            f"{scheme.kv_cache_dtype} cannot be exported; use kv_cache_dtype: auto, or a backend that "
            "loads compressed-tensors (vllm)"
        )
    return None


def modelopt_algo(scheme: Scheme) -> str | None:
    """ModelOpt's `quant_algo` for a scheme, or None when ModelOpt has no matching layout
    (https://github.com/NVIDIA/TensorRT-Model-Optimizer/blob/main/modelopt/torch/export/quant_utils.py)."""
    if scheme.weight_format == "int4" and scheme.symmetric:
        return "W4A16_AWQ"
    if scheme.weight_format == "fp8":
        if scheme.weight_granularity == "tensor" and scheme.activations == "static_tensor":
            return "FP8"
        if scheme.weight_granularity == "channel" and scheme.activations == "dynamic_token":
            return "FP8_PER_CHANNEL_PER_TOKEN"
    return None


def _modelopt(scheme: Scheme) -> str | None:
    if modelopt_algo(scheme) is not None:
        return None
    if scheme.weight_format == "int4":
        return (
            f"symmetric: modelopt's W4A16_AWQ is symmetric (has_zero_point false; TRT-LLM passes no zeros), "
            f"so {scheme.preset} with zero points cannot be stored; use a symmetric int4 preset"
        )
    return (
        f"scheme: no ModelOpt layout for {scheme.preset} ({scheme.weight_format}, "
        f"{scheme.weight_granularity} weights, {scheme.activations} activations); ModelOpt has FP8 "
        "(tensor weights + static inputs), FP8_PER_CHANNEL_PER_TOKEN and symmetric W4A16_AWQ"
    )


def trtllm_algo(scheme: Scheme) -> str | None:
    """TensorRT-LLM's `QuantAlgo` for a scheme (tensorrt_llm/quantization/mode.py names), or None.

    - int4 groups → `W4A16_AWQ`: the only int4 algorithm whose checkpoint holds plain packed codes
      that `trtllm-build` preprocesses for the build GPU itself (`W4A16_GPTQ` checkpoints must be
      pre-interleaved for one SM; `W4A16` is per-channel and quantized from float weights at build).
    - fp8 per-channel weights + dynamic per-token activations → `FP8_PER_CHANNEL_PER_TOKEN`.
    - fp8 per-tensor weights + static per-tensor activations → `FP8`.
    """
    if scheme.weight_format == "int4":
        return "W4A16_AWQ"
    if scheme.weight_format == "fp8":
        fp8_modes = {("channel", "dynamic_token"): "FP8_PER_CHANNEL_PER_TOKEN", ("tensor", "static_tensor"): "FP8"}
        return fp8_modes.get((scheme.weight_granularity, scheme.activations))
    return None


def _trtllm_checkpoint(scheme: Scheme) -> str | None:
    # The checkpoint holds fp8 KV scales only.
    if scheme.weight_format == "fp8" and trtllm_algo(scheme) is None:
        return (
            f"scheme: TensorRT-LLM has no FP8 mode for {scheme.weight_granularity} weight scales with "
            f"{scheme.activations} activations; use FP8_DYNAMIC (per channel, per token) or FP8 (static)"
        )
    if scheme.weight_format not in ("int4", "fp8"):
        return f"scheme: forge cannot write {scheme.preset} into a TensorRT-LLM checkpoint"
    if scheme.kv_cache_dtype not in ("auto", "fp8"):
        return f"kv_cache_dtype: TRT-LLM checkpoints hold fp8 KV scales only, not {scheme.kv_cache_dtype}"
    return None


SPECS: dict[str, FormatSpec] = {
    # pack-quantized: eight codes per int32 along the input, zero points eight per int32 along the
    # output (compressed_tensors/compressors/pack_quantized/base.py).
    "compressed-tensors": FormatSpec("compressed-tensors", "compressed-tensors", _compressed_tensors, 8, 8),
    # qweight / qzeros `[in, out / 8]` (AutoAWQ gemm.py `WQLinear_GEMM`).
    "awq-gemm": FormatSpec("awq-gemm", "awq", _awq_gemm, int4_out_multiple=8),
    # two codes per uint8 along the output (modelopt quant_utils.pack_int4_in_uint8).
    "modelopt": FormatSpec("modelopt", "modelopt", _modelopt, int4_out_multiple=2),
    # its layout rules need config.json's own fields: `trtllm_checkpoint.layout_problems`.
    "trtllm-checkpoint": FormatSpec("trtllm-checkpoint", "trtllm", _trtllm_checkpoint, int4_out_multiple=2),
}


def format_problem(fmt: str, scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
    """Why format `fmt` cannot hold `scheme` for a model of `shape` at tensor parallelism `tp`."""
    return SPECS[fmt].problem(scheme, shape, tp)
