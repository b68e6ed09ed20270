"""The terminal's renderings of plans, build reports and load sweeps (the JSON forms are the source of
truth; `forge report` in `forge.report` renders build.json for CI)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from forge.eval.gates import gate_verdict
from forge.plan import Plan, serving_name
from forge.report import (
    ACCURACY_COLUMNS,
    accuracy_rows,
    build_error,
    build_time,
    gate_headline,
    report_gates,
    stage_note,
)

# Plan stages (run, cached, deferred), artifact cells (planned, pending, impossible), build stages.
STATUS_STYLE = {
    "run": "cyan",
    "ran": "green",
    "cached": "green",
    "deferred": "yellow",
    "impossible": "red",
    "disabled": "dim",
    "not-run": "dim",
    "failed": "red",
}


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _print_rows(console: Console, title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table in a terminal; elsewhere (a CI log, a pipe) one plain line per row, nothing cut or
    wrapped, so a stage id or a command can be copied whole and grep finds a stage on one line."""
    if console.is_terminal:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    plain = [[Text.from_markup(cell).plain for cell in row] for row in rows]
    widths = [max([len(column), *(len(row[i]) for row in plain)]) for i, column in enumerate(columns[:-1])]
    console.out(title, highlight=False)
    for row in [list(columns), *plain]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        console.out(line.rstrip(), highlight=False)


def render_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    rows = [(stage.id, _status(stage.status), stage.command or stage.reason) for stage in plan.stages]
    _print_rows(console, f"plan: {plan.recipe.name}", ("stage", "status", "why / command"), rows)
    render_cells(plan.recipe.name, plan.artifacts, console)
    if plan.shape_pinned:
        console.print(
            "model shape: from source.hub.config (the hub was not reached); the source stage checks it against "
            "the downloaded config.json"
        )


def render_cells(recipe_name: str, cells: list, console: Console | None = None) -> None:
    """The artifact matrix: one row per (variant, backend, GPU) with its format, status and why."""
    console = console or Console()
    rows = [(a.variant, serving_name(a.backend, a.mode), a.gpu, a.format or "-", _status(a.status), a.reason)
            for a in cells]  # fmt: skip
    title = f"artifacts of {recipe_name} (variant × backend × GPU)"
    _print_rows(console, title, ("variant", "backend", "gpu", "format", "status", "why"), rows)


def _verdict(gate: dict) -> str:
    verdict = gate_verdict(gate)
    return f"[green]{verdict}[/]" if gate.get("passed") else f"[red]{verdict}[/]"


def _figure(value) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.4g}"


def render_build(report: dict, report_path: Path, console: Console | None = None) -> None:
    console = console or Console()
    took = build_time(report)
    rows = []
    for stage in report["stages"]:
        seconds = f"{stage['seconds']:.1f}" if "seconds" in stage and stage["status"] == "ran" else ""
        rows.append((stage["id"], _status(stage.get("status", "?")), seconds, stage_note(stage)))
    _print_rows(console, f"build: {report['recipe']['name']} ({took})", ("stage", "status", "seconds", "note"), rows)
    if measured := accuracy_rows(report):  # the numbers, whether or not the recipe gates them
        table = Table(title="accuracy (measured on the exported weights)", title_justify="left")
        for column in ("artifact", *(label for _, label in ACCURACY_COLUMNS)):
            table.add_column(column)
        for artifact, *values in measured:
            table.add_row(artifact, *map(_figure, values))
        console.print(table)
    accuracy = report["validation"]["accuracy"]
    if accuracy:
        gates = Table(title="accuracy gates", title_justify="left")
        for column in ("artifact", "gate", "limit", "measured", "result"):
            gates.add_column(column)
        for g in accuracy:
            gates.add_row(g["artifact"], g["name"], _figure(g["limit"]), _figure(g["measured"]), _verdict(g))
        console.print(gates)
    for sweep in report["validation"].get("throughput", []):
        for g in sweep["gates"]:
            console.print(f"gate {g['name']} ({sweep['stage']} at {g.get('level')}): limit {_figure(g['limit'])}, "
                          f"measured {_figure(g['measured'])} {_verdict(g)}")  # fmt: skip
    render_timing(report, console)
    if gates := report_gates(report):
        console.print(f"gates: {gate_headline(gates)}")
    if stopped := build_error(report):
        console.print(f"[red]{stopped}[/]")
    console.print(f"report: {report_path}")


def render_timing(report: dict, console: Console) -> None:
    """Where this run's time went, slowest first: each stage with its share of the run, then the
    time spent outside stages. A stage's row says `cached` when it only found its entry."""
    timing, total = report.get("timing"), report.get("seconds")
    if not timing or not total:
        return
    rows = [
        (t["stage"], _status(t["status"]), f"{t['seconds']:.1f}", f"{100 * t['seconds'] / total:.0f} %")
        for t in sorted(timing["stages"], key=lambda t: -t["seconds"])
    ]
    outside = timing["outside_stages"]
    rows.append(("(planning, artifact directories, report)", "", f"{outside:.1f}", f"{100 * outside / total:.0f} %"))
    _print_rows(console, f"time: {total:.1f} s in this run", ("stage", "status", "seconds", "share"), rows)


def _ms(stats: dict) -> str:
    return "-" if stats.get("p50") is None else f"{stats['p50']:.0f} / {stats['p99']:.0f}"


def render_sweep(summary: dict, console: Console | None = None) -> None:
    """One row per load level: throughput and p50 / p99 latencies (ms)."""
    console = console or Console()
    table = Table(title=f"load sweep: {summary['model']} ({summary['endpoint']})", title_justify="left")
    for column in ("level", "ok/err", "req/s", "out tok/s", "TTFT p50/p99", "TPOT p50/p99", "E2E p50/p99"):
        table.add_column(column, justify="right")
    for level in summary["levels"]:
        table.add_row(
            level["label"], f"{level['completed']}/{level['errors']}", f"{level['request_throughput_rps']:.2f}",
            f"{level['output_tok_s']:.1f}", _ms(level["ttft_ms"]), _ms(level["tpot_ms"]), _ms(level["e2el_ms"]),
        )  # fmt: skip
    console.print(table)
    for gate in summary["gates"]:
        console.print(f"gate {gate['name']}: limit {_figure(gate['limit'])}, measured {_figure(gate['measured'])} "
                      f"{_verdict(gate)}")  # fmt: skip
    if summary.get("cost"):
        cost = summary["cost"]
        console.print(f"cost: ${cost['usd_per_million_output_tokens']:.2f} per 1M output tokens at {cost['level']}")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
