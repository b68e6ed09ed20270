"""Attacks on the stage cache, the build report and recipe validation.

- A lock or temporary file name planted as a symlink in a shared cache or artifacts directory is
  never followed (it used to truncate, or overwrite, its target).
- The cache is checked, not trusted: an entry whose files changed since it was written (edited
  in place through an artifact's hard link, added, removed, swapped for a link, or written by a
  forge without manifests) is discarded, recomputed and said so; never served nor packaged.
- build.json is written on every exit path once stages start (a failing stage, a refused push),
  saying what failed, so new artifacts never sit beside a stale or missing report.
- Values no build can use, and gates that cannot fail, are refused by `forge validate` naming
  their key; a huge recipe is refused before parsing; a task directory of `/` is not hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

import forge.digest
from forge.build import build, link_tree
from forge.cache import Cache, atomic_write_text
from forge.digest import bounded_file_digests, sha256_file
from forge.errors import InfraError, InputError
from forge.serving import MODEL_DIR
from tests import registry_server
from tests.conftest import missing_requirement, run_cli, tiny_recipe, write_recipe

registry = registry_server.registry
KEY = "k" * 64


def one_cell_recipe(model: Path, eval_text: Path, **overrides) -> dict:
    """The tiny recipe cut to one artifact (FP8 for vLLM on an H100) to keep builds short."""
    data = tiny_recipe(model, eval_text, targets=[{"backend": "vllm", "gpus": ["H100"]}], **overrides)
    data["variants"] = data["variants"][:1]
    return data


def on_disk(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def listed(artifact: dict) -> dict[str, str]:
    return {name: meta["sha256"] for name, meta in artifact["files"].items()}


# ---------------------------------------------------------------- planted symlinks


def test_a_lock_symlink_planted_in_the_cache_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = Cache(tmp_path / "cache")
    (tmp_path / "cache" / "export").mkdir(parents=True)
    (tmp_path / "cache" / "export" / f".{KEY}.lock").symlink_to(victim)
    with pytest.raises(InfraError, match="symbolic link"):
        cache.run("export", KEY, lambda out: {})
    assert victim.read_text() == "precious"


def test_an_artifact_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text("{}")
    dst = tmp_path / "artifacts" / "tiny" / "fp8" / "vllm"
    dst.parent.mkdir(parents=True)
    (dst.parent / ".vllm.lock").symlink_to(victim)
    with pytest.raises(InfraError, match="symbolic link"):
        link_tree(src, dst)
    assert victim.read_text() == "precious"


def test_a_planted_temporary_report_name_is_not_written_through(tmp_path: Path) -> None:
    """build.json is written through `.build.json.<pid>.tmp`: a symlink planted under that
    predictable name must not redirect the write (nor become build.json)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    report = tmp_path / "tiny" / "build.json"
    report.parent.mkdir()
    report.with_name(f".build.json.{os.getpid()}.tmp").symlink_to(victim)
    atomic_write_text(report, '{"ok": true}\n')
    assert victim.read_text() == "precious"
    assert not report.is_symlink() and json.loads(report.read_text()) == {"ok": True}


# ---------------------------------------------------------------- the cache is checked


def produce_two_files(out: Path) -> dict:
    (out / "model").mkdir()
    (out / "model" / "a.bin").write_bytes(b"a" * 4096)
    (out / "model" / "b.bin").write_bytes(b"b" * 4096)
    return {"variant": "fp8"}


def edit_in_place(entry: Path) -> None:
    """Same size, same inode, mtime restored (`touch -r`): only ctime and the bytes change."""
    path = entry / "model" / "a.bin"
    st = path.stat()
    path.chmod(0o644)  # what root could skip, and anyone else must do first
    with open(path, "r+b") as f:
        f.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def strip_manifest(entry: Path) -> None:
    """An entry as a forge without manifests wrote it."""
    stage_json = entry / "stage.json"
    report = json.loads(stage_json.read_text())
    report.pop("manifest", None)
    stage_json.chmod(0o644)
    stage_json.write_text(json.dumps(report))


