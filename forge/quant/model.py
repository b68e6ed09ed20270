"""forge's canonical quantized model: what quantizers produce and every format writer reads.

Quantize once, export many times: a quantizer turns a dense checkpoint into one
`QuantizedModel`; each format writer under `forge/formats/` only re-packs its tensors, so every
backend serves exactly the same integer codes and scales. Readers dequantize an exported
directory back to dense weights, which must equal `QuantizedModel.dequantize()` bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forge.quant.scheme import Scheme
from forge.untrusted import safetensors_header

__all__ = ["QuantizedLinear", "QuantizedModel", "Scheme", "load_quantized", "open_quantized", "save_quantized"]


@dataclass
class QuantizedLinear:
    """One `nn.Linear` weight in canonical form, `[out, in]` like `nn.Linear.weight`.

    int4: `codes` is int8 holding q in [-8, 7] (symmetric, `zero_point` is None) or q in [0, 15]
    with a uint4 `zero_point`; `scale` and `zero_point` are `[out, in // group_size]`, and
    `w = (q - zero_point) * scale` group-wise along `in`.
    fp8: `codes` is float8_e4m3fn and `w = codes * scale` with `scale` `[out, 1]` (channel) or
    `[1]` (tensor); `input_scale` `[1]` exists only for static activation scales.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.codes.dtype == torch.float8_e4m3fn:
            return (self.codes.to(torch.float32) * self.scale.to(torch.float32)).to(dtype)
        out_features, in_features = self.codes.shape
        groups = self.scale.shape[1]
        q = self.codes.to(torch.float32).reshape(out_features, groups, in_features // groups)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32).unsqueeze(-1)
        w = q * self.scale.to(torch.float32).unsqueeze(-1)
        return w.reshape(out_features, in_features).to(dtype)


@dataclass
class QuantizedModel:
    """A whole quantized checkpoint with Hugging Face tensor names.

    `dense` holds every tensor that is not a quantized linear weight (embeddings, norms, biases,
    `lm_head` when ignored); `linears` maps a module name (`model.layers.0.mlp.down_proj`, no
    `.weight`) to its quantized weight; `kv_scales` maps `...self_attn.k_scale`/`v_scale` to a
    float32 scalar when the scheme calibrates an fp8 KV cache.
    """

    config: dict
    scheme: Scheme
    dense: dict[str, torch.Tensor]
    linears: dict[str, QuantizedLinear]
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    # What calibration reached: MoE per-layer expert token counts (`expert_tokens`) and the linears
    # that fell back to round-to-nearest for want of calibration inputs (`rtn_fallback`).
    calibration: dict = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The dense Hugging Face state dict these codes stand for."""
        state = {name: t.to(dtype) for name, t in self.dense.items()}
        for name, linear in self.linears.items():
            state[f"{name}.weight"] = linear.dequantize(dtype)
        return state


_PARTS = ("codes", "scale", "zero_point", "input_scale")


def save_quantized(model: QuantizedModel, directory: Path) -> None:
    """forge's internal cache format: one safetensors file plus `quant.json`; deterministic."""
    tensors: dict[str, torch.Tensor] = {f"dense::{k}": v for k, v in model.dense.items()}
    for name, linear in model.linears.items():
        for part in _PARTS:
            value = getattr(linear, part)
            if value is not None:
                tensors[f"linear::{name}::{part}"] = value
    tensors.update({f"kv::{k}": v for k, v in model.kv_scales.items()})
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, directory / "quantized.safetensors")
    meta = {"config": model.config, "scheme": asdict(model.scheme)}
    if model.calibration:
        meta["calibration"] = model.calibration
    (directory / "quant.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_quantized(directory: Path) -> QuantizedModel:
    meta = json.loads((directory / "quant.json").read_text())
    scheme_fields = meta["scheme"]
    scheme_fields["ignore"] = tuple(scheme_fields["ignore"])
    dense: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kv: dict[str, torch.Tensor] = {}
    safetensors_header(directory / "quantized.safetensors")
    for key, tensor in load_file(directory / "quantized.safetensors").items():
        kind, _, rest = key.partition("::")
        if kind == "dense":
            dense[rest] = tensor
        elif kind == "kv":
            kv[rest] = tensor
        else:
            name, _, part = rest.rpartition("::")
            parts.setdefault(name, {})[part] = tensor
    linears = {name: QuantizedLinear(**p) for name, p in parts.items()}
    return QuantizedModel(meta["config"], Scheme(**scheme_fields), dense, linears, kv, meta.get("calibration", {}))


class LazyTensors(Mapping):
    """Tensors under a key prefix of one safetensors file, read on access and never kept, so an
    export holds one tensor at a time instead of the whole quantized model."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = path, prefix
        with safe_open(path, framework="pt") as f:
            self._keys = sorted(k.removeprefix(prefix) for k in f.keys() if k.startswith(prefix))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LazyLinears(Mapping):
    """`QuantizedLinear`s of a saved model, assembled from their parts on access."""

    def __init__(self, path: Path):
        self.parts = LazyTensors(path, "linear::")
        self._names = sorted({key.rpartition("::")[0] for key in self.parts})

    def __getitem__(self, name: str) -> QuantizedLinear:
        if name not in self._names:
            raise KeyError(name)
        return QuantizedLinear(**{part: self.parts.get(f"{name}::{part}") for part in _PARTS})

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_quantized(directory: Path) -> QuantizedModel:
    """Like `load_quantized`, but tensors are read from disk when a writer asks for them."""
    meta = json.loads((directory / "quant.json").read_text())
    scheme_fields = {**meta["scheme"], "ignore": tuple(meta["scheme"]["ignore"])}
    path = directory / "quantized.safetensors"
    safetensors_header(path)  # checked once; LazyTensors then opens it per tensor
    kv = dict(LazyTensors(path, "kv::"))  # a few scalars
    dense, linears = LazyTensors(path, "dense::"), LazyLinears(path)
    return QuantizedModel(meta["config"], Scheme(**scheme_fields), dense, linears, kv, meta.get("calibration", {}))
