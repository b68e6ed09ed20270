"""Hugging Face TGI 3.x: compressed-tensors for FP8/W4A16, AutoAWQ GEMM for AWQ (`--quantize awq`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from forge.backends.record import BackendRecord, compat_rule
from forge.quant.presets import is_awq

if TYPE_CHECKING:
    from forge.quant.scheme import Scheme
    from forge.recipe import Target

# The newest release checked on 2026-11-30: v3.3.7 (https://github.com/huggingface/text-generation-inference/releases);
# launcher flags below checked in that tag's launcher/src/main.rs.
IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.7"
# The image runs as root and needs to: its virtualenv's interpreter is a uv-managed CPython under
# /root/.local/share/uv (mode 0700), and it listens on port 80 (ENV PORT=80; the bare launcher's
# default is 3000). https://github.com/huggingface/text-generation-inference/blob/v3.3.7/Dockerfile
USER = "root"
PORT = 80
HEALTH_PATH = "/health"
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"  # text-generation-launcher --help


def export_format(scheme: Scheme, target: Target) -> str:
    return "awq-gemm" if is_awq(scheme.preset) else "compressed-tensors"


def serve_command(model_path: str, scheme: Scheme, target: Target) -> list[str]:
    quantize = "awq" if export_format(scheme, target) == "awq-gemm" else "compressed-tensors"
    argv = [
        "text-generation-launcher",
        "--model-id", model_path,
        "--port", str(PORT),
        "--quantize", quantize,
        "--max-input-tokens", str(target.max_input_len),
        "--max-total-tokens", str(target.max_seq_len),
        "--max-batch-prefill-tokens", str(target.max_num_tokens),
        "--num-shard", str(target.tensor_parallel),
    ]  # fmt: skip
    if scheme.kv_cache_dtype == "fp8":
        argv += ["--kv-cache-dtype", "fp8_e4m3fn"]
    return argv


# TGI's OpenAI routes have no `ignore_eos`/`min_tokens`: lengths come from `max_tokens` alone ("none").
RECORD = BackendRecord(
    name="tgi",
    image=lambda target: IMAGE,
    port=PORT,
    health_path=HEALTH_PATH,
    user=USER,
    trust_remote_code_flag=TRUST_REMOTE_CODE_FLAG,
    loadgen_flavor="none",
    export_format=export_format,
    serve_command=serve_command,
    problems=compat_rule("tgi"),
)
