"""Checks on files forge did not write, made before anything is read from them or allocated.

A recipe and the files it names (a checkpoint directory, a GGUF file, a dataset, calibration
texts, an lm-eval task directory) may come from a repository nobody on the build machine
reviewed, so every such file is treated as hostile:

- a symlink must resolve inside the directory it belongs to: `merges.txt -> ~/.docker/config.json`
  in a checkpoint would otherwise be copied, target bytes and all, into the cache, the exports
  and the pushed image; anything forge reads must be a regular file (a FIFO blocks forever,
  `/dev/zero` never ends);
- JSON is bounded in size, must be UTF-8, and must be the kind of document expected;
- a safetensors header is checked against the file it heads before any tensor is mapped;
- a GGUF header is walked with every count and length checked against the bytes left in the file
  (gguf-py's reader loops over whatever count the file claims).

Every refusal is an `InputError` whose one-line message starts with the recipe key or file name.
Nothing here imports torch: these checks run at plan time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.errors import InputError

MAX_JSON_BYTES = 64 << 20  # config.json is a few kB; tokenizer_config.json (with chat templates) well under 1 MB
_CHUNK = 1 << 20


# ---------------------------------------------------------------- paths


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def resolve_inside(path: Path, root: Path, label: str) -> Path:
    """`path` with every symlink resolved; InputError when that leaves `root` (or loops)."""
    try:
        target = path.resolve(strict=False)
        base = root.resolve(strict=False)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise InputError(f"{label}: {path} is a symlink loop") from None
    if not target.is_relative_to(base):
        raise InputError(
            f"{label}: {path} is a symlink to {target}, outside {base}; copy the file in instead of linking it"
        )
    return target


def check_regular(path: Path, label: str) -> None:
    """InputError unless `path` (symlinks followed) exists and is a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{label}: {path} does not exist") from None
    except OSError as error:
        raise InputError(f"{label}: cannot read {path} ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{label}: {path} is {_kind(mode)}, not a regular file")


def recipe_path(recipe_dir: Path, name: str, label: str, *, kind: str = "file") -> Path:
    """The file (or directory) a recipe names, resolved, after the symlink rule.

    A path inside the recipe's folder must stay inside it once symlinks are resolved; a path
    outside it (absolute, or `../…`) is taken as written, but a symlink in its last component must
    stay in the folder that holds it. So `data/eval.txt -> /etc/passwd` is refused while a recipe
    may still name `/data/eval.txt` itself: what it reads is then in the recipe for review to see.
    `kind`: "file" (a regular file), "directory", or "any" (the caller checks).
    """
    lexical = Path(os.path.normpath(recipe_dir / name))
    root = recipe_dir if lexical.is_relative_to(recipe_dir) else lexical.parent
    target = resolve_inside(lexical, root, label)
    if kind == "file":
        check_regular(target, label)
    elif kind == "directory" and not target.is_dir():
        raise InputError(f"{label}: {target} is not a directory")
    return target


def check_entries(directory: Path, root: Path, label: str, used: Callable[[str], bool]) -> None:
    """Every symlink in `directory` stays inside `root`; every entry forge `used`s is a regular file."""
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            resolve_inside(entry, root, f"{label}: {entry.name}")
        if used(entry.name):
            check_regular(entry, f"{label}: {entry.name}")


def check_tree(directory: Path, label: str) -> None:
    """A directory read recursively by another tool: no symlink leaves it, no FIFO or device in it."""
    for parent, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            path = Path(parent) / name
            if path.is_symlink():
                resolve_inside(path, directory, label)
            if name in files:
                check_regular(path, label)


