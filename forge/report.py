"""`forge report`: a build report (`build.json`) as CI reads it, a Markdown job summary and JUnit XML.

CI systems already know how to show these two: GitHub renders Markdown appended to
`$GITHUB_STEP_SUMMARY` on the run page, and GitLab, Jenkins and most test-report actions read
JUnit XML. Both are pure functions of the report dict, so they work on a report copied from
another runner, and they tolerate sections a report does not have (a build without accuracy
validation, throughput or images, or an older report). The report's shape is `forge.build_report`;
gates are worded by `forge.eval.gates`, the one formatter every report uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from forge.eval.gates import gate_failure, gate_verdict

PASS = "✅ pass"
FAIL = "❌ FAIL"
DEFERRED = "⏸ deferred to a GPU builder"

# Stage statuses that mean "nothing ran here": JUnit `<skipped>` with the reason.
SKIPPED_STATUSES = ("deferred", "disabled", "not-run")
# Measured accuracy of each export, shown whether or not the recipe gates it: (stage fact, column).
ACCURACY_COLUMNS = (
    ("perplexity", "perplexity"),
    ("baseline_perplexity", "baseline"),
    ("ppl_increase_pct", "Δ ppl %"),
    ("top1_agreement", "top-1 agreement"),
    ("mean_kl", "mean KL"),
)


# ---------------------------------------------------------------- reading the report


def report_gates(report: dict) -> list[dict]:
    """Every gate of the report in one shape: suite, artifact, name, metric, limit, measured, passed,
    state (passed / failed / deferred).

    Accuracy gates come from `validation.accuracy` (forge/build.py); throughput gates from each
    sweep in `validation.throughput` (forge/loadgen: `gates` with `level`), when present; gates of
    stages deferred to a GPU builder from `validation.deferred` (never passed: not measured).
    """
    validation = report.get("validation")
    validation = validation if isinstance(validation, dict) else {}  # reports from registries are untrusted
    gates = []
    for g in _dicts(validation.get("accuracy")):
        gates.append({"suite": "accuracy", **_gate(g, g.get("artifact", "?"))})
    for sweep in _sweeps(validation.get("throughput")):
        for g in _dicts(sweep.get("gates")):
            gates.append({"suite": "throughput", **_gate(g, _artifact_name(sweep))})
    for g in _dicts(validation.get("deferred")):
        gate = {**_gate(g, g.get("artifact", "?")), "passed": False, "state": "deferred"}
        gates.append({"suite": str(g.get("suite", "gpu")), **gate, "command": g.get("command")})
    return gates


def _dicts(items) -> list[dict]:
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def gate_headline(gates: list[dict]) -> str:
    """`17 passed, 18 deferred to a GPU builder`: deferred gates are their own count, never passes."""
    counts = {state: sum(g["state"] == state for g in gates) for state in ("passed", "failed", "deferred")}
    parts = [f"{counts['passed']} passed"] + [f"{counts['failed']} failed"] * bool(counts["failed"])
    return ", ".join(parts + [f"{counts['deferred']} deferred to a GPU builder"] * bool(counts["deferred"]))


def _gate(g: dict, artifact: str) -> dict:
    name = str(g.get("name", "?"))
    return {
        "artifact": artifact,
        "name": name,
        "metric": g.get("metric"),
        "limit": g.get("limit"),
        "measured": g.get("measured"),
        "margin": g.get("margin"),
        "passed": bool(g.get("passed")),
        "state": "passed" if g.get("passed") else "failed",
        "reason": g.get("reason"),
        "level": g.get("level"),
    }


def _sweeps(throughput) -> list[dict]:
    """`validation.throughput` as a list of sweeps, whether stored as a list or keyed by artifact."""
    if not throughput:
        return []
    if isinstance(throughput, dict):
        if "levels" in throughput or "gates" in throughput:
            return [throughput]
        return [{"artifact": key, **value} for key, value in throughput.items() if isinstance(value, dict)]
    return [s for s in throughput if isinstance(s, dict)]


def _artifact_name(entry: dict) -> str:
    if entry.get("artifact"):
        return str(entry["artifact"])
    parts = [entry.get(k) for k in ("variant", "backend", "gpu") if entry.get(k)]
    return "/".join(map(str, parts)) or str(entry.get("model") or entry.get("endpoint") or "?")


def stage_note(stage: dict) -> str:
    """What to say beside a stage: its error, the command to run it later, why it did not run,
    or that its cached entry failed verification and was recomputed."""
    if stage.get("status") == "failed":
        return f"failed: {stage.get('error') or 'no message'}"
    if stage.get("discarded_entry"):
        return f"recomputed: the cached entry failed verification ({stage['discarded_entry']})"
    return stage.get("command") or stage.get("reason") or ""


def build_error(report: dict) -> str | None:
    """One line for a build that stopped on an error (`status: error`), else None."""
    error = report.get("error")
    if report.get("status") != "error" or not isinstance(error, dict):
        return None
    return f"build stopped at {error.get('stage', '?')}: {error.get('type', 'error')}: {error.get('message', '')}"


def _images(report: dict) -> list[dict]:
    images = report.get("images")
    if images is None:
        images = (report.get("package") or {}).get("images")
    if isinstance(images, dict):
        images = [{"artifact": key, **value} for key, value in images.items() if isinstance(value, dict)]
    return [i for i in images or [] if isinstance(i, dict)]


# ---------------------------------------------------------------- Markdown


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _cell(value) -> str:
    """A table cell: pipes escaped and newlines as <br> so one value never breaks the table."""
    text = value if isinstance(value, str) else _number(value)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _verdict(gate: dict) -> str:
    """The one gate verdict (`forge.eval.gates.gate_verdict`) with its mark."""
    if gate["state"] == "deferred":
        return DEFERRED
    return PASS if gate["passed"] else f"❌ {gate_verdict(gate)}"


def accuracy_rows(report: dict) -> list[list]:
    """Per accuracy stage that measured: artifact and the measured numbers (`ACCURACY_COLUMNS`)."""
    rows = []
    for s in report.get("stages") or []:
        if isinstance(s, dict) and s.get("kind") == "accuracy" and s.get("status") in ("ran", "cached"):
            artifact = str(s.get("id", "?")).removeprefix("accuracy/")
            rows.append([artifact, *(s.get(key) for key, _ in ACCURACY_COLUMNS)])
    return rows


def build_time(report: dict) -> str:
    """The build's own time: the seconds its stages took when computed (a cached stage's from when it
    ran), beside this run's wall time when stages came from the cache, so a cached rerun's 2 s is not
    read as what the build takes."""
    seconds = report.get("seconds")
    stages = [s for s in report.get("stages") or [] if isinstance(s, dict) and s.get("status") in ("ran", "cached")]
    cached = sum(s["status"] == "cached" for s in stages)
    if not cached:
        return "" if seconds is None else f"{_number(seconds, 3)} s"
    total = sum(s["seconds"] for s in stages if isinstance(s.get("seconds"), int | float))
    this_run = "" if seconds is None else f"; this run {_number(seconds, 3)} s"
    return f"built in {_number(total, 3)} s{this_run}, {cached} of {len(stages)} stages cached"


def render_markdown_summary(report: dict) -> str:
    """Markdown for `$GITHUB_STEP_SUMMARY`: verdict, artifacts, gates, throughput, images, stages.

    GitHub renders GitHub-flavoured Markdown appended to that file on the run's summary page (at
    most 1 MiB per step):
    https://docs.github.com/en/actions/writing-workflows/choosing-what-your-workflow-does/workflow-commands-for-github-actions#adding-a-job-summary
    """
    recipe = report.get("recipe") or {}
    name = recipe.get("name") if isinstance(recipe, dict) else str(recipe)
    gates = report_gates(report)
    failed = [g for g in gates if g["state"] == "failed"]
    deferred = [g for g in gates if g["state"] == "deferred"]
    out = [f"## forge build: {name or '?'}\n"]
    facts = []
    if report.get("forge_version"):
        facts.append(f"forge {report['forge_version']}")
    if took := build_time(report):
        facts.append(took)
    if gates:
        facts.append(f"gates: {gate_headline(gates)}")
    if facts:
        out.append(" · ".join(facts) + "\n")
    if stopped := build_error(report):
        out.append(f"**{FAIL}: {_cell(stopped)}**\n")
    if failed:
        out.append(f"**{len(failed)} gate(s) failed**: " + ", ".join(f"`{g['artifact']}` {g['name']}" for g in failed))
        out.append("")

    artifacts = report.get("artifacts") or []
    if artifacts:
        rows = []
        for a in artifacts:
            files = a.get("files") or {}
            size = sum(f.get("bytes", 0) for f in files.values() if isinstance(f, dict)) if files else None
            rows.append(
                [
                    a.get("variant"),
                    a.get("backend"),
                    a.get("gpu"),
                    a.get("format") or "—",
                    len(files),
                    _bytes(size),
                    f"`{a['path']}`" if a.get("path") else "—",
                ]
            )
        out.append("### Artifacts\n")
        out.append(_table(["variant", "backend", "GPU", "format", "files", "size", "path"], rows))
    impossible = report.get("impossible") or []
    if impossible:
        out.append("### Impossible combinations (not built)\n")
        rows = [[i.get("variant"), i.get("backend"), i.get("gpu"), i.get("reason", "")] for i in impossible]
        out.append(_table(["variant", "backend", "GPU", "why"], rows))

    if deferred:
        out.append("### Gates deferred to a GPU builder (not measured)\n")
        rows = [[g["artifact"], g["name"], g["metric"] or "—", g["limit"], f"`{g['command']}`" if g.get("command")
                 else g.get("reason") or "—"] for g in deferred]  # fmt: skip
        out.append(_table(["artifact", "gate", "metric", "limit", "command to measure it"], rows))

    measured = accuracy_rows(report)
    if measured:
        out.append("### Accuracy (measured on the exported weights)\n")
        out.append(_table(["artifact", *(label for _, label in ACCURACY_COLUMNS)], measured))

    accuracy = [g for g in gates if g["suite"] == "accuracy"]
    if accuracy:
        out.append("### Accuracy gates\n")
        rows = [
            [
                g["artifact"],
                g["name"],
                g["metric"] or "—",
                g["limit"],
                g["measured"],
                g["margin"],
                _verdict(g),
            ]
            for g in accuracy
        ]
        out.append(_table(["artifact", "gate", "metric", "limit", "measured", "margin", "result"], rows))

    tasks = [run for run in (report.get("validation") or {}).get("tasks") or [] if isinstance(run, dict)]
    if tasks:
        out.append("### Task scores (lm-eval)\n")
        rows = []
        for run in tasks:
            recovery = run.get("recovery") or {}
            for task, metrics in (run.get("scores") or {}).items():
                for metric, score in metrics.items():
                    rows.append([run.get("variant") or "baseline", task, metric, score,
                                 recovery.get(f"recovery.{task}.{metric}")])  # fmt: skip
        out.append(_table(["model", "task", "metric", "score", "recovery"], rows))

    sweeps = _sweeps((report.get("validation") or {}).get("throughput"))
    if sweeps:
        out.append(render_throughput(sweeps))

    images = _images(report)
    if images:
        out.append("### Images\n")
        preferred = ["artifact", "variant", "backend", "gpu", "reference", "tag", "digest", "bytes", "pushed"]
        present = [k for k in preferred if any(k in i for i in images)]
        present += sorted({k for i in images for k, v in i.items() if k not in present and _scalar(v)})
        rows = [[_bytes(i.get(k)) if k == "bytes" else i.get(k, "—") for k in present] for i in images]
        out.append(_table(present, rows))

    stages = report.get("stages") or []
    if stages:
        out.append("### Stages\n")
        rows = []
        for s in stages:
            status = s.get("status", "—")
            seconds = s.get("seconds") if status == "ran" else None
            seconds = f"{seconds:.2f}" if isinstance(seconds, int | float) else seconds
            note = stage_note(s)
            rows.append([f"`{s.get('id', '?')}`", status, seconds, f"`{note}`" if s.get("command") else note])
        out.append(_table(["stage", "status", "seconds", "note / command to run it"], rows))
    return "\n".join(out)


def _scalar(value) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def render_throughput(sweeps: list[dict]) -> str:
    """Per artifact: each load level's throughput and p99 latencies, its gates, and the cost."""
    out = ["### Throughput\n"]
    rows = []
    for sweep in sweeps:
        for level in sweep.get("levels") or []:
            ttft = (level.get("ttft_ms") or {}).get("p99")
            tpot = (level.get("tpot_ms") or {}).get("p99")
            rows.append(
                [
                    _artifact_name(sweep),
                    level.get("label", "—"),
                    level.get("request_throughput_rps"),
                    level.get("output_tok_s"),
                    ttft,
                    tpot,
                    level.get("goodput_rps"),
                    level.get("errors", 0),
                ]
            )
    if rows:
        header = [
            "artifact",
            "level",
            "req/s",
            "output tok/s",
            "TTFT p99 ms",
            "TPOT p99 ms",
            "goodput req/s",
            "errors",
        ]
        out.append(_table(header, rows))
    gates = [{"suite": "throughput", **_gate(g, _artifact_name(s))} for s in sweeps for g in s.get("gates") or []]
    if gates:
        out.append("#### Throughput gates\n")
        out.append(
            _table(
                ["artifact", "gate", "at level", "limit", "measured", "result"],
                [[g["artifact"], g["name"], g["level"] or "—", g["limit"], g["measured"], _verdict(g)] for g in gates],
            )
        )
    costs = [(s, s["cost"]) for s in sweeps if isinstance(s.get("cost"), dict)]
    if costs:
        out.append("#### Cost\n")
        rows = [
            [
                _artifact_name(s),
                c.get("level", "—"),
                c.get("gpus"),
                c.get("usd_per_gpu_hour"),
                c.get("output_tok_s"),
                c.get("usd_per_million_output_tokens"),
            ]
            for s, c in costs
        ]
        out.append(
            _table(
                [
                    "artifact",
                    "priced at level",
                    "GPUs",
                    "USD/GPU-hour",
                    "output tok/s",
                    "USD per 1M output tokens",
                ],
                rows,
            )
        )
    plots = [(s, p) for s in sweeps for p in (s.get("files") or {}).values() if str(p).endswith((".png", ".svg"))]
    if plots:
        out.append("Plots: " + ", ".join(f"`{p}`" for _, p in plots) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------- JUnit XML


def render_junit(report: dict) -> str:
    """JUnit XML: one testcase per gate (`<failure>` says measured vs limit) and one `<skipped>`
    testcase per deferred / disabled / not-run stage (the reason, and the command to run
    it later when the plan has one).

    Elements and attributes follow the JUnit schema most CI readers accept
    (https://github.com/windyroad/JUnit-Schema, used by GitLab's unit test reports:
    https://docs.gitlab.com/ci/testing/unit_test_reports/).
    """
    import xml.etree.ElementTree as ET  # only here: the terminal's rendering of every build needs none of it

    recipe = report.get("recipe") or {}
    name = recipe.get("name") if isinstance(recipe, dict) else str(recipe)
    root = ET.Element("testsuites", name=f"forge {name or '?'}")
    suites: dict[str, list[ET.Element]] = {}

    for g in report_gates(report):
        case = ET.Element("testcase", classname=f"forge.{g['suite']}.{g['artifact']}", name=_case_name(g), time="0")
        if g["state"] == "deferred":  # not measured: skipped, with what would measure it
            skipped = ET.SubElement(case, "skipped", message=f"deferred to a GPU builder: {g.get('reason') or ''}")
            skipped.text = f"run later with: {g.get('command')}"
        elif not g["passed"]:
            message = gate_failure(g)
            failure = ET.SubElement(case, "failure", message=message, type="GateFailed")
            failure.text = message
        suites.setdefault(f"forge.{g['suite']}", []).append(case)

    stages = [s for s in report.get("stages") or [] if isinstance(s, dict)]
    for s in stages:
        if s.get("status") not in (*SKIPPED_STATUSES, "failed"):
            continue
        case = ET.Element(
            "testcase", classname=f"forge.stages.{s.get('kind', 'stage')}", name=str(s.get("id")), time="0"
        )
        if s["status"] == "failed":
            ET.SubElement(case, "error", message=stage_note(s), type="StageFailed").text = stage_note(s)
        else:
            reason = f"{s['status']}: {s.get('reason') or 'no reason given'}"
            skipped = ET.SubElement(case, "skipped", message=reason)
            if s.get("command"):
                skipped.text = f"run later with: {s['command']}"
        suites.setdefault("forge.stages", []).append(case)
    stopped, error = build_error(report), report.get("error") or {}
    if stopped and not any(s.get("id") == error.get("stage") and s.get("status") == "failed" for s in stages):
        case = ET.Element("testcase", classname="forge.build", name=str(error.get("stage", "build")), time="0")
        ET.SubElement(case, "error", message=stopped, type=str(error.get("type", "Error"))).text = stopped
        suites.setdefault("forge.build", []).append(case)

    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite_name, cases in suites.items():
        counts = {
            "tests": len(cases),
            "failures": sum(c.find("failure") is not None for c in cases),
            "errors": sum(c.find("error") is not None for c in cases),
            "skipped": sum(c.find("skipped") is not None for c in cases),
        }
        suite = ET.SubElement(root, "testsuite", name=suite_name, time="0", **{k: str(v) for k, v in counts.items()})
        suite.extend(cases)
        for key, value in counts.items():
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", _number(report.get("seconds") or 0, 6))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _case_name(g: dict) -> str:
    # One gate can cover several metrics (min_recovery covers every task), so the metric names the case.
    if g["metric"] and g["suite"] in ("accuracy", "tasks"):
        return f"{g['name']} [{g['metric']}]"
    return g["name"]
