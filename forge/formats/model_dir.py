"""What every exported model directory shares: files copied from the source, sharded weights, metadata.

A server loads an export like any Hugging Face checkpoint, so each format writes the same
directory: `config.json` (with the format's `quantization_config`), the tokenizer files, chat
template and generation config copied from the source, safetensors weights (one
`model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json` once the weights pass the shard size limit), and `forge.json`.

Weights are streamed. A format describes its output as `Unit`s — the tensors of one module
(packed weight, scales, zero points) or one dense tensor, with dtypes and shapes known before any
packing — and a function that produces a unit's tensors on demand. Shards are planned from those
sizes, and each shard file is written header first, then unit by unit, so at most one unit's
tensors are alive at a time: peak memory follows the largest tensor, not the model. The same
plan makes the bytes deterministic (sorted names, fixed metadata, no timestamps).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from forge.architectures import ARCHITECTURES, architecture_name
from forge.errors import InputError
from forge.formats.specs import SOURCE_FILES, FormatSpec, group_size_problem
from forge.quant.model import QuantizedModel, Scheme
from forge.quant.rtn import is_ignored
from forge.untrusted import TensorInfo, index_weight_map, read_json, safetensors_header

# transformers' long-standing `max_shard_size` default ("5GB"); it also keeps every shard well
# under registry layer limits (GHCR 10 GB per layer), since OCI packaging puts one shard per layer.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Whole-tensor checks run on blocks of this many elements, so they add no tensor-sized mask.
_CHECK_BLOCK = 1 << 22

# Projections a tensor-parallel server splits along their input dimension (vLLM
# `RowParallelLinear`: o_proj, down_proj, and each MoE expert's down projection, Mixtral's `w2`);
# every rank then holds in / tp input columns.
ROW_PARALLEL = ("self_attn.o_proj", "down_proj", ".w2")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype codes (https://github.com/huggingface/safetensors, "Format" in README).
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()} | {
    "F64": torch.float64,
    "I16": torch.int16,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, described before it exists so shards can be planned up front."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Unit:
    """Tensors produced together (one module's packed parts) and therefore kept in one shard.

    `produce` must look its inputs up when called (not capture tensors), so that a plan of the
    whole model holds no tensor data.
    """

    key: str
    specs: tuple[TensorSpec, ...]
    produce: Callable[[], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)


# ---------------------------------------------------------------- policy shared by the formats


def export_dtype(scheme: Scheme) -> torch.dtype:
    """The dtype of an export's unquantized tensors (and its `torch_dtype`).

    int4 exports are float16 throughout: forge's int4 scales are float16 (the AutoAWQ GEMM layout
    and TurboMind), AWQ kernels run float16 only (vLLM `AWQConfig.get_supported_act_dtypes`), and
    loaders create scale parameters in the model dtype (vLLM compressed-tensors WNA16, TRT-LLM
    `W4A16_AWQ_LinearMethod`, compressed-tensors `initialize_qparams`), so a bfloat16 model would
    round the scales and serve different weights. fp8 exports keep the scheme's dtype.
    """
    if scheme.weight_format == "int4":
        return torch.float16
    return getattr(torch, scheme.dtype)


def never_quantized_pattern(config: dict) -> re.Pattern | None:
    """Full module names of the architecture's linear-shaped modules that are never quantized."""
    arch = ARCHITECTURES.get(architecture_name(config))
    if arch is None or not arch.never_quantized():
        return None
    names = "|".join(re.escape(n) for n in arch.never_quantized())
    return re.compile(rf"^model\.layers\.\d+\.({names})$")


def ignored_modules(qm: QuantizedModel) -> list[str]:
    """Full names of the linears the scheme kept dense, for every format's ignore list.

    The scheme's patterns may be suffixes or `re:` regexes, which the formats' ignore lists match
    differently (compressed-tensors: exact or `re:`; AutoAWQ/vLLM: substring; ModelOpt: fnmatch),
    so every format gets the same concrete module names instead. A tied `lm_head` has no tensor
    of its own but is still listed when ignored, as llm-compressor and ModelOpt do.
    MoE routers (`forge.architectures`: never quantized) are listed too, as llm-compressor's MoE
    recipes ignore `re:.*mlp.gate$`, so no loader mistakes them for a quantized linear.
    """
    never = never_quantized_pattern(qm.config)
    names = set()
    for key, tensor in qm.dense.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and tensor.dim() == 2:
            if is_ignored(module, qm.scheme.ignore) or (never is not None and never.match(module)):
                names.add(module)
    if is_ignored("lm_head", qm.scheme.ignore):
        names.add("lm_head")
    return sorted(names)


