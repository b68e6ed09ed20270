"""Cold and warm `forge build` of a recipe (default: the embedded SmolLM2 recipe).

    .venv/bin/python bench/bench_build.py [RECIPE] [--keep]

Cold: a fresh artifacts/cache directory, so every stage runs (GGUF conversion, baseline,
quantization, exports, accuracy). Warm: the same command again, every stage cached. Each run is
a separate `forge build --json` process, timed from outside, so interpreter start-up counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_build(recipe: Path, artifacts: Path) -> tuple[float, dict]:
    forge = Path(sys.executable).parent / "forge"
    started = time.perf_counter()
    done = subprocess.run(
        [str(forge), "build", str(recipe), "--json", "--artifacts-dir", str(artifacts)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"forge build failed ({done.returncode}):\n{done.stderr}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", type=Path, default=REPO / "recipes" / "smollm2-135m.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the temporary artifacts directory")
    args = parser.parse_args()
    artifacts = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    try:
        for label in ("cold", "warm"):
            seconds, report = timed_build(args.recipe, artifacts)
            counts = Counter(s["status"] for s in report["stages"])
            print(f"{label}: {seconds:7.2f} s  stages: {dict(sorted(counts.items()))}")
            if label == "cold":
                for stage in report["stages"]:
                    if stage["status"] == "ran":
                        print(f"    {stage['id']:<45} {stage['seconds']:7.1f} s")
                for gate in report["validation"]["accuracy"]:
                    print(f"    gate {gate['artifact']:<38} {gate['name']:<22} {gate['measured']:.4g}")
    finally:
        if not args.keep:
            shutil.rmtree(artifacts, ignore_errors=True)


if __name__ == "__main__":
    main()
