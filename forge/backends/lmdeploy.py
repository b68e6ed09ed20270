"""LMDeploy TurboMind: AutoAWQ GEMM int4 (group 128), KV cache quantized online by --quant-policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from forge.backends.record import BackendRecord, compat_rule

if TYPE_CHECKING:
    from forge.quant.scheme import Scheme
    from forge.recipe import Target

# The newest release checked on 2026-11-30: v0.16.0 (https://github.com/InternLM/lmdeploy/releases). Since
# v0.11 the image tags carry the CUDA minor (`<tag>-cu12.8`, `<tag>-cu13.0`: .github/workflows/docker.yml);
# the `api_server` flags below and QuantPolicy 0/4/8 are unchanged in v0.16.0 (lmdeploy/cli/serve.py).
IMAGE = "openmmlab/lmdeploy:v0.16.0-cu12.8"
# docker/Dockerfile has no USER (root); Python is the /opt/py3 virtualenv.
# https://github.com/InternLM/lmdeploy/blob/v0.16.0/docker/Dockerfile
USER = "root"
PORT = 23333
HEALTH_PATH = "/health"
# `lmdeploy serve api_server` has no such flag: it loads configs with trust_remote_code=True, so
# forge refuses a checkpoint with its own code unless the recipe opts in (plan.py).
TRUST_REMOTE_CODE_FLAG = None

# LMDeploy `--quant-policy`: 0 = no KV quantization, 4 = int4 KV, 8 = int8 KV.
QUANT_POLICY = {"auto": 0, "int4": 4, "int8": 8}


def export_format(scheme: Scheme, target: Target) -> str:
    return "awq-gemm"


def serve_command(model_path: str, scheme: Scheme, target: Target) -> list[str]:
    return [
        "lmdeploy", "serve", "api_server", model_path,
        "--backend", "turbomind",
        "--model-format", "awq",
        "--quant-policy", str(QUANT_POLICY[scheme.kv_cache_dtype]),
        "--tp", str(target.tensor_parallel),
        "--session-len", str(target.max_seq_len),
        "--max-batch-size", str(target.max_batch_size),
        "--server-name", "0.0.0.0",
        "--server-port", str(PORT),
    ]  # fmt: skip


# `max_tokens` + `ignore_eos`: both fields of LMDeploy's OpenAI request models ("openai" flavour;
# https://github.com/InternLM/lmdeploy/blob/v0.16.0/lmdeploy/serve/openai/protocol.py).
RECORD = BackendRecord(
    name="lmdeploy",
    image=lambda target: IMAGE,
    port=PORT,
    health_path=HEALTH_PATH,
    user=USER,
    trust_remote_code_flag=TRUST_REMOTE_CODE_FLAG,
    loadgen_flavor="openai",
    export_format=export_format,
    serve_command=serve_command,
    problems=compat_rule("lmdeploy"),
)
