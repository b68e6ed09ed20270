"""TensorRT-LLM: engine mode (legacy checkpoint → `trtllm-build` → engine, TRT-LLM ≤ 1.2.x) and
PyTorch mode (`trtllm-serve --backend pytorch` on a ModelOpt-style HF checkpoint).

TensorRT-LLM main removed the TensorRT engine path in mid-2026 (PR #15763 removed the
`convert_checkpoint.py` → `trtllm-build` examples, PR #15918 the Python modules including
`commands/build.py`; PR #15767 the docs, adding a migration guide); 1.2.x is the last release
line with `trtllm-build`. So the mode follows the version, and engine mode on a newer version is
refused at plan time.

Nothing here needs a GPU to plan: every function that would run something returns the exact argv,
and the one that runs (`build_engine`) raises `EngineBuildDeferred` with that argv and the reason
it cannot run on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from forge.backends.record import BackendRecord, compat_rule
from forge.errors import EXIT_INFRA, ForgeError, InputError
from forge.gpus import GPUProfile, LocalGPUs, detect_local_gpus
from forge.quant.scheme import Scheme

DEFAULT_VERSION = "1.2.1"
LAST_ENGINE_RELEASE = (1, 2)  # trtllm-build exists in ≤ 1.2.x (see module docstring)
IMAGE_REPOSITORY = "nvcr.io/nvidia/tensorrt-llm/release"  # NGC tags: 1.2.1, 1.2.0rc1, …
# NGC TensorRT-LLM images run their MPI launcher as root; no non-root user is prepared in them
# (https://github.com/NVIDIA/TensorRT-LLM/blob/main/docker/Dockerfile.multi).
USER = "root"
PORT = 8000  # trtllm-serve --port default (commands/serve.py)
HEALTH_PATH = "/health"
TRUST_REMOTE_CODE_FLAG = "--trust_remote_code"  # trtllm-serve (commands/serve.py)

# Container paths forge mounts the checkpoint / engine / model at.
_CKPT_MOUNT = "/forge/checkpoint"
_ENGINE_MOUNT = "/forge/engine"
_KEY_FILE = "forge-engine.json"


def image(version: str = DEFAULT_VERSION) -> str:
    return f"{IMAGE_REPOSITORY}:{version}"


# ---------------------------------------------------------------- versions and modes


def parse_version(version: str) -> tuple[int, int, int]:
    """`1.2.1`, `1.2.0rc5`, `1.3.0.dev2026…` → (major, minor, patch); pre-releases keep their numbers."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?([.-]?(?:rc|dev|post)[0-9.]*)?", version)
    if not match:
        raise InputError(f"targets.trtllm.version: {version!r} is not a TensorRT-LLM version (like 1.2.1)")
    major, minor, patch = match.group(1, 2, 3)
    return int(major), int(minor), int(patch or 0)


def engine_mode_available(version: str) -> bool:
    return parse_version(version)[:2] <= LAST_ENGINE_RELEASE


def default_mode(version: str) -> str:
    """`engine` where trtllm-build still exists (≤ 1.2.x), `pytorch` after its removal."""
    return "engine" if engine_mode_available(version) else "pytorch"


def resolve_mode(mode: str | None, version: str) -> str:
    """The mode a target runs in; engine mode on a release without trtllm-build is an InputError."""
    if mode is None:
        return default_mode(version)
    if mode not in ("engine", "pytorch"):
        raise InputError(f"targets.trtllm.mode: {mode!r} is not one of engine, pytorch")
    if mode == "engine" and not engine_mode_available(version):
        raise InputError(
            f"targets.trtllm.mode: engine mode needs trtllm-build, which TensorRT-LLM removed after 1.2.x "
            f"(PRs #15763, #15918); TensorRT-LLM {version} serves only with the PyTorch backend. "
            "Use mode: pytorch, or version: 1.2.1 for engines"
        )
    return mode


# ---------------------------------------------------------------- support table


