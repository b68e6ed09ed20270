"""AutoAWQ "GEMM" checkpoints: read by vLLM (`awq`, `awq_marlin`), TGI `--quantize awq`, LMDeploy TurboMind.

Layout, per quantized linear, transposed relative to `nn.Linear` (AutoAWQ
`awq/modules/linear/gemm.py`, `WQLinear_GEMM.__init__` / `from_linear`; vLLM
`model_executor/layers/quantization/awq.py`, `AWQLinearMethod.create_weights`):

- `qweight` int32 `[in, out / 8]`, `qzeros` int32 `[in / group, out / 8]`, `scales` float16
  `[in / group, out]`, optional `bias` float16 `[out]`.
- Eight uint4 values per int32, interleaved: bits `4 * i` hold output column
  `8 * c + ORDER[i]` with `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]` (`from_linear`'s `order_map`;
  `awq/utils/packing_utils.py` undoes it with `AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]`).
- Dequantization `(q - zero) * scale` with uint4 codes and zeros (`dequantize_gemm`).
- `quantization_config` as AutoAWQ's `AwqConfig.to_transformers_dict` (`awq/models/_config.py`):
  quant_method, zero_point, group_size, bits, version (lower case), modules_to_not_convert.

AWQ kernels are float16 only (vLLM `AWQConfig.get_supported_act_dtypes`), so the whole export
is float16. Symmetric int4 is stored as uint4 with every zero point 8 (AutoAWQ always writes
`zero_point: true` layouts). AutoAWQ GEMM has no fp8 weights and no KV-cache scales.
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
    dense_units,
    export_dtype,
    format_writer,
    ignored_modules,
    read_config,
)
from forge.formats.specs import SPECS
from forge.quant.model import QuantizedModel, Scheme

FORMAT = "awq-gemm"
SPEC = SPECS[FORMAT]
QUANT_METHOD = SPEC.quant_method
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ gemm.py `order_map`: slot i holds column ORDER[i]


def unsupported_reason(scheme: Scheme) -> str | None:
    """Why this format cannot hold `scheme`, or None when it can (its spec's rule, the plan's too)."""
    return SPEC.scheme_problem(scheme)


def quantization_config(qm: QuantizedModel) -> dict:
    return {
        "bits": 4,
        "group_size": qm.scheme.group_size,
        "modules_to_not_convert": ignored_modules(qm),
        "quant_method": QUANT_METHOD,
        "version": "gemm",
        "zero_point": True,
    }


def pack_awq(values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Codes `[rows, cols]` (already AWQ's `[in, out]`) + `offset` (uint4) → int32 `[rows, cols / 8]`.

    Columns are put in slot order first (slot i of each word takes column ORDER[i]); then two
    nibbles per byte (lower slot low), four bytes per little-endian int32.
    """
    rows, cols = values.shape
    nibbles = (values.to(torch.int8) + offset).view(torch.uint8)
    slots = nibbles.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols)
    pairs = slots[:, 0::2] | (slots[:, 1::2] << 4)
    # Through 1-D: a one-row input (the zero points of a single group) may carry a stride of 1 in
    # its size-1 dimension, which a dtype view refuses.
    return pairs.contiguous().reshape(-1).view(torch.int32).reshape(values.shape[0], -1)


