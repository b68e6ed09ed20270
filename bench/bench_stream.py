"""Peak memory of the format writers on multi-GB checkpoints: it follows the largest tensor.

    .venv/bin/python bench/bench_stream.py [--workdir /tmp/forge-bench-stream] [--append bench/RESULTS.md]

Each configuration is a synthetic W4A16_ASYM (group 128) model in forge's quantize-cache layout
(`quantized.safetensors` + `quant.json`, as `forge.quant.model.save_quantized` writes it): two
bfloat16 dense tensors the size of a large vocabulary's embedding and untied lm_head, plus
decoder layers shaped like an 8B Llama (hidden 4096, intermediate 14336, 8 KV heads) holding
random int4 codes. A fresh child process per measurement exports it and reports its own peak
RSS: `VmHWM` from /proc/self/status, the high-water mark of the child's own address space.
(`ru_maxrss` is not used: Linux carries the spawning process's peak across `execve` into it,
so a child spawned by a big parent reports the parent's peak.) The child reads the cache
lazily (`forge.quant.model.open_quantized`: one tensor per `safe_open`), as the export stage reads
a cache bigger than memory. Configurations vary the model size with the largest tensor fixed,
and the largest tensor with the model size fixed; one eager run (`load_quantized`, the whole
cache in memory) shows the difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from forge.formats import FORMATS
from forge.formats.model_dir import TensorSpec, Unit, write_safetensors
from forge.quant.model import load_quantized, open_quantized
from forge.quant.presets import resolve_scheme

HIDDEN, INTERMEDIATE, KV_WIDTH = 4096, 14336, 1024
PROJECTIONS = {  # module → (out, in), Llama-3-8B shapes
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV_WIDTH, HIDDEN),
    "self_attn.v_proj": (KV_WIDTH, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
GIB = 2**30


@dataclass(frozen=True)
class Config:
    name: str
    vocab: int  # rows of the bf16 embedding and lm_head: 131072 → 1 GiB each
    layers: int


CONFIGS = [
    Config("A", 131072, 2),
    Config("B", 131072, 12),
    Config("C", 262144, 2),
]


# ---------------------------------------------------------------- the synthetic cache


def make_cache(directory: Path, config: Config) -> tuple[int, int]:
    """Write the cache without holding it: forge's streaming safetensors writer, random data."""
    directory.mkdir(parents=True, exist_ok=True)
    scheme = resolve_scheme("W4A16_ASYM")  # group 128
    group = scheme.group_size
    generator = torch.Generator().manual_seed(0)
    units: list[Unit] = []

    def add(name: str, dtype: torch.dtype, shape: tuple[int, ...], make) -> None:
        units.append(Unit(name, (TensorSpec(name, dtype, shape),), lambda: {name: make()}))

    def normal(shape):
        return lambda: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        add(f"dense::{name}", torch.bfloat16, (config.vocab, HIDDEN), normal((config.vocab, HIDDEN)))
    add(
        "dense::model.norm.weight",
        torch.bfloat16,
        (HIDDEN,),
        lambda: torch.ones(HIDDEN, dtype=torch.bfloat16),
    )
    for layer in range(config.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"dense::model.layers.{layer}.{norm}.weight"
            add(name, torch.bfloat16, (HIDDEN,), lambda: torch.ones(HIDDEN, dtype=torch.bfloat16))
        for proj, (out_f, in_f) in PROJECTIONS.items():
            prefix = f"linear::model.layers.{layer}.{proj}::"
            shape, qshape = (out_f, in_f), (out_f, in_f // group)
            add(prefix + "codes", torch.int8, shape, lambda s=shape: torch.randint(0, 16, s, dtype=torch.int8))
            add(prefix + "scale", torch.float16, qshape, lambda s=qshape: (torch.rand(s) * 1e-3 + 1e-4).half())
            add(
                prefix + "zero_point",
                torch.int8,
                qshape,
                lambda s=qshape: torch.randint(0, 16, s, dtype=torch.int8),
            )
    write_safetensors(directory / "quantized.safetensors", units)
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": config.layers,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "vocab_size": config.vocab,
    }
    scheme_fields = asdict(scheme)
    (directory / "quant.json").write_text(json.dumps({"config": hf_config, "scheme": scheme_fields}, indent=2))
    largest = max(unit.nbytes for unit in units)
    return sum(unit.nbytes for unit in units), largest


# ---------------------------------------------------------------- lazy view of the cache


# ---------------------------------------------------------------- one measurement (child process)


def peak_rss() -> int:
    """VmHWM: peak resident set of this process's own address space, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(cache: Path, fmt: str, out: Path, mode: str) -> None:
    start = time.perf_counter()
    qm = load_quantized(cache) if mode == "eager" else open_quantized(cache)
    files = [] if fmt == "none" else FORMATS[fmt].write(qm, cache, out, {"bench": "stream"})
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in files)
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"peak_rss": peak_rss(), "ru_maxrss": ru_maxrss, "seconds": seconds, "written": written}
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(cache: Path, fmt: str, out: Path, mode: str = "lazy") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_child("--child", str(cache), fmt, str(out), mode)
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forge-bench-stream"))
    parser.add_argument("--append", type=Path, help="append the results section to this markdown file")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--make-cache", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cache, fmt, out, mode = args.child
        child(Path(cache), fmt, Path(out), mode)
        return
    if args.make_cache:  # in a child too, so the parent stays small
        directory, name = args.make_cache
        total, largest = make_cache(Path(directory), next(c for c in CONFIGS if c.name == name))
        print(json.dumps({"total": total, "largest": largest}))
        return

    rows = []
    for config in CONFIGS:
        cache = args.workdir / f"cache-{config.name}"
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()
        sizes = run_child("--make-cache", str(cache), config.name)
        total, largest = sizes["total"], sizes["largest"]
        print(f"{config.name}: cache {total / GIB:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
        runs = [("none", "lazy"), ("compressed-tensors", "lazy"), ("awq-gemm", "lazy")]
        if config.name == "A":
            runs.append(("compressed-tensors", "eager"))
        for fmt, mode in runs:
            result = measure(cache, fmt, args.workdir / "out", mode)
            rows.append((config, total, largest, fmt, mode, result))
            print(config.name, fmt, mode, json.dumps(result), flush=True)
        shutil.rmtree(cache, ignore_errors=True)

    lines = [
        "",
        f"## Streaming export: peak RSS vs model size ({date.today().isoformat()})",
        "",
        "Machine: 2-core CPU sandbox, 24 GiB. Command: `.venv/bin/python bench/bench_stream.py "
        f"--append bench/RESULTS.md` (torch {torch.__version__}, Python {platform.python_version()}).",
        "Synthetic W4A16_ASYM g128 caches: two bf16 tensors (embedding, untied lm_head) plus Llama-8B-shaped "
        "decoder layers of int4 codes; each row is a fresh child process; peak RSS = its `VmHWM`. "
        "`none` = imports and opening the cache only. Lazy = tensors read one `safe_open` at a time; eager = "
        "`load_quantized` (whole cache in memory).",
        "",
        "| cache | layers | model (cache) GiB | largest tensor GiB | format | read | peak RSS GiB "
        "| peak − baseline GiB | written GiB | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = {config.name: result["peak_rss"] for config, _, _, fmt, _, result in rows if fmt == "none"}
    for config, total, largest, fmt, mode, result in rows:
        above = (result["peak_rss"] - baselines[config.name]) / GIB
        lines.append(
            f"| {config.name} | {config.layers} | {total / GIB:.2f} | {largest / GIB:.2f} | {fmt} | {mode} "
            f"| {result['peak_rss'] / GIB:.2f} | {above:.2f} | {result['written'] / GIB:.2f} "
            f"| {result['seconds']:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if args.append:
        with open(args.append, "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
