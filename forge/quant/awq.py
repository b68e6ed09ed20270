"""AWQ: activation-aware weight quantization to int4 (Lin et al., arXiv 2306.00978).

Two searches per decoder layer, then rounding onto the shared int4 storage rules of `rtn.py`:

1. Scale search (paper §3.2). Input channels that carry large activations matter more, so
   each group of linears sharing an input multiplies its weight columns by s (and the op that
   produces the input divides by s, keeping the float function unchanged) before rounding,
   which shrinks the relative rounding error of salient channels. s = mean|x|^α / mean|ŵ|^(1-α)
   ("duo scaling", AutoAWQ and llm-compressor's default) or mean|x|^α, normalized so
   sqrt(max·min) = 1, with α on a grid; the s minimizing the output error of the group wins.
2. Clipping search (AutoAWQ `auto_clip`): per output row and group, shrink the range the int4
   grid spans by a factor in [0.55, 1] if that lowers the group's output error — trading a few
   clipped outliers for finer steps everywhere else. `OPTIONS.joint` (off) then revisits the
   choices against each row's whole output error, groups' cross terms included
   (`refine_jointly`). Measured on SmolLM2-135M (bench/RESULTS.md): asymmetric +17.1 % perplexity
   on 64 wikitext-2 windows instead of +19.1 %, but symmetric +34.3 % instead of +28.5 %, and the
   default build's lm-eval task recovery fell below its gate (0.71 < 0.75), so it stays off.
3. Rounding (`OPTIONS.gptq`): round-to-nearest onto the clipped grids, or GPTQ error feedback
   onto the same grids with the Hessian of the scaled inputs (`gptq_rounding`).

Speed on CPU comes from measuring every candidate's output error with the calibration inputs'
Gram matrix G = Σ x xᵀ instead of re-running the layer: for a weight error E = Q(W) - W,
Σ_tokens ‖E x‖² = Σ (E G) ⊙ E, which costs out·in² per candidate whatever the number of tokens
(AutoAWQ and llm-compressor rerun the module on every cached token for every grid point), and
5/8 of that as G is symmetric (`quadratic_forms`).
Where the calibration has fewer tokens T than the linear has inputs, the same sum is ‖E Xᵀ‖²
through the kept inputs X (`InputStats.inputs`), out·in·T: at 8B shapes with 1024 tokens, 14×
fewer flops for down_proj and 4× for the others (`output_errors`). The error measured is the
one the paper's objective (§3.2) names, ‖Q(W·s)(s⁻¹·x) − W x‖, at the linears' outputs; AutoAWQ
measures it after the whole attention / MLP block instead.

Layer inputs: `run.py` feeds layer i + 1 the outputs of the quantized layer i (measured
slightly better than AutoAWQ's dense outputs on SmolLM2; see there). The scale folding itself
leaves the float function unchanged, which `tests/test_quant.py` checks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from forge.architectures import EXPERT, Architecture, fused_rows, num_experts
from forge.quant.gptq import Grid, gptq_layer, swapped_options
from forge.quant.layerwise import InputStats
from forge.quant.model import QuantizedLinear, Scheme
from forge.quant.rtn import int4_codes, int4_grid, int4_qparams, quantize_int4

# Grid points for α in the scale search: AutoAWQ `n_grid=20`, llm-compressor `n_grid=20`.
SCALE_GRID = 20
# Clipping: AutoAWQ `auto_clip_layer(n_grid=20, max_shrink=0.5)` tries max·(1 - i/20) for
# i < 0.5·20, i.e. shrink factors 1.0, 0.95, …, 0.55.
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
# Linears whose clipping is skipped: their outputs meet in the q·k product and softmax, which a
# per-linear error does not see (AutoAWQ `_search_best_clip` skips ["q_", "k_"] for this reason).
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")
# Coordinate-descent passes over a linear's groups in `refine_jointly`.
JOINT_SWEEPS = 2
# Column blocks of the Gram matrix in `quadratic_forms`: more skip more of it, in smaller products.
GRAM_BLOCKS = 4
# Weight elements per batched candidate evaluation (4 M floats, 16 MiB per temporary: cache-sized).
BATCH_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class AwqOptions:
    """What `awq_layer` does after the scale search; `OPTIONS` is what a build uses.

    clip: the per-group clipping search. gptq: round with GPTQ error feedback (onto the clipped
    grids) instead of round-to-nearest. act_order: GPTQ's column order, when gptq. widen,
    split_ends: more ranges for the clipping search (`clip_factors`). joint: the clipping choices
    revisited against the whole output error (`refine_jointly`).
    """

    clip: bool = True
    gptq: bool = False
    act_order: bool = False
    widen: bool = False
    split_ends: bool = False
    joint: bool = False


OPTIONS = AwqOptions()


def options(**changes: bool) -> AbstractContextManager[None]:
    """Run with some of `OPTIONS` changed (a benchmark's variants, `forge.quant.gptq.swapped_options`)."""
    return swapped_options(sys.modules[__name__], **changes)


@dataclass(frozen=True)
class ScaleGroup:
    """Modules sharing one input (`balance`) and the op producing that input (`smooth`).

    Names are the loaded model's, relative to the decoder layer. `rows`: the slice of a fused
    `smooth` linear that produces the input (Phi-3's `up` half of `gate_up_proj`). `plus_one`:
    the smooth op is a Gemma RMSNorm, which scales by (1 + weight). `stats`: the module whose
    recorded input is the group's (an MoE router sees every token its experts share).
    `shared`: (query heads per kv head, head_dim) when `smooth` produces attention values under
    grouped-query attention: o_proj's input channel (h, d) reads value channel (h // repeat, d)
    (transformers `repeat_kv`), so the `repeat` columns reading one value channel share its scale.
    """

    smooth: str
    balance: tuple[str, ...]
    rows: tuple[int, int] | None = None
    plus_one: bool = False
    stats: str | None = None
    shared: tuple[int, int] | None = None

    def widen(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales per output channel of `smooth`, as the balance linears' input channels see them."""
        if self.shared is None:
            return scales
        repeat, head_dim = self.shared
        return scales.reshape(-1, 1, head_dim).expand(-1, repeat, head_dim).reshape(-1)

    def narrow(self, per_input: torch.Tensor) -> torch.Tensor:
        """A per-input-channel statistic, averaged over the channels that share one scale."""
        if self.shared is None:
            return per_input
        repeat, head_dim = self.shared
        return per_input.reshape(-1, repeat, head_dim).mean(1).reshape(-1)


def scale_groups(layer: nn.Module, arch: Architecture, config: dict) -> list[ScaleGroup]:
    """The architecture's AWQ smoothing groups (`forge.architectures`), made concrete for one
    loaded decoder layer: experts expanded, fused row ranges resolved, groups whose modules this
    layer lacks (a dense layer of a partly-MoE model) dropped.

    v_proj → o_proj under grouped-query attention too, with one scale per value channel shared
    by the o_proj columns reading it (AutoAWQ and llm-compressor skip the group there, as one
    scale per o_proj column cannot be folded; mit-han-lab/llm-awq PR 67 comment).
    """
    present = {name for name, _ in layer.named_modules()}
    experts = num_experts(config)
    heads = config["num_attention_heads"]
    repeat = heads // (config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    groups = []
    for spec in arch.smoothing:
        shared = (repeat, head_dim) if spec.values and repeat > 1 else None
        if spec.per_expert:
            expanded = [(spec.smooth.replace(EXPERT, str(e)), [b.replace(EXPERT, str(e)) for b in spec.balance])
                        for e in range(experts)]  # fmt: skip
        else:
            balance = []
            for b in spec.balance:
                balance += [b.replace(EXPERT, str(e)) for e in range(experts)] if EXPERT in b else [b]
            expanded = [(spec.smooth, balance)]
        for smooth, balance in expanded:
            smooth, balance = arch.to_memory(smooth), tuple(arch.to_memory(b) for b in balance)
            if smooth not in present or not all(b in present for b in balance):
                continue
            rows = fused_rows(arch, config, spec.smooth)[spec.smooth_part] if spec.smooth_part else None
            router = arch.to_memory(arch.router) if arch.router else None
            stats = router if router in balance else balance[0]
            plus_one = arch.norm_plus_one and not isinstance(layer.get_submodule(smooth), nn.Linear)
            groups.append(ScaleGroup(smooth, balance, rows, plus_one, stats, shared))
    return groups


def fake_quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """Round-trip through the exact storage rules (`rtn.int4_qparams` / `int4_codes`)."""
    scale, zero = int4_qparams(weight, group_size, symmetric, scale_dtype)
    codes = int4_codes(weight, scale, zero, group_size)
    return QuantizedLinear(codes, scale, zero).dequantize(torch.float32)


def weight_salience(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group, per input channel (AutoAWQ `w_mean`),
    summed a block of rows at a time: whole-weight temporaries of 8B's gate/up are 0.44 GiB each."""
    total = torch.zeros(weights[0].shape[1], dtype=torch.float64)
    for block in row_blocks(weights):
        g = block.abs().reshape(block.shape[0], -1, group_size)
        total += (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(block.shape).sum(0, dtype=torch.float64)
    return (total / sum(w.shape[0] for w in weights)).float()


def row_blocks(weights: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The rows of `weights`, stacked, as views of at most `BATCH_ELEMENTS` floats (no copy)."""
    for w in weights:
        yield from w.split(max(1, BATCH_ELEMENTS // w.shape[1]))


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
    weights: list[torch.Tensor], quantized: list[bool], stats: InputStats, scheme: Scheme, group: ScaleGroup
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale minimizing Σ ‖Q(W·s)/s − W‖_G over the quantized linears,
    among scales `group` can fold (`ScaleGroup.widen`): returned per output channel of its smooth op.

    Candidates are evaluated a batch at a time (rows of every candidate stacked into one
    matrix): a few large tensor operations instead of hundreds of small ones, which matters on
    a busy CPU where every parallel region waits for its slowest thread.
    Returns (scales, error with s = 1, best error), errors per calibration token.
    """
    x_mean = stats.abs_mean.float()
    linears = [w for w, q in zip(weights, quantized, strict=True) if q]
    salience = weight_salience(linears, scheme.group_size)
    candidates = scale_candidates(group.narrow(x_mean), group.narrow(salience))
    errors = []
    per_batch = max(1, BATCH_ELEMENTS // sum(w.numel() for w in linears))
    for start in range(0, len(candidates), per_batch):
        s = torch.stack([group.widen(c) for c in candidates[start : start + per_batch]]).unsqueeze(1)  # [c, 1, in]
        error = torch.zeros(s.shape[0])
        for rows in row_blocks(linears):  # rows are independent given s: errors add up over blocks
            scaled = (rows * s).reshape(-1, rows.shape[1])
            deq = fake_quantize_int4(scaled, scheme.group_size, scheme.symmetric, scheme.scale_dtype)
            error += output_errors(deq.reshape(s.shape[0], *rows.shape) / s - rows, stats)
        errors.append(error)
    errors = torch.cat(errors) / stats.tokens
    best = int(torch.argmin(errors))  # first minimum: ties keep the smaller α
    return candidates[best], float(errors[0]), float(errors[best])


def output_errors(delta: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Σ over calibration tokens of ‖δ x‖² for each weight error `delta` ([c, rows, in]): through
    the inputs themselves where they were kept (fewer tokens than inputs), else the Gram matrix."""
    if stats.inputs is not None:
        return (delta @ stats.inputs.T).square().sum(dim=(1, 2))
    return quadratic_forms(delta, stats.gram.float())  # float32 as accumulated: no copy


def quadratic_forms(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ over rows of δ G δᵀ for each candidate of `delta` ([c, rows, in]), G symmetric.

    Over column blocks J of δ: δ_J · (δ_J G_JJ + 2 Σ_{I<J} δ_I G_IJ), so the blocks of G below its
    diagonal are never multiplied: 10/16 of the flops of Σ (δ G) ⊙ δ at 4 blocks (~0.67 of its time
    here), the same sum up to float32 rounding. Only views of G: nothing the size of G is allocated.
    """
    size = gram.shape[1]
    flat = delta.reshape(-1, size)
    total = torch.zeros(delta.shape[0])
    step = -(-size // GRAM_BLOCKS)
    for start in range(0, size, step):
        cols = slice(start, start + step)
        seen = flat[:, cols] @ gram[cols, cols]
        if start:
            seen.addmm_(flat[:, :start], gram[:start, cols], alpha=2)
        total += (seen * flat[:, cols]).reshape(delta.shape[0], -1).sum(1)
    return total


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, stats: InputStats) -> None:
    """W·diag(s) on the balance linears, ÷s on the op producing their input: same float function.

    `scales` are per output channel of the producer (`search_scales`)."""
    smooth = layer.get_submodule(group.smooth)
    rows = slice(*group.rows) if group.rows else slice(None)
    if isinstance(smooth, nn.Linear):
        smooth.weight[rows].div_(scales.unsqueeze(1))  # the producer's output channels
    elif group.plus_one:  # Gemma: x̂ · (1 + w) / s = x̂ · (1 + w')
        smooth.weight.copy_((1 + smooth.weight) / scales - 1)
    else:
        smooth.weight.div_(scales)  # RMSNorm's elementwise weight
    if getattr(smooth, "bias", None) is not None:
        smooth.bias[rows].div_(scales)
    wide = group.widen(scales)
    for name in group.balance:
        layer.get_submodule(name).weight.mul_(wide)
    # The balance linears now see x / s: keep their statistics in step for later searches.
    rescale_stats(stats, wide)


def rescale_stats(stats: InputStats, scales: torch.Tensor) -> None:
    """Statistics of inputs x, made those of x / s."""
    if stats.gram is not None:
        s = scales.to(stats.gram.dtype)
        stats.gram.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))  # in place: at 8B down_proj's Gram is 0.77 GiB
    if stats.inputs is not None:
        stats.inputs.div_(scales)
    stats.abs_sum = stats.abs_sum / scales.double()
    stats.abs_max = stats.abs_max / scales


def clip_factors(symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (low, high) range factors the clipping search tries, least clipping first.

    AutoAWQ shrinks both ends by one factor. `OPTIONS.split_ends` (asymmetric) tries every pair of
    factors; `OPTIONS.widen` (symmetric) also tries ranges past max|w|, down to scale = max|w| / 7
    (ModelOpt's and TensorRT-LLM's symmetric int4 maximum, where max|w| lands on code 7 exactly
    instead of being rounded down from 7.5).
    """
    shrink = torch.tensor([1 - i / CLIP_GRID for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID))])
    if symmetric:
        factors = torch.cat([shrink, torch.tensor([7.5 / 7.25, 7.5 / 7])]) if OPTIONS.widen else shrink
        return factors, factors
    if OPTIONS.split_ends:
        return shrink.repeat_interleave(len(shrink)), shrink.repeat(len(shrink))
    return shrink, shrink


def on_grid(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """`groups` ([..., n, group]) rounded onto per-group int4 grids (`[..., n]`) and dequantized:
    `rtn.int4_codes` then `QuantizedLinear.dequantize`, for any leading shape."""
    step = scale.float().unsqueeze(-1)
    q = torch.round(groups / step)
    if zero is None:
        return q.clamp(-8, 7) * step
    z = zero.float().unsqueeze(-1)
    return ((q + z).clamp(0, 15) - z) * step


def group_grams(stats: InputStats, group_size: int) -> torch.Tensor:
    """The diagonal blocks of the Gram matrix, one per group of inputs ([groups, gs, gs]): cut from
    the Gram, or each group's XᵀX where the inputs were kept instead."""
    if stats.gram is None:
        x = stats.inputs.reshape(stats.inputs.shape[0], -1, group_size).transpose(0, 1)  # [groups, T, gs]
        return torch.bmm(x.transpose(1, 2), x)
    gram, n_groups = stats.gram.float(), stats.gram.shape[0] // group_size  # no copy
    return torch.stack([gram[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size]
                        for g in range(n_groups)])  # fmt: skip


def search_clip(weight: torch.Tensor, stats: InputStats, scheme: Scheme) -> tuple[torch.Tensor, Grid]:
    """`weight` clamped, per output row and group, to the range with least output error, and the
    int4 grid spanning that range (`rtn.int4_grid`).

    Asymmetric ranges are [min, max] scaled by the factors of `clip_factors`; symmetric ones
    ±max|w|. Each group's error uses only its diagonal block of the Gram matrix, as AutoAWQ
    measures the partial dot product of each group separately; `OPTIONS.joint` then revisits the
    choices with the whole Gram matrix (`refine_jointly`).
    """
    group_size = scheme.group_size
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    blocks = group_grams(stats, group_size) / stats.tokens  # [groups, gs, gs]
    w = weight.float().reshape(out_features, n_groups, group_size)
    if scheme.symmetric:
        hi = w.abs().amax(-1)
        lo = -hi
    else:
        hi, lo = w.amax(-1), w.amin(-1)
    low, high = clip_factors(scheme.symmetric)

    def clipped(
        f_lo: torch.Tensor, f_hi: torch.Tensor, part: slice = slice(None), rows: slice = slice(None)
    ) -> tuple[torch.Tensor, Grid]:
        """The groups `part` of `rows` clamped to [lo·f_lo, hi·f_hi] (per candidate, row, group), and their grids."""
        w_lo, w_hi = lo[rows, part] * f_lo, hi[rows, part] * f_hi
        groups = torch.clamp(w[rows, part], w_lo.unsqueeze(-1), w_hi.unsqueeze(-1))
        return groups, int4_grid(w_lo, w_hi, scheme.symmetric, scheme.scale_dtype)

    def deltas(
        f_lo: torch.Tensor, f_hi: torch.Tensor, part: slice = slice(None), rows: slice = slice(None)
    ) -> torch.Tensor:
        groups, (scale, zero) = clipped(f_lo, f_hi, part, rows)
        return on_grid(groups, scale, zero) - w[rows, part]

    def choose(rows: slice) -> torch.Tensor:
        """Each group's least-error factor for `rows` ([rows, groups]; the first minimum clips least)."""
        count = w[rows].shape[0]
        errors = []
        per_batch = max(1, BATCH_ELEMENTS // (count * in_features))
        for start in range(0, len(low), per_batch):
            f_lo, f_hi = (f[start : start + per_batch].reshape(-1, 1, 1) for f in (low, high))  # [c, 1, 1]
            delta = deltas(f_lo, f_hi, rows=rows).permute(2, 0, 1, 3).reshape(n_groups, -1, group_size)
            error = (torch.bmm(delta, blocks) * delta).sum(-1)  # [groups, c * rows]
            errors.append(error.reshape(n_groups, -1, count).permute(1, 2, 0))
        return torch.argmin(torch.cat(errors), dim=0)

    # Rows choose independently: a block of them at a time keeps every temporary ≤ BATCH_ELEMENTS
    # floats (one candidate over 8B's gate_proj alone is 58 M).
    step = max(1, BATCH_ELEMENTS // in_features)
    best = torch.cat([choose(slice(r, r + step)) for r in range(0, out_features, step)])
    if OPTIONS.joint:
        chosen_delta = deltas(low[best], high[best]).reshape(out_features, in_features)
        every = partial(deltas, low.reshape(-1, 1, 1), high.reshape(-1, 1, 1))
        best = refine_jointly(best, chosen_delta, every, stats.full_gram().float())
    chosen, grid = clipped(low[best], high[best])
    return chosen.reshape(out_features, in_features), grid


def refine_jointly(
    best: torch.Tensor, current: torch.Tensor, deltas: Callable[[slice], torch.Tensor], gram: torch.Tensor
) -> torch.Tensor:
    """Coordinate descent on each row's whole output error ΔGΔᵀ, one group at a time.

    The per-group search scores a group's error alone, but errors of different groups add up
    through the off-diagonal blocks of G (correlated input channels). Each step keeps the other
    groups' choices and picks, per row, the candidate minimizing the total: δGδᵀ + 2δ·c, with
    c the other groups' error seen through G. A row's error never grows, so starting from the
    per-group choice can only improve it. `deltas(part)`: every candidate's error for the groups
    in `part`, `[candidates, out, groups, gs]`; `current`: the error of the choices `best`, `[out, in]`.
    """
    out_features, n_groups = best.shape
    group_size = gram.shape[0] // n_groups
    rows = torch.arange(out_features)
    seen = current @ gram  # [out, in]: every row's error through G
    for _ in range(JOINT_SWEEPS):
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            block = gram[cols, cols]
            candidates = deltas(slice(g, g + 1))[:, :, 0]  # [c, out, gs]
            others = seen[:, cols] - current[:, cols] @ block
            error = ((candidates @ block) * candidates).sum(-1) + 2 * (candidates * others).sum(-1)
            best[:, g] = torch.argmin(error, dim=0)
            new = candidates[best[:, g], rows]
            seen += (new - current[:, cols]) @ gram[cols]
            current[:, cols] = new
    return best


@torch.no_grad()
def awq_layer(
    layer: nn.Module,
    stats: dict[str, InputStats],
    quantized: set[str],
    scheme: Scheme,
    groups: list[ScaleGroup],
    step: Callable[[float], None] | None = None,
) -> tuple[dict[str, QuantizedLinear], dict[str, tuple[float, float]]]:
    """Scale search and folding for each group, then clipping and int4 storage for `quantized`;
    `step(fraction)` after each group and linear (a layer of a large model takes minutes).

    A group or linear without statistics (an MoE expert no calibration token reached) is left
    unscaled and unclipped: plain round-to-nearest, which the caller reports.
    Returns the quantized linears (names relative to the layer) and, per scale group, the output
    error per token with s = 1 and with the chosen s (for logs and tests).
    """
    errors = {}
    total, done = len(groups) + len(quantized), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if step is not None:
            step(done / total)

    for group in groups:
        flags = [name in quantized for name in group.balance]
        group_stats = stats.get(group.stats or group.balance[0])
        if not any(flags) or group_stats is None:
            advance()
            continue  # nothing to protect, or nothing seen: leave the float weights as they are
        weights = [layer.get_submodule(name).weight.float() for name in group.balance]
        scales, rtn_error, best_error = search_scales(weights, flags, group_stats, scheme, group)
        fold_scales(layer, group, scales, group_stats)
        members = {id(stats[n]): stats[n] for n in group.balance if n in stats}  # experts: own subsets
        for member in members.values():  # ... of the same input, which now arrives as x / s too
            if member is not group_stats:
                rescale_stats(member, group.widen(scales))
        errors[group.smooth] = (rtn_error, best_error)
        advance()
    if OPTIONS.gptq:
        result = gptq_rounding(layer, stats, quantized, scheme)
        for _ in quantized:
            advance()
        return result, errors
    result = {}
    for name in sorted(quantized):
        weight = layer.get_submodule(name).weight.float()
        if OPTIONS.clip and not name.endswith(NO_CLIP) and name in stats:
            weight, (scale, zero) = search_clip(weight, stats[name], scheme)
            result[name] = QuantizedLinear(int4_codes(weight, scale, zero, scheme.group_size), scale, zero)
        else:
            result[name] = quantize_int4(weight, scheme)
        advance()
    return result, errors


def gptq_rounding(
    layer: nn.Module, stats: dict[str, InputStats], quantized: set[str], scheme: Scheme
) -> dict[str, QuantizedLinear]:
    """GPTQ error feedback on the scaled weights, onto the grids the clipping search chose.

    After folding, the linears compute Q(W·s)(x / s): GPTQ's Hessian is that of the inputs x / s,
    which `rescale_stats` already made of the statistics. The clipped range of each group fixes
    its grid up front (static groups); GPTQ then rounds the unclipped weights onto it, feeding
    each column's error — clipping included — to the columns not yet rounded. Combining the two
    follows the AWQ paper's note that AWQ is orthogonal to GPTQ (arXiv 2306.00978 §5.3, Table 6).
    """

    def clipped_grid(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not OPTIONS.clip or name.endswith(NO_CLIP):
            return None
        return search_clip(weight, stats[name], scheme)[1]

    seen = {n for n in quantized if n in stats}
    result = gptq_layer(layer, stats, seen, scheme, clipped_grid, OPTIONS.act_order)
    for name in sorted(quantized - seen):  # no statistics: round-to-nearest, which the caller reports
        result[name] = quantize_int4(layer.get_submodule(name).weight.float(), scheme)
    return result
