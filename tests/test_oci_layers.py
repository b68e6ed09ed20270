"""Reproducible layers, the OCI layout and image assembly, checked without a registry; umoci and
skopeo read what forge writes where they are installed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from forge.errors import InputError
from forge.oci import layout
from forge.oci.image import ImageConfig, build_image, read_image
from forge.oci.layers import (
    USTAR_MAX_SIZE,
    sanitize_member,
    tarinfo_for,
    write_file_layer,
    write_tree_layer,
)
from tests.registry_server import make_base_layout, require


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    (model / "sub" / "tokenizer.json").write_text('{"vocab": {}}')
    return model


@pytest.fixture
def launch_dir(tmp_path: Path) -> Path:
    launch = tmp_path / "launch"
    launch.mkdir()
    (launch / "serve.sh").write_text("#!/bin/sh\nexec vllm serve /models/model\n")
    (launch / "serve.sh").chmod(0o700)
    (launch / "README").write_text("launch files\n")
    return launch


# ---------------------------------------------------------------- layers


def test_layer_is_byte_identical_whatever_the_file_metadata(tmp_path: Path, model_dir: Path) -> None:
    source = model_dir / "model.safetensors"
    first = write_file_layer(source, "/models/model/model.safetensors", tmp_path / "a")
    os.utime(source, (1_700_000_000, 1_700_000_000))
    source.chmod(0o600)
    second = write_file_layer(source, "models/model/model.safetensors", tmp_path / "b")
    assert first.digest == second.digest
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.digest == "sha256:" + _sha256(first.path)
    assert first.size == first.path.stat().st_size
    assert first.path.name == first.digest.removeprefix("sha256:")
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temporary file left behind


def test_layer_headers_are_normalized(tmp_path: Path, launch_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    layer = write_tree_layer(launch_dir, "/opt/forge", tmp_path / "blobs")
    with tarfile.open(layer.path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["opt", "opt/forge", "opt/forge/README", "opt/forge/serve.sh"]
        assert tar.extractfile("opt/forge/serve.sh").read() == (launch_dir / "serve.sh").read_bytes()
    modes = {m.name: m.mode for m in members}
    assert modes == {"opt": 0o755, "opt/forge": 0o755, "opt/forge/README": 0o644, "opt/forge/serve.sh": 0o755}
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 1_700_000_000)
        assert not m.pax_headers  # small plain files need no PAX records
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert write_tree_layer(launch_dir, "/opt/forge", tmp_path / "other").digest != layer.digest


def test_bad_source_date_epoch_is_an_input_error(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InputError, match="SOURCE_DATE_EPOCH"):
        write_file_layer(model_dir / "config.json", "x/config.json", tmp_path)


def test_symlinked_files_are_packaged_as_their_bytes(tmp_path: Path, model_dir: Path) -> None:
    """Hugging Face snapshots are symlinks into a blob store; the layer must carry the bytes."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    layer = write_tree_layer(snapshot, "models/model", tmp_path / "blobs")
    with tarfile.open(layer.path) as tar:
        member = tar.getmember("models/model/model.safetensors")
        assert member.isfile()
        assert tar.extractfile(member).read() == (model_dir / "model.safetensors").read_bytes()


def test_symlinked_directories_are_refused(tmp_path: Path, model_dir: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "escape").symlink_to(model_dir, target_is_directory=True)
    with pytest.raises(InputError, match="symlinked directories"):
        write_tree_layer(tree, "opt/forge", tmp_path / "blobs")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("/models/model/a.bin", "models/model/a.bin"), ("./opt/./forge/", "opt/forge"), ("a//b", "a/b")],
)
def test_member_paths_are_made_relative(given: str, expected: str) -> None:
    assert sanitize_member(given) == expected


@pytest.mark.parametrize("bad", ["../etc/passwd", "models/../../x", "/", "", "a\0b", "models/.wh.base"])
def test_member_paths_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(InputError):
        sanitize_member(bad)


def test_pax_size_record_only_beyond_ustar_limit() -> None:
    """ustar's 11 octal digits stop at 8 GiB - 1; larger shards need a PAX `size` record. Checked
    on headers, since tarring a real 9 GiB file would take minutes here."""
    big = 9 * 1024**3
    header = tarinfo_for("models/model/big.safetensors", size=big, is_dir=False, executable=False, mtime=0)
    buf = header.tobuf(tarfile.PAX_FORMAT)
    assert buf[156:157] == tarfile.XHDTYPE  # an extended header precedes the member
    assert f" size={big}\n".encode() in buf
    reread = tarfile.open(fileobj=io.BytesIO(buf), mode="r:").next()
    assert (reread.name, reread.size) == ("models/model/big.safetensors", big)

    edge = tarinfo_for("a", size=USTAR_MAX_SIZE, is_dir=False, executable=False, mtime=0)
    buf = edge.tobuf(tarfile.PAX_FORMAT)
    assert buf[156:157] == tarfile.REGTYPE and len(buf) == tarfile.BLOCKSIZE


# ---------------------------------------------------------------- layout


