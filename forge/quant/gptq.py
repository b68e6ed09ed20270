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

from collections.abc import Iterator
from contextlib import contextmanager

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


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    """One `[out, in]` weight (or several stacked along `out` that share `hessian`) to int4."""
    group_size = scheme.group_size
    w = weight.float().clone()
    out_features, in_features = w.shape
    hinv, dead = inverse_hessian_cholesky(hessian)
    w[:, dead] = 0
    block = group_size * max(1, BLOCK // group_size)  # whole groups per block: scales see updates
    n_groups = in_features // group_size
    scales = torch.empty(out_features, n_groups, dtype=scheme.scale_dtype)
    zeros = None if scheme.symmetric else torch.empty(out_features, n_groups, dtype=torch.int8)
    rounded_from = torch.empty_like(w)  # each column as it was when rounded
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with one_thread():
            for i in range(i2 - i1):
                if (i1 + i) % group_size == 0:  # a group starts: its grid from the updated weights
                    g = (i1 + i) // group_size
                    scale, zero = int4_qparams(
                        w1[:, i : i + group_size], group_size, scheme.symmetric, scheme.scale_dtype
                    )
                    scales[:, g : g + 1] = scale
                    if zeros is not None:
                        zeros[:, g : g + 1] = zero
                col = w1[:, i : i + 1]
                deq = QuantizedLinear(int4_codes(col, scale, zero, 1), scale, zero).dequantize()
                rounded_from[:, i1 + i : i1 + i + 1] = col
                err = (col - deq) / hinv1[i, i]
                w1[:, i:] -= err @ hinv1[i : i + 1, i:]  # feed the error to the columns left
                err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy batch update of the later blocks
    return QuantizedLinear(int4_codes(rounded_from, scales, zeros, group_size), scales, zeros)


@torch.no_grad()
def gptq_layer(
    layer: nn.Module, stats: dict[str, InputStats], quantized: set[str], scheme: Scheme
) -> dict[str, QuantizedLinear]:
    """GPTQ for a decoder layer's quantized linears; linears sharing an input share one solve.

    GPTQ treats output rows independently given H, so q/k/v (and gate/up) are stacked and
    solved together, then split: the same result as solving each, in fewer Python steps.
    """
    by_input: dict[int, list[str]] = {}
    for name in sorted(quantized):
        by_input.setdefault(id(stats[name]), []).append(name)
    result = {}
    for names in by_input.values():
        input_stats = stats[names[0]]
        hessian = input_stats.gram / input_stats.tokens
        weights = [layer.get_submodule(n).weight for n in names]
        stacked = gptq_quantize(torch.cat(weights), hessian, scheme)
        start = 0
        for name, w in zip(names, weights, strict=True):
            rows = slice(start, start + w.shape[0])
            zero = None if stacked.zero_point is None else stacked.zero_point[rows].clone()
            result[name] = QuantizedLinear(stacked.codes[rows].clone(), stacked.scale[rows].clone(), zero)
            start += w.shape[0]
    return result