def _linear_unit(qm: QuantizedModel, name: str, tp_size: int) -> Unit:
    linear = qm.linears[name]
    out_features, in_features = linear.codes.shape
    group = check_group_size(FORMAT, name, linear.codes, linear.scale, qm.scheme, tp_size)
    if out_features % 8:
        raise InputError(f"{FORMAT}: {name}: out_features {out_features} is not a multiple of 8")
    if (linear.zero_point is None) != qm.scheme.symmetric:
        raise InputError(f"{FORMAT}: {name}: zero point does not match symmetric={qm.scheme.symmetric}")
    groups = in_features // group
    specs = (
        TensorSpec(f"{name}.qweight", torch.int32, (in_features, out_features // 8)),
        TensorSpec(f"{name}.qzeros", torch.int32, (groups, out_features // 8)),
        TensorSpec(f"{name}.scales", torch.float16, (groups, out_features)),
    )

    def produce() -> dict[str, torch.Tensor]:
        linear = qm.linears[name]
        if linear.zero_point is None:  # symmetric [-8, 7] → uint4 with zero point 8
            offset, zeros = 8, torch.full((out_features, groups), 8, dtype=torch.int8)
        else:
            offset, zeros = 0, linear.zero_point
        return {
            f"{name}.qweight": pack_awq(linear.codes.t().contiguous(), offset),
            f"{name}.qzeros": pack_awq(zeros.t().contiguous()),
            f"{name}.scales": linear.scale.to(torch.float16).t().contiguous(),
        }

    return Unit(name, specs, produce)


def export_plan(qm: QuantizedModel, tp_size: int) -> ExportPlan:
    if qm.kv_scales:
        raise InputError(f"{FORMAT}: AutoAWQ GEMM has no KV-cache scales; use compressed-tensors for an fp8 KV cache")
    units = dense_units(qm, export_dtype(qm.scheme), FORMAT)
    units += [_linear_unit(qm, name, tp_size) for name in sorted(qm.linears)]
    return ExportPlan(units, quantization_config(qm))


write = format_writer(SPEC, export_plan)


# ---------------------------------------------------------------- reading
# Written apart from `pack_awq`: each logical column j is read with its own shift, taken from
# the inverse table (AutoAWQ packing_utils.py AWQ_REVERSE_ORDER), rather than gathering slots.

_COLUMN_SHIFT = (0, 16, 4, 20, 8, 24, 12, 28)  # 4 * [0, 4, 1, 5, 2, 6, 3, 7]: where column j sits


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 `[rows, cols / 8]` → uint4 `[rows, cols]` as int32, logical column order."""
    rows, packed = words.shape
    shifts = torch.tensor(_COLUMN_SHIFT, dtype=torch.int32)  # the shift of logical column 0..7 of each word
    return ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, packed * 8)


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the dense float32 state dict an AWQ GEMM export stands for."""
    config = read_config(directory, FORMAT, QUANT_METHOD)
    qconfig = config["quantization_config"]
    bits = qconfig.get("bits", qconfig.get("w_bit"))
    group = qconfig.get("group_size", qconfig.get("q_group_size"))
    version = str(qconfig.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise InputError(f"{FORMAT}: forge reads 4-bit GEMM checkpoints, found bits={bits} version={version}")
    tensors = Tensors(directory, FORMAT)
    state: dict[str, torch.Tensor] = {}
    for key in tensors.names_ending(".qweight"):
        module = key.removesuffix(".qweight")
        q = _unpack_awq(tensors.take(key))  # [in, out]
        zeros = _unpack_awq(tensors.take(f"{module}.qzeros"))  # [in / group, out]
        scales = tensors.take(f"{module}.scales")  # [in / group, out]
        in_features, out_features = q.shape
        if tuple(scales.shape) != tuple(zeros.shape) or scales.shape[1] != out_features:
            raise InputError(f"{FORMAT}: {module}: scales {tuple(scales.shape)} / qzeros do not fit qweight")
        step = in_features // scales.shape[0]
        if group not in (None, -1) and step != group:
            raise InputError(f"{FORMAT}: {module}: tensors imply group {step}, config says {group}")
        # back to nn.Linear's [out, in]; float32 (q - zero) * scale as QuantizedLinear.dequantize
        q = q.t().to(torch.float32)
        zero = zeros.t().to(torch.float32).repeat_interleave(step, dim=1)
        scale = scales.t().to(torch.float32).repeat_interleave(step, dim=1)
        state[f"{module}.weight"] = (q - zero) * scale
    for name, tensor in tensors.rest().items():
        state[name] = tensor.to(torch.float32)
    return config, state
