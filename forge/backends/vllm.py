"""vLLM: serves compressed-tensors checkpoints (FP8 float-quantized, int4 pack-quantized)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from forge.backends.record import BackendRecord, compat_rule

if TYPE_CHECKING:
    from forge.quant.scheme import Scheme
    from forge.recipe import Target

# The newest release checked on 2026-11-30 (https://github.com/vllm-project/vllm/releases, tag v0.31.0;
# image https://hub.docker.com/r/vllm/vllm-openai/tags). The `vllm serve` flags below are unchanged
# from v0.11.2 to v0.31.0 (vllm/engine/arg_utils.py). From v0.30.0 the plain tag is built for CUDA 13
# (driver ≥ 580); on an older driver set package.base_images.vllm to the `-cu129` variant.
IMAGE = "vllm/vllm-openai:v0.31.0"
# docker/Dockerfile (vllm-openai stage) has no USER: the server runs as root and Python lives in
# the system site-packages (https://github.com/vllm-project/vllm/blob/main/docker/Dockerfile).
USER = "root"
PORT = 8000
HEALTH_PATH = "/health"
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


# `min_tokens` + `max_tokens` + `ignore_eos` (vLLM's extra sampling parameters) fix the output length
# exactly (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html#extra-parameters).
RECORD = BackendRecord(
    name="vllm",
    image=lambda target: IMAGE,
    port=PORT,
    health_path=HEALTH_PATH,
    user=USER,
    trust_remote_code_flag=TRUST_REMOTE_CODE_FLAG,
    loadgen_flavor="vllm",
    export_format=export_format,
    serve_command=serve_command,
    problems=compat_rule("vllm"),
)
