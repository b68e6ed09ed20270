"""Quantize and export seconds, and logit agreement, for every architecture forge maps, on the tiny
random models of `tests/tiny.py` (hidden 128, 2 layers, 4 heads over 2 KV heads, 4 experts top-2).

    .venv/bin/python bench/architectures.py [--samples 8] [--seq-len 64]

Per architecture and scheme (RTN W4A16 g32, GPTQ W4A16 g32, AWQ W4A16 g32 on `pydoc_topics`
calibration, FP8_DYNAMIC): seconds of `quantize_checkpoint`, seconds of the compressed-tensors
export, and, on one 48-token prompt, how the exported model's logits agree with the dense model's:
top-1 agreement and the largest |Δ logit| of forge's reader's dequantized weights in the float32
model, plus the largest |Δ logit| between transformers running the compressed-tensors export
(float16 for int4) and the reader's weights in the same dtype (0 means transformers and forge decode
the same codes). transformers 5.17 cannot load an asymmetric (AWQ) compressed-tensors export of
MoE experts: its expert decompression drops the zero points; that cell says so. Random tiny models
are not language models: the figures compare architectures against each other and catch
regressions, they do not predict accuracy on real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forge.architectures import SUPPORTED_ARCHITECTURES  # noqa: E402
from forge.formats import FORMATS  # noqa: E402
from forge.quant.calibration import load_calibration  # noqa: E402
from forge.quant.presets import resolve_scheme  # noqa: E402
from forge.quant.run import quantize_checkpoint  # noqa: E402
from tests.tiny import make_tiny_model  # noqa: E402

SCHEMES = (
    ("W4A16 g32 RTN", "W4A16", "rtn", 32),
    ("GPTQ g32", "GPTQ_W4A16", "gptq", 32),
    ("AWQ g32", "AWQ_W4A16", "awq", 32),
    ("FP8_DYNAMIC", "FP8_DYNAMIC", "rtn", None),
)


def model_logits(directory: Path, state: dict[str, torch.Tensor] | None, dtype: torch.dtype, ids) -> torch.Tensor:
    """Logits of the model in `directory`, or of its config holding `state` (checkpoint names,
    loaded through transformers' own checkpoint conversion so MoE experts are fused as it does)."""
    from transformers import AutoModelForCausalLM

    if state is not None:
        tmp = Path(tempfile.mkdtemp())
        for name in ("config.json", "generation_config.json"):
            if (directory / name).exists():
                (tmp / name).write_bytes((directory / name).read_bytes())
        config = json.loads((directory / "config.json").read_text())
        weights = {k: v.to(dtype).contiguous() for k, v in state.items() if not k.endswith("_scale")}
        if config.get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        directory = tmp
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--arch", action="append", help="only these architectures (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="forge-arch-bench-"))
    ids = torch.arange(3, 51).unsqueeze(0)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| architecture | scheme | quantize s | export s | top-1 vs dense | max abs Δ logit vs dense | "
          "transformers vs reader |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch or SUPPORTED_ARCHITECTURES:
        source = make_tiny_model(root / arch, arch)
        dense = model_logits(source, None, torch.float32, ids)
        calibration = load_calibration(["pydoc_topics"], source, args.samples, args.seq_len, seed=0)
        for label, preset, algorithm, group in SCHEMES:
            scheme = resolve_scheme(preset, group_size=group)
            start = time.perf_counter()
            qm = quantize_checkpoint(source, scheme, algorithm, calibration if algorithm != "rtn" else None)
            quantize_s = time.perf_counter() - start
            out = root / f"{arch}-{preset}"
            start = time.perf_counter()
            FORMATS["compressed-tensors"].write(qm, source, out, {"recipe": "bench"})
            export_s = time.perf_counter() - start
            _, state = FORMATS["compressed-tensors"].read(out)
            ours = model_logits(source, state, torch.float32, ids)
            top1 = float((ours.argmax(-1) == dense.argmax(-1)).float().mean())
            drift = float((ours - dense).abs().max())
            int4 = scheme.weight_format == "int4"
            if int4:  # FP8: compressed-tensors fake-quantizes activations, so logits are not comparable
                try:
                    loaded = model_logits(out, None, torch.float16, ids)
                    agree = f"{float((loaded - model_logits(source, state, torch.float16, ids)).abs().max()):.2g}"
                except RuntimeError as error:  # transformers' own limits, reported rather than hidden
                    known = "conversion" in str(error) and not scheme.symmetric
                    agree = "not loadable (asymmetric MoE experts)" if known else f"load failed: {str(error)[:60]}"
            else:
                agree = "n/a (fp8 activations)"
            print(f"| {arch} | {label} | {quantize_s:.2f} | {export_s:.2f} | {top1:.3f} | {drift:.3f} | {agree} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
