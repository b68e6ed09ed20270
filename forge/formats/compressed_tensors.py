"""compressed-tensors checkpoints (llm-compressor's output): read by vLLM, TGI, LMDeploy and transformers.

Layouts verified against compressed-tensors 0.19.0 (the version pinned in forge's venv):

- int4 `pack-quantized` (`compressors/pack_quantized/base.py`, `helpers.py`): `weight_packed`
  int32 `[out, in / 8]`, element i of a row at bits `4 * (i % 8)` of word `i // 8`, stored as the
  signed code plus 8; `weight_scale` `[out, in / group]`; `weight_shape` int64 `[out, in]`;
  asymmetric layers add `weight_zero_point`, packed the same way but along the output dimension
  (`pack_to_int32(zero_point, 4, packed_dim=0)`: int32 `[out / 8, in / group]`), also offset by 8.
  compressed-tensors' asymmetric codes are signed (`q - 8`, `zero - 8`), so every stored nibble
  equals forge's uint4 value, and `(q - zero) * scale` is unchanged.
- fp8 `float-quantized` (`compressors/naive_quantized/base.py`): `weight` float8_e4m3fn
  `[out, in]`, `weight_scale` `[out, 1]` (channel) or `[1]` (tensor), `input_scale` `[1]` for
  static activations (`quantization/lifecycle/initialize.py`, `initialize_qparams`).
- `config.json` `quantization_config` as `ModelCompressor.update_config` writes it
  (`compressors/model_compressors/model_compressor.py`); KV-cache scales `self_attn.k_scale` /
  `v_scale` `[1]` with a tensor-strategy float8 `kv_cache_scheme`.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
from forge.formats.specs import SPECS
from forge.quant.model import QuantizedLinear, QuantizedModel, Scheme

FORMAT = "compressed-tensors"
SPEC = SPECS[FORMAT]
QUANT_METHOD = SPEC.quant_method
# The compressed-tensors release whose layout this module was checked against; fixed, not read
# from the installed package, so exports stay byte-identical across environments.
CT_VERSION = "0.19.0"


def unsupported_reason(scheme: Scheme) -> str | None:
    """Why this format cannot hold `scheme`, or None when it can (its spec's rule, the plan's too)."""
    return SPEC.scheme_problem(scheme)


# ---------------------------------------------------------------- config


def _args(**fields) -> dict:
    """A full `QuantizationArgs` dump, so the config reads like llm-compressor's."""
    args = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None,
        "observer": None,
        "observer_kwargs": {},
        "scale_dtype": None,
        "symmetric": True,
        "zp_dtype": None,
    }
    args.update(fields)
    return args


def quantization_config(qm: QuantizedModel) -> dict:
    scheme = qm.scheme
    if scheme.weight_format == "int4":
        fmt = "pack-quantized"
        weights = _args(
            num_bits=4,
            type="int",
            strategy="group",
            group_size=scheme.group_size,
            symmetric=scheme.symmetric,
            # compressed-tensors stores asymmetric int zero points as int8 (QuantizationArgs default)
            zp_dtype=None if scheme.symmetric else "torch.int8",
        )
        inputs = None
    else:
        fmt = "float-quantized"
        weights = _args(num_bits=8, type="float", strategy=scheme.weight_granularity)
        if scheme.activations == "dynamic_token":
            inputs = _args(num_bits=8, type="float", strategy="token", dynamic=True)
        else:
            inputs = _args(num_bits=8, type="float", strategy="tensor")
    kv_scheme = _args(num_bits=8, type="float", strategy="tensor") if qm.kv_scales else None
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": inputs,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignored_modules(qm),
        "kv_cache_scheme": kv_scheme,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


# ---------------------------------------------------------------- writing


