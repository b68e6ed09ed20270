"""`forge build`: run the plan's stages in order, each cached by content, and write build.json.

    resolve source → accuracy baseline → quantize → export per format → accuracy per export
    → engine → lm-eval tasks → throughput → package → gates → push (only when every gate passed) → report

Each stage kind is a module of `forge.stages` (an inputs record and a `produce` function); the
build walks the plan's stages once, in dependency order, handing each its record and its
dependencies' entries by role. `Cache.run` skips a stage when its key is already complete (and
its files still match the entry's manifest), so an unchanged rebuild does no work and a change to
a later stage reuses everything before it. Stages that need absent hardware are
recorded as deferred with their command.

build.json never lies about `artifacts/<name>/`: once stages start, it is written on every exit
path. A build that fails (a stage, writing the artifacts, a push, an interrupt) writes it with
`status: error`, the error, the stage it stopped at, and exactly the artifacts and pushes that
completed; it is written (as interrupted) before the artifact directories change, so even a
killed build leaves no new artifacts beside an older report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path

from forge import __version__
from forge.build_report import typed_report
from forge.cache import Cache, atomic_write_text, lock_file, make_dirs, remove, warn_discarded
from forge.cpu import cpu_description, use_cpu_threads
from forge.digest import keep_memoized, regular_files, settled_clock
from forge.errors import GateFailed, InfraError, InputError
from forge.eval.lm_eval import Worker
from forge.loadgen.server import SharedServer
from forge.plan import Plan, Stage, git_revision, make_plan, serving_name
from forge.progress import Progress
from forge.recipe import dump_recipe, load_recipe
from forge.stages import (
    KINDS,
    Run,
    deferred_gates,
    evaluate_accuracy_gates,
    evaluate_task_gates,
    gate_failure_message,
    throughput_results,
)
from forge.stages.push import push_images

TOOLS = ("torch", "transformers", "safetensors", "compressed-tensors", "llmcompressor", "gguf", "pydantic")
NO_VALIDATION = {"accuracy": [], "tasks": [], "throughput": [], "deferred": []}


@dataclass
class BuildResult:
    report: dict
    report_path: Path
    failed_gates: list[dict] = field(default_factory=list)


@dataclass
class Outcome:
    """What the build did so far: the report is made from it on every exit path."""

    plan: Plan
    recipe_path: Path
    out_root: Path
    started: float
    records: dict[str, dict] = field(default_factory=dict)
    validation: dict | None = None
    artifacts: list[dict] = field(default_factory=list)  # materialized, in order
    images: list[dict] = field(default_factory=list)
    model_images: list[dict] = field(default_factory=list)
    pushed: list[dict] | None = None  # None: no push was attempted
    failed_gates: list[dict] = field(default_factory=list)
    wall: dict[str, float] = field(default_factory=dict)  # stage id → this run's seconds on it
    tools: dict[str, str] = field(default_factory=lambda: tool_versions())  # asked once: it runs git

    def report(self, error: dict | None = None) -> dict:
        plan = self.plan
        validation = self.validation or NO_VALIDATION
        gates = gate_counts(validation)
        status = "gates-failed" if gates["failed"] else "gates-deferred" if gates["deferred"] else "passed"
        report = {
            "forge_version": __version__,
            "status": "error" if error else status,
            "recipe": plan.recipe.model_dump(mode="json"),
            "recipe_file": str(self.recipe_path),
            "inputs": {"source": plan.source_identity, "model_config": plan.model_config},
            "tools": self.tools,
            "stages": [{"id": s.id, "kind": s.kind, "key": s.key, **self.records[s.id]} for s in plan.stages],
            "artifacts": self.artifacts,
            "impossible": [
                {"variant": a.variant, "backend": a.backend, "mode": a.mode, "gpu": a.gpu, "reason": a.reason}
                for a in plan.artifacts
                if a.status == "impossible"
            ],
            "validation": validation,
            "gates": gates,
            "images": self.images,
            "model_images": self.model_images,
        }
        if plan.allow_deferred_gates:
            report["allow_deferred_gates"] = True
        if self.pushed is not None:
            report["pushed"] = self.pushed
        if error:
            report["error"] = error
        report["seconds"] = round(time.monotonic() - self.started, 3)
        report["timing"] = self.timing(report["seconds"])
        # NaN is not JSON: an undefined measurement is null (its gate says why). Typed before it is
        # written: a report that does not fit forge/build_report.schema.json is a bug caught here.
        return typed_report(finite_json(report))

    def timing(self, total: float) -> dict:
        """Where this run's time went (`forge.build_report.Timing`): each stage it computed or took
        from the cache, the same by kind, and the remainder spent outside stages."""
        stages = [
            {"stage": s.id, "kind": s.kind, "status": status, "seconds": round(self.wall[s.id], 3)}
            for s in self.plan.stages
            if s.id in self.wall and (status := self.records.get(s.id, {}).get("status")) in ("ran", "cached", "failed")
        ]
        by_kind: dict[str, float] = {}
        for stage in stages:
            by_kind[stage["kind"]] = round(by_kind.get(stage["kind"], 0.0) + stage["seconds"], 3)
        outside = max(0.0, total - sum(s["seconds"] for s in stages))
        return {"stages": stages, "by_kind": by_kind, "outside_stages": round(outside, 3)}

    @cached_property
    def resolved_recipe(self) -> str:
        """recipe.resolved.yaml, made once for the report's two writes (PyYAML's emitter: ~4 ms each)."""
        return dump_recipe(self.plan.recipe)

    def write(self, report: dict) -> Path:
        path = self.out_root / "build.json"
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        write_if_changed(self.out_root / "recipe.resolved.yaml", self.resolved_recipe)
        return path

    def write_failure(self, error: BaseException, chosen: set[str], only: tuple[str, ...], skip: tuple[str, ...],
                      phase: str) -> None:  # fmt: skip
        """The report of a build that stopped on `error`: the stage it was in is `failed` with the
        message, the stages it never reached `not-run`. Never masks `error`."""
        where = next((sid for sid, r in self.records.items() if r["status"] == "failed" and "error" not in r), phase)
        message = str(error) or type(error).__name__
        if where in self.records:
            self.records[where]["error"] = message
        fill_records(self.plan, self.records, chosen, only, skip, f"not reached: the build stopped at {where}")
        for record in self.records.values():
            if record["status"] == "not-run":
                record["reason"] = f"not reached: the build stopped at {where}"
        try:
            if self.validation is None:
                self.validation, _ = validate(self.plan, self.records)
        except Exception:  # noqa: BLE001 - the gates are a detail of a report about another failure
            self.validation = NO_VALIDATION
        try:
            self.write(self.report({"stage": where, "type": type(error).__name__, "message": message}))
        except Exception as write_error:  # noqa: BLE001 - `error` is what the user must see
            error.add_note(f"build.json could not be written: {write_error}")


def start_cpu_measurers(plan: Plan, chosen: set[str], cache: Cache, server: SharedServer, lm_eval: Worker) -> None:
    """Launch the CPU server and the lm_eval worker now if a stage to run will need them: their
    imports (~8 s each here) then overlap the first stages (the GGUF conversion keeps one core of
    two busy) instead of the first measurement waiting for them. A cached build starts neither."""
    from forge.eval.lm_eval import lm_eval_available
    from forge.stages.serve import CPU

    kinds = {s.kind for s in plan.stages if s.id in chosen and s.kind in ("tasks", "throughput")
             and s.inputs.served.gpu == CPU and not cache.has(s.kind, s.key)}  # fmt: skip
    if kinds:
        server.launch()
    if "tasks" in kinds and lm_eval_available():
        lm_eval.start()


def build(
    recipe_path: Path,
    *,
    artifacts_dir: Path = Path("artifacts"),
    cache_dir: Path | None = None,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    progress: Progress | None = None,
    allow_deferred_gates: bool = False,
) -> BuildResult:
    """Build every artifact of the recipe; raises GateFailed (exit 1) after writing the report.

    `only` / `skip` take stage ids, id prefixes or kinds (`engine`, `export/fp8`): `only` runs
    the named stages and what they need (from the cache when present), even deferred ones, except
    a push: one whose image or gates are deferred is refused before any work (`refuse_deferred_pushes`).
    """
    started = time.monotonic()
    use_cpu_threads()
    progress = progress or Progress(enabled=False)
    recipe = load_recipe(recipe_path)
    discarded: dict[tuple[str, str], str] = {}

    def on_discard(kind: str, key: str, problem: str) -> None:
        discarded[kind, key] = problem
        warn_discarded(kind, key, problem)

    cache = Cache(cache_dir or artifacts_dir / ".cache", on_discard=on_discard)
    plan = make_plan(recipe, recipe_path.parent.resolve(), cache, recipe_file=str(recipe_path),
                     allow_deferred_gates=allow_deferred_gates)  # fmt: skip
    chosen = select_stages(plan, only, skip)
    if any(s.kind == "push" for s in plan.stages if s.id in chosen):
        from forge.oci.signing import signing_key_from_env

        signing_key_from_env()  # a bad FORGE_SIGNING_KEY is exit 2 before any work, not after the build
    refuse_deferred_pushes(plan, chosen)
    check_hardware(plan, chosen, only)
    outcome = Outcome(plan, recipe_path, artifacts_dir / recipe.name, started)
    records = outcome.records
    phase = "stages"

    def run(stage: Stage, deps: dict[str, Path]) -> Path:
        """The stage's cache entry, computed by its kind's `produce` unless complete and verified."""
        records[stage.id] = {"status": "failed"}  # until its entry is complete
        kind = KINDS[stage.kind]

        def produce(out: Path) -> dict:
            progress.quiet()
            return kind.produce(stage.inputs, Run(out, deps, progress, cache, server, lm_eval))

        clock = time.monotonic()
        try:
            path, report, cached = cache.run(stage.kind, stage.key, produce)
        except InfraError as error:  # "pull failed" alone does not tell a release job where: name the stage
            if not str(error).startswith(f"{stage.id}: "):
                error.args = (f"{stage.id}: {error}", *error.args[1:])
            raise
        finally:
            outcome.wall[stage.id] = time.monotonic() - clock
        records[stage.id] = {"status": "cached" if cached else "ran", **report}
        if (stage.kind, stage.key) in discarded:
            records[stage.id]["discarded_entry"] = discarded[stage.kind, stage.key]
        return path

    entries: dict[str, Path] = {}  # stage id → its cache entry, for the stages after it
    server = SharedServer(scratch_root=cache.root)  # started by the first stage that serves a model on this CPU
    lm_eval = Worker()  # started by the first stage that runs lm_eval
    try:
        start_cpu_measurers(plan, chosen, cache, server, lm_eval)
        # One loop in plan order, which is dependency order: each stage reads its dependencies'
        # entries by role. Pushes are not content: they run after the gates, below.
        for stage in plan.stages:
            if stage.id in chosen and stage.kind != "push":
                entries[stage.id] = run(stage, {role: entries[dep] for role, dep in stage.deps.items()})

        fill_records(plan, records, chosen, only, skip, "runs once every gate passed")
        outcome.validation, outcome.failed_gates = validate(plan, records)
        packages = {s.id: entries[s.id] for s in plan.of_kind("package") if s.id in entries}
        model_images = {s.id: entries[s.id] for s in plan.of_kind("model-image") if s.id in entries}
        outcome.images = [{"stage": sid, "layout": str(p / "layout"), **records[sid]} for sid, p in packages.items()]

        phase = "materialize"
        # Said first, so a build killed while the directories change leaves a report that says so.
        interrupted = "interrupted while writing the artifact directories; build again"
        outcome.write(outcome.report({"stage": phase, "type": "Interrupted", "message": interrupted}))
        materialize_artifacts(plan, entries, outcome.out_root, outcome.artifacts)
        for artifact in plan.artifacts:  # artifacts/<recipe>/images/<variant>/<backend>/<gpu>/
            sid = next((sid for sid in artifact.stages if sid in model_images), None)
            if sid is None:
                continue
            entry, target = model_images[sid], outcome.out_root / "images" / artifact.cell
            link_tree(entry / "layout", target / "layout")
            link_tree(entry / "deploy", target / "deploy")
            outcome.model_images.append(
                {"stage": sid, "layout": str(target / "layout"), "deploy": str(target / "deploy"), **records[sid]}
            )

        pushes = [s for s in plan.of_kind("push") if s.id in chosen]
        if pushes and outcome.failed_gates:
            for stage in pushes:  # a release must never publish an artifact that failed its gates
                records[stage.id] = {"status": "disabled", "reason": "not pushed: a validation gate failed"}
        elif pushes:
            attached = outcome.report()  # the report each image carries: everything but the pushes
            outcome.pushed = []
            for stage in pushes:
                phase = stage.id
                records[stage.id] = {"status": "failed"}
                clock = time.monotonic()
                [pushed] = push_images([(stage.id, stage.inputs, entries[stage.deps["image"]])], attached, recipe,
                                       progress)  # fmt: skip
                outcome.wall[stage.id] = time.monotonic() - clock
                outcome.pushed.append(pushed)
                records[stage.id] = {"status": "ran", "digest": pushed["digest"],
                                     "bytes_uploaded": pushed["bytes_uploaded"]}  # fmt: skip
                if stage.inputs.deferred_gates:  # allowed explicitly: the record says what was not measured
                    records[stage.id]["deferred_gates"] = list(stage.inputs.deferred_gates)
        phase = "report"
        report = outcome.report()
        report_path = outcome.write(report)
    except BaseException as error:
        outcome.write_failure(error, chosen, only, skip, phase)
        raise
    finally:
        server.close()
        lm_eval.close()
    result = BuildResult(report, report_path, outcome.failed_gates)
    if outcome.failed_gates:
        raise GateFailed(gate_failure_message(outcome.failed_gates), result)
    return result


def fill_records(
    plan: Plan, records: dict[str, dict], chosen: set[str], only: tuple[str, ...], skip: tuple[str, ...], pending: str
) -> None:
    """A record for every stage that has none: deferred ones say why, those left
    out by --only/--skip say so, chosen ones not run (yet) are `not-run` with `pending` as reason."""
    for stage in plan.stages:
        if stage.id in records:
            continue
        if stage.status not in ("run", "cached"):
            records[stage.id] = {"status": stage.status, "reason": stage.reason, "command": stage.command}
        elif stage.id in chosen:
            records[stage.id] = {"status": "not-run", "reason": pending}
        else:
            reason = f"not selected ({selection_text(only, skip)})"
            records[stage.id] = {"status": "disabled", "reason": reason, "command": stage.command}


def validate(plan: Plan, records: dict[str, dict]) -> tuple[dict, list[dict]]:
    """(report's `validation`, failed gates) from the stages' records; `deferred` lists the gates of
    stages deferred to a GPU builder, which are neither passed nor failed."""
    task_gates, task_scores = evaluate_task_gates(plan, records)
    gates = evaluate_accuracy_gates(plan, records) + task_gates
    throughput = throughput_results(plan, records)
    validation = {"accuracy": gates, "tasks": task_scores, "throughput": throughput,
                  "deferred": deferred_gates(plan, records)}  # fmt: skip
    return validation, failed_gates(gates, throughput)


def gate_counts(validation: dict) -> dict[str, int]:
    """Gates passed, failed and deferred (to a GPU builder: not measured, so never counted as passed)."""
    measured = [g["passed"] for g in validation["accuracy"]]
    measured += [g["passed"] for sweep in validation["throughput"] for g in sweep["gates"]]
    return {"passed": sum(measured), "failed": measured.count(False), "deferred": len(validation["deferred"])}


def refuse_deferred_pushes(plan: Plan, chosen: set[str]) -> None:
    """`forge push` / `--only push` of a push the plan deferred: refused before any work, instead of
    building a deferred engine or publishing unmeasured gates. Exit 1 when gates are deferred (the
    image has not passed them), 3 when only the image waits for GPU hardware."""
    refused = [s for s in plan.of_kind("push") if s.id in chosen and s.status == "deferred"]
    if not refused:
        return
    lines = "\n".join(f"  {s.id}: {s.reason}" for s in refused)
    message = f"push: refused, these pushes are deferred:\n{lines}"
    if any(s.inputs.deferred_gates for s in refused):
        raise GateFailed(message + "\n(--allow-deferred-gates or package.allow_deferred_gates: true pushes anyway)")
    raise InfraError(message)


def finite_json(value):
    """`value` with every NaN or infinite float replaced by None, so build.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def failed_gates(accuracy: list[dict], throughput: list[dict]) -> list[dict]:
    failed = [g for g in accuracy if not g["passed"]]
    for sweep in throughput:
        artifact = sweep["stage"].removeprefix("throughput/")
        failed += [{**g, "artifact": artifact} for g in sweep["gates"] if not g["passed"]]
    return failed


def matches(stage: Stage, selector: str) -> bool:
    return stage.kind == selector or stage.id == selector or stage.id.startswith(selector.rstrip("/") + "/")


def select_stages(plan: Plan, only: tuple[str, ...], skip: tuple[str, ...]) -> set[str]:
    """Stage ids to execute: the plan's runnable stages, or `only` and everything they need, less
    `skip`. Skipping a stage that a selected stage needs is an input error naming both."""
    for selector in (*only, *skip):
        if not any(matches(s, selector) for s in plan.stages):
            raise InputError(f"--only/--skip: {selector!r} names no stage of this plan (see `forge plan`)")
    by_id = {s.id: s for s in plan.stages}
    if only:
        chosen: set[str] = set()
        todo = [s.id for s in plan.stages if any(matches(s, sel) for sel in only)]
        while todo:
            stage = by_id[todo.pop()]
            if stage.id not in chosen:
                chosen.add(stage.id)
                todo += stage.needs
    else:
        chosen = {s.id for s in plan.stages if s.status in ("run", "cached")}
    skipped = {sid for sid in chosen if any(matches(by_id[sid], sel) for sel in skip)}
    chosen -= skipped
    for stage in plan.stages:  # plan order: the first stage left without its input is named
        missing = [need for need in stage.needs if need in skipped]
        if stage.id in chosen and missing:
            selector = next(sel for sel in skip if matches(by_id[missing[0]], sel))
            dependents = [s.id for s in plan.stages if s.id in chosen and missing[0] in s.needs]
            more = f" and {len(dependents) - 1} more" if len(dependents) > 1 else ""
            raise InputError(f"--skip {selector}: {missing[0]} is needed by {stage.id}{more}; skip those too, "
                             f"or select what to run with --only")  # fmt: skip
    return chosen


def selection_text(only: tuple[str, ...], skip: tuple[str, ...]) -> str:
    return " ".join([*(f"--only {o}" for o in only), *(f"--skip {s}" for s in skip)])


def check_hardware(plan: Plan, chosen: set[str], only: tuple[str, ...]) -> None:
    """`on_missing_hardware: fail` stops before any work when a wanted stage needs absent hardware."""
    missing = [s for s in plan.stages if s.status == "deferred" and (s.id in chosen or not only)]
    if plan.recipe.on_missing_hardware == "fail" and missing:
        lines = "\n".join(f"  {s.id}: {s.reason}" for s in missing)
        raise InfraError(f"on_missing_hardware: fail, and these stages need hardware that is absent:\n{lines}")


# ---------------------------------------------------------------- outputs


def materialize_artifacts(plan: Plan, entries: dict[str, Path], out_root: Path, listed: list[dict]) -> None:
    """`artifacts/<recipe>/<variant>/<backend>[-<mode>]/`: hard links into the (verified, read-only) cache
    entries, no copies; each artifact is appended to `listed` once its directory is in place, so
    a failure part-way reports exactly the ones written.

    Hard links rather than copies: a multi-GB checkpoint is not duplicated, and the entry's files
    are read-only, so an in-place edit of an artifact fails instead of editing the cache; one that
    gets through (root ignores file modes) is caught by the entry's manifest on the next build,
    which recomputes the entry and links the artifact afresh."""
    for artifact in plan.artifacts:
        if artifact.status != "planned" or artifact.export_stage not in entries:
            continue  # impossible, or its export left out by --only/--skip
        entry = entries[artifact.export_stage]
        target = out_root / artifact.variant / serving_name(artifact.backend, artifact.mode)
        link_tree(entry / "model", target)
        files = json.loads((entry / "stage.json").read_text())["files"]
        listed.append(
            {
                "variant": artifact.variant,
                "backend": artifact.backend,
                "mode": artifact.mode,
                "gpu": artifact.gpu,
                "format": artifact.format,
                "path": str(target),
                "files": files,
                "stages": artifact.stages,
            }
        )


def write_if_changed(path: Path, text: str) -> None:
    """`atomic_write_text`, unless `path` is a regular file that already holds exactly `text` (never
    read through a link): a rebuild of an unchanged recipe leaves its resolved recipe as it is,
    where rewriting it cost two fsyncs."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        with open(fd, "rb") as handle:
            same = stat.S_ISREG(os.fstat(fd).st_mode) and handle.read(len(data) + 1) == data
        if same:
            return
    atomic_write_text(path, text)


def link_tree(src: Path, dst: Path) -> None:
    """Replace `dst` with hard links to every file of `src` (copies across filesystems).

    Under a lock per directory, so concurrent builds of one recipe never interleave their swaps;
    leftovers of killed builds (`.<name>.*.tmp` / `.old`) are removed there too."""
    make_dirs(dst.parent)
    with lock_file(dst.with_name(f".{dst.name}.lock")):
        for stale in [*dst.parent.glob(f".{dst.name}.*.tmp"), *dst.parent.glob(f".{dst.name}.*.old")]:
            remove(stale)
        if same_files(src, dst):
            return
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        before = regular_files(src)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
        if os.path.lexists(dst):
            os.replace(dst, old)
        os.replace(tmp, dst)
        remove(old)
        # Each link gave a file of `src` a new ctime: the memo follows, or the next build re-reads them.
        keep_memoized(before, settled_clock(src, marker=dst.with_name(f".{dst.name}.{os.getpid()}.clock.tmp")))


def same_files(src: Path, dst: Path) -> bool:
    """`dst` already holds hard links to exactly `src`'s files."""
    if not dst.is_dir():
        return False
    ours = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
    return ours == theirs and all((src / f).stat().st_ino == (dst / f).stat().st_ino for f in ours)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def forge_commit() -> str:
    """The git commit of the forge code that ran, `+dirty` when its files differ from it; `unknown`
    for an installed wheel (its version says what it is). Figures are only comparable per commit."""
    package = Path(__file__).resolve().parent
    git = ["git", "-C", str(package)]
    try:
        tracked = subprocess.run([*git, "ls-files", "--error-unmatch", "build.py"], capture_output=True, timeout=10)
        if tracked.returncode:  # not a checkout of forge (e.g. site-packages inside some other repository)
            return "unknown"
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = git_revision(package)
    return commit + "+dirty" if commit != "unknown" and dirty.stdout.strip() else commit


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "forge": __version__, "forge_commit": forge_commit(),
                "cpu": cpu_description()}  # fmt: skip
    for name in TOOLS:
        try:
            versions[name] = installed_version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def installed_version(name: str) -> str:
    """`importlib.metadata.version(name)`, read from the metadata's headers alone: `version()` parses
    the whole file with the email package, and transformers' and torch's carry their READMEs (the
    seven lookups: ~6 ms of CPU, ~1 ms this way). The headers end at the first empty line
    (https://packaging.python.org/en/latest/specifications/core-metadata/); anything unusual
    falls back to `version()`'s own answer."""
    distribution = metadata.distribution(name)
    text = distribution.read_text("METADATA") or distribution.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if not line.strip():
            break
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "version" and value.strip():
            return value.strip()
    return distribution.version