def check_trtllm_support(scheme: Scheme, gpu: GPUProfile, mode: str) -> str | None:
    """Why TensorRT-LLM cannot run `scheme` on `gpu` in `mode`, or None when it can.

    Rules (each from the TRT-LLM 1.2.x sources unless noted):
    - FP8 weights and an fp8 KV cache need FP8 tensor cores, compute capability ≥ 8.9.
    - int4 weight-only GEMMs need Ampere (≥ 8.0), and group size 64 or 128 (cutlass fpA_intB).
    - builder.py refuses INT4/INT8 weight-only and per-channel/per-token FP8 on SM 10.x engines.
    - the PyTorch backend loads int4 only as ModelOpt W4A16_AWQ, which is symmetric.
    """
    cc = gpu.compute_capability
    where = f"{gpu.name} (compute capability {cc[0]}.{cc[1]})"
    if scheme.weight_format not in ("int4", "fp8"):
        return f"forge does not export {scheme.preset} for TensorRT-LLM yet"
    if scheme.weight_format == "fp8" and not gpu.fp8:
        return f"{where} cannot run FP8 (needs ≥ 8.9: L4, L40S, H100, H200, B200); use AWQ_W4A16"
    if scheme.kv_cache_dtype == "fp8" and not gpu.fp8:
        return f"{where} has no fp8 KV cache in TensorRT-LLM (needs ≥ 8.9); use kv_cache_dtype: auto"
    if scheme.kv_cache_dtype not in ("auto", "fp8"):
        return f"forge writes only fp8 KV scales for TensorRT-LLM, not {scheme.kv_cache_dtype}"
    fp8_modes = (("channel", "dynamic_token"), ("tensor", "static_tensor"))
    if scheme.weight_format == "fp8" and (scheme.weight_granularity, scheme.activations) not in fp8_modes:
        return "TensorRT-LLM FP8 is per-tensor static (FP8) or per-channel per-token (FP8_DYNAMIC)"
    if scheme.weight_format == "int4":
        if cc < (8, 0):
            return f"{where} has no TensorRT-LLM int4 weight-only kernels (needs Ampere ≥ 8.0)"
        if scheme.group_size not in (64, 128):
            return f"TensorRT-LLM int4 GEMMs take group_size 64 or 128, not {scheme.group_size}"
    if mode == "engine" and (10, 0) <= cc < (12, 0):
        # builder.py: "INT8/INT4 quantization is not supported on SM>=100" and "Per-channel or
        # per-token scaling is not supported on SM>=100" (engine builds only).
        if scheme.weight_format == "int4":
            return f"{where}: TensorRT-LLM engines have no int4 weight-only GEMMs on SM 10.x; use mode: pytorch"
        if scheme.weight_granularity == "channel":
            return f"{where}: TensorRT-LLM engines have no per-channel FP8 on SM 10.x; use FP8 or mode: pytorch"
    if mode == "pytorch" and scheme.weight_format == "int4" and not scheme.symmetric:
        return "the PyTorch backend takes int4 only as ModelOpt W4A16_AWQ (symmetric); set symmetric: true"
    return None


# ---------------------------------------------------------------- limits and workload


