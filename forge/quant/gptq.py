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
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import nn

from forge.quant.layerwise import InputStats
from forge.quant.model import QuantizedLinear, Scheme
from forge.quant.rtn import ROW_BLOCK, int4_codes, int4_qparams

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


def factor_inverse_hessian_(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """In place: the float32 H becomes the upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU);
    returns the dead-column mask.

    float32, as the GPTQ reference keeps and factors H (`gptq.py`: `H` float32, `torch.linalg.cholesky`,
    `cholesky_inverse`, `cholesky(upper=True)`), and in place, because H is in_features² floats: for
    Llama-3.1-8B's down_proj 14336² (0.77 GiB), for 70B's 28672² (3.1 GiB). Each LAPACK step
    (potrf, potri, potrf) overwrites its input; torch lets it when `out` is the input and is laid
    out as LAPACK wants, column-major: for a symmetric matrix, its transpose view. The last step
    factors the inverse as L Lᵀ into that view, which leaves `hessian`, read row-major, as U = Lᵀ.
    Input channels that never fire (H_jj = 0) get H_jj = 1 so H stays invertible; their weights
    are irrelevant to the outputs and are zeroed by the caller (as the reference does).
    """
    if hessian.dtype != torch.float32 or not hessian.is_contiguous():
        raise ValueError("factor_inverse_hessian_ needs a contiguous float32 matrix")
    diagonal = torch.diagonal(hessian)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damp * diagonal.mean())
    column_major = hessian.mT
    torch.linalg.cholesky(column_major, out=column_major)
    torch.cholesky_inverse(column_major, out=column_major)
    torch.linalg.cholesky(column_major, out=column_major)
    return dead


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
    """One `[out, in]` weight to int4, `weight` and `hessian` left as they are.

    `order`: act-order (see `act_order`), with static groups. `grid`: fixed per-group (scale, zero)
    to round onto (e.g. from clipped weights); with neither, each group's grid is computed when
    its first column comes up. Groups stay contiguous in the original column order and codes are
    stored in that order, so the format never changes.
    """
    perm = act_order(hessian) if order else None
    hinv = hessian.to(torch.float32, copy=True).contiguous()
    if perm is not None:
        permute_(hinv, perm)
    dead = factor_inverse_hessian_(hinv)
    return round_columns_(weight.to(torch.float32, copy=True), hinv, dead, perm, scheme, grid)


def permute_(matrix: torch.Tensor, perm: torch.Tensor) -> None:
    """`matrix[perm][:, perm]` into `matrix`, with one temporary copy alive at a time."""
    matrix.copy_(matrix[perm])
    matrix.copy_(matrix[:, perm])


