# syntax=docker/dockerfile:1
# Rendered by forge 0.1.0 for golden/awq/tgi. Do not edit: change the recipe instead.
FROM ghcr.io/huggingface/text-generation-inference:3.3.7

LABEL dev.forge.backend="tgi"
LABEL dev.forge.gpu="H100"
LABEL dev.forge.recipe="golden"
LABEL dev.forge.variant="awq"
LABEL dev.forge.version="0.1.0"
LABEL org.opencontainers.image.created="2023-11-14T22:13:20Z"
LABEL org.opencontainers.image.description="golden-file recipe"
LABEL org.opencontainers.image.revision="abc123"
LABEL org.opencontainers.image.source="forge"
LABEL org.opencontainers.image.title="golden-awq-tgi"
LABEL org.opencontainers.image.version="awq"
LABEL team="ml-platform \"core\""

# One COPY per model file keeps each file in its own layer (forge's daemonless builder does the same).
COPY model/config.json /models/model/config.json
COPY model/model.safetensors /models/model/model.safetensors
COPY model/tokenizer.json /models/model/tokenizer.json

ENV FORGE_MODEL_FORMAT="awq-gemm"
ENV HF_HUB_OFFLINE="1"
ENV HOME="/tmp"
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:80/health')"]
USER root
ENTRYPOINT ["text-generation-launcher", "--model-id", "/models/model", "--port", "80", "--quantize", "awq", "--max-input-tokens", "2048", "--max-total-tokens", "4096", "--max-batch-prefill-tokens", "8192", "--num-shard", "1"]
