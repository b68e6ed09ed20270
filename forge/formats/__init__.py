"""Checkpoint formats forge exports, by name: each one a writer and an independent reader.

A backend picks a format (STYLE: formats live apart from backends). Every format module exposes
the same three functions, registered here explicitly:

- `write(qm, source_dir, out_dir, metadata, *, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
  tp_size=1) -> list[Path]`: a complete model directory a server loads (config with
  `quantization_config`, tokenizer files, chat template, generation config, safetensors shards +
  index, `forge.json` holding `metadata`); returns the files written. `tp_size` only adds
  checks (int4 groups must tile each rank's input slice).
- `read(directory) -> (config, state)`: the config.json dict and the dense float32 Hugging Face
  state dict the export stands for (int4 weights equal `QuantizedModel.dequantize()` bit for
  bit), plus `<module>.input_scale` and `...self_attn.k_scale` / `v_scale` where the export
  stores them.
- `unsupported_reason(scheme) -> str | None`: why the format cannot hold a scheme, for planning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from forge.errors import InputError
from forge.formats import awq_gemm, compressed_tensors, modelopt, trtllm_checkpoint
from forge.formats.model_dir import DEFAULT_MAX_SHARD_BYTES
from forge.quant.model import QuantizedModel, Scheme

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "FORMATS", "Format", "export", "get_format"]


@dataclass(frozen=True)
class Format:
    name: str
    # write(qm, source_dir, out_dir, metadata, *, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, tp_size=1)
    write: Callable[..., list[Path]]
    read: Callable[[Path], tuple[dict, dict[str, torch.Tensor]]]
    unsupported_reason: Callable[[Scheme], str | None]


FORMATS: dict[str, Format] = {
    compressed_tensors.FORMAT: Format(
        compressed_tensors.FORMAT,
        compressed_tensors.write,
        compressed_tensors.read,
        compressed_tensors.unsupported_reason,
    ),
    awq_gemm.FORMAT: Format(awq_gemm.FORMAT, awq_gemm.write, awq_gemm.read, awq_gemm.unsupported_reason),
    modelopt.FORMAT: Format(modelopt.FORMAT, modelopt.write, modelopt.read, modelopt.unsupported_reason),
    # The legacy TensorRT-LLM checkpoint (input of trtllm-build): `export` has the common signature.
    trtllm_checkpoint.FORMAT: Format(
        trtllm_checkpoint.FORMAT, trtllm_checkpoint.export, trtllm_checkpoint.read, trtllm_checkpoint.unsupported_reason
    ),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise InputError(f"format: {name!r} is not one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def export(name: str, qm: QuantizedModel, source_dir: Path, out_dir: Path, metadata: dict, **options) -> list[Path]:
    """Write `qm` in format `name`; the one call the build's export stage needs."""
    return get_format(name).write(qm, source_dir, out_dir, metadata, **options)
