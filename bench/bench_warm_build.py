"""Warm `forge build`: every stage already cached, timed from outside as a shell would time it.

    .venv/bin/python bench/bench_warm_build.py [RECIPE] --artifacts-dir DIR [--runs 7]

DIR must hold a complete earlier build of RECIPE (e.g. `forge build RECIPE --artifacts-dir DIR`
once, cold). Each run is a separate `forge build` process (interpreter start-up and imports
count, as in `time forge build`), its output sent to a file, not a terminal. The first run is
reported on its own: it is the one that used to re-read every cache entry written by the cold
build. Also prints the import of `forge.build` alone (`python -c 'import forge.build'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
        seconds = time.perf_counter() - started
        out.seek(0)
        done.stdout = out.read()
    return seconds, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", type=Path, default=REPO / "recipes" / "smollm2-135m.yaml")
    parser.add_argument("--artifacts-dir", type=Path, required=True, help="holds a complete build of RECIPE")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    forge = str(Path(sys.executable).parent / "forge")
    build = [forge, "build", str(args.recipe), "--artifacts-dir", str(args.artifacts_dir)]
    seconds = []
    for run in range(args.runs):
        took, done = timed(build)
        if done.returncode not in (0, 1):
            sys.exit(f"forge build failed ({done.returncode}):\n{done.stderr}")
        seconds.append(took)
        if run == 0:
            report = json.loads((args.artifacts_dir / report_name(args.recipe) / "build.json").read_text())
            counts = Counter(s["status"] for s in report["stages"])
            print(f"stages: {dict(sorted(counts.items()))}")
            if counts.get("ran"):
                print("warning: stages ran; this was not a warm build")
        print(f"run {run + 1}: {took:.3f} s")
    print(f"warm build: first {seconds[0]:.3f} s, min {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s")
    imports = [timed([sys.executable, "-c", "import forge.build"])[0] for _ in range(args.runs)]
    print(f"import forge.build: min {min(imports):.3f} s, median {statistics.median(imports):.3f} s")


def report_name(recipe: Path) -> str:
    """The recipe's name: its directory under the artifacts directory."""
    return yaml.safe_load(recipe.read_text())["name"]


if __name__ == "__main__":
    main()