def test_layout_tags_replace_and_resolve(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    layout.init_layout(root)
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    one = layout.Descriptor(layout.MANIFEST, layout.write_blob(root, b'{"a":1}'), 7)
    two = layout.Descriptor(layout.MANIFEST, layout.write_blob(root, b'{"a":2}'), 7)
    layout.tag_manifest(root, one, "v1")
    layout.tag_manifest(root, one, "latest")
    layout.tag_manifest(root, two, "latest")
    assert layout.resolve_tag(root, "v1").digest == one.digest
    assert layout.resolve_tag(root, "latest").digest == two.digest
    assert len(layout.read_index(root)) == 2
    with pytest.raises(InputError, match="no image tagged 'v2'"):
        layout.resolve_tag(root, "v2")
    with pytest.raises(InputError, match="not a valid OCI tag"):
        layout.tag_manifest(root, one, "bad tag")


def test_layout_detects_corrupt_blobs_and_bad_digests(tmp_path: Path) -> None:
    layout.init_layout(tmp_path)
    digest = layout.write_blob(tmp_path, b"{}")
    layout.blob_path(tmp_path, digest).write_bytes(b"[]")
    with pytest.raises(InputError, match="does not match its digest"):
        layout.read_blob(tmp_path, digest)
    with pytest.raises(InputError, match="malformed digest"):
        layout.blob_path(tmp_path, "sha256:../../etc/passwd")


# ---------------------------------------------------------------- images


def _build(tmp_path: Path, model_dir: Path, launch_dir: Path, out: str, **config) -> object:
    base = tmp_path / "base"
    if not base.exists():
        make_base_layout(base)
    image_config = ImageConfig(
        entrypoint=["/opt/forge/serve.sh"],
        env={"HF_HUB_OFFLINE": "1"},
        exposed_ports=[8000],
        labels={"ai.forge.variant": "fp8"},
        title="tiny",
        version="0.1.0",
        **config,
    )
    return build_image(f"oci:{base}:latest", model_dir, launch_dir, image_config, tmp_path / out, "v1")


def test_same_inputs_give_the_same_manifest_digest(tmp_path: Path, model_dir: Path, launch_dir: Path) -> None:
    first = _build(tmp_path, model_dir, launch_dir, "out1")
    second = _build(tmp_path, model_dir, launch_dir, "out2")
    assert first.digest == second.digest
    assert (tmp_path / "out1/index.json").read_bytes() == (tmp_path / "out2/index.json").read_bytes()
    (model_dir / "config.json").write_text('{"hidden_size": 128}')
    changed = _build(tmp_path, model_dir, launch_dir, "out3")
    assert changed.digest != first.digest
    # Only the changed file's layer differs: one layer per model file.
    assert len({x.digest for x in changed.layers} - {x.digest for x in first.layers}) == 1


def test_image_config_and_manifest(tmp_path: Path, model_dir: Path, launch_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = _build(tmp_path, model_dir, launch_dir, "out")
    manifest, config = read_image(result.layout, "v1")
    assert manifest["mediaType"] == layout.MANIFEST
    base_layer, *forge_layers = manifest["layers"]
    assert base_layer["mediaType"] == layout.LAYER_TAR_GZIP
    assert [d["mediaType"] for d in forge_layers] == [layout.LAYER_TAR] * 4  # 3 model files + launch
    assert [d["digest"] for d in forge_layers] == [layer.digest for layer in result.layers]
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == result.base_digest
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert (config["os"], config["architecture"]) == ("linux", "amd64")  # picked from the base index
    runtime = config["config"]
    assert runtime["Entrypoint"] == ["/opt/forge/serve.sh"]
    assert "Cmd" not in runtime  # the base's Cmd belonged to the base's entrypoint
    assert runtime["Env"] == ["PATH=/usr/local/bin:/usr/bin:/bin", "HF_HUB_OFFLINE=1"]
    assert runtime["ExposedPorts"] == {"8000/tcp": {}}
    assert runtime["Labels"]["org.opencontainers.image.title"] == "tiny"
    assert runtime["Labels"]["ai.forge.variant"] == "fp8"
    assert len(config["rootfs"]["diff_ids"]) == 5
    assert config["rootfs"]["diff_ids"][1:] == [layer.digest for layer in result.layers]
    assert len([h for h in config["history"] if not h.get("empty_layer")]) == 5


def test_unknown_platform_is_an_input_error(tmp_path: Path, model_dir: Path, launch_dir: Path) -> None:
    with pytest.raises(InputError, match=r"no linux/s390x image in the index \(has: linux/amd64, linux/arm64\)"):
        _build(tmp_path, model_dir, launch_dir, "out", platform="linux/s390x")


def test_umoci_unpacks_the_image(tmp_path: Path, model_dir: Path, launch_dir: Path) -> None:
    require("umoci")
    result = _build(tmp_path, model_dir, launch_dir, "out")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{result.layout}:v1", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin/busybox").read_text() == "#!/bin/sh\necho busybox amd64\n"
    for source in model_dir.rglob("*"):
        if source.is_file():
            unpacked = rootfs / "models/model" / source.relative_to(model_dir)
            assert _sha256(unpacked) == _sha256(source)
            assert unpacked.stat().st_mode & 0o777 == 0o644
    assert (rootfs / "opt/forge/serve.sh").stat().st_mode & 0o777 == 0o755


def test_skopeo_reads_the_layout(tmp_path: Path, model_dir: Path, launch_dir: Path) -> None:
    require("skopeo")
    result = _build(tmp_path, model_dir, launch_dir, "out")
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{result.layout}:v1"], check=True, capture_output=True, text=True
    ).stdout
    info = json.loads(out)
    assert info["Digest"] == result.digest
    assert info["Layers"][1:] == [layer.digest for layer in result.layers]
