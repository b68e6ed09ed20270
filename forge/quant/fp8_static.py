"""FP8 with static activation scales: per-tensor e4m3 weights plus a calibrated input scale.

The `FP8` preset (compressed-tensors `FP8`, vLLM `activation_scheme: static`) fixes each linear's
activation scale ahead of time instead of measuring every token at run time; the scale is the
largest |x| the calibration text produced at that linear's input over 448, the largest finite
e4m3 value, as llm-compressor's min-max observer does for static per-tensor activations.
"""

from __future__ import annotations

import torch

from forge.quant.layerwise import InputStats
from forge.quant.model import QuantizedLinear, Scheme
from forge.quant.rtn import FP8_MAX, MIN_SCALE, quantize_fp8


def static_input_scale(stats: InputStats) -> torch.Tensor:
    """`[1]` float32: absmax of the linear's calibration inputs / 448."""
    return (stats.abs_max.amax().float() / FP8_MAX).clamp(min=MIN_SCALE).reshape(1)


def fp8_static_layer(
    layer: torch.nn.Module, stats: dict[str, InputStats], quantized: set[str], scheme: Scheme
) -> dict[str, QuantizedLinear]:
    """Per-tensor fp8 weights (`rtn.quantize_fp8`) with each linear's static `input_scale`."""
    result = {}
    for name in sorted(quantized):
        linear = quantize_fp8(layer.get_submodule(name).weight.detach(), scheme)
        linear.input_scale = static_input_scale(stats[name])
        result[name] = linear
    return result
