"""Quantize and export at real scale: seconds and peak memory against the checkpoint size.

    .venv/bin/python bench/bench_scale.py --workdir /tmp/forge-scale [--runs full,slices,70b,70b-gptq,70b-layer]
        [--layers 1,2,4] [--presets GPTQ_W4A16,AWQ_W4A16] [--timeout SECONDS]

Synthetic checkpoints with real shapes (random bfloat16 weights, std 0.02; norms 1.0; sharded
safetensors with `model.safetensors.index.json` and a LlamaForCausalLM config.json) are written
once into the work directory, tensor by tensor through forge's own streaming writer: Llama-3.1-8B
(32 layers, hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, untied, rope
theta 500000 with llama3 scaling), slices of it with 1, 2 and 4 layers (same embedding and
lm_head), and a 2-layer slice of Llama-3.1-70B (hidden 8192, 64 heads, 8 KV heads, intermediate
28672). Each measurement runs in a FRESH child process (`--child`), which reports its own peak RSS:
`VmHWM` from /proc/self/status (`ru_maxrss` would carry the parent's peak across execve). A child
runs the product path: `forge.quant.run.quantize_to_cache` (what the quantize stage calls), or one
format's `write` on the cache opened lazily (`open_quantized`, what the export stage calls).

Calibration (GPTQ, AWQ) uses 4 random token-id sequences of 256 tokens (seeded): the figures
measure time and memory, not quality, and no tokenizer is needed. GPTQ and AWQ run on slices of
`--layers` layers (1, 2 and 4 by default; 32 is the whole 8B, ~1.5 h of AWQ here) and the 32-layer
figures are a linear fit, printed as extrapolated unless a 32-layer run is among them; `--timeout`
stops a child that runs longer and records the peak RSS it had reached. Each child's stderr is kept
beside results.json (`<model>-<preset>-<step>.log`): a quantize writes one line per finished
decoder layer with its seconds and memory, so a long run can be followed, or read when stopped.
`70b-gptq` runs GPTQ on one Llama-3.1-70B layer, whose down_proj Hessian (28672²) is the widest
forge meets; `70b-layer` runs the `--presets` on it.
Outputs are deleted after each measurement and the checkpoints at the end, so disk use stays
bounded (the largest moment: the 8B checkpoint, one cache and one export).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 2**30
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
LLAMA_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
# preset -> algorithm; the formats are every one forge can write for the scheme
SCHEMES = {"FP8_DYNAMIC": "rtn", "W4A16": "rtn", "GPTQ_W4A16": "gptq", "AWQ_W4A16": "awq"}
CALIBRATION = (4, 256)  # samples × tokens


def llama_config(shape: dict, layers: int) -> dict:
    """config.json of Llama-3.1 (the released file's fields), with `layers` decoder layers."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "initializer_range": 0.02,
        **shape,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """std-0.02 bfloat16 weights (norms: 1.0), generated a block of rows at a time, seeded by name."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(sum(name.encode()) * 7919 + len(name))
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], 2048):
        rows = out[start : start + 2048]
        rows.copy_(torch.randn(rows.shape, generator=generator).mul_(0.02))
    return out


def write_checkpoint(directory: Path, config: dict) -> Path:
    """The synthetic checkpoint, streamed tensor by tensor (cached: reused when complete)."""
    from forge.formats.model_dir import TensorSpec, Unit, write_weights

    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    units = [
        Unit(name, (TensorSpec(name, torch.bfloat16, shape),), lambda n=name, s=shape: {n: random_tensor(n, s)})
        for name, shape in tensor_shapes(config).items()
    ]
    write_weights(tmp, units, 5 * 10**9)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(directory)
    return directory


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- one measurement, in a fresh process


def child(args: argparse.Namespace) -> None:
    """Quantize or export once; print seconds and this process's peak RSS as JSON."""
    from forge.quant.presets import resolve_scheme

    start = time.perf_counter()
    if args.child == "quantize":
        from forge.quant.run import quantize_to_cache

        scheme = resolve_scheme(args.preset)
        algorithm = SCHEMES[args.preset]
        tokens = None
        if algorithm != "rtn":
            vocab = json.loads((Path(args.source) / "config.json").read_text())["vocab_size"]
            tokens = torch.randint(0, vocab, CALIBRATION, generator=torch.Generator().manual_seed(0))
        quantize_to_cache(Path(args.source), Path(args.out), scheme, algorithm, tokens, layer_log(start))
    else:
        from forge.formats import FORMATS
        from forge.quant.model import open_quantized

        qm = open_quantized(Path(args.cache))
        FORMATS[args.child].write(qm, Path(args.source), Path(args.out), {"bench": "bench_scale"}, tp_size=1)
    seconds = time.perf_counter() - start
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_gib": round(hwm * 1024 / GIB, 2)}))


def layer_log(start: float):
    """A quantize progress callback writing one stderr line per finished decoder layer: seconds so
    far, resident and peak memory then (the run's log, read while a long run goes on)."""

    logged = set()

    def log(stage: str, done: float, total: int) -> None:
        if done == int(done) and (stage, done) not in logged:
            logged.add((stage, done))
            rss, hwm = memory_gib("self", "VmRSS"), memory_gib("self", "VmHWM")
            seconds = time.perf_counter() - start
            print(f"{seconds:.1f} s {stage} {done:g}/{total} rss {rss} GiB peak {hwm} GiB", file=sys.stderr, flush=True)

    return log


def memory_gib(pid: int | str, field: str = "VmHWM") -> float | None:
    """A memory field of a process from /proc (`VmHWM`: its peak RSS so far), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")), None)
    return None if kib is None else round(kib * 1024 / GIB, 2)


def measure(*argv: str, log: Path, timeout: float | None = None) -> dict:
    """One child's JSON line, its stderr written to `log` as it runs; past `timeout` seconds the
    child is ended and the row says so, with the peak RSS it had reached (read from /proc while it ran)."""
    cmd = [sys.executable, __file__, *argv]
    start = time.perf_counter()
    with log.open("w") as stderr, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True) as child:
        peak_seen = None
        while True:
            try:
                stdout, _ = child.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                peak_seen = memory_gib(child.pid) or peak_seen
                if timeout is not None and time.perf_counter() - start > timeout:
                    peak_seen = memory_gib(child.pid) or peak_seen
                    child.kill()
                    child.communicate()
                    return {"error": f"stopped after {timeout:.0f} s", "peak_rss_gib_so_far": peak_seen}
    if child.returncode != 0:
        error = (log.read_text().strip().splitlines() or [f"exit status {child.returncode}"])[-1][:200]
        return {"error": error, "peak_rss_gib_so_far": peak_seen}
    return json.loads(stdout.strip().splitlines()[-1])


def formats_for(preset: str) -> list[str]:
    from forge.formats import FORMATS
    from forge.quant.presets import resolve_scheme

    scheme = resolve_scheme(preset)
    return [name for name, fmt in sorted(FORMATS.items()) if fmt.unsupported_reason(scheme) is None]


def run_model(
    work: Path,
    label: str,
    source: Path,
    presets: list[str],
    rows: list[dict],
    exports: bool = True,
    timeout: float | None = None,
) -> None:
    """Quantize `source` with each preset, export every format (unless not `exports`), one fresh
    process each, a quantize stopped after `timeout` seconds. The source is deleted once the last
    preset is quantized."""
    meta = work / f"{label}-meta"  # what an export copies from the source: config.json only
    meta.mkdir(exist_ok=True)
    shutil.copyfile(source / "config.json", meta / "config.json")
    size = dir_bytes(source)
    for i, preset in enumerate(presets):
        cache = work / f"{label}-{preset}-cache"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"model": label, "preset": preset, "checkpoint_gib": round(size / GIB, 2)}
        row["quantize"] = measure(
            "--child", "quantize", "--preset", preset, "--source", str(source), "--out", str(cache),
            log=work / f"{label}-{preset}-quantize.log", timeout=timeout,
        )  # fmt: skip
        print(label, preset, "quantize", row["quantize"], flush=True)
        row["cache_gib"] = round(dir_bytes(cache) / GIB, 2) if cache.exists() else None
        last = i == len(presets) - 1
        if last:
            shutil.rmtree(source)  # exports read only the cache and config.json: frees the disk
        row["exports"] = {}
        if exports and "error" not in row["quantize"]:
            for fmt in formats_for(preset):
                out = work / f"{label}-{preset}-{fmt}"
                shutil.rmtree(out, ignore_errors=True)
                result = measure("--child", fmt, "--preset", preset, "--source", str(meta), "--cache", str(cache),
                                 "--out", str(out), log=work / f"{label}-{preset}-{fmt}.log")  # fmt: skip
                if out.exists():
                    result["size_gib"] = round(dir_bytes(out) / GIB, 2)
                    shutil.rmtree(out)
                row["exports"][fmt] = result
                print(label, preset, fmt, result, flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(row)
        (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    shutil.rmtree(meta, ignore_errors=True)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (layers, value): (per layer, intercept)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def peak(row: dict) -> float:
    values = [row["quantize"].get("peak_rss_gib", 0)] + [e.get("peak_rss_gib", 0) for e in row["exports"].values()]
    return max(values)


def report(rows: list[dict]) -> None:
    print("\n| model | preset | checkpoint GiB | quantize s | quantize peak GiB | export: s / peak GiB / size GiB |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        q = row["quantize"]
        exports = "; ".join(
            f"{fmt} {e.get('seconds', '-')} s / {e.get('peak_rss_gib', '-')} / {e.get('size_gib', '-')}"
            if "error" not in e
            else f"{fmt} ERROR {e['error']}"
            for fmt, e in row["exports"].items()
        )
        if "error" in q:
            seconds, memory = f"ERROR {q['error']}", f"{q.get('peak_rss_gib_so_far')} so far"
        else:
            seconds, memory = q["seconds"], q["peak_rss_gib"]
        print(f"| {row['model']} | {row['preset']} | {row['checkpoint_gib']} | {seconds} | {memory} | {exports} |")
    print()
    for preset in SCHEMES:
        points = [
            (int(r["model"].split("-")[1].removesuffix("L")), r)
            for r in rows
            if r["preset"] == preset and r["model"].startswith("8B-") and "error" not in r["quantize"]
        ]
        if len({x for x, _ in points}) < 2:
            if points:
                print(f"{preset}: only the {points[0][0]}-layer checkpoint measured: no per-layer fit")
            continue
        sec = fit([(x, r["quantize"]["seconds"]) for x, r in points])
        mem = fit([(x, r["quantize"]["peak_rss_gib"]) for x, r in points])
        sizes = "/".join(str(x) for x in sorted({x for x, _ in points}))
        note = f"fit over {sizes} layers" if any(x == 32 for x, _ in points) else f"EXTRAPOLATED from {sizes} layers"
        print(
            f"{preset}: quantize {sec[0]:.1f} s/layer + {sec[1]:.1f} s -> 32 layers {sec[0] * 32 + sec[1]:.0f} s; "
            f"peak RSS {mem[0]:.3f} GiB/layer + {mem[1]:.2f} GiB -> 32 layers {mem[0] * 32 + mem[1]:.2f} GiB ({note})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forge-scale"))
    parser.add_argument(
        "--runs",
        default="full,70b,slices",
        help="comma list of: full, 70b, slices, 70b-gptq (GPTQ on one 70B layer), 70b-layer (--presets on one 70B"
        " layer); smoke: a tiny check",
    )
    parser.add_argument("--layers", default="1,2,4", help="slice sizes (layers) for GPTQ and AWQ")
    parser.add_argument("--presets", default="GPTQ_W4A16,AWQ_W4A16", help="presets run on the slices")
    parser.add_argument("--quantize-only", action="store_true", help="measure quantize, skip the exports")
    parser.add_argument("--timeout", type=float, help="seconds after which a GPTQ / AWQ quantize is stopped")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.json"
    rows: list[dict] = json.loads(results.read_text()) if results.exists() else []
    runs = args.runs.split(",")
    print(f"load average {os.getloadavg()}, cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}", flush=True)
    if "smoke" in runs:  # the script's own check, on a tiny shape
        shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "vocab_size": 1024}  # fmt: skip
        source = write_checkpoint(work / "smoke-2L", llama_config(shape, 2))
        run_model(work, "smoke-2L", source, list(SCHEMES), rows)
    if "full" in runs:
        source = write_checkpoint(work / "llama8b-32L", llama_config(LLAMA_8B, 32))
        run_model(work, "8B-32L", source, ["W4A16", "FP8_DYNAMIC"], rows, not args.quantize_only)
    if "70b" in runs:
        source = write_checkpoint(work / "llama70b-2L", llama_config(LLAMA_70B, 2))
        run_model(work, "70B-2L", source, ["W4A16", "FP8_DYNAMIC"], rows, not args.quantize_only)
    if "slices" in runs:
        # GPTQ and AWQ per layer; their exports cost what RTN's cost (same tensors), measured on 32 layers.
        for layers in (int(n) for n in args.layers.split(",")):
            source = write_checkpoint(work / f"llama8b-{layers}L", llama_config(LLAMA_8B, layers))
            run_model(work, f"8B-{layers}L", source, args.presets.split(","), rows, False, args.timeout)
    if "70b-gptq" in runs:  # the widest Hessian forge meets: down_proj's 28672 inputs
        source = write_checkpoint(work / "llama70b-1L", llama_config(LLAMA_70B, 1))
        run_model(work, "70B-1L", source, ["GPTQ_W4A16"], rows, False, args.timeout)
    if "70b-layer" in runs:  # one 70B layer with --presets: its peak is a 70B run's per-layer peak
        source = write_checkpoint(work / "llama70b-1L", llama_config(LLAMA_70B, 1))
        run_model(work, "70B-1L", source, args.presets.split(","), rows, False, args.timeout)
    print(f"load average {os.getloadavg()}", flush=True)
    report(rows)


if __name__ == "__main__":
    main()
