"""AWQ: activation-aware weight quantization to int4 (Lin et al., arXiv 2306.00978).

Two searches per decoder layer, then the shared round-to-nearest storage rules of `rtn.py`:

1. Scale search (paper §3.2). Input channels that carry large activations matter more, so
   each group of linears sharing an input multiplies its weight columns by s (and the op that
   produces the input divides by s, keeping the float function unchanged) before rounding,
   which shrinks the relative rounding error of salient channels. s = mean|x|^α / mean|ŵ|^(1-α)
   ("duo scaling", AutoAWQ and llm-compressor's default) or mean|x|^α, normalized so
   sqrt(max·min) = 1, with α on a grid; the s minimizing the output error of the group wins.
2. Clipping search (AutoAWQ `auto_clip`): per output row and group, shrink the range the int4
   grid spans by a factor in [0.55, 1] if that lowers the group's output error — trading a few
   clipped outliers for finer steps everywhere else.

Speed on CPU comes from measuring every candidate's output error with the calibration inputs'
Gram matrix G = Σ x xᵀ instead of re-running the layer: for a weight error E = Q(W) - W,
Σ_tokens ‖E x‖² = Σ (E G) ⊙ E, which costs out·in² per candidate whatever the number of tokens
(AutoAWQ and llm-compressor rerun the module on every cached token for every grid point). The
error measured is the one the paper's objective (its Eq. 4) names, ‖Q(W·s)(s⁻¹·x) − W x‖, at
the linears' outputs; AutoAWQ measures it after the whole attention / MLP block instead.

Layer inputs: layer i + 1 is calibrated on the outputs of the dense (unquantized) layer i, as
AutoAWQ does (`_get_input_feat` runs the float layer); the scale folding leaves the float
function unchanged, so one forward pass per layer gives both the statistics and the next inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forge.errors import InputError
from forge.quant.layerwise import InputStats
from forge.quant.model import QuantizedLinear, Scheme
from forge.quant.rtn import int4_codes, int4_qparams, quantize_int4

# Grid points for α in the scale search: AutoAWQ `n_grid=20`, llm-compressor `n_grid=20`.
SCALE_GRID = 20
# Clipping: AutoAWQ `auto_clip_layer(n_grid=20, max_shrink=0.5)` tries max·(1 - i/20) for
# i < 0.5·20, i.e. shrink factors 1.0, 0.95, …, 0.55.
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
# Linears whose clipping is skipped: their outputs meet in the q·k product and softmax, which a
# per-linear error does not see (AutoAWQ `_search_best_clip` skips ["q_", "k_"] for this reason).
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input (`balance`) and the op producing that input (`smooth`)."""

    smooth: str
    balance: tuple[str, ...]


