"""The `forge` command line: each command is a thin call into the library.

Exit codes: 0 success, 1 a validation gate failed, 2 bad input (recipe, arguments),
3 infrastructure (network, registry, server, missing tool), 4 internal error (a bug in forge).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from forge.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, ForgeError, GateFailed, InfraError, InputError
from forge.loadgen.workload import (
    FLAVORS,
    MAX_CONCURRENCY,
    MAX_LEVELS,
    MAX_OUTPUT_TOKENS,
    MAX_PROMPT_TOKENS,
    MAX_PROMPT_TOKENS_TOTAL,
    MAX_REQUESTS,
)

RECIPE = click.argument("recipe", type=click.Path(path_type=Path))
JSON = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout.")
ARTIFACTS = click.option(
    "--artifacts-dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
    help="Where build outputs and reports go.",
)  # fmt: skip
CACHE = click.option(
    "--cache-dir", type=click.Path(path_type=Path), envvar="FORGE_CACHE_DIR", default=None,
    help="Stage cache directory [default: <artifacts-dir>/.cache; env FORGE_CACHE_DIR].",
)  # fmt: skip


def handle_errors(command):
    """Turn forge's known errors into one clear message on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GateFailed as error:
            if kwargs.get("as_json") and error.result is not None:
                click.echo(json.dumps(error.result.report, indent=2))
            click.secho(f"forge: {terminal_safe(str(error))}", fg="red", err=True)
            sys.exit(error.exit_code)
        except ForgeError as error:
            click.secho(f"forge: {terminal_safe(str(error))}", fg="red", err=True)
            sys.exit(error.exit_code)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as error:  # a bug: keep exit 1 for gates, say where the traceback went
            path = write_crash_report()
            click.secho(f"forge: internal error: {type(error).__name__}: {terminal_safe(str(error))}", fg="red",
                        err=True)  # fmt: skip
            click.secho(f"forge: this is a bug in forge; traceback written to {path}", fg="red", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


def terminal_safe(text: str) -> str:
    """`text` with control characters other than newline and tab escaped (`\\x1b`): a recipe path or a
    registry's error body can carry escape sequences that would rewrite the user's terminal."""
    return "".join(
        c if c in "\n\t" or (c.isprintable() and not 0x80 <= ord(c) <= 0x9F) else repr(c)[1:-1] for c in text
    )


def write_crash_report() -> Path:
    """Write the current exception's traceback to a file (never to the terminal) and return its path."""
    directory = Path(os.environ.get("FORGE_CRASH_DIR") or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"forge-crash-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".txt", dir=directory)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"forge {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exc(file=handle)
    return Path(name)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forge")
def main() -> None:
    """forge turns one YAML recipe into quantized, validated, packaged LLM serving artifacts.

    \b
    Typical flow:
      forge validate recipes/smollm2-135m.yaml   # check the recipe, nothing runs
      forge plan recipes/smollm2-135m.yaml       # what would run, what is cached or impossible
      forge build recipes/smollm2-135m.yaml      # run it; report in artifacts/<name>/build.json

    Exit codes: 0 ok, 1 a validation gate failed, 2 bad input, 3 infrastructure, 4 internal error.
    """


@main.command()
@RECIPE
@handle_errors
def validate(recipe: Path) -> None:
    """Check a recipe against the schema (no model access). Exit 2 with every problem listed."""
    from forge.recipe import load_recipe

    loaded = load_recipe(recipe)
    click.echo(f"{recipe}: ok ({len(loaded.variants)} variants, {len(loaded.targets)} targets)")


@main.command()
@RECIPE
@JSON
@ARTIFACTS
@CACHE
@click.option(
    "--format", "fmt", type=click.Choice(["github-matrix", "gitlab", "k8s"]), default=None,
    help="Emit CI jobs for the GPU stages instead: a GitHub Actions matrix (JSON), a GitLab child "
    "pipeline, or Kubernetes Jobs (YAML). Impossible cells are listed beside the jobs.",
)  # fmt: skip
@click.option(
    "--image", default=None, help="forge container image the CI/Kubernetes jobs run [default: forge:<version>]."
)
@click.option(
    "--cache-claim", default="forge-cache", show_default=True, help="k8s: PVC holding the shared stage cache."
)
@click.option("--workdir", default="/forge/workspace", show_default=True, help="k8s: checkout path in the job's pod.")
@handle_errors
def plan(
    recipe: Path, as_json: bool, artifacts_dir: Path, cache_dir: Path | None, fmt: str | None,
    image: str | None, cache_claim: str, workdir: str,
) -> None:  # fmt: skip
    """Expand a recipe into its build graph: one artifact per (variant, backend, GPU).

    Each stage is marked run, cached or deferred (needs absent hardware; the command to run later
    is shown); each artifact planned or impossible (and why). The compatibility of scheme × backend × GPU
    × model shape is checked here, before anything is downloaded.
    """
    from forge.cache import Cache
    from forge.console import render_plan
    from forge.plan import make_plan
    from forge.recipe import load_recipe

    if fmt and as_json:
        raise InputError("--format and --json: choose one")
    from forge.source import ConfigUnavailable

    loaded = load_recipe(recipe)
    try:
        result = make_plan(loaded, recipe.parent.resolve(), Cache(cache_dir or artifacts_dir / ".cache"), str(recipe))
    except ConfigUnavailable as error:
        if fmt:  # CI jobs need the whole plan
            raise
        from dataclasses import asdict

        from forge.plan import SHAPE_CHECKS, recipe_only_cells

        cells = recipe_only_cells(loaded)
        if as_json:
            click.echo(json.dumps({"recipe": loaded.name, "complete": False, "reason": str(error),
                                   "waiting_for_config": list(SHAPE_CHECKS),
                                   "artifacts": [asdict(c) for c in cells]}, indent=2))  # fmt: skip
        else:
            from forge.console import render_cells

            render_cells(loaded.name, cells)
            click.echo(f"waiting for config.json: {', '.join(SHAPE_CHECKS)}")
            click.secho(f"forge: plan incomplete: {error}", fg="yellow", err=True)
        return
    if fmt:
        from forge.ci import DEFAULT_IMAGE, render_matrix

        text = render_matrix(result, fmt, str(recipe), image=image or DEFAULT_IMAGE, cache_claim=cache_claim,
                             workdir=workdir)  # fmt: skip
        click.echo(text, nl=False)
    elif as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render_plan(result)


@main.command()
@RECIPE
@JSON
@ARTIFACTS
@CACHE
@click.option(
    "--only", multiple=True, metavar="STAGE",
    help="Run only these stages (an id like engine/fp8/trtllm-engine/H100, a prefix, or a kind like engine) and "
    "what they need, taken from the cache when present. Runs deferred stages: use it on a GPU builder.",
)  # fmt: skip
@click.option("--skip", multiple=True, metavar="STAGE", help="Do not run these stages (id, prefix or kind).")
@handle_errors
def build(
    recipe: Path, as_json: bool, artifacts_dir: Path, cache_dir: Path | None, only: tuple[str, ...],
    skip: tuple[str, ...],
) -> None:  # fmt: skip
    """Build every artifact of a recipe, validate it against the recipe's gates, write build.json.

    Stages are cached by the digest of their inputs, so a rebuild of an unchanged recipe does no
    work and a change to a later stage reuses the earlier ones. Exit 1 when a gate fails (the
    report is still written).
    """
    from forge.build import build as run_build
    from forge.console import render_build
    from forge.progress import Progress

    result = run_build(
        recipe, artifacts_dir=artifacts_dir, cache_dir=cache_dir, only=only, skip=skip,
        progress=Progress(enabled=not as_json),
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    else:
        render_build(result.report, result.report_path)


@main.command()
@click.option("--check", is_flag=True, help="Exit 2 if the committed schema file is stale.")
@handle_errors
def schema(check: bool) -> None:
    """Print the recipe's JSON Schema (for editors and CI linting of recipes)."""
    from forge.recipe import SCHEMA_PATH, schema_text

    text = schema_text()
    if check:
        if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text() != text:
            click.secho(f"forge: {SCHEMA_PATH} is stale; regenerate with `forge schema > {SCHEMA_PATH}`", err=True)
            sys.exit(EXIT_BAD_INPUT)
        click.echo(f"{SCHEMA_PATH}: current")
        return
    click.echo(text, nl=False)


@main.command()
@click.argument("report", type=click.Path(path_type=Path))
@click.option("--markdown", "fmt", flag_value="markdown", help="A Markdown summary (e.g. for $GITHUB_STEP_SUMMARY).")
@click.option("--junit", "fmt", flag_value="junit", help="JUnit XML: one test case per gate, skipped stages.")
@handle_errors
def report(report: Path, fmt: str | None) -> None:
    """Render a build report (artifacts/<name>/build.json) for CI: Markdown or JUnit XML."""
    from forge.report import render_junit, render_markdown_summary

    if fmt is None:
        raise InputError("report: choose --markdown or --junit")
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"report: cannot read {report}: {error}") from None
    try:
        text = render_markdown_summary(data) if fmt == "markdown" else render_junit(data)
    except (TypeError, AttributeError, KeyError, ValueError):
        raise InputError(f"report: {report} is not a forge build report (artifacts/<name>/build.json)") from None
    click.echo(text, nl=False)


@main.command()
@JSON
@handle_errors
def gpus(as_json: bool) -> None:
    """List the GPU profiles forge knows (compute capability, memory, FP8/FP4, $/hour) and the
    NVIDIA GPUs detected on this machine."""
    from forge.gpus import gpu_listing

    listing = gpu_listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for p in listing["profiles"]:
        flags = " ".join(f for f in ("fp8", "fp4") if p[f])
        click.echo(
            f"{p['name']:<10} {p['sm']:<7} {p['memory_gib']:>4} GiB  ${p['usd_per_hour']:5.2f}/h  {flags}".rstrip()
        )
    detected = ", ".join(f"{g['name']} ({g['sm']}, profile {g['profile']})" for g in listing["local"])
    click.echo(f"local: {detected or listing['local_reason']}")


def _concurrency_levels(ctx, param, value: str) -> list[int]:
    """`--concurrency 1,4,16`: distinct closed-loop levels within the load generator's bounds."""
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not 1 <= len(levels) <= MAX_LEVELS:
        raise click.BadParameter(f"give 1 to {MAX_LEVELS} levels, got {len(levels)}")
    if bad := [n for n in levels if not 1 <= n <= MAX_CONCURRENCY]:
        raise click.BadParameter(f"each level must be in 1..{MAX_CONCURRENCY}, got {bad[0]}")
    if len(set(levels)) != len(levels):
        raise click.BadParameter(f"{value!r} repeats a level")
    return levels


def _request_rates(ctx, param, value: str | None) -> list[float] | None:
    """`--request-rate 2,4,8`: distinct open-loop arrival rates (requests/s), finite and > 0."""
    if value is None:
        return None
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not 1 <= len(rates) <= MAX_LEVELS:
        raise click.BadParameter(f"give 1 to {MAX_LEVELS} rates, got {len(rates)}")
    if bad := [r for r in rates if not (r > 0 and math.isfinite(r))]:
        raise click.BadParameter(f"each rate must be a finite number > 0, got {bad[0]}")
    if len(set(rates)) != len(rates):
        raise click.BadParameter(f"{value!r} repeats a rate")
    return rates


def _finite(ctx, param, value: float | None) -> float | None:
    """click's FloatRange lets `nan` through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _endpoint(ctx, param, value: str) -> str:
    from forge.loadgen.client import Endpoint

    try:
        Endpoint.parse(value)
    except InputError as error:
        raise click.BadParameter(str(error).removeprefix("endpoint: ")) from None
    return value


# run_sweep names its arguments in messages; `forge bench` users know the options.
_BENCH_OPTIONS = {
    "endpoint": "--endpoint",
    "tokenizer_dir": "--tokenizer",
    "api": "--api",
    "flavor": "--flavor",
    "prompt_tokens": "--prompt-tokens",
    "output_tokens": "--output-tokens",
    "requests_per_level": "--requests",
    "levels": "--concurrency",
    "out_dir": "--out",
    "dataset": "--dataset",
}
_POSITIVE = click.FloatRange(min=0, min_open=True)
# The gate options are the recipe's gate names (validation.throughput.*); these older spellings stay
# accepted, hidden, so scripts keep working.
_GATE_ALIAS_NAMES = {"max_ttft_p99_ms": "--ttft-p99-ms", "max_tpot_p99_ms": "--tpot-p99-ms",
                     "min_output_tps": "--min-output-tok-s"}  # fmt: skip


def _deprecated_gate(ctx, param, value: float | None) -> float | None:
    value = _finite(ctx, param, value)
    if value is not None:
        new = next(n for n, old in _GATE_ALIAS_NAMES.items() if old == param.opts[0])
        click.echo(f"forge: {param.opts[0]} is deprecated; use --{new.replace('_', '-')}", err=True)
    return value


def _gate_aliases(command):
    for old in _GATE_ALIAS_NAMES.values():
        command = click.option(old, type=_POSITIVE, default=None, hidden=True, callback=_deprecated_gate)(command)
    return command


_SECONDS = click.FloatRange(min=0, min_open=True, max=7 * 24 * 3600)


@main.command()
@click.option("--endpoint", required=True, callback=_endpoint,
              help="Base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000.")  # fmt: skip
@click.option("--model", required=True, help="Model name the server expects in requests.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Tokenizer directory for exact prompt lengths [default: --model if a directory].")  # fmt: skip
@click.option("--api", type=click.Choice(["completions", "chat"]), default="completions", show_default=True)
@click.option("--flavor", type=click.Choice(["auto", *FLAVORS]), default="auto", show_default=True,
              help="How to ask for a fixed output length: vllm (min_tokens + ignore_eos), openai (ignore_eos), "
              "transformers (generation_config), none (max_tokens only). auto: the first of these the server "
              "accepts, asked with one one-token request each (transformers serve refuses ignore_eos).")  # fmt: skip
@click.option(
    "--concurrency", default="1,4,16", show_default=True, callback=_concurrency_levels,
    help=f"Closed-loop concurrencies: distinct, each 1..{MAX_CONCURRENCY}, at most {MAX_LEVELS} levels.",
)  # fmt: skip
@click.option("--request-rate", "request_rates", default=None, callback=_request_rates, metavar="RATES",
              help="Open loop instead: arrival rates in requests/s, e.g. 2,4,8 (vLLM's --request-rate), "
              "each level capped at the largest --concurrency in flight.")  # fmt: skip
@click.option(
    "--burstiness",
    type=_POSITIVE,
    default=1.0,
    show_default=True,
    callback=_finite,
    help="Open loop: gamma shape of the arrival gaps (1 = Poisson; lower is burstier), as vLLM's.",
)
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Cut the prompts (exact token windows at random offsets) from this plain-text file "
              "instead of random tokens.")  # fmt: skip
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed for the prompts and the open-loop arrival times.",
)
@click.option("--prompt-tokens", type=click.IntRange(1, MAX_PROMPT_TOKENS), default=128, show_default=True,
              help=f"Prompt length. Tokens × (requests + 2) × levels ≤ {MAX_PROMPT_TOKENS_TOTAL:,}.")  # fmt: skip
@click.option("--output-tokens", type=click.IntRange(1, MAX_OUTPUT_TOKENS), default=64, show_default=True)
@click.option("--requests", type=click.IntRange(1, MAX_REQUESTS), default=32, show_default=True,
              help="Measured requests per level (after 2 warm-up requests).")  # fmt: skip
@click.option("--request-timeout", type=_SECONDS, default=120.0, show_default=True, callback=_finite,
              help="Seconds one request may take, from sending it to its last token; past it, it fails.")  # fmt: skip
@click.option("--timeout", "run_timeout", type=_SECONDS, default=3600.0, show_default=True, callback=_finite,
              help="Seconds the whole run may take; requests cut or not sent by then fail.")  # fmt: skip
@click.option("--max-failed-pct", type=click.FloatRange(0, 100), default=0.0, show_default=True, callback=_finite,
              help="Gate: percent of the measured requests (all levels together) allowed to fail.")  # fmt: skip
@click.option("--max-ttft-p99-ms", type=_POSITIVE, default=None, callback=_finite,
              help="Gate: p99 time to first token (ms) at the top level.")  # fmt: skip
@click.option("--max-tpot-p99-ms", type=_POSITIVE, default=None, callback=_finite,
              help="Gate: p99 time per output token (ms) at the top level.")  # fmt: skip
@click.option("--min-output-tps", type=_POSITIVE, default=None, callback=_finite,
              help="Gate: output tokens/s at the top level.")  # fmt: skip
@click.option("--min-goodput", type=_POSITIVE, default=None, callback=_finite,
              help="Gate: requests/s within the TTFT and TPOT limits, at the top level.")  # fmt: skip
@_gate_aliases
@click.option("--gpu-usd-per-hour", type=_POSITIVE, default=None, callback=_finite,
              help="Price per GPU-hour for the cost figure.")  # fmt: skip
@click.option("--gpus", type=click.IntRange(1, 1024), default=1, show_default=True, help="GPUs behind the endpoint.")
@click.option("--out", type=click.Path(file_okay=False, writable=True, path_type=Path), default=Path("artifacts/bench"),
              show_default=True, help="Directory for per-request JSONL, summary.json and plots.")  # fmt: skip
@JSON
@handle_errors
def bench(endpoint, model, tokenizer, api, flavor, concurrency, request_rates, burstiness, dataset, seed,
          prompt_tokens, output_tokens, requests, request_timeout, run_timeout, max_failed_pct, max_ttft_p99_ms,
          max_tpot_p99_ms, min_output_tps, min_goodput, gpu_usd_per_hour, gpus, out, as_json,
          **aliases) -> None:  # fmt: skip
    """Measure any running OpenAI-compatible server: throughput, TTFT, TPOT, ITL, E2E latency
    (mean, p50, p90, p99) per load level, gates, and cost per 1M output tokens.

    Every failed request (HTTP error, refused or dropped connection, timeout, malformed stream) is
    counted per level and overall, in the table and in summary.json. If the server answers none of
    a level's requests, the later levels are not sent (they count as failed). OPENAI_API_KEY, when
    set, is sent as a bearer token (as `vllm bench serve` does); never put credentials in the URL.

    \b
    Metrics, named as vLLM's `bench serve` names them:
      TTFT  time to first token, from the request's scheduled start (queueing counts)
      TPOT  time per output token: (E2E latency - TTFT) / (output tokens - 1), per request
            (guidellm calls this "ITL", inter-token latency)
      ITL   the gaps between consecutive token chunks (a chunk may hold several tokens)
      E2E   end-to-end latency; goodput: requests/s within the TTFT and TPOT limits

    \b
    Exit codes:
      0  every gate passed and at most --max-failed-pct of the requests failed
      1  a gate failed: an SLO, or more than --max-failed-pct of the requests failed
      2  bad arguments
      3  no request succeeded: the server is down, hung, or failed every request
    """
    from forge.loadgen import GpuCost, SLOs, run_sweep

    gates = {"max_ttft_p99_ms": max_ttft_p99_ms, "max_tpot_p99_ms": max_tpot_p99_ms, "min_output_tps": min_output_tps}
    for new, old in _GATE_ALIAS_NAMES.items():
        if (value := aliases[old[2:].replace("-", "_")]) is not None:
            if gates[new] is not None:
                raise InputError(f"{old}: give the gate once, as --{new.replace('_', '-')}")
            gates[new] = value
    slos = SLOs(**gates, min_goodput=min_goodput)
    cost = GpuCost(gpu_usd_per_hour, gpus) if gpu_usd_per_hour else None
    levels = concurrency
    if request_rates:  # open loop; at most the largest closed-loop level in flight
        from forge.loadgen.workload import LoadLevel

        levels = [LoadLevel(max(concurrency), rate, burstiness) for rate in request_rates]
    try:
        result = run_sweep(
            endpoint, model, tokenizer, levels, prompt_tokens, output_tokens, requests, out, slos,
            api=api, flavor=flavor, gpu_cost=cost, request_timeout_s=request_timeout, run_timeout_s=run_timeout,
            max_failed_pct=max_failed_pct, dataset=dataset, seed=seed,
        )  # fmt: skip
    except InputError as error:
        key, _, detail = str(error).partition(":")
        if key in _BENCH_OPTIONS:
            raise InputError(f"{_BENCH_OPTIONS[key]}:{detail}") from None
        raise
    summary = result.to_dict()
    kinds = "".join(f", {kind}: {n}" for kind, n in sorted(result.failed_kinds.items()))
    failed = f"{result.requests_failed} of {result.requests_total} requests failed ({result.failed_pct:.1f}%{kinds})"
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        from forge.console import render_sweep

        render_sweep(summary)
        if flavor == "auto":  # summary.json and --json record it too
            click.echo(f"--flavor {result.flavor}: the first the server accepts")
        click.echo(failed)
        click.echo(f"records and plots: {out}")
    if result.requests_completed == 0:
        errors = sorted({e for level in summary["levels"] for e in level["first_errors"]})
        raise InfraError(f"bench: {failed}: " + (result.aborted or "; ".join(errors)[:500]))
    if not result.gates_passed:
        from forge.eval.gates import gate_failure

        raise GateFailed("throughput gates failed: " + "; ".join(
            gate_failure(g) for g in summary["gates"] if not g["passed"]) + f"; {failed}")  # fmt: skip


@main.command()
@click.argument("image")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), required=True,
              help="The recipe the image must have been built from.")  # fmt: skip
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None,
              help="PEM public key: also require a cosign-compatible signature of the image made with its "
              "private key (forge push signs when FORGE_SIGNING_KEY names one).")  # fmt: skip
@JSON
@handle_errors
def verify(image: str, recipe_path: Path, key_path: Path | None, as_json: bool) -> None:
    """Check a pushed image's SLSA provenance and build report against a recipe, and with --key
    its signature, all three about the same manifest digest.

    IMAGE is `host/repository:tag` or `host/repository@sha256:…`. Exit 1 when any check fails
    (wrong recipe, tampered build report, failed gates, no valid signature), 3 when the registry
    is unreachable. Keyless (Fulcio/Rekor) signatures are not checked: they need the public
    Sigstore services."""
    from forge.provenance import Check, verify_image
    from forge.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    public_key = None
    if key_path is not None:
        from forge.oci.signing import load_public_key

        public_key = load_public_key(key_path)  # a bad key is exit 2 before any network
    digest, checks = verify_image(image, recipe)
    if public_key is not None:
        from forge.oci.signing import verify_signature
        from forge.package import registry_options

        host = image.split("/", 1)[0]
        with tempfile.TemporaryDirectory(prefix="forge-verify-") as work:
            signed = verify_signature(image, digest, public_key, Path(work),
                                      options=registry_options(host, recipe.package.insecure_registries))  # fmt: skip
        checks.append(Check("signature", signed.passed, signed.detail))
    if as_json:
        click.echo(json.dumps({"image": image, "digest": digest, "checks": [c.__dict__ for c in checks]}, indent=2))
    else:
        for check in checks:
            click.echo(f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    if not all(c.passed for c in checks):
        raise GateFailed(f"verify: {image} ({digest}) failed {sum(not c.passed for c in checks)} check(s)")


@main.command()
@RECIPE
@JSON
@ARTIFACTS
@CACHE
@click.option(
    "--allow-deferred-gates", is_flag=True,
    help="Push even where the GPU gates (throughput, lm-eval on the target GPU) are deferred, i.e. not measured; "
    "the report attached to the image says so. Same as package.allow_deferred_gates: true.",
)  # fmt: skip
@click.option("--to", "destination", default=None, metavar="oci:DIR",
              help="Write every image of the build (model images and serving images) into the local OCI layout "
              "DIR, tags kept, instead of pushing to package.registry; `skopeo copy oci:DIR:TAG docker://…` "
              "moves one on.")  # fmt: skip
@handle_errors
def push(
    recipe: Path, as_json: bool, artifacts_dir: Path, cache_dir: Path | None, allow_deferred_gates: bool,
    destination: str | None,
) -> None:  # fmt: skip
    """Push the recipe's images to `package.registry` (building whatever is not cached).

    Credentials: FORGE_REGISTRY_USERNAME / FORGE_REGISTRY_PASSWORD, else ~/.docker/config.json.

    \b
    What is pushed, and the exit status a release pipeline sees:
    - every image that exists (or can be built here) is pushed, each under its tags;
    - an image that is itself deferred (a TensorRT-LLM engine to build on a GPU builder, a base
      image that cannot be reached) is skipped and listed with the command that makes it: in
      this output ("deferred …" lines; in --json, entries with "status": "deferred") and in
      build.json (its push stage `deferred`, with `command`). The rest are still pushed and the
      exit status is 0, so a CPU release job publishes what it can and the GPU jobs push the
      rest later (`forge push` again there);
    - exit 3 when nothing at all could be pushed because every image is deferred;
    - exit 1, before any work, when an image's GPU gates (throughput, lm-eval on the target GPU)
      are deferred, unless --allow-deferred-gates / package.allow_deferred_gates: true; and
      nothing is pushed when a gate fails.
    """
    from forge.build import build as run_build
    from forge.progress import Progress
    from forge.recipe import load_recipe

    package = load_recipe(recipe).package
    if destination is not None:
        push_to_layout(recipe, destination, artifacts_dir, cache_dir, allow_deferred_gates, as_json)
        return
    if not ((package.enabled or package.model_images) and package.registry):
        raise InputError(
            "package.registry: nothing to push (set package.registry, and package.enabled or package.model_images)"
        )
    pushes, waiting = split_deferred_pushes(recipe, artifacts_dir, cache_dir, allow_deferred_gates)
    if not pushes:
        lines = "\n".join(f"  {s.id}: {s.reason}\n    run: {s.command}" for s in waiting)
        raise InfraError(f"push: nothing to push, every image is deferred:\n{lines}")
    result = run_build(recipe, artifacts_dir=artifacts_dir, cache_dir=cache_dir, only=tuple(s.id for s in pushes),
                       progress=Progress(enabled=not as_json), allow_deferred_gates=allow_deferred_gates)  # fmt: skip
    records = {s["id"]: s for s in result.report["stages"]}
    deferred = [{"stage": s.id, "status": "deferred", "reason": records[s.id].get("reason", s.reason),
                 "command": records[s.id].get("command", s.command)} for s in waiting]  # fmt: skip
    pushed = [{**p, "status": "pushed"} for p in result.report.get("pushed", [])]
    lines = [f"{i['reference']} {i['digest']} ({i['bytes_uploaded']} bytes uploaded)" for i in pushed]
    _echo_images(pushed, lines, deferred, as_json)


def split_deferred_pushes(
    recipe: Path, artifacts_dir: Path, cache_dir: Path | None, allow_deferred_gates: bool
) -> tuple[list, list]:
    """(push stages to run, push stages whose image is deferred), from the plan `forge build` makes.
    A push deferred only for its gates stays in the first list: the build refuses it (exit 1)."""
    from forge.cache import Cache
    from forge.plan import make_plan
    from forge.recipe import load_recipe

    loaded = load_recipe(recipe)
    plan = make_plan(loaded, recipe.parent.resolve(), Cache(cache_dir or artifacts_dir / ".cache"),
                     recipe_file=str(recipe), allow_deferred_gates=allow_deferred_gates)  # fmt: skip
    pushes = plan.of_kind("push")
    waiting = [s for s in pushes if s.status == "deferred" and plan.stage(s.needs[0]).status == "deferred"]
    return [s for s in pushes if s not in waiting], waiting


def push_to_layout(
    recipe: Path, destination: str, artifacts_dir: Path, cache_dir: Path | None, allow_deferred_gates: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """`forge push --to oci:DIR`: build (nothing is pushed to a registry), then copy every image into
    one layout, under the same rule as a push: no failed gate, no deferred gate unless allowed."""
    from forge.build import build as run_build
    from forge.oci.layout import copy_image
    from forge.progress import Progress
    from forge.recipe import load_recipe

    if not destination.startswith("oci:") or not destination[4:]:
        raise InputError(f"--to: {destination!r} is not oci:DIR (registries come from package.registry)")
    skip = ("push",) if load_recipe(recipe).package.registry else ()  # the layout instead of the registry
    result = run_build(recipe, artifacts_dir=artifacts_dir, cache_dir=cache_dir, skip=skip,
                       progress=Progress(enabled=not as_json), allow_deferred_gates=allow_deferred_gates)  # fmt: skip
    report = result.report
    deferred = (report.get("gates") or {}).get("deferred", 0)
    if deferred and not (allow_deferred_gates or report.get("allow_deferred_gates")):
        raise GateFailed(f"push: refused, {deferred} gate(s) are deferred to a GPU builder (--allow-deferred-gates "
                         "copies anyway)")  # fmt: skip
    images = [*report.get("model_images", []), *report.get("images", [])]
    if not images:
        raise InputError("package: the build made no image (set package.model_images or package.enabled)")
    root = Path(destination[4:])
    copied = [{"tag": i["tag"], "digest": copy_image(Path(i["layout"]), i["tag"], root).digest} for i in images]
    # Images that wait (an engine for a GPU builder, an unreachable base): listed, as a registry push lists them.
    deferred = [
        {"stage": s["id"], "status": "deferred", "reason": s.get("reason"), "command": s.get("command")}
        for s in report["stages"]
        if s["kind"] in ("package", "model-image") and s["status"] == "deferred"
    ]
    _echo_images(copied, [f"oci:{root}:{image['tag']} {image['digest']}" for image in copied], deferred, as_json)


def _echo_images(done: list[dict], lines: list[str], deferred: list[dict], as_json: bool) -> None:
    """What `forge push` did: the images written (one line each) and those deferred, with the
    command that makes each; with --json, one list of both."""
    if as_json:
        click.echo(json.dumps([*done, *deferred], indent=2))
        return
    for line in lines:
        click.echo(line)
    for entry in deferred:
        click.echo(f"deferred {entry['stage']}: {entry['reason']}\n  run: {entry['command']}")
