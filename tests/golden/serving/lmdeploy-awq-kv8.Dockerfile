# syntax=docker/dockerfile:1
# Rendered by forge 0.1.0 for golden/awq-kv8/lmdeploy. Do not edit: change the recipe instead.
FROM openmmlab/lmdeploy:v0.16.0-cu12.8

LABEL dev.forge.backend="lmdeploy"
LABEL dev.forge.gpu="H100"
LABEL dev.forge.recipe="golden"
LABEL dev.forge.variant="awq-kv8"
LABEL dev.forge.version="0.1.0"
LABEL org.opencontainers.image.created="2023-11-14T22:13:20Z"
LABEL org.opencontainers.image.description="golden-file recipe"
LABEL org.opencontainers.image.revision="abc123"
LABEL org.opencontainers.image.source="forge"
LABEL org.opencontainers.image.title="golden-awq-kv8-lmdeploy"
LABEL org.opencontainers.image.version="awq-kv8"
LABEL team="ml-platform \"core\""

# One COPY per model file keeps each file in its own layer (forge's daemonless builder does the same).
COPY model/config.json /models/model/config.json
COPY model/model.safetensors /models/model/model.safetensors
COPY model/tokenizer.json /models/model/tokenizer.json

ENV FORGE_MODEL_FORMAT="awq-gemm"
ENV HF_HUB_OFFLINE="1"
ENV HOME="/tmp"
EXPOSE 23333
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:23333/health')"]
USER root
ENTRYPOINT ["lmdeploy", "serve", "api_server", "/models/model", "--backend", "turbomind", "--model-format", "awq", "--quant-policy", "8", "--tp", "1", "--session-len", "4096", "--max-batch-size", "64", "--server-name", "0.0.0.0", "--server-port", "23333"]