def llama_scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """AutoAWQ's Llama mappings, names relative to the decoder layer.

    v_proj → o_proj only when v_proj's outputs are o_proj's inputs channel for channel: with
    grouped-query attention (fewer kv heads) each v channel feeds several o_proj columns, so one
    scale per channel cannot be folded (AutoAWQ llama.py; mit-han-lab/llm-awq PR 67 comment).
    """
    attn, mlp = layer.self_attn, layer.mlp
    for needed in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, needed):
            raise InputError(f"quantization: AWQ supports Llama-style layers; self_attn has no {needed}")
    for needed in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, needed):
            raise InputError(f"quantization: AWQ supports Llama-style layers; mlp has no {needed}")
    groups = [ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups.append(ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",)))
    return groups


def fake_quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """Round-trip through the exact storage rules (`rtn.int4_qparams` / `int4_codes`)."""
    scale, zero = int4_qparams(weight, group_size, symmetric, scale_dtype)
    codes = int4_codes(weight, scale, zero, group_size)
    return QuantizedLinear(codes, scale, zero).dequantize(torch.float32)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over calibration tokens of ‖delta · x‖², from the Gram matrix (delta is `[out, in]`)."""
    return ((delta @ gram) * delta).sum()


def weight_salience(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group, per input channel (AutoAWQ `w_mean`)."""
    rows = []
    for w in weights:
        out_features, in_features = w.shape
        g = w.abs().reshape(out_features, in_features // group_size, group_size)
        rows.append((g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(out_features, in_features))
    return torch.cat(rows).mean(0)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int = SCALE_GRID) -> list[torch.Tensor]:
    """Per-channel scales to try: α ∈ {0, 1/(grid-1), …, 1}, activation-only and duo (x and w).

    α = 0 without duo is s = 1, plain round-to-nearest, so the search never does worse than RTN
    on its own error measure. The 1e-4 floors are AutoAWQ's / llm-compressor's.
    """
    candidates = []
    for i in range(grid):
        alpha = i / (grid - 1)
        for duo in (False, True):
            if duo:
                s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
            else:
                s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            candidates.append(torch.nan_to_num(s, nan=1.0, posinf=1.0))
    return candidates


def search_scales(
    weights: list[torch.Tensor], quantized: list[bool], stats: InputStats, scheme: Scheme
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale minimizing Σ ‖Q(W·s)/s − W‖_G over the quantized linears.

    Returns (scales, error with s = 1, best error), errors per token.
    """
    gram = (stats.gram / stats.tokens).float()
    x_mean = stats.abs_mean.float()
    w_all = torch.cat([w for w, q in zip(weights, quantized, strict=True) if q])
    w_mean = weight_salience([w_all], scheme.group_size)
    best_scales, best_error, rtn_error = torch.ones_like(x_mean), float("inf"), float("inf")
    for s in scale_candidates(x_mean, w_mean):
        deq = fake_quantize_int4(w_all * s, scheme.group_size, scheme.symmetric, scheme.scale_dtype)
        error = output_error(deq / s - w_all, gram).item()
        if rtn_error == float("inf"):
            rtn_error = error  # the first candidate is s = 1
        if error < best_error:  # strict: ties keep the earlier (smaller α) candidate
            best_scales, best_error = s, error
    return best_scales, rtn_error, best_error


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, stats: InputStats) -> None:
    """W·diag(s) on the balance linears, ÷s on the op producing their input: same float function."""
    smooth = layer.get_submodule(group.smooth)
    if isinstance(smooth, nn.Linear):
        smooth.weight.div_(scales.unsqueeze(1))  # the producer's output channels
    else:
        smooth.weight.div_(scales)  # RMSNorm's elementwise weight
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.div_(scales)
    for name in group.balance:
        layer.get_submodule(name).weight.mul_(scales)
    # The balance linears now see x / s: keep their statistics in step for later searches.
    stats.gram = stats.gram / (scales.double().unsqueeze(1) * scales.double().unsqueeze(0))
    stats.abs_sum = stats.abs_sum / scales.double()
    stats.abs_max = stats.abs_max / scales


def search_clip(weight: torch.Tensor, stats: InputStats, scheme: Scheme) -> torch.Tensor:
    """`weight` clamped, per output row and group, to the shrunken range with least output error.

    Each group's error uses only its diagonal block of the Gram matrix, as AutoAWQ measures the
    partial dot product of each group separately. Asymmetric schemes shrink min and max
    together (the int4 grid spans [min, max]); symmetric ones shrink ±max|w|.
    """
    group_size = scheme.group_size
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    gram = (stats.gram / stats.tokens).float()
    blocks = torch.stack(
        [gram[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size] for g in range(n_groups)]
    )  # [groups, gs, gs]
    w = weight.reshape(out_features, n_groups, group_size)
    if scheme.symmetric:
        hi = w.abs().amax(-1, keepdim=True)
        lo = -hi
    else:
        hi, lo = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    best_error = torch.full((out_features, n_groups, 1), float("inf"))
    best_ratio = torch.ones(out_features, n_groups, 1)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - i / CLIP_GRID
        clipped = torch.clamp(w, lo * ratio, hi * ratio).reshape(out_features, in_features)
        deq = fake_quantize_int4(clipped, group_size, scheme.symmetric, scheme.scale_dtype)
        delta = (deq - weight).reshape(out_features, n_groups, group_size).transpose(0, 1)  # [g, out, gs]
        error = (torch.bmm(delta, blocks) * delta).sum(-1).transpose(0, 1).unsqueeze(-1)  # [out, g, 1]
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return torch.clamp(w, lo * best_ratio, hi * best_ratio).reshape(out_features, in_features)


@torch.no_grad()
def awq_layer(
    layer: nn.Module, stats: dict[str, InputStats], quantized: set[str], scheme: Scheme
) -> tuple[dict[str, QuantizedLinear], dict[str, tuple[float, float]]]:
    """Scale search and folding for each group, then clipping and int4 storage for `quantized`.

    Returns the quantized linears (names relative to the layer) and, per scale group, the output
    error per token with s = 1 and with the chosen s (for logs and tests).
    """
    errors = {}
    for group in llama_scale_groups(layer):
        flags = [name in quantized for name in group.balance]
        if not any(flags):
            continue  # nothing to protect: leave the float weights as they are
        weights = [layer.get_submodule(name).weight.float() for name in group.balance]
        group_stats = stats[group.balance[0]]
        scales, rtn_error, best_error = search_scales(weights, flags, group_stats, scheme)
        fold_scales(layer, group, scales, group_stats)
        errors[group.smooth] = (rtn_error, best_error)
    result = {}
    for name in sorted(quantized):
        weight = layer.get_submodule(name).weight.float()
        if not name.endswith(NO_CLIP):
            weight = search_clip(weight, stats[name], scheme)
        result[name] = quantize_int4(weight, scheme)
    return result, errors
