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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from forge.architectures import Architecture, fused_rows, get_architecture, num_experts
from forge.errors import InputError
from forge.formats.model_dir import iter_tensors
from forge.formats.specs import group_size_problem
from forge.quant.awq import awq_layer, scale_groups
from forge.quant.fp8_static import fp8_static_layer
from forge.quant.gptq import gptq_layer
from forge.quant.kv_cache import kv_cache_scales
from forge.quant.layerwise import (
    KVSources,
    capture_layer_inputs,
    collect_layer_stats,
    decoder_layers,
    layer_linear_names,
    load_float_model,
    run_layer,
)
from forge.quant.model import QuantizedLinear, QuantizedModel, Scheme
from forge.quant.moe import unfuse_experts
from forge.quant.presets import needs_calibration
from forge.quant.rtn import quantizable_linears, quantize_rtn, quantize_weight, split_state

ALGORITHMS = ("rtn", "gptq", "awq")
Progress = Callable[[str, float, int], None]  # (what, done: whole layers and a fraction, total)


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, single file or sharded (`*.index.json`), each
    header checked before anything is mapped (`forge.formats.model_dir.iter_tensors`)."""
    return dict(iter_tensors(model_dir, "source"))


def check_group_size(state: dict[str, torch.Tensor], names: list[str], scheme: Scheme) -> None:
    """int4 groups must tile every quantized linear's input dimension exactly (the plan's one rule,
    `forge.formats.specs.group_size_problem`, over the checkpoint's actual widths)."""
    if scheme.weight_format != "int4":
        return
    widths = {name: state[f"{name}.weight"].shape[1] for name in names}
    if (problem := group_size_problem(scheme.group_size, widths)) is not None:
        raise InputError(f"group_size: {problem}")


def quantize_checkpoint(
    model_dir: Path,
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor | None,
    progress: Progress | None = None,
) -> QuantizedModel:
    """Quantize the dense checkpoint in `model_dir` with `algorithm` (rtn | gptq | awq).

    `calibration` is `load_calibration`'s token tensor; it may be None only for uncalibrated
    schemes (RTN weights without static activation or KV-cache scales). `progress(stage, done,
    total)` reports each decoder layer, stage "awq", "gptq" or "calibrate" (static FP8 / KV scales
    only); an uncalibrated run reports ("rtn", 1, 1) when done.
    """
    if algorithm not in ALGORITHMS:
        raise InputError(f"quantization: unknown algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
    if algorithm != "rtn" and scheme.weight_format != "int4":
        raise InputError(f"quantization: {algorithm} produces int4 weights; {scheme.preset} is {scheme.weight_format}")
    config = json.loads((model_dir / "config.json").read_text())
    state = load_state(model_dir)
    names = quantizable_linears(state, scheme, config)
    check_group_size(state, names, scheme)
    if not needs_calibration(scheme, algorithm):
        model = quantize_rtn(state, config, scheme)
        if progress is not None:
            progress("rtn", 1, 1)
        return model
    if calibration is None:
        raise InputError(f"calibration: {scheme.preset} ({algorithm}) needs calibration data; none was given")
    report: dict = {}
    linears, kv_scales, changed = calibrated_quantize(
        model_dir, names, scheme, algorithm, calibration, progress, report
    )
    # AWQ folds its scales into norms and producer linears: store those in place of the originals.
    state.update({k: v for k, v in changed.items() if k in state})
    dense, _ = split_state(state, config, scheme)
    return QuantizedModel(config, scheme, dense, linears, kv_scales, calibration=report)


def kv_sources(arch: Architecture, config: dict) -> KVSources:
    """Where the architecture's cached keys and values appear in a loaded layer."""
    if "self_attn.qkv_proj" in arch.fused:
        rows = fused_rows(arch, config, "self_attn.qkv_proj")
        return KVSources("self_attn.qkv_proj", "self_attn.qkv_proj", rows["k"], rows["v"])
    return KVSources("self_attn.k_norm" if arch.qk_norm else "self_attn.k_proj", "self_attn.v_proj")


@torch.no_grad()
def calibrated_quantize(
    model_dir: Path,
    names: list[str],
    scheme: Scheme,
    algorithm: str,
    calibration: torch.LongTensor,
    progress: Progress | None = None,
    report: dict | None = None,
) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer by layer: statistics, quantized linears, KV scales, next layer's inputs.

    KV scales come from the layer as served: after AWQ / GPTQ, from the quantized layer's k/v.
    The model's own decoder layers run with the arguments its forward gives them
    (`capture_layer_inputs`); MoE experts run unfused so each one's statistics cover exactly
    the tokens routed to it. A quantized linear without statistics (an expert no calibration
    token reached) falls back to round-to-nearest; `report` (when given) receives per-layer
    expert token counts and the names of those fallbacks.

    Returns the quantized linears, the KV-cache scales and the decoder-layer parameters an
    algorithm changed (AWQ's folded scales), all under full checkpoint names.
    """
    config = json.loads((model_dir / "config.json").read_text())
    arch = get_architecture(config)
    model = load_float_model(model_dir)
    unfuse_experts(model, arch)
    layers = decoder_layers(model)
    hidden, per_layer_kwargs = capture_layer_inputs(model, calibration)
    kv = scheme.kv_cache_dtype == "fp8"
    sources = kv_sources(arch, config)
    router = (arch.to_memory(arch.router),) if arch.router else ()
    linears: dict[str, QuantizedLinear] = {}
    kv_scales: dict[str, torch.Tensor] = {}
    changed: dict[str, torch.Tensor] = {}
    report = {} if report is None else report
    report.setdefault("expert_tokens", {})
    report.setdefault("rtn_fallback", [])
    for index, layer in enumerate(layers):
        layer_kwargs = per_layer_kwargs[index]
        prefix = f"model.layers.{index}."
        quantized = {arch.to_memory(n.removeprefix(prefix)) for n in names if n.startswith(prefix)}
        stats, dense_out = collect_layer_stats(
            layer,
            hidden,
            layer_kwargs,
            layer_linear_names(layer, router),
            gram=algorithm != "rtn",
            kv=kv,
            kv_sources=sources,
        )
        unseen = sorted(n for n in quantized if n not in stats.inputs)
        if arch.moe and router and router[0] in {n for n, _ in layer.named_modules()}:
            experts = arch.to_memory(arch.experts)
            gate = arch.expert_linears[0]
            report["expert_tokens"][str(index)] = [
                stats.inputs[f"{experts}.{e}.{gate}"].tokens if f"{experts}.{e}.{gate}" in stats.inputs else 0
                for e in range(num_experts(config))
            ]
        if algorithm == "awq":
            step = None if progress is None else lambda f, i=index: progress("awq", i + f, len(layers))
            groups = scale_groups(layer, arch, config)
            layer_linears, _ = awq_layer(layer, stats.inputs, quantized, scheme, groups, step)
            changed.update({prefix + arch.to_checkpoint(n): p.detach().clone() for n, p in layer.named_parameters()})
        elif algorithm == "gptq":
            layer_linears = gptq_layer(layer, stats.inputs, quantized - set(unseen), scheme)
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
        linears.update({prefix + arch.to_checkpoint(n): q for n, q in layer_linears.items()})
        if algorithm in ("awq", "gptq"):
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
        if kv:
            kv_scales.update(kv_cache_scales(stats, index))
        if progress is not None:
            progress(algorithm if algorithm != "rtn" else "calibrate", index + 1, len(layers))
    return linears, kv_scales, changed