def swap_for_symlink(entry: Path) -> None:
    elsewhere = entry.parent.parent / "elsewhere.bin"
    elsewhere.write_bytes(b"a" * 4096)  # the same bytes, but not the entry's to vouch for
    (entry / "model" / "a.bin").unlink()
    (entry / "model" / "a.bin").symlink_to(elsewhere)


TAMPERING: dict[str, Callable[[Path], None]] = {
    "edited in place": edit_in_place,
    "file added": lambda entry: (entry / "model" / "evil.py").write_text("import os\n"),
    "file removed": lambda entry: (entry / "model" / "b.bin").unlink(),
    "swapped for a symlink": swap_for_symlink,
    "no manifest": strip_manifest,
}


@pytest.mark.parametrize("tamper", list(TAMPERING), ids=list(TAMPERING))
def test_a_changed_cache_entry_is_recomputed_not_served(tamper: str, tmp_path: Path, capsys) -> None:
    cache = Cache(tmp_path / "cache")
    entry, _, _ = cache.run("export", KEY, produce_two_files)
    TAMPERING[tamper](entry)
    runs = []

    def again(out: Path) -> dict:
        runs.append(out)
        return produce_two_files(out)

    path, report, cached = cache.run("export", KEY, again)
    assert not cached and len(runs) == 1, "a changed entry was served from the cache"
    assert "failed verification" in capsys.readouterr().err
    assert on_disk(path / "model") == {"a.bin": sha256_file_bytes(b"a" * 4096), "b.bin": sha256_file_bytes(b"b" * 4096)}
    assert report["variant"] == "fp8" and "manifest" not in report
    assert cache.run("export", KEY, again)[2], "the recomputed entry verifies"