def check_utf8(path: Path, label: str) -> None:
    """InputError near the first byte that is not UTF-8; read a chunk at a time, nothing kept."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise InputError(f"{label}: {path} is not UTF-8 text (near byte {offset + error.start})") from None
            if not chunk:
                return
            offset += len(chunk)


# ---------------------------------------------------------------- JSON


def read_json(path: Path, label: str, kind: type = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON document of `kind` from a file that may lie about being one."""
    check_regular(path, label)
    if path.stat().st_size > max_bytes:
        raise InputError(f"{label}: {path.name} is {path.stat().st_size} bytes, more than {max_bytes} for JSON")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InputError(f"{label}: {path.name} is not UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise InputError(
            f"{label}: {path.name} is not JSON (line {error.lineno} column {error.colno}: {error.msg})"
        ) from None
    except (ValueError, RecursionError) as error:  # an integer beyond Python's digit limit, deep nesting
        raise InputError(f"{label}: {path.name} is not usable JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, kind):
        raise InputError(f"{label}: {path.name} holds a JSON {type(data).__name__}, expected an object")
    return data


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------- safetensors

# https://github.com/huggingface/safetensors#format; the dtypes `safetensors.torch` loads, in bytes.
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "C64": 8,
                           "U64": 8, "U32": 4, "U16": 2}  # fmt: skip
# safetensors refuses larger headers too (`N_MAX` in safetensors/src/tensor.rs).
MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def safetensors_header(path: Path, label: str | None = None) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking the header against the file.

    The same rules as safetensors' own `Metadata::validate`: an 8-byte little-endian header
    length within the file, a JSON object, every tensor with a known dtype, a shape of
    non-negative integers and `data_offsets` whose span is exactly shape × dtype size, and the
    spans tiling the data section with no gap or overlap up to the end of the file.
    """
    label = label or path.name
    check_regular(path, label)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{label}: {size} bytes, too short for a safetensors header")
        length = struct.unpack("<Q", head)[0]
        if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise InputError(f"{label}: header length {length} does not fit the file ({size} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{label}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{label}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise InputError(f"{label}: __metadata__ must map strings to strings")
            continue
        where = f"{label}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
            raise InputError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):  # fmt: skip
            raise InputError(f"{where} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):  # fmt: skip
            raise InputError(f"{where} has data_offsets {offsets!r} outside the {data_bytes} data bytes")
        if math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise InputError(f"{where}: shape {shape} of {dtype} does not fill data_offsets {offsets}")
        tensors[name] = TensorInfo(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise InputError(f"{label}: tensor {name!r} starts at {begin}, not where the previous one ends ({end})")
        end = stop
    if end != data_bytes:
        raise InputError(f"{label}: the tensors cover {end} bytes but the file holds {data_bytes} after the header")
    return tensors


def index_weight_map(directory: Path, label: str) -> dict[str, str] | None:
    """`model.safetensors.index.json`'s tensor → shard map (None without an index), each shard a
    plain `.safetensors` file name beside the index, never a path (`../../etc/passwd`)."""
    index = directory / "model.safetensors.index.json"
    if not index.exists() and not index.is_symlink():
        return None
    weight_map = read_json(index, f"{label}: {index.name}").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{label}: {index.name}: weight_map must map tensor names to file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise InputError(f"{label}: {index.name} names {shard!r}, not a .safetensors file beside it")
    return weight_map


def checkpoint_tensors(directory: Path, label: str) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors checkpoint (the index's shards, else every `*.safetensors`)."""
    weight_map = index_weight_map(directory, label)
    if weight_map is None:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    else:
        shards = sorted(set(weight_map.values()))
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        found = safetensors_header(directory / shard, f"{label}: {shard}")
        for name in found:
            if name in tensors:
                raise InputError(f"{label}: tensor {name!r} is in more than one shard ({shard})")
        tensors.update(found)
    for name, shard in (weight_map or {}).items():
        if name not in tensors:
            raise InputError(f"{label}: tensor {name} is missing from {shard} (the index lists it there)")
    return tensors


# ---------------------------------------------------------------- GGUF

# https://github.com/ggml-org/ggml/blob/master/docs/gguf.md: value types and their sizes in bytes.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGML_MAX_DIMS = 4  # ggml.h


