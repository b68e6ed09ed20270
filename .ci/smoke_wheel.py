"""Smoke check of forge installed from its wheel (run by `.ci/smoke-wheel` with that venv's Python).

It runs from a directory outside the clone so that nothing but the installed package can be
imported as `forge`; the repository is only read for the recipes and the test helpers that make a
tiny checkpoint and a local base image (appended to sys.path after site-packages).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(sys.argv[1]).resolve()
BIN = Path(sys.executable).parent
sys.path.append(str(REPO))  # after site-packages: the installed forge wins over REPO/forge


def forge(*args: str, cwd: Path) -> str:
    done = subprocess.run([str(BIN / "forge"), *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"smoke: forge {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> None:
    import forge as installed
    from tests.registry_server import make_base_layout
    from tests.tiny import make_tiny_llama

    assert REPO not in Path(installed.__file__).resolve().parents, (
        f"forge imported from the clone: {installed.__file__}"
    )
    work = Path.cwd() / "smoke"  # inside .ci/smoke-wheel's temporary directory, removed on exit
    work.mkdir()
    print(forge("--version", cwd=work).strip())
    module = subprocess.run([sys.executable, "-m", "forge", "--version"], cwd=work, capture_output=True, text=True)
    assert module.returncode == 0 and "version" in module.stdout, module
    default = REPO / "recipes" / "smollm2-135m.yaml"
    print(forge("validate", str(default), cwd=work).strip())
    plan = json.loads(forge("plan", str(default), "--json", "--artifacts-dir", str(work / "plan"), cwd=work))
    assert any(a["status"] == "planned" for a in plan["artifacts"]), plan

    # A packaging build from the wheel: templates and the shipped dataset come from package data.
    model = make_tiny_llama(work / "model")
    base = make_base_layout(work / "base")
    recipe = {
        "name": "smoke",
        "source": {"path": str(model)},
        "variants": [{"name": "fp8", "scheme": "FP8_DYNAMIC"}],
        "targets": [{"backend": "vllm", "gpus": ["H100"]}],
        "validation": {"accuracy": {"dataset": "wikitext-2", "window": 64, "max_windows": 2}},
        "package": {"enabled": True, "base_images": {"vllm": f"oci:{base}:latest"}},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = json.loads(forge("build", str(path), "--json", "--artifacts-dir", str(work / "artifacts"), cwd=work))
    dockerfiles = list((work / "artifacts").rglob("Dockerfile"))
    layouts = list((work / "artifacts").rglob("oci-layout"))
    packaged = [s for s in report["stages"] if s["kind"] == "package" and s["status"] == "ran"]
    assert dockerfiles and layouts and packaged, (dockerfiles, layouts, report["stages"])
    print(f"smoke: wheel install ok: {installed.__file__}; {len(packaged)} image(s), {dockerfiles[0]}")


if __name__ == "__main__":
    main()
