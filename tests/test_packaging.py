"""forge stands alone: package data, the shipped dataset, no reference to anything outside the repo."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tomllib

from forge.datasets import BUILTIN_DATASETS, DATA_DIR, resolve_dataset
from forge.errors import EXIT_INTERNAL
from tests.conftest import FORGE, REPO, run_cli, tiny_recipe, write_recipe

# Text that only makes sense beside the development checkout: a sibling directory, or documents and
# issue numbers that a user of the repository does not have.
OUTSIDE = re.compile(r"\.\./shared|REFERENCE(\.md)?\s*§|REFERENCE\.md|forge issue \d|STYLE\.md")


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_no_file_refers_outside_the_repository():
    offenders = []
    for name in tracked_files():
        path = REPO / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".j2", ".txt", ""} or name.startswith(
            "forge/data/"
        ):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE.search(line) and name != "tests/test_packaging.py":
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_shipped_dataset_is_the_documented_file():
    readme = (DATA_DIR / "README.md").read_text()
    for name, file in BUILTIN_DATASETS.items():
        data = resolve_dataset(name, REPO / "recipes").read_bytes()
        assert f"recipe name: `{name}`" in readme and file in readme
        assert f"{len(data):,}" in readme
        assert hashlib.sha256(data).hexdigest() in readme


def test_every_package_under_forge_ships_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "forge").rglob("__init__.py")} | {
        "forge.templates"
    }
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {"forge.templates": "templates"}


def test_python_dash_m_forge_is_the_cli():
    done = subprocess.run([*FORGE, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "forge validate" in done.stdout
    assert FORGE[:2] == [sys.executable, "-m"]


def test_an_internal_error_exits_4_with_the_traceback_in_a_file(tiny_model, eval_text, tmp_path, monkeypatch):
    """A bug (any exception that is not one of forge's errors) is not a failed gate: exit 4, one line."""
    import forge.build

    def broken(*args, **kwargs):
        raise ZeroDivisionError("planted bug")

    monkeypatch.setattr(forge.build, "make_plan", broken)
    monkeypatch.setenv("FORGE_CRASH_DIR", str(tmp_path / "crashes"))
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model, eval_text))
    code, output = run_cli("build", str(recipe), "--artifacts-dir", str(tmp_path / "artifacts"))
    assert code == EXIT_INTERNAL == 4, output
    assert "internal error: ZeroDivisionError: planted bug" in output
    assert "Traceback" not in output
    [crash] = (tmp_path / "crashes").iterdir()
    assert str(crash) in output
    assert "Traceback" in crash.read_text() and "planted bug" in crash.read_text()
