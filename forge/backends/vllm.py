"""vLLM: serves compressed-tensors checkpoints (FP8 float-quantized, int4 pack-quantized)."""

from __future__ import annotations

from forge.quant.scheme import Scheme
from forge.recipe import Target

IMAGE = "vllm/vllm-openai:v0.11.2"
PORT = 8000
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"  # vllm serve --help


def export_format(scheme: Scheme, target: Target) -> str:
    return "compressed-tensors"


def serve_command(model_path: str, scheme: Scheme, target: Target) -> list[str]:
    """`vllm serve` argv; the quantization method is read from the checkpoint's config."""
    argv = [
        "vllm", "serve", model_path,
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--max-model-len", str(target.max_seq_len),
        "--max-num-seqs", str(target.max_batch_size),
        "--max-num-batched-tokens", str(target.max_num_tokens),
        "--tensor-parallel-size", str(target.tensor_parallel),
    ]  # fmt: skip
    if scheme.kv_cache_dtype == "fp8":
        argv += ["--kv-cache-dtype", "fp8"]  # uses the checkpoint's calibrated k_scale/v_scale
    return argv
