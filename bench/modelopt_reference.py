"""NVIDIA ModelOpt's INT4 AWQ and FP8 on a dense checkpoint, saved as the weights the model computes with.

Runs in its own virtual environment (ModelOpt pins its own transformers), not forge's:

    python3.11 -m venv /tmp/modelopt-venv
    /tmp/modelopt-venv/bin/pip install torch==2.13.0
    /tmp/modelopt-venv/bin/pip install 'nvidia-modelopt[hf]==0.47.0' 'transformers==5.14.1'
    /tmp/modelopt-venv/bin/python bench/modelopt_reference.py --model /tmp/smollm2-hf \
        --calibration /tmp/forge-calibration.pt --out /tmp/modelopt-ref

`--calibration` is forge's calibration token tensor (`load_calibration`, saved with `torch.save` by
`bench/bench_int4.py --save-calibration`), so both tools see the same tokens. For each scheme the
script writes `<out>/<scheme>.safetensors`: every quantized linear's *effective dense weight*
(ModelOpt's fake-quantized weight times its AWQ pre-quant scale, per input channel) and, for
FP8, `<linear>.input_scale` (the static per-tensor activation scale, amax / 448). forge's
benchmark loads these into the float32 model and scores them with its own perplexity code.
Each saved weight is checked against the quantized module's own output on a calibration batch.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

FP8_MAX = 448.0


def config_for(name: str, block: int) -> dict:
    """ModelOpt's preset with the int4 block size changed (every weight-quantizer entry)."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, name))
    if name.startswith("INT4"):
        set_block_size(config["quant_cfg"], block)
    return config


def set_block_size(quant_cfg, block: int) -> None:
    """Block size of every int4 weight quantizer; quant_cfg is a dict or (newer) a list of entries."""
    entries = quant_cfg.values() if isinstance(quant_cfg, dict) else quant_cfg
    for entry in entries:
        cfg = entry.get("cfg", entry) if isinstance(entry, dict) else None
        if isinstance(cfg, dict) and isinstance(cfg.get("block_sizes"), dict) and -1 in cfg["block_sizes"]:
            cfg["block_sizes"][-1] = block


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per quantized linear: the dense weight its forward uses, and static input scales if any."""
    out = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is None or not getattr(wq, "is_enabled", False):
            continue
        with torch.no_grad():
            weight = wq(module.weight.float()).float()
            iq = getattr(module, "input_quantizer", None)
            pre = getattr(iq, "pre_quant_scale", None) if iq is not None else None
            if pre is not None:  # AWQ: x·p goes through Q(W'); the same as x through Q(W')·diag(p)
                weight = weight * pre.float().reshape(1, -1)
            out[f"{name}.weight"] = weight.contiguous()
            if iq is not None and iq.is_enabled and getattr(iq, "amax", None) is not None:
                out[f"{name}.input_scale"] = (iq.amax.float().reshape(1) / FP8_MAX).contiguous()
    return out


@torch.no_grad()
def check(model: torch.nn.Module, weights: dict[str, torch.Tensor], batch: torch.Tensor) -> float:
    """Largest relative difference between a module's output and x @ Wᵀ with the saved weight
    (inputs rounded to fp8 with the saved scale where there is one), over the quantized linears."""
    inputs, worst = {}, 0.0
    hooks = []
    for name in {k.rsplit(".", 1)[0] for k in weights if k.endswith(".weight")}:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, a, o, n=name: inputs.__setitem__(n, (a[0], o))))
    model(batch)
    for hook in hooks:
        hook.remove()
    for name, (x, y) in inputs.items():
        x = x.float()
        if f"{name}.input_scale" in weights:
            s = weights[f"{name}.input_scale"]
            x = (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
        ref = x @ weights[f"{name}.weight"].T
        bias = getattr(model.get_submodule(name), "bias", None)
        if bias is not None:
            ref = ref + bias.float()
        worst = max(worst, float((ref - y.float()).norm() / y.float().norm().clamp(min=1e-12)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2-hf"))
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--schemes", default="FP8_DEFAULT_CFG,INT4_AWQ_CFG")
    args = parser.parse_args()

    import modelopt
    import modelopt.torch.quantization as mtq
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    calibration = torch.load(args.calibration)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.schemes.split(","):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

        def forward_loop(m: torch.nn.Module) -> None:
            for sample in calibration:
                m(sample.unsqueeze(0))

        started = time.perf_counter()
        mtq.quantize(model, config_for(name, args.block), forward_loop)
        seconds = time.perf_counter() - started
        weights = effective_weights(model)
        worst = check(model, weights, calibration[:1])
        meta = {"modelopt": modelopt.__version__, "scheme": name, "block": str(args.block),
                "seconds": f"{seconds:.1f}", "check": f"{worst:.2e}"}  # fmt: skip
        save_file(weights, str(args.out / f"{name}.safetensors"), metadata=meta)
        print(f"{name}: {len(weights)} tensors, {seconds:.1f} s, max relative output difference {worst:.2e}")
        if worst > 1e-3:
            raise SystemExit(f"{name}: the saved weights do not reproduce the quantized modules' outputs")


if __name__ == "__main__":
    main()
