"""The quantize stage: a dense safetensors checkpoint in, forge's canonical `QuantizedModel` out.

Round-to-nearest needs only the weights. Everything calibrated (AWQ, GPTQ, static FP8 input
scales, FP8 KV-cache scales) walks the calibration tokens through the model one decoder layer at
a time (`layerwise.py`), and each algorithm turns a layer's input statistics into its quantized
linears. What feeds layer i + 1:

- AWQ and GPTQ: the outputs of the *quantized* layer i, so each layer is calibrated on the
  inputs it will see when served and can absorb the error of the layers before it (the GPTQ
  reference does this; AutoAWQ uses the dense outputs). Measured for AWQ on SmolLM2-135M, g64,
  32 wikitext-2 windows: 28.51 with quantized inputs vs 28.67 with dense ones (RTN 31.98,
  baseline 24.19), for one more forward pass per layer.
- Static FP8 input scales and KV-cache scales alone: the dense layer's outputs, one pass.

Everything streams, so an 8B model quantizes in a few GiB: the checkpoint is read one decoder
layer at a time (`Checkpoint`, headers checked up front), the calibrated path builds the model on
the meta device and makes real only the embeddings (once) and the layer being calibrated
(`StreamedModel`), and `quantize_parts` hands out each layer's result as soon as it is done, for
`quantize_to_cache` to write (`QuantizedWriter`) and drop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forge.architectures import Architecture, fused_rows, get_architecture, num_experts
from forge.errors import InputError
from forge.formats.model_dir import Checkpoint
from forge.formats.specs import group_size_problem
from forge.quant.awq import awq_layer, scale_groups
from forge.quant.fp8_static import fp8_static_layer
from forge.quant.gptq import Parked, gptq_layer
from forge.quant.kv_cache import kv_cache_scales
from forge.quant.layerwise import (
    KVSources,
    StreamedModel,
    collect_layer_stats,
    layer_linear_names,
    run_layer,
)
from forge.quant.model import QuantizedLinear, QuantizedModel, QuantizedWriter, Scheme, cache_tensors, open_quantized
from forge.quant.moe import unfuse_layer_experts
from forge.quant.presets import AWQ_ALGORITHMS, needs_calibration
from forge.quant.rounding import tune_rounding
from forge.quant.rtn import quantizable_linears, quantize_weight, split_state

ALGORITHMS = ("rtn", "gptq", *AWQ_ALGORITHMS)
AWQ_SHARE = 0.2  # awq_tuned: the share of a layer's progress its AWQ searches take, the rest is tuning
Progress = Callable[[str, float, int], None]  # (what, done: whole layers and a fraction, total)


def check_group_size(state: dict[str, torch.Tensor], names: list[str], scheme: Scheme) -> None:
    """int4 groups must tile every quantized linear's input dimension exactly (the plan's one rule,
    `forge.formats.specs.group_size_problem`, over the checkpoint's actual widths)."""
    if scheme.weight_format != "int4":
        return
    widths = {name: state[f"{name}.weight"].shape[1] for name in names}
    if (problem := group_size_problem(scheme.group_size, widths)) is not None:
        raise InputError(f"group_size: {problem}")


