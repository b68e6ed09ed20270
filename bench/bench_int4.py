"""int4 and FP8 quality of forge's methods beside llm-compressor's and ModelOpt's, on SmolLM2-135M-Instruct.

    .venv/bin/python bench/bench_int4.py --model /tmp/smollm2-hf --windows 64 \
        --modelopt /tmp/modelopt-ref --llmcompressor

One table: perplexity on the first N non-overlapping 1024-token windows of the wikitext-2 test
text shipped in forge/data (`bench_quant.wikitext_windows` / `perplexity`), its change against the
float32 model, top-1 agreement with the float32 model's next-token choice, mean KL(fp32 ‖ quantized)
per predicted token, and quantize seconds (wall). Every method computes with the weights it would
serve: forge's codes dequantized into the float32 model; llm-compressor's model as `oneshot`
leaves it (compressed-tensors fake-quantizes weights, and activations where the scheme has them, in
its forward); ModelOpt's fake-quantized dense weights written by `bench/modelopt_reference.py`
(its own venv). FP8 activations: static schemes round each linear's input to fp8 with the
calibrated per-tensor scale, dynamic ones per token, as serving does.
Calibration for every calibrated method: 16 × 256 tokens of `pydoc_topics`, seed 0 unless `--seed` draws another sample
(or `--calibration`, a saved token tensor: another text's, or text sampled from the model itself).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.` and `forge.` from a checkout

from bench.bench_quant import fp8_dynamic_activations, load_dequantized, wikitext_windows
from forge.quant import awq, gptq
from forge.quant.calibration import load_calibration
from forge.quant.model import QuantizedModel
from forge.quant.presets import AWQ_ALGORITHMS, resolve_scheme
from forge.quant.rtn import FP8_MAX
from forge.quant.run import quantize_checkpoint


@dataclass
class Row:
    label: str
    ppl: float
    top1: float
    kl: float
    seconds: float | None


class Reference:
    """The float32 model's log-probabilities per window, kept on disk in float16 (64 windows of
    1024 × 49152 would be 13 GB in float32), to score every method against. With `keep`, they are
    read from that file when an earlier run on the same windows wrote it, else written there (under
    a temporary name until complete) for the next run."""

    def __init__(self, model: torch.nn.Module, windows: torch.LongTensor, directory: Path, keep: Path | None) -> None:
        shape = (windows.shape[0], windows.shape[1] - 1, model.config.vocab_size)
        if keep is not None and keep.exists():  # another run's reference on the same windows: no forward pass
            self.logp = self.mapped(keep, shape)
            targets = self.logp.gather(-1, windows[:, 1:].unsqueeze(-1)).float()
            self.ppl = math.exp(-float(targets.sum()) / targets.numel())  # from float16: ≈ 1e-3 relative
            return
        path = keep.with_name(keep.name + ".partial") if keep else directory / "reference.f16"
        self.logp = self.mapped(path, shape)
        nll = 0.0
        with torch.no_grad():
            for i, window in enumerate(windows):
                logp = torch.log_softmax(model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
                nll += float(torch.nn.functional.nll_loss(logp, window[1:], reduction="sum"))
                self.logp[i] = logp.half()
        self.ppl = math.exp(nll / (windows.numel() - windows.shape[0]))  # the float32 model's own
        if keep:
            path.rename(keep)

    @staticmethod
    def mapped(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=torch.float16).reshape(shape)


@torch.no_grad()
def score(model: torch.nn.Module, windows: torch.LongTensor, reference: Reference | None) -> tuple[float, float, float]:
    """Perplexity (as `bench_quant.perplexity`), top-1 agreement and mean KL(reference ‖ model)."""
    nll, agree, kl, count = 0.0, 0, 0.0, 0
    for i, window in enumerate(windows):
        logp = torch.log_softmax(model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
        nll += float(torch.nn.functional.nll_loss(logp, window[1:], reduction="sum"))
        count += window.numel() - 1
        if reference is not None:
            ref = reference.logp[i].float()
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
    if reference is None:
        return math.exp(nll / count), 1.0, 0.0
    return math.exp(nll / count), agree / count, kl / count


def static_fp8_inputs(model: torch.nn.Module, input_scales: dict[str, torch.Tensor]) -> list:
    """Round each linear's input to fp8 with its static per-tensor scale, as FP8 (static) serves."""

    def hook(scale: torch.Tensor) -> Callable:
        def round_input(_module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            s = scale.float()
            return (((x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s).to(x.dtype),)

        return round_input

    return [model.get_submodule(name).register_forward_pre_hook(hook(s)) for name, s in input_scales.items()]


# AWQ rows name their options against this base (clipping on, every other option off), not
# against `awq.OPTIONS`, so a label keeps its meaning when the build's default changes.
AWQ_BASE = {"clip": True, "gptq": False, "act_order": False, "widen": False, "split_ends": False, "joint": False}


def forge_variant(preset: str, algorithm: str, symmetric: bool | None = None, **opts: bool) -> Callable:
    """A forge run: `quantize_checkpoint` with the preset at group 64 (int4) and, for AWQ/GPTQ,
    the algorithm options `opts` (`awq.options` over `AWQ_BASE` / `gptq.options`)."""

    def run(args: argparse.Namespace, calibration: torch.LongTensor) -> tuple[QuantizedModel, float]:
        group = 64 if "W4A16" in preset else None
        scheme = resolve_scheme(preset, group_size=group, symmetric=symmetric)
        if algorithm in AWQ_ALGORITHMS:
            context = awq.options(**(AWQ_BASE | opts))
        else:
            context = gptq.options(**opts) if algorithm == "gptq" else contextlib.nullcontext()
        started = time.perf_counter()
        with context:
            quantized = quantize_checkpoint(args.model, scheme, algorithm, calibration)
        return quantized, time.perf_counter() - started

    return run


FORGE_ROWS: list[tuple[str, Callable]] = [  # most telling first: each row prints as it completes
    ("forge AWQ asym g64 + clip (AWQ_W4A16)", forge_variant("AWQ_W4A16", "awq")),
    ("forge AWQ asym g64 + clip, tuned rounding (AWQ_TUNED_W4A16)", forge_variant("AWQ_TUNED_W4A16", "awq_tuned")),
    ("forge AWQ sym g64 + clip, tuned rounding", forge_variant("AWQ_TUNED_W4A16", "awq_tuned", symmetric=True)),
    ("forge AWQ asym g64 + clip + GPTQ", forge_variant("AWQ_W4A16", "awq", gptq=True)),
    ("forge AWQ sym g64 + clip + GPTQ", forge_variant("AWQ_W4A16", "awq", symmetric=True, gptq=True)),
    ("forge FP8 (static)", forge_variant("FP8", "rtn")),
    ("forge FP8_DYNAMIC", forge_variant("FP8_DYNAMIC", "rtn")),
    ("forge RTN asym g64 (W4A16_ASYM)", forge_variant("W4A16_ASYM", "rtn")),
    ("forge RTN sym g64 (W4A16)", forge_variant("W4A16", "rtn")),
    ("forge GPTQ sym g64", forge_variant("GPTQ_W4A16", "gptq", act_order=False)),
    ("forge GPTQ sym g64 act-order", forge_variant("GPTQ_W4A16", "gptq", act_order=True)),
    ("forge AWQ asym g64, no clip", forge_variant("AWQ_W4A16", "awq", clip=False)),
    ("forge AWQ sym g64 + clip", forge_variant("AWQ_W4A16", "awq", symmetric=True)),
    (
        "forge AWQ sym g64 + clip + GPTQ act-order",
        forge_variant("AWQ_W4A16", "awq", symmetric=True, gptq=True, act_order=True),
    ),
    ("forge AWQ sym g64 + widened clip", forge_variant("AWQ_W4A16", "awq", symmetric=True, widen=True)),
    (
        "forge AWQ sym g64 + widened clip, joint",
        forge_variant("AWQ_W4A16", "awq", symmetric=True, widen=True, joint=True),
    ),
    ("forge AWQ asym g64 + clip, joint", forge_variant("AWQ_W4A16", "awq", joint=True)),
    ("forge AWQ sym g64 + clip, joint", forge_variant("AWQ_W4A16", "awq", symmetric=True, joint=True)),
    ("forge AWQ asym g64 + split-end clip", forge_variant("AWQ_W4A16", "awq", split_ends=True)),
    ("forge AWQ asym g64 + split-end clip, joint", forge_variant("AWQ_W4A16", "awq", split_ends=True, joint=True)),
]

LLMC_ROWS = [  # (label, llm-compressor scheme, GPTQ?)
    ("llm-compressor RTN W4A16 sym g64", "W4A16", False),
    ("llm-compressor GPTQ W4A16 sym g64", "W4A16", True),
    ("llm-compressor FP8 (static)", "FP8", False),
    ("llm-compressor FP8_DYNAMIC", "FP8_DYNAMIC", False),
]

MODELOPT_ROWS = [
    ("ModelOpt 0.47 INT4_AWQ (awq_lite) sym g64", "INT4_AWQ_CFG"),
    ("ModelOpt 0.47 FP8_DEFAULT (static)", "FP8_DEFAULT_CFG"),
]

# Run order, most telling first: every row prints as it completes, so a run cut short still answers.
ORDER = [
    "forge AWQ asym g64 + clip (AWQ_W4A16)",
    "forge AWQ asym g64 + clip, tuned rounding (AWQ_TUNED_W4A16)",
    "forge AWQ sym g64 + clip, tuned rounding",
    "forge AWQ asym g64 + clip, joint",
    "forge FP8 (static)",
    "forge FP8_DYNAMIC",
    "llm-compressor FP8_DYNAMIC",
    "llm-compressor FP8 (static)",
    "forge RTN asym g64 (W4A16_ASYM)",
    "forge RTN sym g64 (W4A16)",
    "llm-compressor RTN W4A16 sym g64",
    "forge AWQ sym g64 + clip",
    "forge AWQ sym g64 + clip, joint",
    "llm-compressor GPTQ W4A16 sym g64",
    "forge GPTQ sym g64",
    "forge GPTQ sym g64 act-order",
    "forge AWQ asym g64 + clip + GPTQ",
    MODELOPT_ROWS[0][0],
    MODELOPT_ROWS[1][0],
    "forge AWQ asym g64 + split-end clip",
    "forge AWQ asym g64 + split-end clip, joint",
    "forge AWQ sym g64 + widened clip",
    "forge AWQ sym g64 + widened clip, joint",
    "forge AWQ sym g64 + clip + GPTQ",
    "forge AWQ asym g64, no clip",
    "forge AWQ sym g64 + clip + GPTQ act-order",
]


def llmcompressor_model(model_dir: Path, scheme: str, use_gptq: bool, calibration: torch.LongTensor):
    """llm-compressor 0.14 `oneshot` (group 64 for int4), calibrated on forge's calibration tokens."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if scheme == "W4A16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
        config = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}}
    else:
        config = {"scheme": scheme}
    modifier = (GPTQModifier if use_gptq else QuantizationModifier)(targets="Linear", ignore=["lm_head"], **config)
    started = time.perf_counter()
    if use_gptq or scheme == "FP8":  # calibrated: GPTQ's Hessians, static input scales
        tokens = {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
        oneshot(model=model, recipe=modifier, dataset=Dataset.from_dict(tokens),
                num_calibration_samples=calibration.shape[0], max_seq_length=calibration.shape[1],
                pipeline="sequential" if use_gptq else "basic")  # fmt: skip
    else:
        oneshot(model=model, recipe=modifier)
    return model, time.perf_counter() - started


def modelopt_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """ModelOpt's saved effective weights, static input scales by linear, and its quantize seconds."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        seconds = float(f.metadata()["seconds"])
    weights = {k: v for k, v in tensors.items() if k.endswith(".weight")}
    scales = {k.removesuffix(".input_scale"): v for k, v in tensors.items() if k.endswith(".input_scale")}
    return weights, scales, seconds


@contextlib.contextmanager
def restored(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> Iterator[list]:
    """Yield a hook list; afterwards remove the hooks and put the float32 weights back."""
    hooks: list = []
    try:
        yield hooks
    finally:
        for hook in hooks:
            hook.remove()
        model.load_state_dict(original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smollm2-hf"))
    parser.add_argument("--windows", type=int, default=8, help="1024-token wikitext-2 windows to score")
    parser.add_argument("--modelopt", type=Path, help="bench/modelopt_reference.py's output directory")
    parser.add_argument("--wait-modelopt", type=float, default=0, help="seconds to wait for a missing ModelOpt file")
    parser.add_argument("--llmcompressor", action="store_true", help="also llm-compressor's RTN, GPTQ, FP8 rows")
    parser.add_argument("--reference", type=Path, help="float32 reference file: read if present, else written")
    parser.add_argument("--threads", type=int, help="torch threads (fewer contend less on a busy machine)")
    parser.add_argument("--only", default="", help="'|'-separated row labels: run only these, in this order")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample seed (another draw of the same text)")
    parser.add_argument("--save-calibration", type=Path, help="write the calibration tokens (torch.save) and stop")
    parser.add_argument("--calibration", type=Path, help="calibration tokens to use instead (a torch.save'd tensor)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calibration:
        calibration = torch.load(args.calibration)
    else:
        calibration = load_calibration(["pydoc_topics"], args.model, 16, 256, seed=args.seed)
    if args.save_calibration:
        torch.save(calibration, args.save_calibration)
        return
    wanted = [s.strip() for s in args.only.split("|") if s.strip()] or ORDER
    unknown = set(wanted) - set(ORDER)
    if unknown:
        sys.exit(f"--only: no row labelled {sorted(unknown)}; the rows: {ORDER}")

    windows = wikitext_windows(args.model, args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    started_at = datetime.datetime.now(datetime.UTC)
    print(f"{started_at:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, {args.windows} windows × 1024 tokens, calibration seed {args.seed}",
          flush=True)  # fmt: skip
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-int4-") as tmp:
        started = time.perf_counter()
        reference = Reference(model, windows, Path(tmp), args.reference)
        rows.append(Row("float32 baseline", reference.ppl, 1.0, 0.0, None))
        print(
            f"  reference + baseline: {time.perf_counter() - started:.0f} s, float32 ppl {reference.ppl:.3f}",
            flush=True,
        )

        def report(row: Row) -> None:
            rows.append(row)
            delta = 100 * (row.ppl / rows[0].ppl - 1)
            when = f"(load {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M')})"
            print(f"  | {row.label} | {row.ppl:.3f} | {delta:+.1f} % | {row.top1:.4f} | {row.kl:.4f} | "
                  f"{row.seconds:.1f} | {when}", flush=True)  # fmt: skip

        def forge_row(run: Callable) -> tuple:
            quantized, seconds = run(args, calibration)
            with restored(model, original) as hooks:
                load_dequantized(model, quantized)
                if quantized.scheme.activations == "dynamic_token":
                    hooks += fp8_dynamic_activations(model, quantized)
                elif quantized.scheme.activations == "static_tensor":
                    scales = {n.removesuffix(".weight"): q.input_scale for n, q in quantized.linears.items()}
                    hooks += static_fp8_inputs(model, {n: s for n, s in scales.items() if s is not None})
                return score(model, windows, reference), seconds

        def llmc_row(scheme: str, use_gptq: bool) -> tuple:
            peer, seconds = llmcompressor_model(args.model, scheme, use_gptq, calibration)
            return score(peer, windows, reference), seconds

        def modelopt_row(path: Path) -> tuple:
            deadline = time.monotonic() + args.wait_modelopt
            while not path.exists() and time.monotonic() < deadline:  # its own run may still be going
                time.sleep(10)
            weights, scales, seconds = modelopt_state(path)
            with restored(model, original) as hooks:
                _, unexpected = model.load_state_dict(weights, strict=False)
                assert not unexpected, unexpected
                hooks += static_fp8_inputs(model, scales)
                return score(model, windows, reference), seconds

        thunks: dict[str, Callable[[], tuple]] = {label: (lambda r=run: forge_row(r)) for label, run in FORGE_ROWS}
        if args.llmcompressor:
            thunks |= {label: (lambda s=s, g=g: llmc_row(s, g)) for label, s, g in LLMC_ROWS}
        if args.modelopt:
            thunks |= {
                label: (lambda n=n: modelopt_row(args.modelopt / f"{n}.safetensors")) for label, n in MODELOPT_ROWS
            }
        plan = [label for label in wanted if label in thunks]

        def made(name: str) -> bool:  # ModelOpt's own run may still be writing it: score it last
            return not args.modelopt or (args.modelopt / f"{name}.safetensors").exists()

        waiting = {label for label, name in MODELOPT_ROWS if not made(name)}
        plan = sorted(plan, key=lambda label: label in waiting)  # stable: the order otherwise kept
        for label in plan:
            try:
                (ppl, top1, kl), seconds = thunks[label]()
            except Exception as error:  # noqa: BLE001 - one peer failing must not lose the other rows
                print(f"  {label}: FAILED {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                continue
            report(Row(label, ppl, top1, kl, seconds))
    print_table(rows, args)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    base = rows[0].ppl
    print()
    print(f"| method | ppl ({args.windows} × 1024) | Δ vs fp32 | top-1 agreement | mean KL | quantize s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        delta = "" if row is rows[0] else f"{100 * (row.ppl / base - 1):+.1f} %"
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        print(f"| {row.label} | {row.ppl:.3f} | {delta} | {row.top1:.4f} | {row.kl:.4f} | {seconds} |")
    print()
    print("load average {:.2f} {:.2f} {:.2f} at the end; ".format(*os.getloadavg()), end="")
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
