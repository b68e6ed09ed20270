"""Cold `forge build` of this checkout against another commit's, alternated in one run.

    .venv/bin/python bench/bench_build_ab.py --base 0a01958 [--rounds 1] [--keep-report build.json] [RECIPE]

These machines' speed moves about 3x from one day to the next, so a build's seconds alone compare
nothing; the ratio of two builds run back to back on the same machine does. Each round builds the
base commit (a `git worktree` of it in a temporary directory, run with this interpreter and its
packages) and this checkout, each cold into a fresh artifacts directory, in ABBA order over rounds
so a drift in machine load falls on both sides; then this checkout once more, warm (every stage
cached). Every build is its own `forge build --json` process timed from outside, interpreter
start-up included. Prints each build's seconds and its stages' seconds by kind (from build.json),
the ratio this/base, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_build(checkout: Path, recipe: Path, artifacts: Path) -> tuple[float, dict]:
    """One `forge build` of `recipe` with the forge package of `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "forge", "build", str(recipe), "--json", "--artifacts-dir", str(artifacts)],
        cwd=checkout, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        sys.exit(f"forge build ({checkout}) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def by_kind(report: dict) -> dict[str, float]:
    """Seconds of the stages that ran, summed by kind: the report's own `timing` where it has one
    (a stage reusing another's evaluation carries that evaluation's seconds, which a plain sum
    would count twice), else the stages' seconds (reports from before `timing`)."""
    if "timing" in report:
        return dict(report["timing"]["by_kind"])
    totals: dict[str, float] = defaultdict(float)
    for stage in report["stages"]:
        if stage["status"] == "ran" and isinstance(stage.get("seconds"), int | float):
            totals[stage["kind"]] += stage["seconds"]
    return dict(totals)


def accuracy_figures(report: dict) -> dict[str, float]:
    return {f"{g['artifact']} {g['name']}": g["measured"] for g in report["validation"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2-135m.yaml", help="relative to each checkout")
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. the previous release)")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (each builds both sides cold)")
    parser.add_argument("--keep-report", type=Path, help="copy this checkout's last cold build.json here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="forge-ab-"))
    base = scratch / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
    sides = {"base": base, "this": REPO}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; base {args.base}, this {head.stdout.strip()}; "
          f"load average before {os.getloadavg()}", flush=True)  # fmt: skip
    seconds: dict[str, list[float]] = {"base": [], "this": []}
    reports: dict[str, dict] = {}
    try:
        order = [("base", "this") if r % 2 == 0 else ("this", "base") for r in range(args.rounds)]
        for run, side in enumerate(s for pair in order for s in pair):
            took, report = timed_build(sides[side], sides[side] / args.recipe, scratch / f"artifacts-{run}")
            seconds[side].append(took)
            reports[side] = report
            if side == "this" and args.keep_report:
                args.keep_report.write_text(json.dumps(report, indent=2) + "\n")
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind(report).items(), key=lambda kv: -kv[1]))
            print(f"cold {side:<4} {took:7.1f} s   {kinds}", flush=True)
            if side == "this":
                warm, _ = timed_build(REPO, REPO / args.recipe, scratch / f"artifacts-{run}")
                print(f"warm this {warm:7.2f} s (every stage cached)", flush=True)
        ratio = sum(seconds["this"]) / sum(seconds["base"])
        print(f"ratio this/base (sum over rounds): {ratio:.3f}; load average after {os.getloadavg()}")
        before, after = accuracy_figures(reports["base"]), accuracy_figures(reports["this"])
        for name in sorted(before.keys() | after.keys()):
            print(f"  {name:<55} base {before.get(name, float('nan')):.5g}  this {after.get(name, float('nan')):.5g}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
