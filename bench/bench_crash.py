"""Crash campaign: SIGKILL `forge build` of the tiny recipe at many random points, then finish.

    .venv/bin/python bench/bench_crash.py [--rounds 4] [--seed N] [--concurrent 2]

Each round is a fresh artifacts directory in which six builds are killed one after another (at
a random moment after start, inside a stage of a given kind, at a random moment into the
remaining stage work, or while it materializes `artifacts/<name>/`; see ROUNDS), each followed
by an audit of the whole cache; then a
build runs to completion and must reproduce the uninterrupted reference build's digests and
accuracy numbers. Afterwards pairs of concurrent cold builds share one artifacts directory.
The harness is `tests/test_crash.py`'s (CI runs one short round); this prints where the kills
landed and exits 1 if any audit failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.test_crash import (  # noqa: E402 - after the path insert, so the tests package resolves
    artifact_digests,
    audit_artifacts,
    audit_cache,
    describe,
    forge_env,
    kill_campaign,
    start_build,
    timed_reference,
)
from tests.tiny import make_tiny_llama  # noqa: E402

# Per round, in order (each run inherits what the previous ones finished, and a `stage` kill
# may land several stages ahead, so the targeted kinds come first); rounds alternate.
ROUNDS = [
    ["startup", "kind:source", "kind:baseline", "kind:quantize", "stage", "materialize"],
    ["startup", "kind:quantize", "kind:export", "stage", "kind:accuracy", "materialize"],
    ["kind:baseline", "kind:quantize", "kind:quantize", "kind:export", "stage", "materialize"],
]


def write_tiny_recipe(root: Path) -> Path:
    import yaml

    from tests.conftest import WIKITEXT, tiny_recipe

    model = make_tiny_llama(root / "model")
    eval_text = root / "eval.txt"
    eval_text.write_text(WIKITEXT.read_text()[:20000])
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, eval_text), sort_keys=False))
    return recipe


def concurrent_pair(recipe: Path, artifacts: Path, env: dict, reference: dict) -> list[str]:
    """Two cold builds into one artifacts directory; the problems found (none is the goal)."""
    procs = [start_build(recipe, artifacts, env) for _ in range(2)]
    outputs = [p.communicate() for p in procs]
    problems = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            problems.append(f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
        elif artifact_digests(json.loads(out)) != artifact_digests(reference):
            problems.append("digests differ from the reference")
    problems += audit_cache(artifacts / ".cache")
    if not problems:
        problems += audit_artifacts(artifacts, json.loads((artifacts / "tiny" / "build.json").read_text()))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of six kills each")
    parser.add_argument("--seed", type=int, default=None, help="first round's seed (default: random)")
    parser.add_argument("--concurrent", type=int, default=2, help="pairs of concurrent cold builds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    root = Path(tempfile.mkdtemp(prefix="forge-crash-"))
    failed = False
    try:
        recipe = write_tiny_recipe(root)
        env = forge_env(root / "digests.json")
        begun = started = time.monotonic()
        reference, timing = timed_reference(recipe, root / "reference", env)
        print(
            f"reference build: {time.monotonic() - started:.1f} s, {len(reference['artifacts'])} artifacts, "
            f"{timing.work_s:.1f} s from its first stage to its exit"
        )
        phases: Counter[str] = Counter()
        kills = finished = 0
        leftovers: list[str] = []
        for round_ in range(args.rounds):
            started = time.monotonic()
            modes = ROUNDS[round_ % len(ROUNDS)]
            campaign = kill_campaign(recipe, root / f"round-{round_}", env, modes, seed + round_, reference, timing)
            print(f"round {round_} ({time.monotonic() - started:.1f} s): {describe(campaign)}")
            for k in campaign.kills:
                kills += k.killed
                finished += not k.killed
                phases[k.phase if k.killed else "finished first"] += 1
                failed |= bool(k.problems)
            failed |= bool(campaign.final_problems)
            leftovers += campaign.leftovers
        pairs = []
        for i in range(args.concurrent):
            problems = concurrent_pair(recipe, root / f"concurrent-{i}", env, reference)
            pairs.append(problems)
            failed |= bool(problems)
        print()
        print(f"wall time: {time.monotonic() - begun:.0f} s")
        print(f"kills: {kills} (plus {finished} builds that finished before their kill came)")
        print("landed in: " + ", ".join(f"{phase} {n}" for phase, n in phases.most_common()))
        if failed:
            print("audits: PROBLEMS, see above")
        else:
            print(f"audits: all clean; final digests equal the reference in all {args.rounds} rounds")
        print(f"temporary files left after the final builds: {len(leftovers)} {sorted(set(leftovers))[:6]}")
        for i, problems in enumerate(pairs):
            print(f"concurrent pair {i}: {'; '.join(problems) or 'both exit 0, identical digests, audit clean'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