@dataclass
class Part:
    """What the quantizer hands out at a time (a decoder layer's results, or one other tensor)."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)


def quantize_checkpoint(
    model_dir: Path,
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor | None,
    progress: Progress | None = None,
) -> QuantizedModel:
    """Quantize the dense checkpoint in `model_dir` with `algorithm` (rtn | gptq | awq), in memory.

    Every part of `quantize_parts` gathered into one `QuantizedModel` (small models, tests);
    `quantize_to_cache` writes the same parts to disk as they come instead.
    """
    report: dict = {}
    model = QuantizedModel(_config(model_dir), scheme, {}, {}, {}, calibration=report)
    for part in quantize_parts(model_dir, scheme, algorithm, calibration, progress, report):
        model.dense.update(part.dense)
        model.linears.update(part.linears)
        model.kv_scales.update(part.kv_scales)
    return model


def quantize_to_cache(
    model_dir: Path,
    out_dir: Path,
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor | None,
    progress: Progress | None = None,
) -> QuantizedModel:
    """`quantize_checkpoint` written to forge's cache in `out_dir` part by part (`QuantizedWriter`),
    so memory follows one decoder layer; returns the cache opened lazily (`open_quantized`)."""
    report: dict = {}
    writer = QuantizedWriter(out_dir)
    for part in quantize_parts(model_dir, scheme, algorithm, calibration, progress, report):
        if tensors := cache_tensors(part.dense, part.linears, part.kv_scales):
            writer.add(tensors)
        del part, tensors  # written: not held while the next layer is quantized
    writer.finish(_config(model_dir), scheme, report)
    return open_quantized(out_dir)


def _config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_groups(names: list[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Checkpoint names by decoder layer index, and the names outside every decoder layer."""
    layers: dict[int, list[str]] = {}
    rest = []
    for name in names:
        if match := _LAYER.match(name):
            layers.setdefault(int(match.group(1)), []).append(name)
        else:
            rest.append(name)
    return dict(sorted(layers.items())), rest


