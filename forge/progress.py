"""Rich progress bars for long stages, on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

Advance = Callable[[float, int], None]  # (done, total); a fraction moves the bar within a step


# Logged once per process by transformers' fast tokenizers when decoding with a BPE model
# (transformers/tokenization_utils_tokenizers.py): forge decodes for the load generator and
# lm-eval, where the cleanup it refers to is already off, so the line tells the user nothing.
_TOKENIZER_NOISE = "Ignoring clean_up_tokenization_spaces"


def _drop_tokenizer_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TOKENIZER_NOISE)


def quiet_libraries() -> None:
    """Silence transformers' own tqdm bars ("Writing model shards", "Loading weights") and its BPE
    cleanup notice: forge's stages show their own progress, and a second bar of another style
    interleaved on stderr hides it. Hub download bars (huggingface_hub's own tqdm) stay."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    noisy = logging.getLogger("transformers.tokenization_utils_tokenizers")
    if _drop_tokenizer_noise not in noisy.filters:
        noisy.addFilter(_drop_tokenizer_noise)


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.quieted = False
        if "transformers" in sys.modules:  # already imported (a library caller, a test): silence it now
            self.quiet()

    @cached_property
    def console(self) -> Console:
        """stderr, made when the first bar is drawn: importing rich is tens of milliseconds, which
        a build whose every stage is cached must not pay."""
        from rich.console import Console

        return Console(stderr=True)

    def quiet(self) -> None:
        """`quiet_libraries`, once, before a stage runs: importing transformers takes 1-2 s, which
        a build whose every stage is cached must not pay."""
        if not self.quieted:
            quiet_libraries()
            self.quieted = True

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        """Yield `advance(done, total)`; the bar shows a spinner until a total is known."""
        if not self.enabled:
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total)

            def advance(done: int, total: int) -> None:
                bar.update(task_id, completed=done, total=total)

            yield advance