@dataclass(frozen=True)
class Limits:
    """The shape limits an engine is built for and a server is started with."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    tp_size: int = 1

    @classmethod
    def from_target(cls, target) -> Limits:
        """From a recipe `Target` (duck-typed to keep this module free of the recipe schema)."""
        return cls(
            target.max_batch_size, target.max_input_len, target.max_seq_len, target.max_num_tokens,
            target.tensor_parallel,
        )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """The traffic the server is tuned for (the recipe's throughput section)."""

    concurrency: int  # most requests in flight at once
    prompt_tokens: int
    output_tokens: int


# ---------------------------------------------------------------- engine mode: trtllm-build


def gemm_plugin(scheme: Scheme, limits: Limits) -> str:
    """`--gemm_plugin` for the GEMMs the quantized layers do not own.

    docs/source/performance/perf-best-practices.md (1.2.x): enable the cuBLASLt GEMM plugin for
    FP16/BF16; for FP8 keep it disabled, except `fp8` for small batches (BS ≤ 4) where it cuts
    latency. Per-channel FP8 and int4 layers get their own plugins from builder.py
    (fp8_rowwise_gemm_plugin / weight_only_groupwise_quant_matmul_plugin), so `auto` only
    covers the dense GEMMs left (lm_head).
    """
    if scheme.weight_format == "fp8" and scheme.weight_granularity == "tensor":
        return "fp8" if limits.max_batch_size <= 4 else "disable"
    return "auto"


def paged_context_fmha(scheme: Scheme) -> bool:
    """Whether the engine keeps paged context FMHA, which chunked prefill and KV reuse need.

    builder.py turns FP8 context FMHA on only for the FP8 / W4A8_AWQ / NVFP4 algorithms, and with an
    fp8 KV cache it then turns paged context FMHA off for every other algorithm. forge asks for
    the outcome explicitly instead of relying on those warnings.
    """
    return scheme.kv_cache_dtype != "fp8" or _fp8_context_fmha(scheme)


def _fp8_context_fmha(scheme: Scheme) -> bool:
    # FP8 context FMHA reads an fp8 KV cache and belongs to the FP8 (per-tensor) workflow.
    return scheme.kv_cache_dtype == "fp8" and scheme.weight_format == "fp8" and scheme.weight_granularity == "tensor"


def limits_problem(scheme: Scheme, limits: Limits, mode: str) -> str | None:
    """Limits an engine cannot honour: without paged context FMHA there is no chunked prefill,
    so every prompt must fit in one step's token budget."""
    if mode == "engine" and not paged_context_fmha(scheme) and limits.max_input_len > limits.max_num_tokens:
        return (
            f"max_input_len {limits.max_input_len} > max_num_tokens {limits.max_num_tokens} needs chunked "
            "prefill, which TensorRT-LLM engines lose with an fp8 KV cache outside the FP8 scheme; raise "
            "max_num_tokens or use kv_cache_dtype: auto"
        )
    return None


def build_argv(checkpoint_dir: str | Path, output_dir: str | Path, limits: Limits, scheme: Scheme) -> list[str]:
    """The `trtllm-build` command line (flags of tensorrt_llm/commands/build.py and PluginConfig)."""
    argv = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--gemm_plugin", gemm_plugin(scheme, limits),
        "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable" if paged_context_fmha(scheme) else "disable",
        "--use_fp8_context_fmha", "enable" if _fp8_context_fmha(scheme) else "disable",
    ]  # fmt: skip
    if limits.tp_size > 1:
        # One build process per rank (capped by build.py at the number of visible GPUs).
        argv += ["--workers", str(limits.tp_size)]
    return argv


def docker_argv(inner: list[str], mounts: dict[str, str], version: str) -> list[str]:
    """`docker run` around `inner` in the NGC TensorRT-LLM release image.

    `--ipc host` and the memlock/stack ulimits are what NVIDIA's container instructions pass
    (docs/source/installation/containers.md); `mounts` maps host paths to container paths.
    """
    argv = ["docker", "run", "--rm", "--gpus", "all", "--ipc", "host",
            "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]  # fmt: skip
    for host, container in mounts.items():
        argv += ["-v", f"{Path(host).resolve()}:{container}"]
    return argv + [image(version), *inner]


def docker_build_argv(
    checkpoint_dir: str | Path, output_dir: str | Path, limits: Limits, scheme: Scheme, version: str
) -> list[str]:
    inner = build_argv(_CKPT_MOUNT, _ENGINE_MOUNT, limits, scheme)
    return docker_argv(inner, {str(checkpoint_dir): f"{_CKPT_MOUNT}:ro", str(output_dir): _ENGINE_MOUNT}, version)


def engine_build_command(checkpoint_dir: Path, engine_dir: Path, limits: Limits, scheme: Scheme, version: str) -> str:
    """The `docker run … trtllm-build` line to paste on a GPU builder, as one shell-quoted string.

    Both directories must be absolute: a relative path (or a placeholder word) would be resolved
    against wherever the line is pasted, or read by Docker as a named volume.
    """
    for name, path in (("checkpoint_dir", checkpoint_dir), ("engine_dir", engine_dir)):
        if not Path(path).is_absolute():
            raise ValueError(f"{name}: {path} is not an absolute path")
    return shlex.join(docker_build_argv(checkpoint_dir, engine_dir, limits, scheme, version))


# ---------------------------------------------------------------- engine cache key


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """sha256 over the checkpoint's config.json and rank files (names and contents, sorted)."""
    root = Path(checkpoint_dir)
    files = [root / "config.json", *sorted(root.glob("rank*.safetensors"))]
    outer = hashlib.sha256()
    for path in files:
        inner = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.name}\0{inner.hexdigest()}\n".encode())
    return "sha256:" + outer.hexdigest()


def build_config(limits: Limits, scheme: Scheme) -> dict[str, str]:
    """The engine-shaping flags of `build_argv` as a dict (paths and worker count left out)."""
    argv = build_argv("C", "E", limits, scheme)[1:]
    flags = dict(zip(argv[0::2], argv[1::2], strict=True))
    for volatile in ("--checkpoint_dir", "--output_dir", "--workers"):
        flags.pop(volatile, None)
    flags["tp_size"] = str(limits.tp_size)
    return flags


