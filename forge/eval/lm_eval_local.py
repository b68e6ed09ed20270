"""`lm_eval run …` without lm-eval's index of its own tasks, when the run needs none of them.

Before running anything, lm-evaluation-harness indexes every task YAML it ships (thousands of
files): ~20 s on an idle 2-core machine, most of a 50-question task's run. `TaskManager(
include_defaults=False)` skips that index (lm_eval/tasks/manager.py); the CLI has no flag for it.
This entry point takes the CLI's own argv (`python -m forge.eval.lm_eval_local run --tasks …
--include_path …`) and, when every task it names is a plain task defined under the include path,
makes that the CLI's TaskManager; otherwise (a built-in task, a group or tag) the CLI runs as it
is. Either way lm-eval's own CLI parses the arguments and writes the results.

`--worker` makes it a process that imports lm-eval once and runs each command it is sent in a
child forked from it (`forge.eval.lm_eval.Worker`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence

# What every forge lm_eval run imports: ~8 s of a 50-question run on an idle 2-core machine.
PRELOAD = ("torch", "transformers.models.auto.tokenization_auto", "lm_eval.__main__", "lm_eval.tasks",
           "lm_eval.models.openai_completions")  # fmt: skip


def option(argv: Sequence[str], name: str) -> str | None:
    """The value after `name` in an argv, or None."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def local_tasks_only(argv: Sequence[str]) -> bool:
    """Whether every task `argv` names is a task (not a group or tag) under its --include_path."""
    from lm_eval.tasks import TaskManager

    include, tasks = option(argv, "--include_path"), option(argv, "--tasks")
    if include is None or tasks is None:
        return False
    local = set(TaskManager(include_path=include, include_defaults=False).all_subtasks)
    return all(task in local for task in tasks.split(","))


def main(argv: Sequence[str]) -> None:
    if local_tasks_only(argv):
        import lm_eval.tasks

        class LocalTaskManager(lm_eval.tasks.TaskManager):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **{**kwargs, "include_defaults": False})

        lm_eval.tasks.TaskManager = LocalTaskManager  # read by the CLI's config and evaluator modules
    # lm-eval's results carry torch's environment report (`add_env_info`), which runs `pip list`
    # and other probes: ~0.9 s of a 50-question run. The build report records the versions instead.
    import torch.utils.collect_env

    torch.utils.collect_env.get_pretty_env_info = environment_not_probed
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def environment_not_probed() -> str:
    """What lm-eval's results say in place of torch's environment report."""
    return "not collected by forge: build.json records the tool versions (tools)"


def run_job(job: dict) -> int:
    """In a forked child: one command (`job`: argv, cwd, log), its output to its log; the exit code."""
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the job pipe is the worker's, not the run's
        if job["cwd"] is not None:
            os.chdir(job["cwd"])
        main(job["argv"])
        code = 0
    except SystemExit as exit_:  # the CLI's own exit
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def worker() -> None:
    """Import lm-eval once, then for each JSON job line on stdin fork a child that runs it (so each
    run still has a process of its own: its logging, its global state, its exit code) and answer
    `{"returncode": …}` on stdout. An import that fails here fails again, with its message, in the
    child's log."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: S112 - reported by the run that needs it
            continue
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            os._exit(run_job(json.loads(line)))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    worker() if sys.argv[1:] == ["--worker"] else main(sys.argv[1:])