def pack_int4_rows(values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Codes `[rows, cols]` + `offset` (uint4) → int32 `[rows, cols / 8]`; element i at bits 4 * (i % 8).

    Two nibbles per byte (even column low), four bytes per little-endian int32: byte-wide work
    only, so packing costs about 1.5 bytes of scratch per weight.
    """
    nibbles = (values.to(torch.int8) + offset).view(torch.uint8)
    pairs = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    # Through 1-D: a one-row result (one group's zero points, transposed) may carry a stride
    # of 1 in its size-1 dimension, which a dtype view refuses.
    return pairs.contiguous().reshape(-1).view(torch.int32).reshape(values.shape[0], -1)


def _linear_unit(qm: QuantizedModel, name: str, linear: QuantizedLinear, tp_size: int) -> Unit:
    scheme = qm.scheme
    out_features, in_features = linear.codes.shape
    if scheme.weight_format == "int4":
        group = check_group_size(FORMAT, name, linear.codes, linear.scale, scheme, tp_size)
        if in_features % 8 or out_features % 8:
            raise InputError(f"{FORMAT}: {name}: int4 packing needs both dimensions divisible by 8")
        if (linear.zero_point is None) != scheme.symmetric:
            raise InputError(f"{FORMAT}: {name}: zero point does not match symmetric={scheme.symmetric}")
        specs = [
            TensorSpec(f"{name}.weight_packed", torch.int32, (out_features, in_features // 8)),
            TensorSpec(f"{name}.weight_scale", torch.float16, (out_features, in_features // group)),
            TensorSpec(f"{name}.weight_shape", torch.int64, (2,)),
        ]
        if not scheme.symmetric:
            specs.append(
                TensorSpec(f"{name}.weight_zero_point", torch.int32, (out_features // 8, in_features // group))
            )
    else:
        scale_shape = (out_features, 1) if scheme.weight_granularity == "channel" else (1,)
        if tuple(linear.scale.shape) != scale_shape:
            raise InputError(f"{FORMAT}: {name}: fp8 scale shape {tuple(linear.scale.shape)}, expected {scale_shape}")
        specs = [
            TensorSpec(f"{name}.weight", torch.float8_e4m3fn, (out_features, in_features)),
            TensorSpec(f"{name}.weight_scale", torch.float32, scale_shape),
        ]
        if scheme.activations == "static_tensor":
            if linear.input_scale is None:
                raise InputError(f"{FORMAT}: {name}: static activations ({scheme.preset}) need an input_scale")
            specs.append(TensorSpec(f"{name}.input_scale", torch.float32, (1,)))

    def produce() -> dict[str, torch.Tensor]:
        linear = qm.linears[name]
        if scheme.weight_format == "fp8":
            tensors = {f"{name}.weight": linear.codes, f"{name}.weight_scale": linear.scale.to(torch.float32)}
            if scheme.activations == "static_tensor":
                tensors[f"{name}.input_scale"] = linear.input_scale.to(torch.float32).reshape(1)
            return tensors
        tensors = {
            # signed (symmetric) codes are stored offset by 8; forge's asymmetric codes are uint4
            f"{name}.weight_packed": pack_int4_rows(linear.codes, offset=8 if scheme.symmetric else 0),
            f"{name}.weight_scale": linear.scale.to(torch.float16),
            f"{name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if not scheme.symmetric:
            # packed along the output dimension: transpose, pack rows, transpose back
            zero = linear.zero_point.t().contiguous()
            tensors[f"{name}.weight_zero_point"] = pack_int4_rows(zero).t().contiguous()
        return tensors

    return Unit(name, tuple(specs), produce)


def _kv_unit(name: str, qm: QuantizedModel) -> Unit:
    def produce() -> dict[str, torch.Tensor]:
        return {name: qm.kv_scales[name].to(torch.float32).reshape(1)}

    return Unit(name, (TensorSpec(name, torch.float32, (1,)),), produce)


def export_plan(qm: QuantizedModel, tp_size: int) -> ExportPlan:
    check_kv_scales(FORMAT, qm)
    units = dense_units(qm, export_dtype(qm.scheme), FORMAT)
    units += [_linear_unit(qm, name, qm.linears[name], tp_size) for name in sorted(qm.linears)]
    units += [_kv_unit(name, qm) for name in sorted(qm.kv_scales)]
    return ExportPlan(units, quantization_config(qm))


write = format_writer(SPEC, export_plan)


# ---------------------------------------------------------------- reading
# Written apart from the packing above: nibbles are pulled out with one shift per position into
# strided columns, instead of reshaping and summing, so a shared mistake cannot cancel out.


def _unpack_columns(words: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 `[rows, columns / 8]` → uint4 values `[rows, columns]` as uint8: column j is nibble
    j % 8 of word j // 8. Read byte-wise (little-endian, as safetensors stores it): byte k of a word
    holds nibbles 2k (low half) and 2k + 1 (high half)."""
    octets = words.contiguous().view(torch.uint8)
    return torch.stack((octets & 0xF, octets >> 4), dim=-1).reshape(words.shape[0], columns)


def _read_int4(tensors: Tensors, module: str, config_group: int | None, symmetric: bool) -> torch.Tensor:
    packed = tensors.take(f"{module}.weight_packed")
    scale = tensors.take(f"{module}.weight_scale").to(torch.float32)
    out_features, in_features = (int(v) for v in tensors.take(f"{module}.weight_shape"))
    if tuple(packed.shape) != (out_features, in_features // 8) or packed.dtype != torch.int32:
        raise InputError(
            f"{FORMAT}: {module}.weight_packed is {packed.dtype} {tuple(packed.shape)}, "
            f"expected int32 [{out_features}, {in_features // 8}]"
        )
    group = in_features // scale.shape[1]
    if config_group is not None and group != config_group:
        raise InputError(f"{FORMAT}: {module}: scales imply group {group}, config says {config_group}")
    q = _unpack_columns(packed, in_features).to(torch.float32).view(out_features, -1, group)
    if symmetric:
        q -= 8
    else:
        packed_zero = tensors.take(f"{module}.weight_zero_point")
        zero = _unpack_columns(packed_zero.t().contiguous(), out_features).t()
        q -= zero.to(torch.float32).unsqueeze(-1)
    # same arithmetic as QuantizedLinear.dequantize: float32 (q - zero) * scale, group-wise
    return (q * scale.unsqueeze(-1)).view(out_features, in_features)


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the dense float32 state dict an export stands for.

    Besides the Hugging Face weights, static activation scales come back as
    `<module>.input_scale` (`[1]`) and KV-cache scales as `...self_attn.k_scale` / `v_scale`
    (0-d), all float32.
    """
    config = read_config(directory, FORMAT, QUANT_METHOD)
    qconfig = config["quantization_config"]
    groups = qconfig.get("config_groups") or {}
    if len(groups) != 1:
        raise InputError(f"{FORMAT}: forge reads one config group, found {sorted(groups)}")
    (group_config,) = groups.values()
    weights = group_config.get("weights") or {}
    tensors = Tensors(directory, FORMAT)
    state: dict[str, torch.Tensor] = {}
    if weights.get("type") == "int" and weights.get("num_bits") == 4:
        for key in tensors.names_ending(".weight_packed"):
            module = key.removesuffix(".weight_packed")
            state[f"{module}.weight"] = _read_int4(
                tensors, module, weights.get("group_size"), bool(weights.get("symmetric", True))
            )
    elif weights.get("type") == "float" and weights.get("num_bits") == 8:
        for key in tensors.names_ending(".weight_scale"):
            module = key.removesuffix(".weight_scale")
            codes = tensors.take(f"{module}.weight")
            if codes.dtype != torch.float8_e4m3fn:
                raise InputError(f"{FORMAT}: {module}.weight is {codes.dtype}, expected float8_e4m3fn")
            state[f"{module}.weight"] = codes.to(torch.float32) * tensors.take(key).to(torch.float32)
            input_scale = tensors.take_optional(f"{module}.input_scale")
            if input_scale is not None:
                state[f"{module}.input_scale"] = input_scale.to(torch.float32).reshape(1)
    else:
        raise InputError(f"{FORMAT}: forge reads int4 or fp8 weights, not {weights}")
    for name, tensor in tensors.rest().items():
        if name.endswith(("self_attn.k_scale", "self_attn.v_scale")):
            state[name] = tensor.to(torch.float32).reshape(())
        else:
            state[name] = tensor.to(torch.float32)
    return config, state
