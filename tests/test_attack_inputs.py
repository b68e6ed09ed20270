"""Hostile input files: checkpoints, datasets, calibration texts and task directories that lie.

Each test damages a copy of a tiny real checkpoint (or writes a tiny real GGUF file) the way an
attacker or a broken download would, runs the CLI, and asserts the contract of README "Exit
codes": exit 2, one message naming the recipe key or the file, no traceback, and nothing written
under the artifacts directory. Refusals happen at plan time, before any file is copied or any
tensor allocated: symlinks that leave the checkpoint (`merges.txt -> ~/.docker/config.json`),
FIFOs and directories where files belong, config.json sizes that do not match the weights,
safetensors and GGUF headers whose lengths, counts or offsets lie, non-UTF-8 text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.errors import InputError
from forge.untrusted import safetensors_header
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.strategies import JSONISH

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers


def copy_model(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def refused(tmp_path: Path, recipe: dict, mentions: list[str], command: str = "plan") -> str:
    """`forge <command>` exits 2 naming every string in `mentions`, without a traceback or any output file."""
    path = write_recipe(tmp_path / "recipe-dir", recipe)
    artifacts = tmp_path / "artifacts"
    code, output = run_cli(command, str(path), "--artifacts-dir", str(artifacts))
    assert "Traceback" not in output and "internal error" not in output, output
    assert code == 2, f"exit {code}, wanted 2:\n{output}"
    for text in mentions:
        assert text in output, f"message does not name {text!r}:\n{output}"
    assert len(output.strip().splitlines()) == 1, output
    assert files_under(artifacts) == []
    return output


def plans(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "recipe-dir", recipe)
    code, output = run_cli("plan", str(path), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == 0, output


def host_secret(tmp_path: Path) -> Path:
    """A file outside everything the recipe names, standing in for ~/.docker/config.json."""
    secret = tmp_path / "home" / ".docker" / "config.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"auths": {"registry.example": {"auth": "c2VjcmV0"}}}')
    return secret


def write_header(path: Path, header: dict | list | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def read_header(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


# ---------------------------------------------------------------- 3. no host files through symlinks


@pytest.mark.parametrize("name", ["merges.txt", "tokenizer_config.json", "model.safetensors", "config.json"])
@pytest.mark.parametrize("command", ["plan", "build"])
def test_checkpoint_symlink_out_of_the_checkpoint_is_refused(
    name: str, command: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path)
    secret = host_secret(tmp_path)
    if name in ("model.safetensors", "config.json"):  # valid content outside: the link itself is the fault
        secret = tmp_path / "elsewhere" / name
        secret.parent.mkdir()
        shutil.copy(model / name, secret)
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(secret)
    output = refused(tmp_path, tiny_recipe(model, eval_text), ["source.path", name], command)
    assert str(secret) in output


def test_symlinks_that_stay_inside_the_checkpoint_are_fine(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    (model / "weights").mkdir()
    (model / "model.safetensors").rename(model / "weights" / "model.safetensors")
    (model / "model.safetensors").symlink_to("weights/model.safetensors")
    plans(tmp_path, tiny_recipe(model, eval_text))


def test_hub_cache_snapshot_links_into_its_own_blobs(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links every file to `../../blobs/<hash>`: inside the model's
    own cache folder, so it is a checkpoint like any other."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(tiny_model.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    plans(tmp_path / "first", tiny_recipe(snapshot, eval_text))
    (snapshot / "merges.txt").symlink_to(host_secret(tmp_path))  # but not beyond the cache folder
    refused(tmp_path, tiny_recipe(snapshot, eval_text), ["source.path", "merges.txt"])


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("name", ["merges.txt", "model.safetensors"])
def test_non_regular_checkpoint_files_are_refused(
    kind: str, name: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path)
    target = model / name
    if name == "model.safetensors":  # the weights move to a shard so the checkpoint still has some
        target.rename(model / "model-00001-of-00001.safetensors")
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    description = {"fifo": "a FIFO", "directory": "a directory"}[kind]
    refused(tmp_path, tiny_recipe(model, eval_text), ["source.path", name, description])


def test_dataset_symlink_out_of_the_recipe_folder_is_refused(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    data = tmp_path / "recipe-dir" / "data"
    data.mkdir(parents=True)
    (data / "eval.txt").symlink_to(host_secret(tmp_path))
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["validation"]["accuracy"]["dataset"] = "data/eval.txt"
    refused(tmp_path, recipe, ["validation.accuracy.dataset", ".docker/config.json"])


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_dataset_that_never_ends_is_refused(kind: str, tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, eval_text)
    if kind == "fifo":
        fifo = tmp_path / "eval.fifo"
        os.mkfifo(fifo)
        recipe["validation"]["accuracy"]["dataset"] = str(fifo)
        refused(tmp_path, recipe, ["validation.accuracy.dataset", "a FIFO"])
    else:
        recipe["validation"]["accuracy"]["dataset"] = "/dev/zero"
        refused(tmp_path, recipe, ["validation.accuracy.dataset", "a character device"])


def test_calibration_symlink_out_of_the_recipe_folder_is_refused(
    tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    (tmp_path / "recipe-dir").mkdir()
    (tmp_path / "recipe-dir" / "cal.txt").symlink_to(host_secret(tmp_path))
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["variants"][1] = {"name": "awq", "scheme": "AWQ_W4A16", "group_size": 64,
                             "calibration": {"sources": ["pydoc_topics", "cal.txt"]}}  # fmt: skip
    refused(tmp_path, recipe, ["variants[1].calibration.sources[1]", ".docker/config.json"])


@pytest.mark.parametrize("where", ["file-in-dir", "dir-itself"])
def test_task_include_path_symlinks_out_are_refused(
    where: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval")
    recipe_dir = tmp_path / "recipe-dir"
    outside = tmp_path / "outside-tasks"
    outside.mkdir()
    (outside / "t.yaml").write_text("task: t\n")
    if where == "dir-itself":
        recipe_dir.mkdir()
        (recipe_dir / "tasks").symlink_to(outside)
    else:
        (recipe_dir / "tasks").mkdir(parents=True)
        (recipe_dir / "tasks" / "t.yaml").symlink_to(host_secret(tmp_path))
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["validation"]["accuracy"].update(tasks=["t"], task_include_path="tasks")
    refused(tmp_path, recipe, ["validation.accuracy.task_include_path"])


LINKABLE = ["merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "config.json",
            "generation_config.json", "notes.md"]  # fmt: skip


@FUZZ
@given(links=st.dictionaries(st.sampled_from(LINKABLE), st.sampled_from(["inside", "outside", "chain", "loop"]),
                             min_size=1, max_size=4))  # fmt: skip
def test_any_symlink_tree_is_refused_iff_a_link_leaves(
    links: dict[str, str], tiny_model: Path, eval_text: Path, tmp_path_factory
) -> None:
    """Files of a checkpoint replaced by symlinks: to a copy inside the checkpoint, to the host, via
    another link inside that leads out, or in a loop. The plan refuses, naming a link, exactly when
    one of them does not resolve inside the checkpoint."""
    tmp = tmp_path_factory.mktemp("links")
    model = copy_model(tiny_model, tmp)
    secret = host_secret(tmp)
    (model / "inside").mkdir()
    for name, how in links.items():
        if (model / name).exists():
            (model / name).rename(model / "inside" / name)
        else:
            (model / "inside" / name).write_text("{}")
        target = {"inside": f"inside/{name}", "outside": str(secret), "chain": f"inside/{name}.out",
                  "loop": f"{name}.loop"}[how]  # fmt: skip
        (model / name).symlink_to(target)
        if how == "chain":
            (model / "inside" / f"{name}.out").symlink_to(secret)
        if how == "loop":
            (model / f"{name}.loop").symlink_to(name)
    path = write_recipe(tmp / "recipe-dir", tiny_recipe(model, eval_text))
    code, output = run_cli("plan", str(path), "--artifacts-dir", str(tmp / "artifacts"))
    assert "Traceback" not in output, output
    if all(how == "inside" for how in links.values()):
        assert code == 0, output
    else:
        assert code == 2, output
        assert output.startswith("forge: source.path: ") and any(name in output for name in links), output
        assert files_under(tmp / "artifacts") == []


# ---------------------------------------------------------------- 4. config.json that lies


def edit_config(model: Path, edit) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))


CONFIG_LIES = {
    "missing-hidden": (lambda c: c.pop("hidden_size"), "hidden_size is missing"),
    "zero-hidden": (lambda c: c.update(hidden_size=0), "hidden_size must be a positive integer"),
    "negative-layers": (lambda c: c.update(num_hidden_layers=-2), "num_hidden_layers must be a positive integer"),
    "string-vocab": (lambda c: c.update(vocab_size="512"), "vocab_size must be a positive integer"),
    "bool-heads": (lambda c: c.update(num_attention_heads=True), "num_attention_heads must be a positive integer"),
    "float-inter": (lambda c: c.update(intermediate_size=256.0), "intermediate_size must be a positive integer"),
    "kv-not-dividing": (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    # 2**20 × vocab 512 × fp32 = 2 GiB of embeddings alone, 137 GB with the layers: refused from the headers
    "huge-hidden": (lambda c: c.update(hidden_size=2**20, head_dim=64), "model.embed_tokens.weight has shape"),
    "more-layers": (lambda c: c.update(num_hidden_layers=200), "model.layers.2.self_attn.q_proj.weight is missing"),
    "fewer-layers": (lambda c: c.update(num_hidden_layers=1), "beyond config.json's num_hidden_layers 1"),
    "untied-head": (lambda c: c.update(tie_word_embeddings=False), "lm_head.weight is missing"),
    "arch-as-string": (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures must be a list"),
}


@pytest.mark.parametrize("lie", sorted(CONFIG_LIES))
def test_config_json_that_lies_is_refused_before_any_allocation(
    lie: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    edit, message = CONFIG_LIES[lie]
    model = copy_model(tiny_model, tmp_path)
    edit_config(model, edit)
    refused(tmp_path, tiny_recipe(model, eval_text), ["config.json", message], "build")


CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "architectures", "model_type", "tie_word_embeddings", "auto_map"]  # fmt: skip


@FUZZ
@given(key=st.sampled_from(CONFIG_KEYS), value=JSONISH | st.integers(-(2**70), 2**70))
def test_any_config_value_plans_or_is_refused(
    key: str, value: object, tiny_model: Path, eval_text: Path, tmp_path_factory
) -> None:
    """One config.json value replaced by anything JSON holds: the plan succeeds only when the
    config still describes the weights (the original value), else exits 2 naming `source`."""
    tmp = tmp_path_factory.mktemp("config")
    model = copy_model(tiny_model, tmp)
    original = json.loads((model / "config.json").read_text())
    edit_config(model, lambda c: c.update({key: value}))
    path = write_recipe(tmp / "recipe-dir", tiny_recipe(model, eval_text))
    code, output = run_cli("plan", str(path), "--artifacts-dir", str(tmp / "artifacts"))
    assert "Traceback" not in output and code in (0, 2), output
    if code == 2:
        assert output.startswith("forge: source"), output
        assert files_under(tmp / "artifacts") == []
    elif key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert value == original[key], f"{key}={value!r} planned against weights of {original[key]}"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{not json", "is not JSON"), (b"[1, 2]", "holds a JSON list"), (b'{"a": "\xff\xfe"}', "is not UTF-8"),
     (b"", "is not JSON"), (b"1" * 5000, "not usable JSON"), (b"[" * 100_000, "not usable JSON")],
    ids=["bad-json", "list", "latin-1", "empty", "huge-int", "deep"],
)  # fmt: skip
def test_config_json_that_is_not_a_json_object_is_refused(
    content: bytes, message: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path)
    (model / "config.json").write_bytes(content)
    refused(tmp_path, tiny_recipe(model, eval_text), ["source.path: config.json", message])


# ---------------------------------------------------------------- 4. safetensors headers that lie


def damage_weights(model: Path, how: str) -> None:
    path = model / "model.safetensors"
    header, data = read_header(path)
    first = sorted(k for k in header if k != "__metadata__")[0]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "length-past-end":
        path.write_bytes(struct.pack("<Q", path.stat().st_size) + path.read_bytes()[8:])
    elif how == "length-huge":
        path.write_bytes(struct.pack("<Q", 2**63) + path.read_bytes()[8:])
    elif how == "tiny-file":
        path.write_bytes(b"\x01\x00")
    elif how == "header-not-json":
        write_header(path, b"{'a': 1}", data)
    elif how == "header-list":
        write_header(path, [1, 2], data)
    elif how == "unknown-dtype":
        header[first]["dtype"] = "F128"
        write_header(path, header, data)
    elif how == "offsets-past-end":
        header[first]["data_offsets"] = [0, len(data) * 2]
        write_header(path, header, data)
    elif how == "shape-lies":
        header[first]["shape"] = [d * 1000 for d in header[first]["shape"]]
        write_header(path, header, data)
    elif how == "overlap":
        entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
        (a0, _), name = entries[1]
        header[name]["data_offsets"] = [a0 - 4, header[name]["data_offsets"][1] - 4]
        write_header(path, header, data)
    elif how == "trailing-bytes":
        write_header(path, header, data + b"\0" * 64)
    else:
        raise AssertionError(how)


SAFETENSORS_LIES = ["truncated", "length-past-end", "length-huge", "tiny-file", "header-not-json", "header-list",
                    "unknown-dtype", "offsets-past-end", "shape-lies", "overlap", "trailing-bytes"]  # fmt: skip


@pytest.mark.parametrize("how", SAFETENSORS_LIES)
def test_safetensors_header_that_lies_is_refused(how: str, tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path)
    damage_weights(model, how)
    refused(tmp_path, tiny_recipe(model, eval_text), ["source.path", "model.safetensors"], "build")


@pytest.mark.parametrize("shard", ["../../home/.docker/config.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_naming_a_path_instead_of_a_shard_is_refused(
    shard: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path)
    header, _ = read_header(model / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: shard for k in header if k != "__metadata__"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(tmp_path, tiny_recipe(model, eval_text), ["source.path", "model.safetensors.index.json"])


def _mutations() -> st.SearchStrategy:
    """One edit to a real header: a field of one tensor replaced by a random JSON value, a tensor
    dropped or duplicated under another name, or the data section cut or extended."""
    value = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
                         lambda kids: st.lists(kids, max_size=4), max_leaves=6)  # fmt: skip
    return st.one_of(
        st.tuples(st.just("field"), st.integers(0, 50), st.sampled_from(["dtype", "shape", "data_offsets"]), value),
        st.tuples(st.just("drop"), st.integers(0, 50)),
        st.tuples(st.just("copy"), st.integers(0, 50)),
        st.tuples(st.just("resize"), st.integers(-5000, 5000)),
        st.tuples(st.just("offset"), st.integers(0, 50), st.integers(0, 1), st.integers(-(2**64), 2**64)),
    )


@FUZZ
@given(mutation=_mutations())
def test_any_header_the_check_accepts_safetensors_loads(mutation: tuple, tiny_model: Path, tmp_path: Path) -> None:
    """The check is at least as strict as safetensors itself: whatever one edit does to a real
    header, `safetensors_header` either refuses with InputError or every tensor then loads with the
    dtype and shape it reported (so no reader can crash or over-read on a header forge accepted)."""
    from safetensors import safe_open

    header, data = read_header(tiny_model / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    kind, index = mutation[0], mutation[1] % len(names)
    if kind == "field":
        header[names[index]][mutation[2]] = mutation[3]
    elif kind == "drop":
        del header[names[index]]
    elif kind == "copy":
        header["copy." + names[index]] = dict(header[names[index]])
    elif kind == "resize":
        data = data[: len(data) + mutation[1]] if mutation[1] < 0 else data + b"\0" * mutation[1]
    else:
        header[names[index]]["data_offsets"][mutation[2]] = mutation[3]
    path = tmp_path / f"m{abs(hash(repr(mutation)))}.safetensors"
    write_header(path, header, data)
    try:
        found = safetensors_header(path)
    except InputError as error:
        assert str(error).startswith(path.name), error
        return
    with safe_open(path, framework="pt") as f:
        for name, info in found.items():
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == info.shape
            assert tensor.numel() == math.prod(info.shape)


# ---------------------------------------------------------------- 4. GGUF headers that lie


def write_gguf(path: Path, *, drop: str | None = None, **override: int) -> Path:
    """A tiny real llama GGUF: 1 block, hidden 64, 4 heads (2 KV) of 16, ffn 128, 40 tokens."""
    import numpy as np
    from gguf import GGUFWriter

    hidden, ff, heads, kv, vocab = 64, 128, 4, 2, 40
    writer = GGUFWriter(str(path), "llama")
    keys = {"embedding_length": hidden, "feed_forward_length": ff, "block_count": 1, "head_count": heads,
            "head_count_kv": kv, **override}  # fmt: skip
    adders = {"embedding_length": writer.add_embedding_length, "feed_forward_length": writer.add_feed_forward_length,
              "block_count": writer.add_block_count, "head_count": writer.add_head_count,
              "head_count_kv": writer.add_head_count_kv}  # fmt: skip
    for key, value in keys.items():
        if key != drop:
            adders[key](value)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    if drop != "tokens":
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv * 16, hidden),
              "blk.0.attn_v.weight": (kv * 16, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_recipe(path: Path, eval_text: Path) -> dict:
    recipe = tiny_recipe(path, eval_text)
    recipe["source"] = {"gguf": {"file": str(path)}}
    return recipe


def test_tiny_gguf_plans(eval_text: Path, tmp_path: Path) -> None:
    plans(tmp_path, gguf_recipe(write_gguf(tmp_path / "m.gguf"), eval_text))


def patch_bytes(path: Path, offset: int, value: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset : offset + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("lie", "message"),
    [("tensor-count", "cannot fit"), ("kv-count", "cannot fit"), ("key-length", "runs past the end"),
     ("token-count", "runs past the end"), ("truncated", "runs past the end"), ("magic", "no GGUF magic"),
     ("no-embedding-length", "llama.embedding_length is missing"), ("no-tokens", "tokenizer.ggml.tokens is missing"),
     ("zero-ffn", "llama.feed_forward_length is missing or not a positive"),
     ("huge-embedding", "model.embed_tokens.weight has shape"), ("more-blocks", "model.layers.1."),
     ("heads-lie", "has shape")],
)  # fmt: skip
def test_gguf_header_that_lies_is_refused(lie: str, message: str, eval_text: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    if lie == "no-embedding-length":
        write_gguf(path, drop="embedding_length")
    elif lie == "no-tokens":
        write_gguf(path, drop="tokens")
    elif lie == "zero-ffn":
        write_gguf(path, feed_forward_length=0)
    elif lie == "huge-embedding":
        write_gguf(path, embedding_length=2**20)
    elif lie == "more-blocks":
        write_gguf(path, block_count=1000)
    elif lie == "heads-lie":
        write_gguf(path, head_count=2, head_count_kv=2)
    else:
        write_gguf(path)
        blob = path.read_bytes()
        if lie == "tensor-count":
            patch_bytes(path, 8, 2**60)
        elif lie == "kv-count":
            patch_bytes(path, 16, 2**60)
        elif lie == "key-length":
            patch_bytes(path, 24, 2**62)
        elif lie == "token-count":  # key, value type ARRAY (u32), item type STRING (u32), then the count
            patch_bytes(path, blob.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8, 2**40)
        elif lie == "truncated":
            path.write_bytes(blob[: blob.index(b"tokenizer.ggml.tokens") + 100])  # cut inside the token list
        elif lie == "magic":
            path.write_bytes(b"GGUX" + blob[4:])
    refused(tmp_path, gguf_recipe(path, eval_text), ["source.gguf.file", message])


@FUZZ
@given(offset=st.integers(0, 700), value=st.binary(min_size=1, max_size=8))
def test_any_damaged_gguf_header_plans_or_is_refused(
    offset: int, value: bytes, eval_text: Path, tmp_path: Path
) -> None:
    """Random bytes written over the header of a valid GGUF: the plan succeeds or exits 2 naming
    the GGUF file, quickly, never with a traceback (gguf-py's reader loops over any count it reads)."""
    path = tmp_path / f"g{offset}-{value.hex()}.gguf"
    if not (tmp_path / "clean.gguf").exists():
        write_gguf(tmp_path / "clean.gguf")
    blob = bytearray((tmp_path / "clean.gguf").read_bytes())
    blob[offset : offset + len(value)] = value
    path.write_bytes(bytes(blob))
    recipe = write_recipe(tmp_path / f"r-{path.stem}", gguf_recipe(path, eval_text))
    code, output = run_cli("plan", str(recipe), "--artifacts-dir", str(tmp_path / f"a-{path.stem}"))
    assert "Traceback" not in output, output
    assert code in (0, 2), output
    if code == 2:
        assert output.startswith("forge: source") or "source.gguf.file" in output, output


# ---------------------------------------------------------------- 4. text that is not UTF-8


def test_dataset_that_is_not_utf8_is_refused(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    bad = tmp_path / "eval.txt"
    bad.write_bytes(eval_text.read_bytes()[:5000] + b"\xff\xfe latin-1: caf\xe9\n")
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["validation"]["accuracy"]["dataset"] = str(bad)
    refused(tmp_path, recipe, ["validation.accuracy.dataset", "not UTF-8", "byte 5000"], "build")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calibration_text_that_is_not_utf8_is_refused(
    suffix: str, tiny_model: Path, eval_text: Path, tmp_path: Path
) -> None:
    (tmp_path / "recipe-dir").mkdir()
    (tmp_path / "recipe-dir" / f"cal{suffix}").write_bytes(b'{"text": "caf\xe9"}\n')
    recipe = tiny_recipe(tiny_model, eval_text)
    recipe["variants"] = [{"name": "awq", "scheme": "AWQ_W4A16", "group_size": 64,
                           "calibration": {"sources": [f"cal{suffix}"]}}]  # fmt: skip
    refused(tmp_path, recipe, ["variants[0].calibration.sources[0]", "not UTF-8"], "build")


def test_readers_refuse_non_utf8_text_called_directly(tiny_model: Path, tmp_path: Path) -> None:
    """`load_windows` and `read_documents` are also used outside a plan (bench, tests): InputError."""
    from forge.eval.perplexity import load_windows
    from forge.quant.calibration import read_documents

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    with pytest.raises(InputError, match="bad.txt: not UTF-8"):
        load_windows(bad, tiny_model, 16, 1)
    with pytest.raises(InputError, match="calibration.sources: .*bad.txt is not UTF-8"):
        read_documents(bad)


# ---------------------------------------------------------------- 16. remote tokenizer code


def with_remote_tokenizer(tiny_model: Path, tmp_path: Path) -> Path:
    model = copy_model(tiny_model, tmp_path)
    (model / "custom_tok.py").write_text("raise SystemExit('forge must never import this')\n")
    (model / "helper.py").write_text("X = 1\n")
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["custom_tok.CustomTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    return model


def test_tokenizer_auto_map_needs_trust_remote_code(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    model = with_remote_tokenizer(tiny_model, tmp_path)
    refused(tmp_path, tiny_recipe(model, eval_text), ["source.trust_remote_code", "tokenizer_config.json"])


def test_trusted_remote_code_reaches_the_export(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    """With trust_remote_code the export keeps `auto_map` and the model's `.py` files, so the flag
    the serving command passes can work; forge itself still never imports them."""
    from forge.build import build

    model = with_remote_tokenizer(tiny_model, tmp_path)
    edit_config(model, lambda c: c.update(auto_map={"AutoConfig": "helper.Config"}))
    recipe = tiny_recipe(model, eval_text, source={"path": str(model), "trust_remote_code": True})
    recipe["variants"] = [{"name": "int4", "scheme": "W4A16_ASYM", "group_size": 64}]
    recipe["targets"] = [{"backend": "vllm", "gpus": ["H100"]}]
    artifacts = tmp_path / "artifacts"
    build(write_recipe(tmp_path / "recipe-dir", recipe), artifacts_dir=artifacts, only=("export",))
    exports = [p.parent for p in artifacts.rglob("forge.json")]
    assert exports, files_under(artifacts)
    for export in exports:
        assert (export / "custom_tok.py").read_text() == (model / "custom_tok.py").read_text()
        assert (export / "helper.py").is_file()
        assert json.loads((export / "config.json").read_text())["auto_map"] == {"AutoConfig": "helper.Config"}
        assert "auto_map" in json.loads((export / "tokenizer_config.json").read_text())


def test_untrusted_build_copies_no_python(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    """Without an auto_map the flag is off and stray `.py` files in the checkpoint are left behind."""
    from forge.build import build

    model = copy_model(tiny_model, tmp_path)
    (model / "stray.py").write_text("X = 1\n")
    recipe = tiny_recipe(model, eval_text)
    recipe["variants"] = [{"name": "int4", "scheme": "W4A16_ASYM", "group_size": 64}]
    recipe["targets"] = [{"backend": "vllm", "gpus": ["H100"]}]
    artifacts = tmp_path / "artifacts"
    build(write_recipe(tmp_path / "recipe-dir", recipe), artifacts_dir=artifacts, only=("export",))
    assert not list(artifacts.rglob("*.py"))


def test_escape_sequences_in_a_message_never_reach_the_terminal_raw(tmp_path):
    """A recipe path (or a registry's error body) carrying terminal escapes is shown escaped."""
    hostile = tmp_path / "\x1b]0;pwned\x07\x1b[2J.yaml"
    code, output = run_cli("validate", str(hostile))
    assert code == 2, output
    assert "\x1b" not in output and "\x07" not in output
    assert "\\x1b]0;pwned\\x07\\x1b[2J.yaml" in output