def quantize_parts(
    model_dir: Path,
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor | None,
    progress: Progress | None = None,
    report: dict | None = None,
) -> Iterator[Part]:
    """The quantized model a part at a time: each tensor outside the decoder layers, then each layer.

    `calibration` is `load_calibration`'s token tensor; it may be None only for uncalibrated
    schemes (RTN weights without static activation or KV-cache scales). `progress(stage, done,
    total)` reports each decoder layer, stage "awq", "gptq" or "calibrate" (static FP8 / KV scales
    only); an uncalibrated run reports ("rtn", 1, 1) when done. Every check on the inputs runs
    before the first part is handed out. Dense tensors keep the checkpoint's dtype.
    """
    if algorithm not in ALGORITHMS:
        raise InputError(f"quantization: unknown algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    if algorithm != "rtn" and scheme.weight_format != "int4":
        raise InputError(f"quantization: {algorithm} produces int4 weights; {scheme.preset} is {scheme.weight_format}")
    config = _config(model_dir)
    source = Checkpoint(model_dir, "source")
    shapes = source.shapes()
    names = quantizable_linears(shapes, scheme, config)
    check_group_size(shapes, names, scheme)
    layers, rest = layer_groups(source.names)
    calibrated = needs_calibration(scheme, algorithm)
    if calibrated and calibration is None:
        raise InputError(f"calibration: {scheme.preset} ({algorithm}) needs calibration data; none was given")
    if not calibrated:
        for name in rest:  # a part of its own: an 8B embedding alone is 1 GB
            yield rtn_part(source, [name], config, scheme)
        for group in layers.values():
            yield rtn_part(source, group, config, scheme)
        if progress is not None:
            progress("rtn", 1, 1)
        return
    model = StreamedModel(model_dir, source)
    count = len(model.layers)
    # Layers the model does not run (none in a well-formed checkpoint) are rounded to nearest.
    for name in rest + [n for i, group in layers.items() if i >= count for n in group]:
        yield rtn_part(source, [name], config, scheme)
    groups = [layers.get(i, []) for i in range(count)]
    yield from calibrated_quantize(model, source, groups, names, scheme, algorithm, calibration, progress, report)


def rtn_part(source: Checkpoint, names: list[str], config: dict, scheme: Scheme) -> Part:
    """Round-to-nearest for the quantizable linears among `names`, the rest dense as read; one
    tensor read at a time, so memory holds one source tensor beside the part's results."""
    part = Part()
    for name in names:
        state = source.read([name])
        dense, linears = split_state(state, config, scheme)
        part.dense.update(dense)
        part.linears.update({module: quantize_weight(state[f"{module}.weight"], scheme) for module in linears})
    return part


def kv_sources(arch: Architecture, config: dict) -> KVSources:
    """Where the architecture's cached keys and values appear in a loaded layer."""
    if "self_attn.qkv_proj" in arch.fused:
        rows = fused_rows(arch, config, "self_attn.qkv_proj")
        return KVSources("self_attn.qkv_proj", "self_attn.qkv_proj", rows["k"], rows["v"])
    return KVSources("self_attn.k_norm" if arch.qk_norm else "self_attn.k_proj", "self_attn.v_proj")


@torch.no_grad()
def calibrated_quantize(
    model: StreamedModel,
    source: Checkpoint,
    layer_names: list[list[str]],
    names: list[str],
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor,
    progress: Progress | None = None,
    report: dict | None = None,
) -> Iterator[Part]:
    """Layer by layer: statistics, quantized linears, KV scales, next layer's inputs.

    KV scales come from the layer as served: after AWQ / GPTQ, from the quantized layer's k/v.
    The model's own decoder layers run with the arguments its forward gives them
    (`capture_layer_inputs`); MoE experts run unfused so each one's statistics cover exactly
    the tokens routed to it. A quantized linear without statistics (an expert no calibration
    token reached) falls back to round-to-nearest; `report` (when given) receives per-layer
    expert token counts and the names of those fallbacks.

    `model` makes layer i real from its checkpoint tensors (`layer_names[i]`, read from `source`)
    and releases it once its part is handed out: one part per layer, holding its quantized
    linears, KV-cache scales and dense tensors under full checkpoint names. A dense tensor an
    algorithm changed (AWQ's folded norms) is stored as computed, in float32; every other one as read.
    """
    config = model.config
    arch = get_architecture(config)
    layers = model.layers
    hidden, per_layer_kwargs = model.embed(calibration)
    kv = scheme.kv_cache_dtype == "fp8"
    sources = kv_sources(arch, config)
    router = (arch.to_memory(arch.router),) if arch.router else ()
    report = {} if report is None else report
    report.setdefault("expert_tokens", {})
    report.setdefault("rtn_fallback", [])
    awq = algorithm in AWQ_ALGORITHMS
    share = AWQ_SHARE if algorithm == "awq_tuned" else 1.0
    for index in range(len(layers)):
        state = source.read(layer_names[index])
        layer = model.layer(index, state)
        unfuse_layer_experts(layer, arch)
        dense, _ = split_state(state, config, scheme)
        del state  # the layer holds its float32 copy
        changed: dict[str, torch.Tensor] = {}
        layer_kwargs = per_layer_kwargs[index]
        prefix = f"model.layers.{index}."
        quantized = {arch.to_memory(n.removeprefix(prefix)) for n in names if n.startswith(prefix)}
        linear_names = layer_linear_names(layer, router)
        solved: dict[str, QuantizedLinear] = {}
        if algorithm == "gptq":
            parked = Parked(layer, quantized)  # narrow until solved (70B: 1.6 GiB)
            # The down projections first, on a pass of their own: their Grams are the widest (70B:
            # 28672², 3.06 GiB) and never coexist with the others (0.75 GiB). Their outputs feed no
            # other linear of the layer, so the second pass sees every other input as before.
            last = [n for n in linear_names if arch.feeds_no_linear(arch.to_checkpoint(n))]
            down, _ = collect_layer_stats(layer, hidden, layer_kwargs, last, gram=True, kv=False)
            solved = gptq_layer(layer, down.inputs, quantized & set(down.inputs), scheme, release=True)
            linear_names = [n for n in linear_names if n not in last]
            del down
        stats, dense_out = collect_layer_stats(
            layer,
            hidden,
            layer_kwargs,
            linear_names,
            gram=algorithm != "rtn",
            kv=kv,
            kv_sources=sources,
            inputs=awq,
        )
        unseen = sorted(n for n in quantized if n not in stats.inputs and n not in solved)
        if arch.moe and router and router[0] in {n for n, _ in layer.named_modules()}:
            experts = arch.to_memory(arch.experts)
            gate = arch.expert_linears[0]
            report["expert_tokens"][str(index)] = [
                stats.inputs[f"{experts}.{e}.{gate}"].tokens if f"{experts}.{e}.{gate}" in stats.inputs else 0
                for e in range(num_experts(config))
            ]
        if awq:
            step = _layer_step(progress, "awq", index, len(layers), 0.0, share)
            groups = scale_groups(layer, arch, config)
            layer_linears, _ = awq_layer(layer, stats.inputs, quantized, scheme, groups, step)
            if algorithm == "awq_tuned":
                step = _layer_step(progress, "tune", index, len(layers), share, 1 - share)
                rounded = layer_linears
                layer_linears, errors = tune_rounding(
                    layer, layer_linears, hidden, dense_out, layer_kwargs, scheme, step
                )
                report.setdefault("tuned_output_error", {})[str(index)] = [round(e, 9) for e in errors]
                # Once the attention is int4 the router may send a token to an expert the dense pass
                # never reached: its codes are then tuned, no longer round-to-nearest.
                unseen = [n for n in unseen if torch.equal(layer_linears[n].codes, rounded[n].codes)]
            for n, p in layer.named_parameters():  # the folded norms (not the linears: a copy of the layer)
                if (name := prefix + arch.to_checkpoint(n)) in dense:
                    changed[name] = p.detach().clone()
        elif algorithm == "gptq":
            rest = quantized - set(unseen) - set(solved)
            layer_linears = solved | gptq_layer(layer, stats.inputs, rest, scheme, release=True)
            parked.close()
        elif scheme.activations == "static_tensor":
            layer_linears = fp8_static_layer(layer, stats.inputs, quantized - set(unseen), scheme)
            for n in unseen:  # no input seen: the widest scale of its kind in the layer bounds it
                kind = n.rsplit(".", 1)[-1]
                peers = [q.input_scale for m, q in layer_linears.items() if m.rsplit(".", 1)[-1] == kind]
                fallback = quantize_weight(layer.get_submodule(n).weight, scheme)
                fallback.input_scale = torch.stack(peers).amax(0) if peers else torch.ones(1)
                layer_linears[n] = fallback
        else:
            layer_linears = {n: quantize_weight(layer.get_submodule(n).weight, scheme) for n in sorted(quantized)}
        for n in unseen:
            if n not in layer_linears:  # round-to-nearest: no statistics to do better with
                layer_linears[n] = quantize_weight(layer.get_submodule(n).weight, scheme)
        if algorithm != "rtn" or scheme.activations == "static_tensor":
            report["rtn_fallback"].extend(prefix + arch.to_checkpoint(n) for n in unseen)
        linears = {prefix + arch.to_checkpoint(n): q for n, q in layer_linears.items()}
        if awq or algorithm == "gptq":
            # The served layer: its outputs feed the next layer, its k/v are what the cache holds.
            for n, q in layer_linears.items():
                layer.get_submodule(n).weight.copy_(q.dequantize())
            if kv:
                stats, hidden = collect_layer_stats(
                    layer, hidden, layer_kwargs, [], gram=False, kv=True, kv_sources=sources
                )
            else:
                hidden = run_layer(layer, hidden, layer_kwargs)
        else:
            hidden = dense_out
        kv_scales = kv_cache_scales(stats, index) if kv else {}
        model.release(index)
        if progress is not None:
            progress(algorithm if algorithm != "rtn" else "calibrate", index + 1, len(layers))
        yield Part(_with_changes(dense, changed), linears, kv_scales)
        # Handed out: the next layer's peak need not hold these codes, nor this layer's Gram matrices.
        del layer_linears, linears, stats, dense_out


def _layer_step(
    progress: Progress | None, stage: str, index: int, total: int, start: float, width: float
) -> Callable[[float], None] | None:
    """Progress within layer `index`: a fraction f of a step spanning [start, start + width] of the layer."""
    if progress is None:
        return None
    return lambda f: progress(stage, index + start + width * f, total)


def _with_changes(dense: dict[str, torch.Tensor], changed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's dense tensors, each one an algorithm changed replaced by its float32 value."""
    out = {}
    for name, tensor in dense.items():
        new = changed.get(name)
        out[name] = tensor if new is None or torch.equal(new, tensor.to(new.dtype)) else new
    return out