@dataclass
class GGUFHeader:
    """Metadata as key → (value type, value), arrays as their length, and tensor shapes.

    Shapes are in ggml order, innermost first: `token_embd.weight` is `[n_embd, n_vocab]`.
    """

    fields: dict[str, tuple[int, Any]]
    tensors: dict[str, tuple[int, ...]]


class _Cursor:
    def __init__(self, data: mmap.mmap, label: str):
        self.data, self.offset, self.label = data, 0, label

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise InputError(f"{self.label}: truncated GGUF header at byte {self.offset}")
        value = struct.unpack_from(fmt, self.data, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if length > len(self.data) - self.offset:
            raise InputError(f"{self.label}: string of {length} bytes at byte {self.offset} runs past the end")
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.label}: string at byte {self.offset - length} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY and depth < 2:
            item, count = self.take("<I"), self.take("<Q")
            smallest = struct.calcsize(_GGUF_SCALARS[item]) if item in _GGUF_SCALARS else 8 if item == 8 else 12
            if count * smallest > len(self.data) - self.offset:
                raise InputError(f"{self.label}: array of {count} items at byte {self.offset} runs past the end")
            if item in _GGUF_SCALARS:  # skipped in one step: forge reads no array's items, only its length
                self.offset += count * smallest
                return count
            for _ in range(count):
                self.value(item, depth + 1)
            return count
        raise InputError(f"{self.label}: unknown GGUF value type {kind} at byte {self.offset}")


def gguf_header(path: Path, label: str) -> GGUFHeader:
    """Walk a GGUF file's header with every length checked against the bytes left, so a lying
    count or length is an InputError here instead of a loop, an allocation or a crash later."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    check_regular(path, label)
    if path.stat().st_size < 24:
        raise InputError(f"{label}: {path.name} is too short to be a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data, label)
        if cursor.take("<4s") != b"GGUF":
            raise InputError(f"{label}: {path.name} is not a GGUF file (no GGUF magic)")
        version = cursor.take("<I")
        if version not in (2, 3):
            raise InputError(f"{label}: GGUF version {version} is not supported (2 or 3, little-endian)")
        tensor_count, kv_count = cursor.take("<Q"), cursor.take("<Q")
        left = len(data) - cursor.offset
        if kv_count * 13 > left or tensor_count * 28 > left:  # the smallest possible entries
            raise InputError(f"{label}: {kv_count} keys and {tensor_count} tensors cannot fit in {len(data)} bytes")
        fields: dict[str, tuple[int, Any]] = {}
        for _ in range(kv_count):
            key = cursor.string()
            if key in fields:
                raise InputError(f"{label}: key {key!r} appears twice")
            kind = cursor.take("<I")
            fields[key] = (kind, cursor.value(kind))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.take("<I")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise InputError(f"{label}: tensor {name!r} has {n_dims} dimensions (1 to {GGML_MAX_DIMS})")
            dims = tuple(cursor.take("<Q") for _ in range(n_dims))
            kind, offset = cursor.take("<I"), cursor.take("<Q")
            infos.append((name, dims, kind, offset))
        kind, alignment = fields.get("general.alignment", (4, 32))
        if kind != 4 or not positive_int(alignment) or alignment & (alignment - 1):  # a uint32 power of two
            raise InputError(f"{label}: general.alignment {alignment!r} is not a power of two")
        start = -(-cursor.offset // alignment) * alignment
        tensors: dict[str, tuple[int, ...]] = {}
        for name, dims, kind, offset in infos:
            if name in tensors:
                raise InputError(f"{label}: tensor {name!r} appears twice")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise InputError(f"{label}: tensor {name!r} has unknown ggml type {kind}") from None
            count = math.prod(dims)
            if dims[0] % block or start + offset + count // block * type_size > len(data):
                raise InputError(f"{label}: tensor {name!r} of shape {list(dims)} does not fit in the file")
            tensors[name] = dims
    return GGUFHeader(fields, tensors)
