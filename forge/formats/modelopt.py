"""NVIDIA ModelOpt unified Hugging Face checkpoints: TRT-LLM's PyTorch backend, vLLM `modelopt`, SGLang.

The only int4 layout TRT-LLM's PyTorch backend reads is ModelOpt's `W4A16_AWQ`; it does not
read AutoAWQ or compressed-tensors int4. Layouts as ModelOpt writes them
(`modelopt/torch/export/unified_export_hf.py` `_export_quantized_weight`, `quant_utils.py`) and
TRT-LLM / vLLM read them (`tensorrt_llm/_torch/modules/linear.py`,
`vllm/model_executor/layers/quantization/modelopt.py`):

- `FP8` (per-tensor weights, static per-tensor activations): `weight` float8_e4m3fn `[out, in]`,
  `weight_scale` and `input_scale` float32 scalars.
- `FP8_PER_CHANNEL_PER_TOKEN`: `weight` float8_e4m3fn, `weight_scale` float32 `[out]`
  (vLLM `ModelOptFp8PcPtLinearMethod`, TRT-LLM `FP8RowwiseLinearMethod`), no `input_scale`.
- `W4A16_AWQ`: `weight` uint8 `[out / 2, in]`, two signed int4 codes per byte along the output
  dimension (row 2r in the low nibble, row 2r + 1 in the high one; `quant_utils.pack_int4_in_uint8`),
  `weight_scale` `[out, in / group]` (TRT-LLM transposes it on load), `pre_quant_scale` `[in]`
  multiplying the layer's input (TRT-LLM `W4A16_AWQ_LinearMethod.apply`; its loader for
  o_proj/down_proj requires the tensor). Symmetric only: `has_zero_point: false`, and TRT-LLM's
  kernel call passes no zeros. vLLM's modelopt loader does not list W4A16_AWQ: TRT-LLM only.
- KV cache: `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale` float32 scalars
  (`quant_utils.postprocess_state_dict`), `kv_cache_quant_algo: "FP8"`.
- `hf_quant_config.json` `{"producer", "quantization": {quant_algo, kv_cache_quant_algo,
  group_size, has_zero_point, pre_quant_scale, exclude_modules}}` (`quant_utils.
  process_layer_quant_config`; read by TRT-LLM `ModelConfig.load_modelopt_quant_config`), and
  the same facts in config.json's `quantization_config` in the shape ModelOpt's
  `convert_hf_config.convert_hf_quant_config_format` gives them (`quant_method: "modelopt"`,
  which is how vLLM's `ModelOptQuantConfigBase.from_config` and TRT-LLM's
  `read_modelopt_quant_config` recognise the flat shape; the producer is honestly "forge").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import forge
from forge.errors import InputError
from forge.formats.model_dir import (
    ExportPlan,
    Tensors,
    TensorSpec,
    Unit,
    check_group_size,
    check_kv_scales,
    dense_units,
    export_dtype,
    format_writer,
    ignored_modules,
    read_config,
)
from forge.formats.specs import SPECS, modelopt_algo
from forge.quant.model import QuantizedModel, Scheme

FORMAT = "modelopt"
SPEC = SPECS[FORMAT]
QUANT_METHOD = SPEC.quant_method
HF_QUANT_CONFIG = "hf_quant_config.json"
_KV_NAMES = {"self_attn.k_scale": "self_attn.k_proj.k_scale", "self_attn.v_scale": "self_attn.v_proj.v_scale"}


def unsupported_reason(scheme: Scheme) -> str | None:
    """Why this format cannot hold `scheme`, or None when it can (its spec's rule, the plan's too)."""
    return SPEC.scheme_problem(scheme)


def hf_quant_config(qm: QuantizedModel) -> dict:
    algo = modelopt_algo(qm.scheme)
    quantization: dict = {
        "exclude_modules": ignored_modules(qm),
        "kv_cache_quant_algo": "FP8" if qm.kv_scales else None,
        "quant_algo": algo,
    }
    if algo == "W4A16_AWQ":
        quantization.update(group_size=qm.scheme.group_size, has_zero_point=False, pre_quant_scale=True)
    return {"producer": {"name": "forge", "version": forge.__version__}, "quantization": quantization}


def quantization_config(hf_config: dict) -> dict:
    """config.json's block, shaped as ModelOpt's `convert_hf_quant_config_format` output."""
    details = hf_config["quantization"]
    config: dict = {
        "ignore": details["exclude_modules"],
        "producer": hf_config["producer"],
        "quant_algo": details["quant_algo"],
        "quant_method": QUANT_METHOD,
    }
    if details["quant_algo"] == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        config["config_groups"] = {"group_0": {"input_activations": fp8, "targets": ["Linear"], "weights": fp8}}
    for key in ("group_size", "has_zero_point", "pre_quant_scale"):  # W4A16_AWQ facts, kept flat
        if key in details:
            config[key] = details[key]  # vLLM's and TRT-LLM's flat-config parsers read group_size here
    if details["kv_cache_quant_algo"] == "FP8":
        config["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return config


# ---------------------------------------------------------------- writing


def pack_int4_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 `[out, in]` → uint8 `[out / 2, in]`: even rows low nibble, odd rows high."""
    nibbles = codes.to(torch.int8).view(torch.uint8) & 0xF  # two's complement low nibble
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _linear_unit(qm: QuantizedModel, name: str, dtype: torch.dtype, tp_size: int) -> Unit:
    scheme = qm.scheme
    linear = qm.linears[name]
    out_features, in_features = linear.codes.shape
    algo = modelopt_algo(scheme)
    if algo == "W4A16_AWQ":
        group = check_group_size(FORMAT, name, linear.codes, linear.scale, scheme, tp_size)
        if out_features % 2:
            raise InputError(f"{FORMAT}: {name}: out_features {out_features} is odd; int4 pairs need it even")
        if linear.zero_point is not None:
            raise InputError(f"{FORMAT}: {name}: has zero points, which W4A16_AWQ cannot store")
        specs = (
            TensorSpec(f"{name}.pre_quant_scale", dtype, (in_features,)),
            TensorSpec(f"{name}.weight", torch.uint8, (out_features // 2, in_features)),
            TensorSpec(f"{name}.weight_scale", torch.float16, (out_features, in_features // group)),
        )
    else:
        expected = (out_features, 1) if algo == "FP8_PER_CHANNEL_PER_TOKEN" else (1,)
        if tuple(linear.scale.shape) != expected:
            raise InputError(f"{FORMAT}: {name}: fp8 scale shape {tuple(linear.scale.shape)}, expected {expected}")
        scale_shape = (out_features,) if algo == "FP8_PER_CHANNEL_PER_TOKEN" else ()
        specs = (
            TensorSpec(f"{name}.weight", torch.float8_e4m3fn, (out_features, in_features)),
            TensorSpec(f"{name}.weight_scale", torch.float32, scale_shape),
        )
        if algo == "FP8":
            if linear.input_scale is None:
                raise InputError(f"{FORMAT}: {name}: quant_algo FP8 needs a static input_scale")
            specs += (TensorSpec(f"{name}.input_scale", torch.float32, ()),)

    def produce() -> dict[str, torch.Tensor]:
        linear = qm.linears[name]
        if algo == "W4A16_AWQ":
            return {
                # forge's int4 has no activation-aware input scaling left over: identity
                f"{name}.pre_quant_scale": torch.ones(in_features, dtype=dtype),
                f"{name}.weight": pack_int4_pairs(linear.codes),
                f"{name}.weight_scale": linear.scale.to(torch.float16),
            }
        tensors = {
            f"{name}.weight": linear.codes,
            f"{name}.weight_scale": linear.scale.to(torch.float32).reshape(scale_shape),
        }
        if algo == "FP8":
            tensors[f"{name}.input_scale"] = linear.input_scale.to(torch.float32).reshape(())
        return tensors

    return Unit(name, specs, produce)


def _kv_unit(qm: QuantizedModel, name: str) -> Unit:
    for canonical, modelopt_name in _KV_NAMES.items():
        if name.endswith(canonical):
            out_name = name.removesuffix(canonical) + modelopt_name
            break
    else:
        raise InputError(f"{FORMAT}: {name} is not a `self_attn.k_scale` / `v_scale` name")

    def produce() -> dict[str, torch.Tensor]:
        return {out_name: qm.kv_scales[name].to(torch.float32).reshape(())}

    return Unit(out_name, (TensorSpec(out_name, torch.float32, ()),), produce)


def export_plan(qm: QuantizedModel, tp_size: int) -> ExportPlan:
    check_kv_scales(FORMAT, qm)
    dtype = export_dtype(qm.scheme)
    units = dense_units(qm, dtype, FORMAT)
    units += [_linear_unit(qm, name, dtype, tp_size) for name in sorted(qm.linears)]
    units += [_kv_unit(qm, name) for name in sorted(qm.kv_scales)]
    hf_config = hf_quant_config(qm)
    return ExportPlan(units, quantization_config(hf_config), {HF_QUANT_CONFIG: hf_config})


write = format_writer(SPEC, export_plan)


# ---------------------------------------------------------------- reading
# Written apart from `pack_int4_pairs`: nibbles are split with a shift and sign-extended by
# subtraction, then placed into strided rows, instead of masking a reshaped pair dimension.


def _unpack_int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[out / 2, in]` → signed codes `[out, in]` as int32."""
    byte = packed.to(torch.int32)
    low, high = byte % 16, byte // 16
    codes = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int32)
    codes[0::2] = torch.where(low >= 8, low - 16, low)
    codes[1::2] = torch.where(high >= 8, high - 16, high)
    return codes


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the dense float32 state dict a ModelOpt export stands for.

    Static activation scales come back as `<module>.input_scale` (`[1]`) and KV-cache scales
    under forge's names `...self_attn.k_scale` / `v_scale` (0-d), all float32.
    """
    config = read_config(directory, FORMAT, QUANT_METHOD)
    hf_path = Path(directory) / HF_QUANT_CONFIG
    details = json.loads(hf_path.read_text())["quantization"] if hf_path.is_file() else {}
    algo = str(details.get("quant_algo") or config["quantization_config"].get("quant_algo", "")).upper()
    tensors = Tensors(directory, FORMAT)
    state: dict[str, torch.Tensor] = {}
    for key in tensors.names_ending(".weight_scale"):
        module = key.removesuffix(".weight_scale")
        scale = tensors.take(key).to(torch.float32)
        weight = tensors.take(f"{module}.weight")
        if algo == "W4A16_AWQ":
            q = _unpack_int4_pairs(weight).to(torch.float32)
            step = q.shape[1] // scale.shape[1]
            group = details.get("group_size")
            if group is not None and step != group:
                raise InputError(f"{FORMAT}: {module}: tensors imply group {step}, config says {group}")
            dense = q * scale.repeat_interleave(step, dim=1)
            pre_quant = tensors.take_optional(f"{module}.pre_quant_scale")
            if pre_quant is not None:  # y = (x * s) W^T, so s scales W's input columns
                dense = dense * pre_quant.to(torch.float32)
        elif algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
            if weight.dtype != torch.float8_e4m3fn:
                raise InputError(f"{FORMAT}: {module}.weight is {weight.dtype}, expected float8_e4m3fn")
            per_row = scale.reshape(-1, 1) if scale.dim() == 1 else scale
            dense = weight.to(torch.float32) * per_row
            input_scale = tensors.take_optional(f"{module}.input_scale")
            if input_scale is not None:
                state[f"{module}.input_scale"] = input_scale.to(torch.float32).reshape(1)
        else:
            raise InputError(f"{FORMAT}: forge reads FP8, FP8_PER_CHANNEL_PER_TOKEN and W4A16_AWQ, not {algo!r}")
        state[f"{module}.weight"] = dense
    for name, tensor in tensors.rest().items():
        for canonical, modelopt_name in _KV_NAMES.items():
            if name.endswith(modelopt_name):
                name, tensor = name.removesuffix(modelopt_name) + canonical, tensor.reshape(())
        state[name] = tensor.to(torch.float32)
    return config, state
