"""`lm_eval run …` without lm-eval's index of its own tasks, when the run needs none of them.

Before running anything, lm-evaluation-harness indexes every task YAML it ships (thousands of
files): ~20 s on an idle 2-core machine, most of a 50-question task's run. `TaskManager(
include_defaults=False)` skips that index (lm_eval/tasks/manager.py); the CLI has no flag for it.
This entry point takes the CLI's own argv (`python -m forge.eval.lm_eval_local run --tasks …
--include_path …`) and, when every task it names is a plain task defined under the include path,
makes that the CLI's TaskManager; otherwise (a built-in task, a group or tag) the CLI runs as it
is. Either way lm-eval's own CLI parses the arguments and writes the results.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


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
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
