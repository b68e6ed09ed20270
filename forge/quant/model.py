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
from safetensors.torch import load_file

from forge.errors import InputError
from forge.quant.scheme import Scheme
from forge.untrusted import safetensors_header

__all__ = [
    "QuantizedLinear",
    "QuantizedModel",
    "QuantizedWriter",
    "Scheme",
    "load_quantized",
    "open_quantized",
    "save_quantized",
]


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
        # A new tensor (copy=True), then changed in place: one float temporary (0.9 GiB at 70B's down_proj).
        q = self.codes.to(torch.float32, copy=True).reshape(out_features, groups, in_features // groups)
        if self.zero_point is not None:
            q.sub_(self.zero_point.to(torch.float32).unsqueeze(-1))
        w = q.mul_(self.scale.to(torch.float32).unsqueeze(-1))
        return w.reshape(out_features, in_features).to(dtype)


@dataclass
class QuantizedModel:
    """A whole quantized checkpoint with Hugging Face tensor names.

    `dense` holds every tensor that is not a quantized linear weight (embeddings, norms, biases,
    `lm_head` when ignored); `linears` maps a module name (`model.layers.0.mlp.down_proj`, no
    `.weight`) to its quantized weight; `kv_scales` maps `...self_attn.k_scale`/`v_scale` to a
    float32 scalar when the scheme calibrates an fp8 KV cache.

    Dense tensors keep the source checkpoint's dtype (float32 for what an algorithm computed, such
    as AWQ-folded norm weights): each format casts them once, to its own dtype, so an export's
    embedding is `source.to(export dtype)` and not a rounding of a rounding.
    """

    config: dict
    scheme: Scheme
    dense: dict[str, torch.Tensor]
    linears: dict[str, QuantizedLinear]
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    # What calibration reached: MoE per-layer expert token counts (`expert_tokens`) and the linears
    # that fell back to round-to-nearest for want of calibration inputs (`rtn_fallback`).
    calibration: dict = field(default_factory=dict)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, dense_dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The dense Hugging Face state dict these codes stand for; with `dense_dtype`, the dense
        tensors as an export in that dtype holds them (floating ones rounded to it first)."""
        state = {name: _round(t, dense_dtype).to(dtype) for name, t in self.dense.items()}
        for name, linear in self.linears.items():
            state[f"{name}.weight"] = linear.dequantize(dtype)
        return state


def _round(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


_PARTS = ("codes", "scale", "zero_point", "input_scale")
INDEX = "quantized.index.json"  # tensor name -> part file, for a cache written part by part
SINGLE = "quantized.safetensors"  # the one-file layout (older caches; still read)


def cache_tensors(
    dense: Mapping[str, torch.Tensor], linears: Mapping[str, QuantizedLinear], kv_scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The cache's flat names for a model's (or one part's) tensors: `dense::`, `linear::<name>::<part>`, `kv::`."""
    tensors: dict[str, torch.Tensor] = {f"dense::{k}": v for k, v in dense.items()}
    for name, linear in linears.items():
        for part in _PARTS:
            value = getattr(linear, part)
            if value is not None:
                tensors[f"linear::{name}::{part}"] = value
    tensors.update({f"kv::{k}": v for k, v in kv_scales.items()})
    return tensors


class QuantizedWriter:
    """forge's internal cache, written one part (a decoder layer's tensors) at a time.

    Each `add` writes one safetensors file (`quantized-00000.safetensors`, ...) and drops its
    tensors, so a quantizer never holds more than one layer's output; `finish` writes the index
    (tensor name -> file) and then `quant.json`, whose presence marks the cache complete.
    Deterministic: the same parts in the same order give the same bytes.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from forge.formats.model_dir import TensorSpec, Unit, write_safetensors  # model_dir imports this module

        if twice := set(tensors).intersection(self.weight_map):
            raise RuntimeError(f"quantized cache: {min(twice)} written twice")  # a quantizer bug
        name = f"quantized-{len(set(self.weight_map.values())):05d}.safetensors"
        units = [
            Unit(key, (TensorSpec(key, t.dtype, tuple(t.shape)),), lambda key=key, t=t: {key: t.contiguous()})
            for key, t in tensors.items()
        ]
        write_safetensors(self.directory / name, units)
        self.weight_map.update(dict.fromkeys(tensors, name))

    def finish(self, config: dict, scheme: Scheme, calibration: dict) -> None:
        index = {"weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_meta(self.directory, config, scheme, calibration)


def save_quantized(model: QuantizedModel, directory: Path) -> None:
    """An in-memory model as forge's cache in one file (`quantized.safetensors`) plus `quant.json`;
    deterministic. The quantize stage streams instead (`QuantizedWriter`, one file per part)."""
    from forge.formats.model_dir import TensorSpec, Unit, write_safetensors  # model_dir imports this module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = cache_tensors(model.dense, model.linears, model.kv_scales)
    units = [
        Unit(key, (TensorSpec(key, t.dtype, tuple(t.shape)),), lambda key=key: {key: tensors[key].contiguous()})
        for key, t in tensors.items()
    ]
    write_safetensors(directory / SINGLE, units)
    _write_meta(directory, model.config, model.scheme, model.calibration)


def _write_meta(directory: Path, config: dict, scheme: Scheme, calibration: dict) -> None:
    meta = {"config": config, "scheme": asdict(scheme)}
    if calibration:
        meta["calibration"] = calibration
    (directory / "quant.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def cache_files(directory: Path) -> dict[str, Path]:
    """Cache key -> the file holding it, every file's header checked once (`safetensors_header`)
    and the index checked against them; reads both layouts (index + parts, or one file)."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.exists():
        path = directory / SINGLE
        return dict.fromkeys(safetensors_header(path), path)
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: set(safetensors_header(directory / name)) for name in sorted(set(weight_map.values()))}
    for key, name in weight_map.items():
        if key not in files[name]:
            raise InputError(f"quantized cache: {key} is missing from {name} (its index lists it there)")
    return {key: directory / name for key, name in weight_map.items()}


