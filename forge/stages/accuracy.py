"""accuracy: perplexity, top-1 agreement and KL of an export against the baseline, on weights
re-read from the exported files through the format's own reader. The gates are applied when
the report is written (forge.stages.gates), so a changed threshold re-gates without measuring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.digest import json_digest
from forge.quant.scheme import Scheme
from forge.stages.base import Run, local

VERSION = 3  # 3: the windows are the baseline entry's, not tokenized again
SHARED = "accuracy-weights"  # cache kind of a measurement shared by formats that re-read to the same weights


@dataclass(frozen=True)
class Inputs:
    variant: str
    format: str
    tp: int
    scheme: Scheme  # its activation quantization is simulated as serving does it, on the linears it quantized
    dataset_sha256: str
    window: int
    max_windows: int | None
    dataset: Path = local()  # the text whose digest is dataset_sha256


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `export` (the artifact), `baseline` (the source's hidden states on the same windows)."""
    from forge.eval.perplexity import (
        baseline_windows,
        build_model,
        compare_pass,
        simulate_dynamic_fp8_activations,
        simulate_static_fp8_activations,
        split_scales,
    )
    from forge.formats import FORMATS
    from forge.quant.rtn import quantizable_linears

    export_dir, baseline_dir = run.deps["export"] / "model", run.deps["baseline"]
    windows = baseline_windows(baseline_dir)  # the dataset, window and count are the baseline's inputs too
    config, state = FORMATS[inputs.format].read(export_dir)

    def measure(_out: Path) -> dict:
        weights, scales = split_scales(state)
        model = build_model(config, weights)
        if inputs.scheme.activations == "dynamic_token":  # serving rounds activations to fp8 per token too
            simulate_dynamic_fp8_activations(model, quantizable_linears(model.state_dict(), inputs.scheme))
        elif inputs.scheme.activations == "static_tensor":  # ... or with the calibrated input scales
            simulate_static_fp8_activations(model, {k: v for k, v in scales.items() if k.endswith(".input_scale")})
        with run.progress.task(f"accuracy {inputs.variant} ({inputs.format})", len(windows)) as advance:
            metrics = compare_pass(model, windows, baseline_dir, progress=advance)
        if any(k.endswith((".k_scale", ".v_scale")) for k in scales):  # said, not silently left out
            metrics["not_simulated"] = "the fp8 KV cache (its scales are exported; attention runs unquantized here)"
        return metrics

    # Formats that re-read to bit-identical weights share one measurement (same weights, same numbers).
    weights = state_digest(state)
    key = json_digest({"stage": SHARED, "version": 1, "inputs": {"weights": weights, "baseline": baseline_dir.name,
                                                                   "act": inputs.scheme.activations}})  # fmt: skip
    _, metrics, shared = run.cache.run(SHARED, key, measure)
    metrics = {k: v for k, v in metrics.items() if k not in ("kind", "key")}
    return {"variant": inputs.variant, "format": inputs.format, "tp": inputs.tp, **metrics, "weights_sha256": weights,
            "measurement_shared": shared}  # fmt: skip


def state_digest(state: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