def sha256_file_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_verification_reads_only_what_changed(tmp_path: Path, monkeypatch) -> None:
    """Cheap when nothing changed (the digest memo: one stat per file); a file edited in place
    with its mtime restored is read again and the entry recomputed."""
    monkeypatch.setattr(forge.digest, "RACY_NS", 0)  # memoize even files written just now
    cache = Cache(tmp_path / "cache")
    entry, _, _ = cache.run("export", KEY, produce_two_files)
    assert cache.run("export", KEY, produce_two_files)[2]  # verified once: both digests memoized
    hashed: list[str] = []
    real = forge.digest.sha256_file
    monkeypatch.setattr(forge.digest, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert cache.run("export", KEY, produce_two_files)[2]
    assert hashed == [], "an unchanged entry was re-read"
    edit_in_place(entry)
    read_to_verify = []
    _, _, cached = cache.run("export", KEY, lambda out: read_to_verify.extend(hashed) or produce_two_files(out))
    assert not cached and read_to_verify == ["a.bin"]
    # A memo that cannot be written (a read-only home in CI) costs hashing, never a good entry.
    (tmp_path / "blocked").write_text("a file where the memo's directory should be")
    monkeypatch.setenv("FORGE_DIGEST_MEMO", str(tmp_path / "blocked" / "digests.json"))
    assert cache.run("export", KEY, produce_two_files)[2]


def layer_files(layout: Path) -> dict[str, str]:
    """sha256 of every file under the model directory in the image's layers (model files only)."""
    found = {}
    for blob in (layout / "blobs" / "sha256").iterdir():
        try:
            with tarfile.open(blob) as tar:
                for member in tar.getmembers():
                    name = "/" + member.name.lstrip("./")
                    if member.isfile() and name.startswith(MODEL_DIR + "/"):
                        data = tar.extractfile(member).read()
                        found[name.removeprefix(MODEL_DIR + "/")] = hashlib.sha256(data).hexdigest()
        except tarfile.ReadError:
            continue  # a manifest or config blob
    return found


def test_an_artifact_edited_in_place_is_never_packaged(tiny_model: Path, eval_text: Path, tmp_path: Path, capsys):
    """An artifact is a hard link into the cache: its files are read-only, and an edit that gets
    through anyway (root, or a chmod first) is caught by the entry's manifest on the next build,
    which recomputes the export, packages the recomputed bytes and relinks the artifact."""
    artifacts = tmp_path / "artifacts"
    data = one_cell_recipe(tiny_model, eval_text)
    first = build(write_recipe(tmp_path, data), artifacts_dir=artifacts).report
    [artifact] = first["artifacts"]
    weights = Path(artifact["path"]) / "model.safetensors"
    assert weights.stat().st_mode & 0o222 == 0, "artifact files must be read-only (they are the cache's)"
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            open(weights, "r+b")
    good = listed(artifact)
    st = weights.stat()
    weights.chmod(0o644)
    with open(weights, "r+b") as f:  # in place: the cache entry's file is the same inode
        f.seek(st.st_size // 2)
        f.write(b"\xff" * 64)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()

    base = registry_server.make_base_layout(tmp_path / "base")
    data["package"] = {"enabled": True, "base_images": {"vllm": f"oci:{base}:latest"}}
    second = build(write_recipe(tmp_path, data), artifacts_dir=artifacts).report
    stages = {s["id"]: s for s in second["stages"]}
    export = stages["export/fp8/compressed-tensors"]
    assert export["status"] == "ran" and "model.safetensors" in export["discarded_entry"]
    assert "failed verification" in capsys.readouterr().err
    [artifact] = second["artifacts"]
    assert listed(artifact) == good == on_disk(Path(artifact["path"]))
    [image] = second["images"]
    assert layer_files(Path(image["layout"])) == good, "the image carries bytes the report does not list"


# ---------------------------------------------------------------- reports on every exit path


def test_a_failing_stage_writes_the_report_naming_it(tiny_model: Path, eval_text: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one window.\n")
    data = one_cell_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"].update(dataset=str(short), window=1024)
    artifacts = tmp_path / "artifacts"
    code, output = run_cli("build", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(artifacts))
    assert code == 2, output
    report = json.loads((artifacts / "tiny" / "build.json").read_text())
    assert report["status"] == "error" and report["error"]["stage"] == "baseline"
    assert "window" in report["error"]["message"] and report["error"]["type"] == "InputError"
    stages = {s["id"]: s for s in report["stages"]}
    assert stages["source"]["status"] == "ran"
    assert stages["baseline"]["status"] == "failed" and stages["baseline"]["error"] == report["error"]["message"]
    assert stages["quantize/fp8"] == {**stages["quantize/fp8"], "status": "not-run",
                                      "reason": "not reached: the build stopped at baseline"}  # fmt: skip
    assert report["artifacts"] == [] and not (artifacts / "tiny" / "fp8").exists()
    assert (artifacts / "tiny" / "recipe.resolved.yaml").is_file()


def test_a_refused_push_after_a_good_build_writes_the_report(
    registry, tiny_model: Path, eval_text: Path, tmp_path: Path, monkeypatch
) -> None:
    """The real registry refuses the credentials. The artifacts were already written: build.json
    must describe them, the images and the failed push, not stay the earlier build's."""
    monkeypatch.setenv("FORGE_REGISTRY_USERNAME", registry.username)
    monkeypatch.setenv("FORGE_REGISTRY_PASSWORD", "not-the-password")
    artifacts = tmp_path / "artifacts"
    data = one_cell_recipe(tiny_model, eval_text)
    build(write_recipe(tmp_path, data), artifacts_dir=artifacts)  # an earlier good build and its report
    base = registry_server.make_base_layout(tmp_path / "base")
    data["package"] = {"enabled": True, "base_images": {"vllm": f"oci:{base}:latest"}, "registry": registry.host,
                       "repository": "forge/tiny"}  # fmt: skip
    with pytest.raises(InfraError):
        build(write_recipe(tmp_path, data), artifacts_dir=artifacts)
    report_path = artifacts / "tiny" / "build.json"
    report = json.loads(report_path.read_text())
    assert report["recipe"]["package"]["registry"] == registry.host, "build.json is the earlier build's"
    assert report["status"] == "error" and report["error"]["stage"] == "push/fp8/vllm/H100"
    stages = {s["id"]: s for s in report["stages"]}
    assert stages["push/fp8/vllm/H100"]["status"] == "failed" and stages["push/fp8/vllm/H100"]["error"]
    assert stages["package/fp8/vllm/H100"]["status"] == "ran" and report["images"]
    assert report["pushed"] == []
    [artifact] = report["artifacts"]
    assert listed(artifact) == on_disk(Path(artifact["path"]))

    code, markdown = run_cli("report", str(report_path), "--markdown")
    assert code == 0 and "build stopped at push/fp8/vllm/H100" in markdown
    code, junit = run_cli("report", str(report_path), "--junit")
    errors = ET.fromstring(junit).findall(".//error")
    assert code == 0 and len(errors) == 1 and "push/fp8/vllm/H100" in ET.tostring(ET.fromstring(junit), "unicode")


# ---------------------------------------------------------------- validate: ranges and gates that can fail


def valid_recipe() -> dict:
    return {
        "name": "tiny",
        "source": {"path": "model"},
        "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}],
        "targets": [{"backend": "vllm", "gpus": ["H100"]}],
        "validation": {"accuracy": {"tasks": ["forge_facts"]}, "throughput": {"enabled": True}},
    }


def edit(path: str, value) -> Callable[[dict], None]:
    """Set a dotted key (`[i]` for list items) of the recipe."""

    def apply(data: dict) -> None:
        node, parts = data, path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value

    return apply


LONG = "v" * 60
UNUSABLE = [
    ("concurrency 0", edit("validation.throughput.concurrency", [0]), "validation.throughput.concurrency[0]"),
    ("no concurrency level", edit("validation.throughput.concurrency", []), "validation.throughput.concurrency"),
    ("level twice", edit("validation.throughput.concurrency", [4, 4]), "concurrency: level 4 is listed twice"),
    ("huge window", edit("validation.accuracy.window", 10**18), "validation.accuracy.window"),
    ("negative recovery", edit("validation.accuracy.gates.min_recovery", {"forge_facts": -7}),
     "validation.accuracy.gates.min_recovery.forge_facts"),
    ("zero recovery", edit("variants[0].gates", {"min_recovery": {"forge_facts": 0}}),
     "variants[0].gates.min_recovery.forge_facts"),
    ("zero agreement", edit("validation.accuracy.gates.min_top1_agreement", 0),
     "validation.accuracy.gates.min_top1_agreement"),
    ("infinite ppl", edit("validation.accuracy.gates.max_ppl_increase_pct", float("inf")),
     "validation.accuracy.gates.max_ppl_increase_pct"),
    ("infinite ttft", edit("validation.throughput.max_ttft_p99_ms", float("inf")),
     "validation.throughput.max_ttft_p99_ms"),
    ("infinite tps", edit("validation.throughput.min_output_tps", float("inf")),
     "validation.throughput.min_output_tps"),
    ("negative price", edit("validation.throughput.usd_per_hour", {"H100": -1}),
     "validation.throughput.usd_per_hour.H100"),
    ("aliased price", edit("validation.throughput.usd_per_hour", {"A100": 2.0}), "write its profile name 'A100-80GB'"),
    ("huge sequence", edit("targets[0].max_seq_len", 10**18), "targets[0].max_seq_len"),
    ("huge fewshot", edit("validation.accuracy.num_fewshot", 10**6), "validation.accuracy.num_fewshot"),
    ("huge request count", edit("validation.throughput.requests_per_level", 10**18),
     "validation.throughput.requests_per_level"),
    ("prompt longer than the server takes", edit("validation.throughput.prompt_tokens", 4000),
     "validation.throughput.prompt_tokens: 4000 is longer than targets[0].max_input_len (2048)"),
    ("tag too long once expanded", lambda d: (edit("variants[0].name", LONG)(d),
                                              edit("package.tags", ["{variant}-{backend}-{gpu}-" + "x" * 58])(d)),
     "package.tags[0]"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "mentions"), [u[1:] for u in UNUSABLE], ids=[u[0] for u in UNUSABLE])
def test_unusable_values_are_refused_by_validate_naming_the_key(change, mentions: str, tmp_path: Path) -> None:
    data = valid_recipe()
    path = write_recipe(tmp_path, data, name="ok.yaml")
    assert run_cli("validate", str(path))[0] == 0
    change(data)
    path = write_recipe(tmp_path, data)
    for command in (["validate", str(path)], ["plan", str(path), "--artifacts-dir", str(tmp_path / "a")]):
        code, output = run_cli(*command)
        assert code == 2 and mentions in output and "Traceback" not in output, output
    assert not (tmp_path / "a").exists()


def test_tags_are_checked_as_every_artifact_expands_them(tmp_path: Path) -> None:
    """128 characters once `{variant}-{backend}-{gpu}-` is filled in pass; 129 do not (they passed
    validate and plan before, and failed at push)."""
    data = valid_recipe()
    edit("variants[0].name", LONG)(data)
    edit("package.tags", ["{variant}-{backend}-{gpu}-" + "x" * 57])(data)  # 60 + 11 + 57 = 128 characters
    code, output = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert code == 0, output
    edit("package.tags", ["latest", "{variant}-{backend}-{gpu}-" + "x" * 58])(data)
    code, output = run_cli("validate", str(write_recipe(tmp_path, data)))
    assert code == 2 and output.startswith("forge: package.tags[1]: ") and "(129 characters)" in output, output


# ---------------------------------------------------------------- bounded inputs


def test_a_recipe_larger_than_one_mebibyte_is_refused_before_parsing(tmp_path: Path) -> None:
    import yaml

    text = yaml.safe_dump(valid_recipe()) + ("# padding\n" * 110_000)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, output = run_cli("validate", str(path))
    assert code == 2 and f"{path}: larger than 1048576 bytes" in output, output


@pytest.mark.parametrize("include", ["/", "../" * 40, "/usr"])
def test_task_include_path_at_a_system_root_is_not_hashed(include: str, tiny_model, eval_text, tmp_path) -> None:
    from forge.eval.lm_eval import lm_eval_available

    if not lm_eval_available():
        missing_requirement("needs the eval extra (lm_eval)")
    data = one_cell_recipe(tiny_model, eval_text)
    data["validation"]["accuracy"].update(tasks=["forge_facts"], task_include_path=include)
    code, output = run_cli("plan", str(write_recipe(tmp_path, data)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2 and "validation.accuracy.task_include_path: " in output and "system directory" in output, output


def test_task_directory_digests_stop_at_their_bounds(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    for i in range(4):
        (tasks / "sub" / f"t{i}.yaml").write_text(f"task: t{i}\n")
    assert len(bounded_file_digests(tasks, "k", max_files=4, max_bytes=1000)) == 4
    with pytest.raises(InputError, match="^k: .* more than 3 files"):
        bounded_file_digests(tasks, "k", max_files=3, max_bytes=1000)
    with pytest.raises(InputError, match="^k: .* 20 bytes"):
        bounded_file_digests(tasks, "k", max_files=10, max_bytes=20)
    (tasks / "endless").symlink_to("/dev/zero")  # not a regular file: skipped, never read
    (tasks / "status").symlink_to("/proc/self/status")  # stat says 0 bytes; the bytes read are counted
    with pytest.raises(InputError, match="^k: "):
        bounded_file_digests(tasks, "k", max_files=10, max_bytes=60)
