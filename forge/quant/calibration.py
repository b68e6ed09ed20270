"""Calibration tokens for AWQ, GPTQ, static FP8 and KV-cache scales.

Every calibrated algorithm sees the same `[num_samples, seq_len]` token tensor, cut from text the
recipe names: local `.txt` files, JSONL files (one document per line, a `text` field), or the
builtin `pydoc_topics` (CPython's bundled documentation, so a fresh machine needs no download).
The evaluation text (wikitext-2) must never be used here: calibrating on it would flatter the
perplexity gate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forge.errors import InputError
from forge.untrusted import check_utf8, recipe_path

if TYPE_CHECKING:
    import torch

BUILTIN_SOURCES = ("pydoc_topics",)


def pydoc_topics_documents() -> list[str]:
    """CPython's `pydoc_data.topics.topics` in sorted key order, so every Python gives one order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def calibration_file(recipe_dir: Path, name: str, label: str) -> Path:
    """A recipe's calibration file, checked at plan time like every recipe path (`recipe_path`:
    no symlink out of its folder, a regular file) and decoded as UTF-8 before anything runs."""
    path = recipe_path(recipe_dir, name, label)
    check_utf8(path, label)
    return path


def read_documents(source: str | Path, text_field: str = "text") -> list[str]:
    """The documents of one source: a whole `.txt` file, each JSONL line's `text_field`, or a builtin."""
    if str(source) == "pydoc_topics":
        return pydoc_topics_documents()
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"calibration.sources: {str(source)!r} is not a file (use a .txt or .jsonl file, or one of "
            f"{', '.join(BUILTIN_SOURCES)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"calibration.sources: {path} is not UTF-8 text (byte {error.start})") from None
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"calibration.sources: {path}:{number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"calibration.sources: {path}:{number} has no string field {text_field!r}")
            documents.append(record[text_field])
        return documents
    return [text]


def load_calibration(
    sources: Sequence[str | Path],
    tokenizer_dir: Path,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> torch.LongTensor:
    """`[num_samples, seq_len]` token ids: non-overlapping windows of the sources' token stream.

    Documents are tokenized one by one (no special tokens) and joined with the EOS token, the way
    pretraining packs documents; the stream is cut into consecutive `seq_len` windows and `seed`
    picks which ones (a `torch.Generator` permutation, so the same seed gives the same bytes on
    every machine). Windows never overlap, so no token is counted twice in the statistics.
    """
    import torch
    from transformers import AutoTokenizer

    if not sources:
        raise InputError("calibration.sources: empty; name at least one text source")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for source in sources:
        documents = [d for d in read_documents(source, text_field) if d.strip()]
        if not documents:
            raise InputError(f"calibration.sources: {str(source)!r} holds no text")
        encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.extend(separator)
    available = len(stream) // seq_len
    if available < num_samples:
        names = ", ".join(str(s) for s in sources)
        raise InputError(
            f"calibration.sources: {names} give {len(stream)} tokens, {available} windows of {seq_len}; "
            f"num_samples needs {num_samples} ({num_samples * seq_len} tokens) — add text or lower "
            "calibration.num_samples / seq_len"
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).reshape(available, seq_len)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)[:num_samples]
    return windows[order].contiguous()
