"""Round-to-nearest quantizers: the storage rules every algorithm (RTN, GPTQ, AWQ) ends in.

AWQ and GPTQ only change the weights (or the scales) they hand to these functions, so the
integer codes of every scheme follow one definition, the one the formats and readers check.
"""

from __future__ import annotations

import re

import torch

from forge.architectures import ANY_QUANTIZABLE, get_architecture
from forge.quant.model import QuantizedLinear, QuantizedModel, Scheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn value (OCP FP8 spec, E4M3)
# Smallest scale any quantizer stores (weights, static inputs, KV cache): keeps an all-zero group,
# or an input that never fires, from dividing by zero.
MIN_SCALE = 1e-8
ROW_BLOCK = 2048  # rows of a weight quantized at once (`quantize_weight`)


def int4_qparams(
    weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale (rounded to `scale_dtype`) and uint4 zero point for an `[out, in]` weight:
    the grid spanning each group's own range (`int4_grid`)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    return int4_grid(groups.amin(dim=-1), groups.amax(dim=-1), symmetric, scale_dtype)


def int4_grid(
    w_min: torch.Tensor, w_max: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of the int4 grid spanning [w_min, w_max] (per group, any shape).

    The range always holds 0, as compressed-tensors' `calculate_qparams` does. Symmetric scales
    map max|w| to 7.5 (range width 15 / 2, as compressed-tensors and AutoGPTQ), codes in [-8, 7].
    Asymmetric follows AutoAWQ: scale = (max - min) / 15, zero = clamp(-round(min / scale), 0, 15).
    """
    w_min = w_min.clamp(max=0)
    w_max = w_max.clamp(min=0)
    if symmetric:
        scale = (torch.maximum(-w_min, w_max) / 7.5).clamp(min=MIN_SCALE)
        return nonzero(stored_toward_zero(scale, scale_dtype)), None
    scale = nonzero(((w_max - w_min) / 15).clamp(min=MIN_SCALE).to(scale_dtype))
    zero = torch.clamp(-torch.round(w_min / scale.float()), 0, 15).to(torch.int8)
    return scale, zero


def nonzero(stored: torch.Tensor) -> torch.Tensor:
    """A stored scale of at least its dtype's smallest positive value.

    `MIN_SCALE` is below float16's smallest subnormal (2⁻²⁴ ≈ 6e-8), so an all-zero group's scale
    would be stored as 0 and its codes computed as 0 / 0. Only scales that would be stored as 0
    change: the group's weights (all within ±4.5e-7) then round to codes again, zeros exactly.
    """
    smallest = torch.nextafter(torch.zeros((), dtype=stored.dtype), torch.ones((), dtype=stored.dtype))
    return stored.clamp(min=smallest)


def stored_toward_zero(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, rounded toward zero where rounding to nearest would grow it.

    A symmetric group's largest weight sits exactly half a step past code 7: max|w| / scale = 7.5.
    With the scale exact, -max|w| rounds to code -8 (its magnitude kept); a stored scale rounded
    up by a fraction of an fp16 ulp moves it to -7.5 + ε, code -7: the group's largest weight
    loses a whole step. On SmolLM2, RTN symmetric g64 lost about 1 perplexity point that way
    against compressed-tensors' float32 scales (bench/RESULTS.md).
    """
    stored = scale.to(dtype)
    down = torch.nextafter(stored, torch.zeros_like(stored))
    return torch.where((stored.float() > scale) & (down > 0), down, stored)


def int4_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Round `weight` onto the int4 grid given by `scale` / `zero` (both `[out, in / group]`)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    q = torch.round(groups / scale.float().unsqueeze(-1))  # in place below: one float temporary, not three
    if zero is None:
        q.clamp_(-8, 7)
    else:
        q.add_(zero.float().unsqueeze(-1)).clamp_(0, 15)
    return q.reshape(out_features, in_features).to(torch.int8)


def quantize_int4(weight: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    scale, zero = int4_qparams(weight, scheme.group_size, scheme.symmetric, scheme.scale_dtype)
    return QuantizedLinear(int4_codes(weight, scale, zero, scheme.group_size), scale, zero)


def quantize_fp8(weight: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    """fp8 e4m3 with per-channel (`[out, 1]`) or per-tensor (`[1]`) fp32 scales = absmax / 448."""
    w = weight.float()
    if scheme.weight_granularity == "channel":
        absmax = w.abs().amax(dim=1, keepdim=True)
    else:
        absmax = w.abs().amax().reshape(1)
    scale = (absmax / FP8_MAX).clamp(min=MIN_SCALE).to(torch.float32)
    codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedLinear(codes, scale)


def quantize_weight(weight: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    """`scheme`'s codes for one weight, a block of rows at a time where rows are independent
    (int4 groups and fp8 channel scales never span rows): the same codes, with float32
    temporaries of one block instead of several copies of a 70B-wide weight."""
    rowwise = scheme.weight_format == "int4" or scheme.weight_granularity == "channel"
    if not rowwise or weight.shape[0] <= ROW_BLOCK:
        return _quantize_whole(weight, scheme)
    blocks = [_quantize_whole(block, scheme) for block in weight.split(ROW_BLOCK)]
    zero = None if blocks[0].zero_point is None else torch.cat([b.zero_point for b in blocks])
    return QuantizedLinear(torch.cat([b.codes for b in blocks]), torch.cat([b.scale for b in blocks]), zero)


def _quantize_whole(weight: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    if scheme.weight_format == "fp8":
        return quantize_fp8(weight, scheme)
    return quantize_int4(weight, scheme)


def quantizable_linears(state: dict[str, torch.Tensor], scheme: Scheme, config: dict | None = None) -> list[str]:
    """Module names of the decoder-layer projections to quantize, in checkpoint order.

    Only the projections `forge.architectures` lists for the config's architecture (attention,
    MLP, MoE experts) are quantized; embeddings, norms, MoE routers and `lm_head` stay dense
    (lm_head is also in every preset's `ignore`). Without a config, any known architecture's
    projection names match.
    """
    known = config is not None and config.get("architectures")
    pattern = get_architecture(config).quantizable() if known else ANY_QUANTIZABLE
    names = []
    for key, tensor in state.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and tensor.dim() == 2 and pattern.match(module):
            if not is_ignored(module, scheme.ignore):
                names.append(module)
    return names


def is_ignored(module: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors style targets: an exact module name, or `re:<regex>` matched in full."""
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def split_state(
    state: dict[str, torch.Tensor], config: dict, scheme: Scheme
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors that stay dense and the linears to quantize.

    Dense tensors keep their dtype: each format casts them once, to its own dtype, at export
    (a bfloat16 copy here would round them twice on their way to a float16 int4 export).
    """
    names = quantizable_linears(state, scheme, config)
    quantized = {f"{n}.weight" for n in names}
    dense = {k: v for k, v in state.items() if k not in quantized}
    if config.get("tie_word_embeddings"):
        dense.pop("lm_head.weight", None)  # tied: lm_head is the embedding, stored once
    return dense, names


def quantize_rtn(state: dict[str, torch.Tensor], config: dict, scheme: Scheme) -> QuantizedModel:
    """Round-to-nearest for every quantizable linear of a dense HF state dict."""
    dense, names = split_state(state, config, scheme)
    linears = {n: quantize_weight(state[f"{n}.weight"], scheme) for n in names}
    return QuantizedModel(config, scheme, dense, linears)