def round_columns_(
    w: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    perm: torch.Tensor | None,
    scheme: Scheme,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> QuantizedLinear:
    """GPTQ's column loop on the float32 `w`, in place: `w` is left holding each column as it was
    when rounded (in the original column order), from which the codes are computed.

    `hinv`, `dead`: `factor_inverse_hessian_` of H with rows and columns in `perm` order (None:
    the natural order). `grid`: as `gptq_quantize`'s; act-order without one rounds onto
    `static_grid(w)`, computed before any column changes. Working in place keeps the layer's
    memory at one copy of each weight: at 70B a gate_proj is 28672 × 8192 floats (0.9 GiB).
    """
    group_size = scheme.group_size
    out_features, in_features = w.shape
    if grid is None and perm is not None:
        grid = static_grid(w, scheme)
    work = w if perm is None else w[:, perm]  # act-order: the columns in rounding order (a copy)
    work[:, dead] = 0
    block = group_size * max(1, BLOCK // group_size)  # whole groups per block: scales see updates
    n_groups = in_features // group_size
    if grid is None:
        scales = torch.empty(out_features, n_groups, dtype=scheme.scale_dtype)
        zeros = None if scheme.symmetric else torch.empty(out_features, n_groups, dtype=torch.int8)
    else:
        scales, zeros = grid
    columns = torch.arange(in_features) if perm is None else perm
    column_group = (columns // group_size).tolist()  # each column's group in the original order
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = work[:, i1:i2].clone()
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
                work[:, i1 + i : i1 + i + 1] = col  # the column as rounded: its codes come from it
                err = (col - deq) / hinv1[i, i]
                w1[:, i:] -= err @ hinv1[i : i + 1, i:]  # feed the error to the columns left
                err1[:, i : i + 1] = err
        work[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the later blocks
    if perm is not None:
        w[:, perm] = work
    codes = torch.empty(w.shape, dtype=torch.int8)
    for rows in _row_blocks(out_features):  # float temporaries of a block of rows, not of the weight
        codes[rows] = int4_codes(w[rows], scales[rows], None if zeros is None else zeros[rows], group_size)
    return QuantizedLinear(codes, scales, zeros)


class Parked:
    """The named linears of a layer held in the narrowest float dtype that holds each weight exactly
    (`park_`: a bfloat16 checkpoint's 70B layer in 1.6 GiB instead of 3.2) while the streaming
    quantizer calibrates and solves it. A linear is float32 only while it runs (a copy made by a
    forward pre-hook, dropped by its forward hook: the same outputs) and, for good, once solved
    (`gptq_layer` with `release`); `close` makes the rest float32 again and removes the hooks."""

    def __init__(self, layer: nn.Module, names: Iterable[str]) -> None:
        self.modules = [layer.get_submodule(name) for name in sorted(names)]
        self.narrow: dict[int, torch.Tensor] = {}
        self.hooks = []
        for module in self.modules:
            park_(module.weight)
            self.hooks += [module.register_forward_pre_hook(self._widen), module.register_forward_hook(self._restore)]

    def _widen(self, module: nn.Module, _args: tuple) -> None:
        if module.weight.dtype != torch.float32:
            self.narrow[id(module)] = module.weight.data
            module.weight.data = module.weight.data.float()

    def _restore(self, module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
        if (narrow := self.narrow.pop(id(module), None)) is not None:
            module.weight.data = narrow

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for module in self.modules:
            module.weight.data = module.weight.data.float()  # exact; float32 weights stay as they are


def park_(weight: torch.Tensor) -> None:
    """Hold a float32 weight as bfloat16 or float16 if either holds every value exactly (a weight
    read from a checkpoint of that dtype), else leave it: a 70B layer waits in 1.6 GiB, not 3.2.
    Cast and checked a block of rows at a time, so no float32 temporary of the whole weight exists."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = torch.empty_like(weight.data, dtype=dtype)
        for rows in _row_blocks(weight.shape[0]):
            narrow[rows] = weight.data[rows]
            if not torch.equal(narrow[rows].to(torch.float32), weight.data[rows]):
                break
        else:
            weight.data = narrow
            return


def _row_blocks(rows: int) -> list[slice]:
    return [slice(start, min(start + ROW_BLOCK, rows)) for start in range(0, rows, ROW_BLOCK)]


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
    order: bool | None = None,
    *,
    release: bool = False,
) -> dict[str, QuantizedLinear]:
    """GPTQ for a decoder layer's quantized linears; linears sharing an input share one factored H.

    GPTQ treats output rows independently given H, so the linears fed the same input (q/k/v,
    gate/up) are rounded one after the other with the same H⁻¹ factor: what solving them stacked
    would give, without a stacked copy. `grid(name, weight)`: a fixed int4 grid for that linear
    (AWQ's clipped ranges), or None; when one linear of an input has a fixed grid, the others
    get theirs from their weights up front (`static_grid`), as a stacked solve would. `order`:
    act-order, `OPTIONS.act_order` when None.

    `release`: the caller is done with the layer's float weights and its statistics (the
    streaming quantizer). Each input's Gram matrix is then factored in place and dropped once its
    linears are rounded, and each weight is rounded in place and left holding its dequantized
    value, the layer as served (in float32, also where it waited narrower: `Parked`). At
    Llama-3.1-8B scale the down_proj Gram alone is 14336² floats (0.77 GiB) and the layer 0.8 GiB,
    so copies of either are what the peak memory is made of.
    Without it, `stats` and the layer are left as they are.
    """
    order = OPTIONS.act_order if order is None else order
    by_input: dict[int, list[str]] = {}
    for name in sorted(quantized):
        by_input.setdefault(id(stats[name]), []).append(name)
    result = {}
    for names in by_input.values():
        input_stats = stats[names[0]]
        weights = [layer.get_submodule(n).weight for n in names]
        grids = [grid(n, w.float()) for n, w in zip(names, weights, strict=True)] if grid else [None] * len(names)
        if any(g is not None for g in grids):  # static groups for all: the grids a stacked solve would use
            grids = [g or static_grid(w.float(), scheme) for g, w in zip(grids, weights, strict=True)]
        hessian = input_stats.full_gram().to(torch.float32, copy=not release)
        if release:
            input_stats.gram = None
        hessian.div_(input_stats.tokens)  # H = mean x xᵀ; GPTQ's result does not depend on its scale
        perm = act_order(hessian) if order else None
        if perm is not None:
            permute_(hessian, perm)
        dead = factor_inverse_hessian_(hessian)
        for name, weight, fixed in zip(names, weights, grids, strict=True):
            w = weight.data if release and weight.dtype == torch.float32 else weight.to(torch.float32, copy=True)
            linear = round_columns_(w, hessian, dead, perm, scheme, fixed)
            if release:
                weight.data = w  # float32 again, if it was parked
                for rows in _row_blocks(w.shape[0]):  # the served weight
                    zero = None if linear.zero_point is None else linear.zero_point[rows]
                    weight.data[rows] = QuantizedLinear(linear.codes[rows], linear.scale[rows], zero).dequantize()
            result[name] = linear
        del hessian, w
    return result
