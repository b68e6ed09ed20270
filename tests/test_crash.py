"""Crash safety: a `forge build` killed with SIGKILL at any moment never leaves a cache entry that
looks complete but is not, and a rerun finishes with exactly the bytes of an uninterrupted build.

The campaign kills real `forge build --json` processes (the CLI, as CI runs it) at points chosen
by timing: a random moment after start-up; a random moment into the remaining stage work once
the process has begun its first uncached stage (its `.tmp-<key>-<pid>` directory appears); a
random moment within a stage of a given kind once the process has begun one (quantize and
export take tenths of a second here, so whole-build timing alone rarely hits them); and a
random moment after it begins materializing `artifacts/<name>/`. After every kill the whole
cache is audited (`audit_cache`): every entry with a `stage.json` lists files that exist with
their recorded sha256. The last run must then reproduce the reference build's digests.

`bench/bench_crash.py` runs the long campaign (≥ 20 kills) and prints where the kills landed;
CI runs `test_kill_campaign_short` (≥ 5 kills). The per-entry lock, stale temporary directories,
concurrent builds and the digest memo are tested directly below.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forge.cache import Cache
from forge.digest import file_digest, sha256_file
from tests.conftest import FORGE, REPO, tiny_recipe, write_recipe

RECIPE_NAME = "tiny"


# ---------------------------------------------------------------- the harness (shared with bench)


@dataclass
class KillPoint:
    """One interrupted run: how the moment was chosen, where it landed, what the audit found."""

    mode: str  # startup | stage | kind:<stage kind> | materialize
    delay_s: float
    window_s: float  # the delay was drawn from [0, window_s]
    killed: bool  # False: the build finished before the kill came
    phase: str = ""  # what the process was doing: a stage kind, materialize, report, startup/between
    complete_before: int = 0
    complete_after: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Campaign:
    seed: int
    kills: list[KillPoint]
    final_report: dict
    final_problems: list[str]
    leftovers: list[str]  # temporary files or directories left after the final, complete run


def forge_env(memo: Path) -> dict[str, str]:
    """The build's environment: the digest memo kept out of ~/.cache, no progress bars."""
    return {**os.environ, "FORGE_DIGEST_MEMO": str(memo), "PYTHONUNBUFFERED": "1"}


