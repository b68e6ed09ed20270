"""Task accuracy over a served endpoint with lm-evaluation-harness, and recovery vs the baseline.

The model under test is the one the backend actually serves, reached through its OpenAI-compatible
completions endpoint: `lm_eval --model local-completions` sends `echo=True, logprobs=1,
max_tokens=1` requests for log-likelihood tasks (lm_eval/models/openai_completions.py,
`LocalCompletionsAPI._create_payload`); chat endpoints cannot return prompt log-probabilities,
so `local-chat-completions` only runs generation tasks.

lm-evaluation-harness is an optional extra (`pip install "lm_eval[api]"`; it does not depend on
torch). It runs as a subprocess so its import time, logging and global state stay out of forge,
through `forge.eval.lm_eval_local` (the same CLI, minus ~20 s of indexing tasks a run never uses);
a build runs its several lm_eval commands through one `Worker`, which pays the imports once.

Recovery = quantized score / baseline score per task and metric, the ratio llm-compressor's
lm-eval checks hold at ≥ 0.95; for metrics where lower is better (perplexities, bits per byte)
it is baseline / quantized, so recovery < 1 always means the quantized model is worse.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from forge.errors import InfraError, InputError
from forge.untrusted import check_tree, recipe_path

INSTALL_HINT = 'install the extra: .venv/bin/pip install -c .ci/constraints.txt "lm_eval[api]"'
# Requests lm_eval keeps in flight (its `num_concurrent`). Servers batch concurrent requests
# (transformers serve's continuous batching, vLLM, TGI): on this 2-core CPU 50 forge_facts
# questions took 14.4 s one at a time and 7.3 s eight at a time, with the same answers
# (bench/RESULTS.md). Greedy answers only change if batching flips a near-tie in the last bits.
CONCURRENT_REQUESTS = 8
LOCAL_MODULE = "forge.eval.lm_eval_local"


def lm_eval_command(
    base_url: str,
    model: str,
    tokenizer: str,
    tasks: Sequence[str],
    output_dir: Path | str,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    num_concurrent: int = CONCURRENT_REQUESTS,
    max_length: int | None = None,
    include_path: Path | str | None = None,
    module: str = "lm_eval",
) -> list[str]:
    """The `lm_eval run` argv for one served model (`module`: the entry point; forge's local runs
    use `forge.eval.lm_eval_local`, the same CLI without the built-in task index).

    `base_url` is the full completions URL (`http://host:port/v1/completions`), as lm_eval's
    API models post to it as given. The tokenizer is named explicitly with the `huggingface`
    backend: lm_eval needs it to find where the continuation starts inside the echoed prompt,
    and "auto" would first probe the server for a remote tokenizer. Requests go out as text
    (`tokenized_requests=False`, vLLM's documented lm_eval invocation) so servers that reject
    token-id prompts (TGI) work too.
    """
    if not tasks:
        raise InputError("tasks: at least one lm_eval task is needed")
    model_args = {
        "base_url": base_url,
        "model": model,
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": "False",
        "num_concurrent": str(num_concurrent),
        "max_retries": "3",
    }
    if max_length is not None:
        model_args["max_length"] = str(max_length)
    for key, value in model_args.items():
        if "," in value:
            raise InputError(f"lm_eval.{key}: {value!r} cannot contain ',' (lm_eval splits model_args on it)")
    argv = [
        sys.executable, "-m", module, "run",
        "--model", "local-completions",
        "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
        "--tasks", ",".join(tasks),
        "--output_path", str(output_dir),
    ]  # fmt: skip
    if num_fewshot is not None:
        argv += ["--num_fewshot", str(num_fewshot)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if include_path is not None:
        argv += ["--include_path", str(include_path)]
    return argv


def include_dir(recipe_dir: Path, path: str) -> Path:
    """The recipe's lm-eval task directory: lm_eval reads every YAML under it (and the files those
    name), so no symlink in it may lead out of it and nothing in it may be a FIFO or a device."""
    include = recipe_path(recipe_dir, path, "validation.accuracy.task_include_path", kind="directory")
    check_tree(include, "validation.accuracy.task_include_path")
    return include


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(
    base_url: str,
    model: str,
    tokenizer: str,
    tasks: Sequence[str],
    output_dir: Path | str,
    cwd: Path | str | None = None,
    worker: Worker | None = None,
    **options,
) -> dict:
    """Run lm_eval against a served model and return its results JSON (see `parse_scores`).

    `cwd` is where lm_eval runs: local task YAMLs name their data files relative to it. With a
    `worker`, it runs there instead of in a process of its own started from scratch.

    Raises InputError when lm_eval is not installed (an optional extra), InfraError with the tail
    of lm_eval's log when it fails (server unreachable, task data not downloadable, ...).
    """
    if not lm_eval_available():
        raise InputError(f"accuracy.tasks: lm-evaluation-harness is not installed; {INSTALL_HINT}")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.rglob("results_*.json"))
    argv = lm_eval_command(base_url, model, tokenizer, tasks, out, module=LOCAL_MODULE, **options)
    log = out / "lm_eval.log"
    if worker is not None:
        returncode = worker.run(argv, cwd, log)
    else:
        with log.open("w") as sink:
            returncode = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, check=False, cwd=cwd).returncode
    written = sorted(set(out.rglob("results_*.json")) - before, key=lambda p: p.stat().st_mtime)
    if returncode != 0 or not written:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise InfraError(f"lm_eval exited {returncode} without results (log: {log}):\n{tail}")
    return json.loads(written[-1].read_text())


class Worker:
    """One `python -m forge.eval.lm_eval_local --worker` for the lm_eval commands of a build.

    Each lm_eval process spent ~8 s of a 50-question run importing torch, transformers' tokenizers
    and lm-eval (bench/RESULTS.md); the worker imports them once and runs each command in a child
    forked from it, so a run still has a process of its own, its log and its exit code, as with
    `subprocess.run`. Started by the first run or before (`start`), it dies with forge."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()  # one job at a time on the pipe

    def run(self, argv: Sequence[str], cwd: Path | str | None, log: Path) -> int:
        """`argv` (an `lm_eval_command` for `LOCAL_MODULE`) run in `cwd`, its output in `log`: its
        exit code. A worker that died (killed by a run gone wrong) is started again for the next."""
        if list(argv[:3]) != [sys.executable, "-m", LOCAL_MODULE]:
            raise ValueError(f"not a {LOCAL_MODULE} command: {argv[:3]}")
        job = json.dumps({"argv": list(argv[3:]), "cwd": None if cwd is None else str(cwd), "log": str(log)})
        with self.lock:
            self.start()
            try:
                self.proc.stdin.write(job + "\n")
                self.proc.stdin.flush()
                answer = self.proc.stdout.readline()
            except BrokenPipeError:
                answer = ""
            if not answer:
                self.close()
                return -1
            return json.loads(answer)["returncode"]

    def start(self) -> None:
        """Start the worker without waiting: it imports while the caller works on. Nothing to do
        while one runs."""
        from forge.loadgen.server import die_with_parent

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", LOCAL_MODULE, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
            )  # fmt: skip

    def close(self) -> None:
        """End the worker: its stdin closed, it exits after the run in hand (none, between runs)."""
        if self.proc is None:
            return
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.stdout.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def parse_scores(results: Mapping) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from an lm_eval results JSON, standard errors left out.

    lm_eval keys each value `"<metric>,<filter>"` (`"acc,none"`, `"exact_match,strict-match"`);
    the default filter `none` is dropped so gates read `acc`, other filters keep lm_eval's
    spelling. Group rows (`mmlu`) appear like tasks. Non-numeric values ("N/A") are skipped.
    """
    scores: dict[str, dict[str, float]] = {}
    rows = {**results.get("groups", {}), **results.get("results", {})}
    for task, row in rows.items():
        for key, value in row.items():
            metric, comma, flt = key.partition(",")
            if not comma or "_stderr" in metric or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            scores.setdefault(task, {})[metric if flt == "none" else key] = float(value)
    return scores


def _higher_is_better(results: Mapping, task: str, metric: str) -> bool:
    table = results.get("higher_is_better", {}).get(task, {})
    value = table.get(metric.partition(",")[0])
    if value is None:
        lower = ("perplexity", "bits_per_byte", "bpb", "ter")
        return not any(word in metric for word in lower)
    return bool(value)


def recovery(baseline: Mapping, quantized: Mapping) -> dict[str, float]:
    """`{"recovery.<task>.<metric>": ratio}` for every metric both results hold.

    Metrics the quantized run lacks are left out, so a gate on them reports "not measured"
    and fails instead of passing silently. A baseline that scores 0 (or a lower-is-better
    metric the quantized run drives to 0) gives NaN, which fails its gate too: a task the model
    cannot do shows no loss, so a "recovery" of 0/0 would pass without meaning anything.
    """
    base_scores, quant_scores = parse_scores(baseline), parse_scores(quantized)
    ratios: dict[str, float] = {}
    for task, metrics in base_scores.items():
        for metric, base in metrics.items():
            if metric not in quant_scores.get(task, {}):
                continue
            quant = quant_scores[task][metric]
            better, worse = (quant, base) if _higher_is_better(baseline, task, metric) else (base, quant)
            ratios[f"recovery.{task}.{metric}"] = better / worse if worse else float("nan")
    return ratios