def load_quantized(directory: Path) -> QuantizedModel:
    """The whole cached model in memory (tests and small models; exports use `open_quantized`)."""
    meta = json.loads((Path(directory) / "quant.json").read_text())
    scheme_fields = meta["scheme"]
    scheme_fields["ignore"] = tuple(scheme_fields["ignore"])
    dense: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    kv: dict[str, torch.Tensor] = {}
    files = cache_files(directory)
    for path in sorted(set(files.values())):
        for key, tensor in load_file(path).items():
            kind, _, rest = key.partition("::")
            if kind == "dense":
                dense[rest] = tensor
            elif kind == "kv":
                kv[rest] = tensor
            else:
                name, _, part = rest.rpartition("::")
                parts.setdefault(name, {})[part] = tensor
    dense = dict(sorted(dense.items()))
    linears = {name: QuantizedLinear(**parts[name]) for name in sorted(parts)}
    kv = dict(sorted(kv.items()))
    return QuantizedModel(meta["config"], Scheme(**scheme_fields), dense, linears, kv, meta.get("calibration", {}))


class LazyTensors(Mapping):
    """Tensors under a key prefix of the cache's files, read on access and never kept, so an
    export holds one tensor at a time instead of the whole quantized model."""

    def __init__(self, files: Mapping[str, Path], prefix: str):
        self.prefix = prefix
        self._files = {k.removeprefix(prefix): p for k, p in files.items() if k.startswith(prefix)}
        self._keys = sorted(self._files)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise KeyError(key)
        with safe_open(self._files[key], framework="pt") as f:
            return f.get_tensor(self.prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LazyLinears(Mapping):
    """`QuantizedLinear`s of a saved model, assembled from their parts on access."""

    def __init__(self, files: Mapping[str, Path]):
        self.parts = LazyTensors(files, "linear::")
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
    meta = json.loads((Path(directory) / "quant.json").read_text())
    scheme_fields = {**meta["scheme"], "ignore": tuple(meta["scheme"]["ignore"])}
    files = cache_files(directory)  # headers checked once; LazyTensors then opens a file per tensor
    kv = dict(LazyTensors(files, "kv::"))  # a few scalars
    dense, linears = LazyTensors(files, "dense::"), LazyLinears(files)
    return QuantizedModel(meta["config"], Scheme(**scheme_fields), dense, linears, kv, meta.get("calibration", {}))
