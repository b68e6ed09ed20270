"""Checkpoint formats forge exports, by name: each one a torch-free spec and a codec (writer and reader).

A backend picks a format (STYLE: formats live apart from backends). `forge.formats.specs` holds
each format's spec (which schemes it stores, what a model's shape must satisfy), imported by the
plan without torch; the codec module, loaded here only when `FORMATS` is first asked for, exposes:

- `write(qm, source_dir, out_dir, metadata, *, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
  tp_size=1) -> list[Path]`: a complete model directory a server loads (config with
  `quantization_config`, tokenizer files, chat template, generation config, safetensors shards +
  index, `forge.json` holding `metadata`); returns the files written. `tp_size` only adds
  checks (int4 groups must tile each rank's input slice). It refuses with its spec first.
- `read(directory) -> (config, state)`: the config.json dict and the dense float32 Hugging Face
  state dict the export stands for (int4 weights equal `QuantizedModel.dequantize()` bit for
  bit), plus `<module>.input_scale` and `...self_attn.k_scale` / `v_scale` where the export
  stores them.
- `unsupported_reason(scheme) -> str | None`: why the format cannot hold a scheme.

Adding a format is its codec module, its `FormatSpec` in `specs.SPECS` and one line in `_codecs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from forge.errors import InputError
from forge.formats.specs import SPECS, FormatSpec

__all__ = ["FORMATS", "SPECS", "Format", "get_format"]


@dataclass(frozen=True)
class Format:
    spec: FormatSpec
    # write(qm, source_dir, out_dir, metadata, *, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, tp_size=1)
    write: Callable[..., list[Path]]
    read: Callable[[Path], tuple[dict, dict]]
    unsupported_reason: Callable[[Any], str | None]

    @property
    def name(self) -> str:
        return self.spec.name


@cache
def _codecs() -> dict[str, Format]:
    """The codec of every spec, imported on first use: they import torch, planning must not."""
    from forge.formats import awq_gemm, compressed_tensors, modelopt, trtllm_checkpoint

    formats = {
        m.FORMAT: Format(SPECS[m.FORMAT], m.write, m.read, m.unsupported_reason)
        for m in (compressed_tensors, awq_gemm, modelopt)
    }
    # The legacy TensorRT-LLM checkpoint (input of trtllm-build): `export` has the common signature.
    formats[trtllm_checkpoint.FORMAT] = Format(
        SPECS[trtllm_checkpoint.FORMAT], trtllm_checkpoint.export, trtllm_checkpoint.read,
        trtllm_checkpoint.unsupported_reason,
    )  # fmt: skip
    if set(formats) != set(SPECS):
        raise RuntimeError(f"format specs {sorted(SPECS)} and codecs {sorted(formats)} differ")
    return formats


def __getattr__(name: str) -> Any:
    if name == "FORMATS":
        return _codecs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_format(name: str) -> Format:
    if name not in SPECS:
        raise InputError(f"format: {name!r} is not one of {', '.join(sorted(SPECS))}")
    return _codecs()[name]