def engine_cache_key(checkpoint_dir: str | Path, limits: Limits, scheme: Scheme, version: str, gpu_sm: str) -> dict:
    """What an engine is valid for. A TensorRT engine runs only on the GPU architecture and the
    exact TensorRT / TRT-LLM release that built it (TensorRT-LLM issues #222, #3031,
    tensorrtllm_backend #531), so both are part of the key next to the inputs."""
    parts = {
        "checkpoint_digest": checkpoint_digest(checkpoint_dir),
        "build_config": build_config(limits, scheme),
        "trtllm_version": version,
        "gpu_sm": gpu_sm,
    }
    parts["key"] = "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def engine_reusable(engine_dir: str | Path, key: dict) -> bool:
    """True only when `engine_dir` holds an engine forge built for exactly this key."""
    engine_dir = Path(engine_dir)
    try:
        recorded = json.loads((engine_dir / _KEY_FILE).read_text())
        engine_config = json.loads((engine_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    # TRT-LLM's engine config.json records the builder's version (builder.py EngineConfig).
    built_by = engine_config.get("version")
    if built_by is not None and built_by != key["trtllm_version"]:
        return False
    return recorded.get("key") == key["key"]


# ---------------------------------------------------------------- running trtllm-build


class EngineBuildDeferred(ForgeError):
    """The engine cannot be built on this machine; `command` is exactly what would run."""

    exit_code = EXIT_INFRA

    def __init__(self, reason: str, command: list[str]):
        super().__init__(f"engine build deferred: {reason}; would run: {shlex.join(command)}")
        self.reason = reason
        self.command = command


@dataclass(frozen=True)
class Toolchain:
    """What this machine offers for building: a local TRT-LLM, GPUs, a Docker engine."""

    trtllm_version: str | None
    gpus: LocalGPUs
    docker: bool
    docker_reason: str | None = None


def local_trtllm_version() -> str | None:
    """The installed tensorrt_llm release, read from package metadata (importing it loads CUDA)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def docker_engine() -> tuple[bool, str | None]:
    """(reachable, reason-if-not): `docker info` must answer, a CLI alone is not enough."""
    docker = shutil.which("docker")
    if docker is None:
        return False, "docker CLI not found"
    try:
        proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=15)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"docker info failed: {exc}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return False, lines[0] if lines else f"docker info exit status {proc.returncode}"
    return True, None


def probe_toolchain() -> Toolchain:
    reachable, why = docker_engine()
    return Toolchain(local_trtllm_version(), detect_local_gpus(), reachable, why)


@dataclass(frozen=True)
class EngineBuild:
    """A finished build: where the engine is, how it was built, the key it is valid for."""

    engine_dir: Path
    runner: str  # "local", "docker", or "cached" (a matching engine was already there)
    command: list[str]
    key: dict


def build_engine(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    limits: Limits,
    scheme: Scheme,
    target_gpu: GPUProfile,
    version: str = DEFAULT_VERSION,
    toolchain: Toolchain | None = None,
    timeout_s: float | None = None,
) -> EngineBuild:
    """Build (or reuse) the engine for `target_gpu`: locally when tensorrt_llm `version` and a
    matching GPU are here, else in the release container when a Docker engine is reachable,
    else raise EngineBuildDeferred carrying the reason and the exact command."""
    resolve_mode("engine", version)
    problem = check_trtllm_support(scheme, target_gpu, "engine") or limits_problem(scheme, limits, "engine")
    if problem:
        raise InputError(f"targets: {problem}")
    toolchain = probe_toolchain() if toolchain is None else toolchain
    output_dir = Path(output_dir)
    local_argv = build_argv(checkpoint_dir, output_dir, limits, scheme)
    container_argv = docker_build_argv(checkpoint_dir, output_dir, limits, scheme, version)

    reasons = []
    gpu = next((g for g in toolchain.gpus.gpus if g.compute_capability == target_gpu.compute_capability), None)
    if not toolchain.gpus:
        reasons.append(toolchain.gpus.reason or "no NVIDIA GPU detected")
    elif gpu is None:
        found = ", ".join(sorted({g.sm for g in toolchain.gpus.gpus}))
        reasons.append(
            f"engines for {target_gpu.name} ({target_gpu.sm}) must be built on {target_gpu.sm}; found {found}"
        )
    elif len(toolchain.gpus.gpus) < limits.tp_size:
        reasons.append(
            f"tensor_parallel {limits.tp_size} needs {limits.tp_size} GPUs; found {len(toolchain.gpus.gpus)}"
        )
    local_ok = toolchain.trtllm_version == version
    if not local_ok and not toolchain.docker:
        have = "tensorrt_llm not importable" if toolchain.trtllm_version is None else (
            f"tensorrt_llm {toolchain.trtllm_version} installed, not {version}"
        )  # fmt: skip
        reasons.append(f"{have} and no Docker engine ({toolchain.docker_reason})")
    command = local_argv if local_ok else container_argv
    if reasons:
        raise EngineBuildDeferred("; ".join(reasons), command)

    key = engine_cache_key(checkpoint_dir, limits, scheme, version, target_gpu.sm)
    if engine_reusable(output_dir, key):
        return EngineBuild(output_dir, "cached", command, key)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / _KEY_FILE).unlink(missing_ok=True)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ForgeError(f"trtllm-build failed (exit status {proc.returncode}): {shlex.join(command)}\n{tail}")
    record = {**key, "runner": "local" if local_ok else "docker", "command": command, "gpu": gpu.name}
    (output_dir / _KEY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return EngineBuild(output_dir, record["runner"], command, key)


# ---------------------------------------------------------------- serving: trtllm-serve


def kv_cache_free_gpu_memory_fraction(gpu: GPUProfile) -> float:
    """Share of the memory left after weights that goes to the KV cache.

    trtllm-serve's default is 0.9 (commands/serve.py). forge keeps that on cards with ≥ 40 GiB and
    leaves 15 % on smaller ones, where CUDA graphs and activation workspaces are a larger share
    (forge's margin, not an upstream rule).
    """
    return 0.9 if gpu.memory_gib >= 40 else 0.85


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the max batch, plus the max batch itself: with enable_padding a batch
    runs in the next captured size, so this covers every batch with at most 2× padding."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def serve_options(scheme: Scheme, gpu: GPUProfile, limits: Limits, workload: Workload, mode: str) -> dict:
    """The LLM API options trtllm-serve reads from `--config` / `--extra_llm_api_options`.

    Field names from tensorrt_llm/llmapi/llm_args.py: `kv_cache_config` (KvCacheConfig:
    free_gpu_memory_fraction, enable_block_reuse, and `dtype`, PyTorch backend only),
    `cuda_graph_config` (TorchLlmArgs only: batch_sizes, enable_padding) and
    `enable_chunked_prefill` (BaseLlmArgs). The YAML replaces the CLI's kv_cache_config whole
    (llm_utils.update_llm_args_with_extra_dict), so the memory fraction is repeated here.
    """
    # Chunked prefill: required when a prompt can exceed one step's token budget; also worth it when
    # the workload's concurrent prompts overflow that budget, so decodes keep running beside prefills.
    # An engine without paged context FMHA can neither chunk prefills nor reuse KV blocks
    # (llm_args.py ties enable_block_reuse to use_paged_context_fmha).
    paged = mode == "pytorch" or paged_context_fmha(scheme)
    chunked = paged and (
        limits.max_input_len > limits.max_num_tokens
        or workload.concurrency * workload.prompt_tokens > limits.max_num_tokens
    )
    kv_cache: dict = {
        "free_gpu_memory_fraction": kv_cache_free_gpu_memory_fraction(gpu),
        "enable_block_reuse": paged,
    }
    options: dict = {"kv_cache_config": kv_cache, "enable_chunked_prefill": chunked}
    if mode == "pytorch":
        kv_cache["dtype"] = "fp8" if scheme.kv_cache_dtype == "fp8" else "auto"
        options["cuda_graph_config"] = {
            "enable_padding": True,
            "batch_sizes": cuda_graph_batch_sizes(limits.max_batch_size),
        }
    return options


def serve_options_yaml(scheme: Scheme, gpu: GPUProfile, limits: Limits, workload: Workload, mode: str) -> str:
    return yaml.safe_dump(serve_options(scheme, gpu, limits, workload, mode), sort_keys=True)


def serve_argv(
    model_dir: str,
    limits: Limits,
    gpu: GPUProfile,
    config_path: str,
    mode: str,
    version: str = DEFAULT_VERSION,
    tokenizer_dir: str | None = None,
) -> list[str]:
    """The `trtllm-serve` command line (options of tensorrt_llm/commands/serve.py).

    pytorch mode serves a HF-layout checkpoint; engine mode serves an engine directory with
    `--backend tensorrt` and needs the tokenizer next to it. The host must be 0.0.0.0 (the
    default is localhost, unreachable from outside a container). `--config` is the alias of
    `--extra_llm_api_options` added by PR #9104; forge passes the original name to ≤ 1.2.x.
    """
    mode = resolve_mode(mode, version)
    argv = ["trtllm-serve", model_dir, "--backend", "pytorch" if mode == "pytorch" else "tensorrt"]
    if mode == "engine":
        if tokenizer_dir is None:
            raise InputError("trtllm engine mode: the server needs the tokenizer directory next to the engine")
        argv += ["--tokenizer", tokenizer_dir]
    argv += [
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--tp_size", str(limits.tp_size),
        "--max_batch_size", str(limits.max_batch_size),
        "--max_num_tokens", str(limits.max_num_tokens),
        "--max_seq_len", str(limits.max_seq_len),
        "--kv_cache_free_gpu_memory_fraction", str(kv_cache_free_gpu_memory_fraction(gpu)),
        "--config" if not engine_mode_available(version) else "--extra_llm_api_options", config_path,
    ]  # fmt: skip
    return argv


@dataclass(frozen=True)
class ServePlan:
    """Everything a serving stage needs: the argv, the YAML it points at, the image it runs in."""

    argv: list[str]
    config_yaml: str
    image: str
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


def serve_plan(
    model_dir: str,
    scheme: Scheme,
    gpu: GPUProfile,
    limits: Limits,
    workload: Workload,
    mode: str | None = None,
    version: str = DEFAULT_VERSION,
    config_path: str = "/forge/trtllm-serve.yaml",
    tokenizer_dir: str | None = None,
) -> ServePlan:
    mode = resolve_mode(mode, version)
    problem = check_trtllm_support(scheme, gpu, mode) or limits_problem(scheme, limits, mode)
    if problem:
        raise InputError(f"targets: {problem}")
    return ServePlan(
        serve_argv(model_dir, limits, gpu, config_path, mode, version, tokenizer_dir),
        serve_options_yaml(scheme, gpu, limits, workload, mode),
        image(version),
        mode,
    )


# ---------------------------------------------------------------- backend protocol (forge.backends)


def export_format(scheme: Scheme, target) -> str:
    """engine mode builds from the legacy checkpoint; the PyTorch backend loads a ModelOpt export."""
    mode = resolve_mode(target.trtllm.mode, target.trtllm.version)
    return "trtllm-checkpoint" if mode == "engine" else "modelopt"


def serve_command(model_path: str, scheme: Scheme, target, gpu: GPUProfile | None = None) -> list[str]:
    """`trtllm-serve` for a recipe target with the checkpoint at `model_path`, as forge's images lay
    it out: the engine in `engine/` beside it (engine mode; `model_path` then gives the tokenizer)
    and the LLM API YAML at `launch/trtllm-serve.yaml` (forge.serving's ENGINE_DIR and LAUNCH_DIR)."""
    from pathlib import PurePosixPath

    from forge.gpus import lookup_gpu

    gpu = gpu or lookup_gpu(target.gpus[0])
    mode = resolve_mode(target.trtllm.mode, target.trtllm.version)
    root = PurePosixPath(model_path).parent
    served, tokenizer = (str(root / "engine"), model_path) if mode == "engine" else (model_path, None)
    config = str(root / "launch" / "trtllm-serve.yaml")
    return serve_argv(served, Limits.from_target(target), gpu, config, mode, target.trtllm.version, tokenizer)


# NGC images run as root (USER above); `ignore_eos` + `max_tokens` are in trtllm-serve's OpenAI
# completion request (tensorrt_llm/serve/openai_protocol.py), so the "openai" flavour fixes lengths.
RECORD = BackendRecord(
    name="trtllm",
    image=lambda target: image(target.trtllm.version),
    port=PORT,
    health_path=HEALTH_PATH,
    user=USER,
    trust_remote_code_flag=TRUST_REMOTE_CODE_FLAG,
    loadgen_flavor="openai",
    export_format=export_format,
    serve_command=serve_command,
    problems=compat_rule("trtllm"),
)
