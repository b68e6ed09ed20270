"""Human renderings of plans and build reports (the JSON forms are the source of truth)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from forge.plan import Plan
from forge.summary import build_error, stage_note

STATUS_STYLE = {
    "run": "cyan",
    "ran": "green",
    "cached": "green",
    "deferred": "yellow",
    "not-implemented": "magenta",
    "impossible": "red",
    "disabled": "dim",
    "not-run": "dim",
    "failed": "red",
}


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def render_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    stages = Table(title=f"plan: {plan.recipe.name}", title_justify="left")
    for column in ("stage", "status", "why / command"):
        stages.add_column(column)
    for stage in plan.stages:
        stages.add_row(stage.id, _status(stage.status), stage.command or stage.reason)
    console.print(stages)
    render_cells(plan.recipe.name, plan.artifacts, console)
    if plan.shape_pinned:
        console.print(
            "model shape: from source.hub.config (the hub was not reached); the source stage checks it against "
            "the downloaded config.json"
        )


def render_cells(recipe_name: str, cells: list, console: Console | None = None) -> None:
    """The artifact matrix: one row per (variant, backend, GPU) with its format, status and why."""
    console = console or Console()
    matrix = Table(title=f"artifacts of {recipe_name} (variant × backend × GPU)", title_justify="left")
    for column in ("variant", "backend", "gpu", "format", "status", "why"):
        matrix.add_column(column)
    for a in cells:
        matrix.add_row(a.variant, a.backend, a.gpu, a.format or "-", _status(a.status), a.reason)
    console.print(matrix)


def render_build(report: dict, report_path: Path, console: Console | None = None) -> None:
    console = console or Console()
    stages = Table(title=f"build: {report['recipe']['name']} ({report['seconds']:.1f} s)", title_justify="left")
    for column in ("stage", "status", "seconds", "note"):
        stages.add_column(column)
    for stage in report["stages"]:
        seconds = f"{stage['seconds']:.1f}" if "seconds" in stage and stage["status"] == "ran" else ""
        note = stage_note(stage)
        stages.add_row(stage["id"], _status(stage.get("status", "?")), seconds, note)
    console.print(stages)
    accuracy = report["validation"]["accuracy"]
    if accuracy:
        gates = Table(title="accuracy gates", title_justify="left")
        for column in ("artifact", "gate", "limit", "measured", "result"):
            gates.add_column(column)
        for g in accuracy:
            verdict = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
            gates.add_row(g["artifact"], g["name"], f"{g['limit']:g}", f"{g['measured']:.4g}", verdict)
        console.print(gates)
    if stopped := build_error(report):
        console.print(f"[red]{stopped}[/]")
    console.print(f"report: {report_path}")


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
        verdict = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        measured = "n/a" if gate["measured"] is None else f"{gate['measured']:.4g}"
        console.print(f"gate {gate['name']}: limit {gate['limit']:g}, measured {measured} {verdict}")
    if summary.get("cost"):
        cost = summary["cost"]
        console.print(f"cost: ${cost['usd_per_million_output_tokens']:.2f} per 1M output tokens at {cost['level']}")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
