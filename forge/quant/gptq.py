"""GPTQ: int4 weights with second-order error feedback (Frantar et al., arXiv 2210.17323).

Columns are rounded left to right; the rounding error of each column is spread over the columns
not yet rounded, weighted by the inverse Hessian of the layer's output error, H = Σ x xᵀ
(paper Algorithm 1, "lazy batch" blocks of 128 columns and a Cholesky form of H⁻¹). Without
act-order (columns in their natural order), as LMDeploy TurboMind requires, and with a group's
scale and zero point computed when the group's first column comes up, from the weights as the
error feedback has left them (the reference `gptq.py` calls `find_params` at that moment).
Codes and scales follow `rtn.py`'s storage rules exactly, so every writer reads them the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import nn

from forge.quant.layerwise import InputStats
from forge.quant.model import QuantizedLinear, Scheme
from forge.quant.rtn import int4_codes, int4_qparams

# Dampening: λ = 1 % of the mean diagonal of H added to its diagonal (GPTQ `--percdamp .01`).
DAMP = 0.01
# Columns per lazy-batch block (GPTQ `blocksize=128`); rounded to whole groups below.
BLOCK = 128


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny per-column tensor ops on one thread.

    Each column step is a handful of operations on a few thousand floats: splitting them across
    threads costs more in synchronization than it saves, and on a busy machine every parallel
    region waits for a descheduled thread. The block-level matmuls keep every thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, in float64 for stability, and the dead-column mask.

    Input channels that never fire (H_jj = 0) get H_jj = 1 so H stays invertible; their weights
    are irrelevant to the outputs and are zeroed by the caller (as the reference does).
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def static_grid(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every group's scale and zero point from the weights before any error feedback.

    With act-order the columns of a group are rounded at scattered moments, so the grid cannot wait
    for "the group's first column"; the GPTQ reference's `static_groups=True` fixes each group's
    grid from the original weights up front instead (AutoGPTQ `gptq.py`, `static_groups`).
    """
    return int4_qparams(weight, scheme.group_size, scheme.symmetric, scheme.scale_dtype)


def act_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column order by descending H_jj: the inputs with the most energy are rounded first, while
    the most columns are left to absorb their error (GPTQ reference `--act-order`)."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    order: bool = False,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> QuantizedLinear:
    """One `[out, in]` weight (or several stacked along `out` that share `hessian`) to int4.

    `order`: act-order (see `act_order`), with static groups. `grid`: fixed per-group (scale, zero)
    to round onto (e.g. from clipped weights); with neither, each group's grid is computed when
    its first column comes up. Groups stay contiguous in the original column order and codes are
    stored in that order, so the format never changes.
    """
    group_size = scheme.group_size
    w = weight.float().clone()
    out_features, in_features = w.shape
    if grid is None and order:
        grid = static_grid(w, scheme)
    perm = act_order(hessian) if order else torch.arange(in_features)
    w = w[:, perm]
    hinv, dead = inverse_hessian_cholesky(hessian[perm][:, perm])
    w[:, dead] = 0
    block = group_size * max(1, BLOCK // group_size)  # whole groups per block: scales see updates
    n_groups = in_features // group_size
    if grid is None:
        scales = torch.empty(out_features, n_groups, dtype=scheme.scale_dtype)
        zeros = None if scheme.symmetric else torch.empty(out_features, n_groups, dtype=torch.int8)
    else:
        scales, zeros = grid
    column_group = (perm // group_size).tolist()  # each permuted column's group in the original order
    rounded_from = torch.empty_like(w)  # each column as it was when rounded
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with one_thread():
            for i in range(i2 - i1):
                g = column_group[i1 + i]
                if grid is None and (i1 + i) % group_size == 0:  # a group starts: grid from the updated weights
                    scale, zero = int4_qparams(
                        w1[:, i : i + group_size], group_size, scheme.symmetric, scheme.scale_dtype
                    )
                    scales[:, g : g + 1] = scale
                    if zeros is not None:
                        zeros[:, g : g + 1] = zero
                scale = scales[:, g : g + 1]
                zero = None if zeros is None else zeros[:, g : g + 1]
                col = w1[:, i : i + 1]
                deq = QuantizedLinear(int4_codes(col, scale, zero, 1), scale, zero).dequantize()
                rounded_from[:, i1 + i : i1 + i + 1] = col
                err = (col - deq) / hinv1[i, i]
                w1[:, i:] -= err @ hinv1[i : i + 1, i:]  # feed the error to the columns left
                err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the later blocks
    original = torch.empty_like(rounded_from)
    original[:, perm] = rounded_from
    return QuantizedLinear(int4_codes(original, scales, zeros, group_size), scales, zeros)


@dataclass(frozen=True)
class GptqOptions:
    """How `gptq_layer` rounds; `OPTIONS` is what a build uses, `options()` swaps it for a benchmark."""

    act_order: bool = False


OPTIONS = GptqOptions()


@contextmanager
def swapped_options(module: ModuleType, **changes: bool) -> Iterator[None]:
    """Run with some of `module.OPTIONS` changed: benchmarks compare variants of an algorithm
    through its normal entry points (`options` here and in `forge.quant.awq`)."""
    before = module.OPTIONS
    module.OPTIONS = replace(before, **changes)
    try:
        yield
    finally:
        module.OPTIONS = before


def options(**changes: bool) -> AbstractContextManager[None]:
    return swapped_options(sys.modules[__name__], **changes)


Grid = tuple[torch.Tensor, torch.Tensor | None]


@torch.no_grad()
def gptq_layer(
    layer: nn.Module,
    stats: dict[str, InputStats],
    quantized: set[str],
    scheme: Scheme,
    grid: Callable[[str, torch.Tensor], Grid | None] | None = None,
    act_order: bool | None = None,
) -> dict[str, QuantizedLinear]:
    """GPTQ for a decoder layer's quantized linears; linears sharing an input share one solve.

    GPTQ treats output rows independently given H, so q/k/v (and gate/up) are stacked and
    solved together, then split: the same result as solving each, in fewer Python steps.
    `grid(name, weight)`: a fixed int4 grid for that linear (AWQ's clipped ranges), or None.
    """
    order = OPTIONS.act_order if act_order is None else act_order
    by_input: dict[int, list[str]] = {}
    for name in sorted(quantized):
        by_input.setdefault(id(stats[name]), []).append(name)
    result = {}
    for names in by_input.values():
        input_stats = stats[names[0]]
        hessian = input_stats.gram / input_stats.tokens
        weights = [layer.get_submodule(n).weight.float() for n in names]
        grids = [grid(n, w) for n, w in zip(names, weights, strict=True)] if grid is not None else [None]
        fixed = None
        if any(g is not None for g in grids):  # one fixed grid for the stack: the others' from their weights
            grids = [g if g is not None else static_grid(w, scheme) for g, w in zip(grids, weights, strict=True)]
            zeros = None if scheme.symmetric else torch.cat([g[1] for g in grids])
            fixed = (torch.cat([g[0] for g in grids]), zeros)
        stacked = gptq_quantize(torch.cat(weights), hessian, scheme, order=order, grid=fixed)
        start = 0
        for name, w in zip(names, weights, strict=True):
            rows = slice(start, start + w.shape[0])
            zero = None if stacked.zero_point is None else stacked.zero_point[rows].clone()
            result[name] = QuantizedLinear(stacked.codes[rows].clone(), stacked.scale[rows].clone(), zero)
            start += w.shape[0]
    return result