def start_build(recipe: Path, artifacts: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*FORGE, "build", str(recipe), "--json", "--artifacts-dir", str(artifacts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip


def run_build(recipe: Path, artifacts: Path, env: dict[str, str]) -> dict:
    """One uninterrupted build; its JSON report."""
    done = subprocess.run(
        [*FORGE, "build", str(recipe), "--json", "--artifacts-dir", str(artifacts)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"forge build exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def complete_entries(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("*/*/stage.json") if not p.parent.name.startswith("."))


def listed_files(entry: Path, report: dict) -> Path:
    """Where a stage's `files` are relative to: `model/` for source and export, else the entry."""
    return entry / "model" if (entry / "model").is_dir() else entry


def audit_cache(cache: Path) -> list[str]:
    """Every way the cache could serve something partial or wrong: an entry directory without its
    stage.json, an unreadable or mislabeled stage.json, a listed file missing, changed or extra.
    Temporary (`.tmp-*`) directories and lock files are invisible to readers and not audited."""
    problems = []
    if not cache.exists():
        return problems
    for memo in cache.glob("model-config/*.json"):
        try:
            json.loads(memo.read_text())
        except ValueError:
            problems.append(f"{memo}: torn model-config memo")
    for kind_dir in sorted(p for p in cache.iterdir() if p.is_dir() and p.name != "model-config"):
        for entry in sorted(p for p in kind_dir.iterdir() if not p.name.startswith(".")):
            stage_json = entry / "stage.json"
            if not stage_json.is_file():
                problems.append(f"{entry}: entry without stage.json (partial entry in place)")
                continue
            try:
                report = json.loads(stage_json.read_text())
            except ValueError:
                problems.append(f"{stage_json}: torn stage.json")
                continue
            if report.get("kind") != kind_dir.name or report.get("key") != entry.name:
                problems.append(f"{stage_json}: says {report.get('kind')}/{report.get('key')}")
            if "files" not in report:
                continue
            base = listed_files(entry, report)
            on_disk = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}
            if on_disk != set(report["files"]):
                problems.append(f"{entry}: files {sorted(on_disk ^ set(report['files']))} differ from stage.json")
            for name, meta in report["files"].items():
                path = base / name
                if path.is_file() and (path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]):
                    problems.append(f"{path}: content differs from stage.json")
    return problems


def audit_artifacts(artifacts: Path, report: dict) -> list[str]:
    """The materialized artifact directories hold exactly the files the report lists."""
    problems = []
    for artifact in report["artifacts"]:
        directory = Path(artifact["path"])
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        if on_disk != set(artifact["files"]):
            problems.append(f"{directory}: files {sorted(on_disk ^ set(artifact['files']))} differ from build.json")
        for name, meta in artifact["files"].items():
            if (directory / name).is_file() and sha256_file(directory / name) != meta["sha256"]:
                problems.append(f"{directory / name}: sha256 differs from build.json")
    build_json = artifacts / RECIPE_NAME / "build.json"
    if json.loads(build_json.read_text()) != report:
        problems.append(f"{build_json}: differs from the report printed on stdout")
    return problems


def artifact_digests(report: dict) -> dict[tuple[str, str, str], dict]:
    return {(a["variant"], a["backend"], a["gpu"]): a["files"] for a in report["artifacts"]}


def measured(report: dict) -> dict[str, float]:
    """Every accuracy measurement, which depends on the baseline and accuracy entries."""
    return {f"{g['artifact']}:{g['name']}": g["measured"] for g in report["validation"]["accuracy"]}


def leftovers(artifacts: Path) -> list[str]:
    return sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def phase_of(artifacts: Path, pid: int) -> str:
    """What the killed process was doing, from the temporary names it left (they carry its pid)."""
    cache = artifacts / ".cache"
    for tmp in cache.glob(f"*/.tmp-*-{pid}"):
        return "conversion" if tmp.parent.name == "source" else tmp.parent.name
    out_root = artifacts / RECIPE_NAME
    if any(out_root.glob(f"*/.*.{pid}.tmp")) or any(out_root.glob(f"*/.*.{pid}.old")):
        return "materialize"
    if any(out_root.glob(f".*.{pid}.tmp")):
        return "report"
    if list(cache.glob(f"model-config/*.{pid}.tmp")) or list(cache.glob(f"model-config/.*.{pid}.tmp")):
        return "plan"
    return "startup/between"


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` every 2 ms while the process lives; False when it exited first."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


@dataclass
class Timing:
    """The stages of an uninterrupted cold build with their reported seconds, and its wall time
    from its first stage to its exit (reports undercount that: each process also imports torch
    and transformers inside its first model stage)."""

    stages: list[tuple[str, str, float]]  # (kind, key, reported seconds) in run order
    work_s: float  # the process's wall time from its first stage to its exit
    entries: int  # complete cache entries it left (stages and entries nested in them)

    def left(self, key: str) -> list[tuple[str, str, float]]:
        """The stages from `key` on, in run order (all of them for an unknown key)."""
        keys = [k for _, k, _ in self.stages]
        return self.stages[keys.index(key) :] if key in keys else self.stages

    def seconds(self, key: str) -> float:
        return next((s for _, k, s in self.stages if k == key), 0.05)


def timed_reference(recipe: Path, artifacts: Path, env: dict[str, str]) -> tuple[dict, Timing]:
    """An uninterrupted cold build, timed from its first stage to its exit; its report."""
    proc = start_build(recipe, artifacts, env)
    wait_until(proc, lambda: any((artifacts / ".cache").glob(f"*/.tmp-*-{proc.pid}")), 120)
    began = time.monotonic()
    stdout, stderr = proc.communicate()
    work_s = time.monotonic() - began
    assert proc.returncode == 0, f"forge build exited {proc.returncode}:\n{stderr[-3000:]}"
    report = json.loads(stdout)
    stages = [(s["kind"], s["key"], s["seconds"]) for s in report["stages"] if s.get("status") == "ran"]
    return report, Timing(stages, work_s, len(complete_entries(artifacts / ".cache")))


def kill_once(
    recipe: Path, artifacts: Path, env: dict[str, str], mode: str, rng: random.Random, timing: Timing
) -> KillPoint:
    """Start a build, SIGKILL it at a moment chosen by `mode`, then audit the cache."""
    cache = artifacts / ".cache"
    before = len(complete_entries(cache))
    label = mode
    if mode.startswith("kind:"):
        done = {p.name for p in complete_entries(cache)}
        if all(key in done for kind, key, _ in timing.stages if kind == mode.removeprefix("kind:")):
            mode, label = "stage", f"stage ({mode.removeprefix('kind:')} done)"  # an earlier kill went past it
    proc = start_build(recipe, artifacts, env)
    pid = proc.pid
    window = 0.0
    if mode == "startup":
        window = 3.0  # interpreter start, imports, planning, the first stage
    elif mode == "stage":
        # A random moment of the work this process has left: a stage drawn with probability
        # proportional to its duration, then a moment within it. (A moment drawn over the whole
        # remaining time would now and then outlast a build running faster than the reference.)
        if wait_until(proc, lambda: any(cache.glob(f"*/.tmp-*-{pid}")), 60):
            current = next(iter(cache.glob(f"*/.tmp-*-{pid}")), None)
            key = current.name.split("-")[1] if current else ""  # `.tmp-<key>-<pid>`
            left = timing.left(key)
            _, target, seconds = rng.choices(left, weights=[max(s, 0.01) for _, _, s in left])[0]
            wait_until(proc, lambda: any(cache.glob(f"*/.tmp-{target}-{pid}")), 120)
            window = 0.9 * seconds
    elif mode.startswith("kind:"):
        # Short stages (quantize, export: tenths of a second here) are rarely hit by a random
        # moment in the whole build, so wait for this process to begin one, then pick a moment
        # within its reported duration.
        kind = mode.removeprefix("kind:")
        if wait_until(proc, lambda: any(cache.glob(f"{kind}/.tmp-*-{pid}")), 120):
            current = next(iter(cache.glob(f"{kind}/.tmp-*-{pid}")), None)
            window = timing.seconds(current.name.split("-")[1]) if current else 0.0
    elif mode == "materialize":
        # Materializing and writing the report take milliseconds: start the clock when this
        # process has completed the last stage entry (or, if it had nothing to compute, when
        # its first temporary name appears under artifacts/<name>/).
        out_root = artifacts / RECIPE_NAME
        worked: list[bool] = []

        def finishing() -> bool:
            if not worked and any(cache.glob(f"*/.tmp-*-{pid}")):
                worked.append(True)
            if worked and len(complete_entries(cache)) >= timing.entries:
                return True
            return any(out_root.glob(f"*/.*.{pid}.tmp")) or any(out_root.glob(f".*.{pid}.tmp"))

        wait_until(proc, finishing, 120)
        window = 0.03
    else:
        raise ValueError(mode)
    delay = rng.uniform(0.0, window)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    phase = phase_of(artifacts, pid) if killed else "finished"
    if phase == "startup/between" and mode == "materialize":
        phase = "materialize (between renames) or report"
    point = KillPoint(label, delay, window, killed, phase, before)
    point.complete_after = len(complete_entries(cache))
    point.problems = audit_cache(cache)
    build_json = artifacts / RECIPE_NAME / "build.json"
    if build_json.exists():
        try:
            json.loads(build_json.read_text())
        except ValueError:
            point.problems.append(f"{build_json}: torn")
    return point


def kill_campaign(
    recipe: Path, artifacts: Path, env: dict[str, str], modes: list[str], seed: int, reference: dict, timing: Timing
) -> Campaign:
    """Kill one build after another in the same artifacts directory (each run inherits what the
    previous ones finished, so the kills walk through the stages), then build to completion."""
    rng = random.Random(seed)
    kills = [kill_once(recipe, artifacts, env, mode, rng, timing) for mode in modes]
    final = run_build(recipe, artifacts, env)
    problems = audit_cache(artifacts / ".cache") + audit_artifacts(artifacts, final)
    if artifact_digests(final) != artifact_digests(reference):
        problems.append("artifact digests differ from the uninterrupted build")
    if measured(final) != measured(reference):
        problems.append(f"accuracy measurements differ: {measured(final)} != {measured(reference)}")
    return Campaign(seed, kills, final, problems, leftovers(artifacts))


def describe(campaign: Campaign) -> str:
    lines = [f"seed {campaign.seed}"]
    for k in campaign.kills:
        where = f"killed in {k.phase}" if k.killed else "finished first"
        audit = "; ".join(k.problems) or "audit ok"
        entries = f"entries {k.complete_before}→{k.complete_after}"
        lines.append(f"  {k.mode:<22} +{k.delay_s:6.3f}s of {k.window_s:5.2f}s  {where:<28} {entries}  {audit}")
    lines.append(f"  final: {'; '.join(campaign.final_problems) or 'digests equal the uninterrupted build'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tiny_model: Path, eval_text: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("crash")
    recipe = write_recipe(root, tiny_recipe(tiny_model, eval_text))
    env = forge_env(root / "digests.json")
    return {"root": root, "recipe": recipe, "env": env}


@pytest.fixture(scope="module")
def timed(workspace: dict) -> tuple[dict, Timing]:
    """An uninterrupted cold build: the digests every interrupted build must end up with."""
    return timed_reference(workspace["recipe"], workspace["root"] / "reference", workspace["env"])


@pytest.fixture(scope="module")
def reference(timed: tuple[dict, Timing]) -> dict:
    return timed[0]


# ---------------------------------------------------------------- the campaigns


def test_kill_campaign_short(workspace: dict, timed: tuple[dict, Timing]) -> None:
    """CI's version: six kills: start-up, inside a quantize and an export stage, two at random
    moments into the remaining work, one while materializing `artifacts/tiny/`."""
    seed = int(os.environ.get("FORGE_CRASH_SEED", random.randrange(1 << 30)))
    modes = ["startup", "kind:quantize", "kind:export", "stage", "stage", "materialize"]
    campaign = kill_campaign(workspace["recipe"], workspace["root"] / f"campaign-{seed}", workspace["env"], modes,
                             seed, *timed)  # fmt: skip
    report = describe(campaign)
    print(report)  # where the kills landed, with -s or in the captured output of a failure
    assert sum(k.killed for k in campaign.kills) >= 5, report
    assert all(not k.problems for k in campaign.kills), report
    assert campaign.final_problems == [], report
    assert not [p for p in campaign.leftovers if "/.tmp-" in p], report  # cache.run reclaims them


def test_concurrent_builds_of_one_recipe_agree(workspace: dict, reference: dict) -> None:
    """Two `forge build`s of one recipe into one artifacts directory: both succeed, the per-entry
    lock makes each stage run once in all, and both reports carry the reference's digests."""
    artifacts = workspace["root"] / "concurrent"
    procs = [start_build(workspace["recipe"], artifacts, workspace["env"]) for _ in range(2)]
    outputs = [p.communicate() for p in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    reports = [json.loads(stdout) for stdout, _ in outputs]
    for report in reports:
        assert artifact_digests(report) == artifact_digests(reference)
    for a, b in zip(reports[0]["stages"], reports[1]["stages"], strict=True):
        assert {a["status"], b["status"]} <= {"ran", "cached"}
        assert not (a["status"] == "ran" and b["status"] == "ran"), f"{a['id']} computed twice"
    assert audit_cache(artifacts / ".cache") == []
    assert audit_artifacts(artifacts, json.loads((artifacts / RECIPE_NAME / "build.json").read_text())) == []


def _hammer_link_tree(args: tuple[str, str, int]) -> str:
    from forge.build import link_tree

    src, dst, rounds = args
    for _ in range(rounds):
        try:
            link_tree(Path(src), Path(dst))
        except OSError as error:
            return f"{type(error).__name__}: {error}"
    return "ok"


def test_materialization_is_safe_under_concurrency(tmp_path: Path) -> None:
    """Four processes replacing `artifacts/<name>/<variant>/<backend>` at once (a one-file model
    keeps each round short, so the rounds overlap); each stops at its first error."""
    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text("{}")
    dst = tmp_path / "tiny" / "fp8" / "vllm"
    dst.parent.mkdir(parents=True)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_hammer_link_tree, [(str(src), str(dst), 500)] * 4)
    assert results == ["ok"] * 4


# ---------------------------------------------------------------- the cache itself


_PRODUCER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from forge.cache import Cache

    root, ready, counter = map(Path, sys.argv[1:4])
    def produce(out):
        with open(counter, "a") as f:
            f.write("x")
        (out / "model").mkdir()
        (out / "model" / "half.bin").write_bytes(b"a" * 1000)
        ready.touch()
        time.sleep(float(sys.argv[4]))
        (out / "model" / "other.bin").write_bytes(b"b" * 1000)
        return {}
    path, _, cached = Cache(root).run("export", "k" * 64, produce)
    print(path, cached)
    """
)


def _producer(root: Path, ready: Path, counter: Path, sleep_s: float) -> subprocess.Popen:
    code = [sys.executable, "-c", _PRODUCER, str(root), str(ready), str(counter), str(sleep_s)]
    return subprocess.Popen(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_killed_stage_leaves_no_entry_and_is_recomputed(tmp_path: Path) -> None:
    """Deterministic kill point: SIGKILL while `produce` is half done. Nothing is served; the
    next run recomputes and reclaims the dead process's temporary directory."""
    root, ready, counter = tmp_path / "cache", tmp_path / "ready", tmp_path / "count"
    proc = _producer(root, ready, counter, 30)
    assert wait_until(proc, ready.exists, 30)
    proc.kill()
    proc.wait()
    cache = Cache(root)
    assert not cache.has("export", "k" * 64)
    assert list(root.glob("export/.tmp-*")), "the kill should have left a temporary directory"
    path, _, cached = cache.run("export", "k" * 64, lambda out: {"done": True})
    assert not cached and json.loads((path / "stage.json").read_text())["done"] is True
    assert not list(root.glob("export/.tmp-*")), "stale temporary directory not reclaimed"


def test_an_entry_without_stage_json_is_never_served(tmp_path: Path) -> None:
    """A directory at an entry's final path with no stage.json (from a foreign writer or an older
    forge) counts as absent and is replaced whole."""
    cache = Cache(tmp_path)
    partial = cache.entry("quantize", "a" * 64)
    partial.mkdir(parents=True)
    (partial / "weights.bin").write_bytes(b"half")
    assert not cache.has("quantize", "a" * 64)
    path, _, cached = cache.run("quantize", "a" * 64, lambda out: (out / "weights.bin").write_bytes(b"whole") and {})
    assert not cached and (path / "weights.bin").read_bytes() == b"whole"


def test_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def fails(out: Path) -> dict:
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.run("export", "b" * 64, fails)
    assert not cache.has("export", "b" * 64)
    assert [p.name for p in (tmp_path / "export").iterdir()] == [f".{'b' * 64}.lock"]


def test_concurrent_runs_of_one_entry_compute_it_once(tmp_path: Path) -> None:
    root, counter = tmp_path / "cache", tmp_path / "count"
    procs = [_producer(root, tmp_path / f"ready{i}", counter, 1.0) for i in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert counter.read_text() == "x"
    assert sorted(out.split()[1] for out, _ in outputs) == ["False", "True"]
    assert audit_cache(root) == []


# ---------------------------------------------------------------- the digest memo


def test_memo_sees_an_in_place_rewrite_with_restored_mtime(tmp_path: Path, monkeypatch) -> None:
    """`touch -r` / `cp -p` / `tar x` restore mtime; same size, same inode, same mtime must still
    hash again, or a changed dataset would look cached (digest.py stamps ctime too)."""
    import forge.digest

    monkeypatch.setattr(forge.digest, "RACY_NS", 0)  # memoize even a file written just now
    path = tmp_path / "eval.txt"
    path.write_bytes(b"a" * 4096)
    st = path.stat()
    time.sleep(0.05)  # past the timestamp tick, so the rewrite gets a later ctime
    first = file_digest(path)
    time.sleep(0.05)
    with open(path, "r+b") as f:  # in place: same inode
        f.write(b"b" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino
    assert file_digest(path) == sha256_file(path) != first


def test_memo_does_not_trust_a_file_written_just_now(tmp_path: Path) -> None:
    """A second write within the same timestamp tick leaves the stat unchanged, so digests of
    files younger than RACY_NS are computed but not memoized (git's racy-clean rule)."""
    path = tmp_path / "fresh.txt"
    path.write_text("fresh")
    assert file_digest(path) == sha256_file(path)
    memo = Path(os.environ["FORGE_DIGEST_MEMO"])
    stored = json.loads(memo.read_text()) if memo.exists() else {}
    assert str(path.resolve()) not in stored


def test_memo_survives_concurrent_writers(tmp_path: Path) -> None:
    """Processes updating the memo at once may lose each other's entries, never corrupt it."""
    files = []
    for i in range(40):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(64))
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        files.append(path)
    code = "import sys; from pathlib import Path; import forge.digest as d\nd.RACY_NS = 0\n" \
           "for p in sys.argv[1:]: d.file_digest(Path(p))"  # fmt: skip
    env = {**os.environ, "FORGE_DIGEST_MEMO": str(tmp_path / "memo.json")}
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, files[i::4])], env=env, cwd=REPO)
             for i in range(4)]  # fmt: skip
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    memo = json.loads((tmp_path / "memo.json").read_text())
    assert memo, "nothing memoized"
    for key, entry in memo.items():
        assert entry["sha256"] == sha256_file(Path(key))
