# syntax=docker/dockerfile:1
# Rendered by forge 0.1.0 for golden/awq/vllm. Do not edit: change the recipe instead.
FROM vllm/vllm-openai:v0.31.0

LABEL dev.forge.backend="vllm"
LABEL dev.forge.gpu="H100"
LABEL dev.forge.recipe="golden"
LABEL dev.forge.variant="awq"
LABEL dev.forge.version="0.1.0"
LABEL org.opencontainers.image.created="2023-11-14T22:13:20Z"
LABEL org.opencontainers.image.description="golden-file recipe"
LABEL org.opencontainers.image.revision="abc123"
LABEL org.opencontainers.image.source="forge"
LABEL org.opencontainers.image.title="golden-awq-vllm"
LABEL org.opencontainers.image.version="awq"
LABEL team="ml-platform \"core\""

# One COPY per model file keeps each file in its own layer (forge's daemonless builder does the same).
COPY model/config.json /models/model/config.json
COPY model/model.safetensors /models/model/model.safetensors
COPY model/tokenizer.json /models/model/tokenizer.json

ENV FORGE_MODEL_FORMAT="compressed-tensors"
ENV HF_HUB_OFFLINE="1"
ENV HOME="/tmp"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
USER root
ENTRYPOINT ["vllm", "serve", "/models/model", "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "8192", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192", "--tensor-parallel-size", "2"]