def check_group_size(
    fmt: str, name: str, codes: torch.Tensor, scale: torch.Tensor, scheme: Scheme, tp_size: int = 1
) -> int:
    """The int4 group size of one linear, checked against its shapes with the plan's one rule
    (`specs.group_size_problem`); InputError naming the layer. With tensor parallelism a
    row-parallel layer's groups must also tile each rank's slice of the input."""
    out_features, in_features = codes.shape
    group = scheme.group_size
    widths = {name: in_features}
    if tp_size > 1 and name.endswith(ROW_PARALLEL):
        if in_features % tp_size:
            raise InputError(f"{fmt}: {name}: in_features {in_features} cannot be split over tensor_parallel {tp_size}")
        widths[f"{name} per rank at tensor_parallel {tp_size}"] = in_features // tp_size
    if (problem := group_size_problem(group, widths)) is not None:
        raise InputError(f"{fmt}: {problem}")
    if tuple(scale.shape) != (out_features, in_features // group):
        raise InputError(
            f"{fmt}: {name}: scale shape {tuple(scale.shape)} does not match [{out_features}, {in_features} / {group}]"
        )
    return group


def dense_units(qm: QuantizedModel, dtype: torch.dtype, fmt: str) -> list[Unit]:
    """One unit per unquantized tensor, cast to the export dtype (a tied lm_head is not written)."""
    tied = bool(qm.config.get("tie_word_embeddings"))
    units = []
    for name in sorted(qm.dense):
        if tied and name == "lm_head.weight":
            continue  # tied: the embedding is the head; writing both would duplicate it
        shape = tuple(qm.dense[name].shape)
        out_dtype = dtype if qm.dense[name].is_floating_point() else qm.dense[name].dtype

        def produce(name: str = name, out_dtype: torch.dtype = out_dtype) -> dict[str, torch.Tensor]:
            source = qm.dense[name]
            tensor = source.to(out_dtype)
            if out_dtype == torch.float16 and _has_inf(tensor) and not _has_inf(source):
                raise InputError(f"{fmt}: {name} has values beyond float16's range (±65504)")
            return {name: tensor}

        units.append(Unit(name, (TensorSpec(name, out_dtype, shape),), produce))
    return units


def _has_inf(tensor: torch.Tensor) -> bool:
    """isinf().any() a block at a time, so the check adds no tensor-sized mask to peak memory."""
    flat = tensor.reshape(-1)
    return any(bool(torch.isinf(block).any()) for block in flat.split(_CHECK_BLOCK))


# ---------------------------------------------------------------- writing


def write_model_dir(
    qm: QuantizedModel,
    source_dir: Path,
    out_dir: Path,
    metadata: dict,
    export: ExportPlan,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write a complete loadable model directory; returns every file written, sorted."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"export: {out_dir} is not empty; exports are written into a fresh directory")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write_model_dir(qm, Path(source_dir), out_dir, metadata, export, max_shard_bytes)
    except BaseException:
        # never leave a half-written export that looks loadable
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for path in out_dir.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


def _write_model_dir(
    qm: QuantizedModel, source_dir: Path, out_dir: Path, metadata: dict, export: ExportPlan, max_shard_bytes: int
) -> list[Path]:
    written = copy_source_files(source_dir, out_dir)

    config = json.loads(json.dumps(qm.config))  # a deep copy that is also JSON-clean
    config.pop("quantization_config", None)
    dtype_name = str(export_dtype(qm.scheme)).removeprefix("torch.")
    # transformers 5 writes `dtype`; vLLM, TGI and older transformers read `torch_dtype`.
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name
    config["quantization_config"] = export.quantization_config
    written.append(write_json(out_dir / "config.json", config))
    for name, data in sorted((export.extra_json or {}).items()):
        written.append(write_json(out_dir / name, data))
    written.append(write_json(out_dir / "forge.json", metadata))
    written.extend(write_weights(out_dir, export.units, max_shard_bytes))
    return sorted(written)


@dataclass(frozen=True)
class ExportPlan:
    """What a format's writer decided for one model: its tensors (as units), config.json's
    `quantization_config`, and any extra JSON files (ModelOpt's `hf_quant_config.json`)."""

    units: list[Unit]
    quantization_config: dict
    extra_json: Mapping[str, dict] | None = None


def format_writer(spec: FormatSpec, plan: Callable[[QuantizedModel, int], ExportPlan]) -> Callable[..., list[Path]]:
    """The `write` of a model-directory format: its spec's refusal first (the rule the plan
    applied), then its `plan(qm, tp_size)`, then the shared directory writer."""

    def write(
        qm: QuantizedModel,
        source_dir: Path,
        out_dir: Path,
        metadata: dict,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        tp_size: int = 1,
    ) -> list[Path]:
        """Export `qm` as a model directory in this format; returns the files written.

        `tp_size` is the tensor-parallel degree the export will be served with: it only adds checks
        (int4 groups must tile each rank's input slice), the files are the same for every degree.
        """
        if (reason := spec.scheme_problem(qm.scheme)) is not None:
            raise InputError(reason)
        return write_model_dir(qm, source_dir, out_dir, metadata, plan(qm, tp_size), max_shard_bytes)

    write.__qualname__ = write.__name__ = f"write_{spec.name.replace('-', '_')}"
    return write


def check_kv_scales(fmt: str, qm: QuantizedModel) -> None:
    """An fp8 KV cache needs its calibrated scales, under forge's `self_attn.k_scale` / `v_scale` names."""
    if qm.scheme.kv_cache_dtype == "fp8" and not qm.kv_scales:
        raise InputError(f"{fmt}: kv_cache_dtype fp8 needs calibrated k/v scales; the model has none")
    for name in qm.kv_scales:
        if not name.endswith(("self_attn.k_scale", "self_attn.v_scale")):
            raise InputError(f"{fmt}: {name} is not a `self_attn.k_scale` / `v_scale` name")


def copy_source_files(source_dir: Path, out_dir: Path) -> list[Path]:
    """Tokenizer, chat template and generation config, unchanged, so the export chats like the source;
    and the model's own code (`*.py`, in the source only when the recipe sets trust_remote_code), so
    the `auto_map` the config and tokenizer config keep still names files that exist."""
    copied = []
    for name in [*SOURCE_FILES, *sorted(p.name for p in Path(source_dir).glob("*.py"))]:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            copied.append(out_dir / name)
    return copied


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def plan_shards(units: list[Unit], max_shard_bytes: int) -> list[list[Unit]]:
    """Greedy, in name order: a shard closes when the next unit would pass the limit.

    A unit larger than the limit gets a shard of its own (units are never split, as
    transformers never splits a tensor).
    """
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for unit in sorted(units, key=lambda u: u.key):
        if current and size + unit.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit.nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(out_dir: Path, units: list[Unit], max_shard_bytes: int) -> list[Path]:
    """`model.safetensors`, or numbered shards plus the index transformers and vLLM read."""
    names = [spec.name for unit in units for spec in unit.specs]
    if len(names) != len(set(names)):
        raise RuntimeError("export plan names a tensor twice")  # a format bug, not user input
    shards = plan_shards(units, max_shard_bytes)
    if len(shards) <= 1:
        path = out_dir / WEIGHTS_NAME
        write_safetensors(path, shards[0] if shards else [])
        return [path]
    written = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, shard)
        written.append(path)
        for unit in shard:
            total += unit.nbytes
            weight_map.update({spec.name: path.name for spec in unit.specs})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    written.append(write_json(out_dir / INDEX_NAME, index))
    return written


def write_safetensors(path: Path, units: list[Unit]) -> None:
    """One safetensors file, header first, then each unit's tensors as it is produced.

    safetensors' own `save_file` needs every tensor in memory at once; the format is simple
    enough to stream: 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte range, then the raw little-endian data. The data is laid out unit by unit (a
    unit's tensors by name); readers locate tensors by their byte ranges, not by header order.
    """
    if sys.byteorder != "little":  # tensors are written (and int4 words packed) in host byte order
        raise RuntimeError("safetensors data is little-endian; forge writes it on little-endian hosts only")
    units = sorted(units, key=lambda u: u.key)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # transformers requires "pt"
    offset = 0
    for unit in units:
        for spec in sorted(unit.specs, key=lambda s: s.name):
            header[spec.name] = {
                "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for unit in units:
            produced = unit.produce()
            for spec in sorted(unit.specs, key=lambda s: s.name):
                tensor = produced.pop(spec.name, None)
                if tensor is None or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise RuntimeError(f"{spec.name}: produced tensor does not match its plan")
                _write_tensor(f, tensor)
                del tensor  # hold no written tensor while the next unit is produced
            if produced:
                raise RuntimeError(f"{unit.key}: produced unplanned tensors {sorted(produced)}")
            del produced
        if f.tell() != 8 + len(encoded) + offset:
            raise RuntimeError(f"{path.name}: written size differs from the planned size")


def _write_tensor(f, tensor: torch.Tensor) -> None:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    f.write(memoryview(data.numpy()))


# ---------------------------------------------------------------- reading


def read_config(directory: Path, fmt: str, quant_method: str) -> dict:
    """config.json of an export, checked to be the format the reader expects."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise InputError(f"{fmt}: {directory} has no config.json")
    config = read_json(path, fmt)
    quantization = config.get("quantization_config") or {}
    found = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if found != quant_method:
        raise InputError(f"{fmt}: {path} has quant_method {found!r}, expected {quant_method!r}")
    return config


def weight_files(directory: Path, fmt: str) -> dict[str, list[str]]:
    """Shard file → tensor names of a safetensors checkpoint (a source or an export), as
    `weight_headers` checks them. The one loader: the quantize stage reads its source and every
    format reader its export here."""
    return {shard: sorted(header) for shard, header in weight_headers(directory, fmt).items()}


def weight_headers(directory: Path, fmt: str) -> dict[str, dict[str, TensorInfo]]:
    """Shard file → its tensors' dtype and shape: the index's shards, else every `*.safetensors`;
    every shard's header checked against its file (`safetensors_header`), no tensor in two shards
    and the index honest, before a tensor is mapped."""
    directory = Path(directory)
    weight_map = index_weight_map(directory, fmt)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise InputError(f"{fmt}: {directory} has no *.safetensors weights (neither {WEIGHTS_NAME} nor {INDEX_NAME})")
    files = {shard: safetensors_header(directory / shard, f"{fmt}: {shard}") for shard in shards}
    seen: set[str] = set()
    for shard, names in files.items():
        if twice := seen.intersection(names):
            raise InputError(f"{fmt}: tensor {min(twice)!r} is in more than one shard ({shard})")
        seen.update(names)
    for name, shard in sorted((weight_map or {}).items()):
        if name not in files[shard]:
            raise InputError(f"{fmt}: tensor {name} is missing from {shard} (the index lists it there)")
    return files


class Checkpoint:
    """A safetensors checkpoint read a few tensors at a time, its headers checked up front.

    The quantizer reads one decoder layer's tensors, quantizes them and lets them go, so memory
    follows a layer, not the model. Each read opens its shard and closes it again: a mapping kept
    open would leave every page it touched counted in the process's resident memory.
    """

    def __init__(self, directory: Path, fmt: str):
        self.directory, self.fmt = Path(directory), fmt
        self.shard_of: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        for shard, header in weight_headers(directory, fmt).items():
            for name in sorted(header):
                self.shard_of[name] = shard
                self.infos[name] = header[name]

    @property
    def names(self) -> list[str]:
        """Tensor names, shard by shard, sorted within a shard (the order `iter_tensors` yields)."""
        return list(self.shard_of)

    def shapes(self) -> dict[str, torch.Tensor]:
        """Every tensor as a data-less (meta) tensor of its shape and dtype."""
        return {
            name: torch.empty(info.shape, dtype=_TORCH_DTYPES.get(info.dtype, torch.uint8), device="meta")
            for name, info in self.infos.items()
        }

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the given order; InputError for a name the checkpoint lacks."""
        if missing := [n for n in names if n not in self.shard_of]:
            raise InputError(f"{self.fmt}: tensor {missing[0]} is missing from {self.directory}")
        out: dict[str, torch.Tensor] = {}
        for name in names:  # a mapping per tensor: the pages it touched leave with it
            with safe_open(self.directory / self.shard_of[name], framework="pt") as f:
                out[name] = f.get_tensor(name)
        return out

    def read_as(self, name: str, dtype: torch.dtype, rows: int = 4096) -> torch.Tensor:
        """One tensor cast to `dtype` a block of rows at a time, so a wide cast (a bfloat16
        embedding to float32) never holds the source and the result whole at once.

        Each block reads through its own mapping of the shard: the pages a mapping touched stay
        resident (and counted) until it closes, so one mapping for the whole tensor would hold
        all of its source bytes beside the result (an 8B embedding: 1 GiB of bfloat16 pages)."""
        if name not in self.shard_of:
            raise InputError(f"{self.fmt}: tensor {name} is missing from {self.directory}")
        path = self.directory / self.shard_of[name]
        with safe_open(path, framework="pt") as f:
            shape = f.get_slice(name).get_shape()
            if len(shape) < 2:
                return f.get_tensor(name).to(dtype)
        out = torch.empty(shape, dtype=dtype)
        for start in range(0, shape[0], rows):
            with safe_open(path, framework="pt") as f:
                out[start : start + rows] = f.get_slice(name)[start : start + rows]
        return out


def iter_tensors(directory: Path, fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export, shard by shard, through safetensors' own reader."""
    for shard, names in weight_files(directory, fmt).items():
        with safe_open(Path(directory) / shard, framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)


class Tensors:
    """An export's tensors by name, consumed as a reader decodes them.

    `take` raises InputError naming the tensor and format when it is absent, so a truncated or
    hand-edited export fails with the key a user can look for.
    """

    def __init__(self, directory: Path, fmt: str):
        self.fmt = fmt
        self.directory = Path(directory)
        self._tensors = dict(iter_tensors(directory, fmt))

    def take(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise InputError(f"{self.fmt}: tensor {name} is missing from {self.directory}")
        return self._tensors.pop(name)

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self._tensors.pop(name, None)

    def names_ending(self, suffix: str) -> list[str]:
        return sorted(name for name in self._tensors if name.endswith(suffix))

    def rest(self) -> dict[str, torch.Tensor]:
        rest, self._tensors = self._tensors, {}
        return rest
