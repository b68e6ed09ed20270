"""What the load generator sends: exact-length prompts, fixed-length outputs, arrival times.

Throughput numbers are only comparable when every request has the same shape, so prompts are built
to an exact token count *as the server will count it* (special tokens the tokenizer adds, and the
chat template for chat requests) and outputs are pinned with the server's own ignore-EOS switch.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from forge.errors import InputError

Api = Literal["completions", "chat"]

# How each server family pins the output length. vLLM (and SGLang, TRT-LLM's trtllm-serve) take
# `ignore_eos` and `min_tokens` as extra sampling parameters on the OpenAI routes (vLLM docs,
# "OpenAI-Compatible Server › Extra Parameters"). `transformers serve` rejects unknown fields with
# 422 (transformers/cli/serving/utils.py `_validate_request`) but takes a `generation_config` JSON
# string, where `min_new_tokens` suppresses EOS. "openai" sends `ignore_eos` only (LMDeploy and
# servers without `min_tokens`); "none" sends only `max_tokens`. A server that still stops early
# is reported as ignoring ignore_eos (see metrics.summarize_level).
FLAVORS = ("vllm", "openai", "transformers", "none")

# Upper bounds on a sweep's size. Beyond them a typo (`1e8` prompt tokens) runs for days: building
# exact-length prompts costs ~50-100 µs per token on one core, and every level is a full run.
MAX_PROMPT_TOKENS = 131_072  # the longest context windows served today
MAX_OUTPUT_TOKENS = 131_072
MAX_REQUESTS = 10_000  # measured requests per level (warm-up requests too)
MAX_CONCURRENCY = 1024  # one connection each
MAX_LEVELS = 32
MAX_PROMPT_TOKENS_TOTAL = 2**23  # prompt tokens built for the whole sweep, about 10 minutes


@dataclass(frozen=True)
class Prompt:
    """One request's input; `tokens` is the length the server should report as prompt_tokens."""

    text: str
    tokens: int


@dataclass(frozen=True)
class LoadLevel:
    """One point of a sweep.

    Closed loop (`request_rate` None): `concurrency` users each send the next request when the
    previous one finishes. Open loop: requests arrive at `request_rate` per second with gamma
    inter-arrival times (`burstiness` 1 = Poisson), capped at `concurrency` in flight if given.
    """

    concurrency: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency is None and self.request_rate is None:
            raise InputError("levels: a level needs a concurrency, a request_rate, or both")
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise InputError(f"levels: concurrency must be in 1..{MAX_CONCURRENCY}, got {self.concurrency}")
        if self.request_rate is not None and not (self.request_rate > 0 and math.isfinite(self.request_rate)):
            raise InputError(f"levels: request_rate must be a finite number > 0, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise InputError(f"levels: burstiness must be a finite number > 0, got {self.burstiness}")

    @property
    def label(self) -> str:
        parts = []
        if self.request_rate is not None:
            parts.append(f"rate{self.request_rate:g}")
            if self.burstiness != 1.0:
                parts.append(f"b{self.burstiness:g}")
        if self.concurrency is not None:
            parts.append(f"c{self.concurrency}")
        return "-".join(parts)


def as_level(level: int | LoadLevel) -> LoadLevel:
    return level if isinstance(level, LoadLevel) else LoadLevel(concurrency=int(level))


def arrival_offsets(n: int, rate: float | None, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds after the level start at which each request arrives.

    Gamma inter-arrival times with shape = burstiness and scale = 1 / (rate · burstiness), so the
    mean rate is `rate` and burstiness 1 is a Poisson process (vLLM `vllm/benchmarks/serve.py`,
    `get_request`). No rate means everything arrives at once (a closed loop takes over pacing).
    """
    if rate is None:
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.gammavariate(burstiness, theta)
    return offsets


def load_tokenizer(directory: Path) -> Any:
    """The model's own tokenizer: prompt lengths only mean something in the server's tokens."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # the `quant` extra brings transformers
        raise InputError("tokenizer: building prompts needs transformers (pip install 'forge[quant]')") from exc
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise InputError(f"tokenizer_dir: cannot load a tokenizer from {directory}: {exc}") from exc


def _ids(encoded: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a list or a BatchEncoding depending on version."""
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])


class PromptCounter:
    """Counts prompt tokens the way the server will: with added special tokens, and through the chat
    template for chat requests (`add_generation_prompt=True`, as vLLM and transformers serve do)."""

    def __init__(self, tokenizer: Any, api: Api) -> None:
        self.tokenizer = tokenizer
        self.api = api
        if api == "chat" and not getattr(tokenizer, "chat_template", None):
            raise InputError("api: 'chat' needs a tokenizer with a chat_template; use api 'completions'")
        probe = "hello"
        # Tokens the server adds around the text (BOS, chat template).
        self.overhead = self.count(probe) - len(tokenizer.encode(probe, add_special_tokens=False))

    def count(self, text: str) -> int:
        if self.api == "chat":
            messages = [{"role": "user", "content": text}]
            return len(_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)))
        return len(self.tokenizer(text)["input_ids"])


# Short pieces tried, in order, to add exactly one token when cutting text by characters.
_ONE_TOKEN_PIECES = (" a", "a", " the", ".", ",", " x", "x", "0", " ")


def _fit(counter: PromptCounter, ids: list[int], target: int, filler: list[int]) -> str | None:
    """Decode `ids` and nudge its length until the server-side count is exactly `target`.

    Decoding then re-encoding is not the identity (tokens merge or split at the seams, byte-level
    pieces become U+FFFD), so iterate: trim when long, append filler when short. That converges in
    a round or two on real tokenizers; when it does not (a tokenizer without a matching decoder),
    fall back to cutting the decoded text by characters.
    """
    tok = counter.tokenizer
    content_target = target - counter.overhead
    if content_target < 1:
        raise InputError(f"prompt_tokens: {target} is shorter than the {counter.overhead} tokens the server adds")
    ids = ids[:content_target]
    for _ in range(4):
        text = tok.decode(ids, skip_special_tokens=True)
        n = counter.count(text)
        if n == target:
            return text
        ids = tok.encode(text, add_special_tokens=False)
        if n > target:
            ids = ids[: len(ids) - (n - target)]
        else:
            ids = ids + filler[: target - n]
    return _cut_text(counter, tok.decode(ids + filler, skip_special_tokens=True), target)


def _cut_text(counter: PromptCounter, text: str, target: int) -> str | None:
    """The longest character prefix of `text` within `target` tokens, topped up one token at a time.

    Binary search assumes the count grows with the prefix, which holds for BPE/unigram tokenizers up
    to a token or two at merge seams; the top-up and the final exact check absorb that slack.
    """
    if counter.count(text) < target:
        return None
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counter.count(text[:mid]) <= target:
            lo = mid
        else:
            hi = mid - 1
    base = text[:lo]
    for _ in range(8):
        n = counter.count(base)
        if n == target:
            return base
        piece = next((p for p in _ONE_TOKEN_PIECES if counter.count(base + p) == n + 1), None)
        if piece is None:
            return None
        base += piece
    return None


def _usable_token_ids(tokenizer: Any) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def random_prompts(tokenizer: Any, api: Api, n: int, prompt_tokens: int, seed: int) -> list[Prompt]:
    """Prompts of uniformly random non-special tokens, like vLLM's `random` dataset, but exact."""
    counter = PromptCounter(tokenizer, api)
    vocab = _usable_token_ids(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        for _attempt in range(20):
            ids = [rng.choice(vocab) for _ in range(prompt_tokens)]
            filler = [rng.choice(vocab) for _ in range(prompt_tokens)]
            text = _fit(counter, ids, prompt_tokens, filler)
            if text is not None:
                prompts.append(Prompt(text, prompt_tokens))
                break
        else:
            raise InputError(f"prompt_tokens: could not build prompt {i} of exactly {prompt_tokens} tokens")
    return prompts


def text_prompts(tokenizer: Any, api: Api, n: int, prompt_tokens: int, dataset: Path, seed: int) -> list[Prompt]:
    """Consecutive token windows of a text file (vLLM's `txt-slices` idea), each exact in length.

    Windows start at different offsets so prompts do not share a prefix a server could cache.
    """
    try:
        ids = tokenizer.encode(dataset.read_text(encoding="utf-8"), add_special_tokens=False)
    except OSError as exc:
        raise InputError(f"dataset: cannot read {dataset}: {exc}") from exc
    if len(ids) < 2 * prompt_tokens + 2:
        raise InputError(f"dataset: {dataset} has {len(ids)} tokens; need at least {2 * prompt_tokens + 2}")
    counter = PromptCounter(tokenizer, api)
    rng = random.Random(seed)
    span = len(ids) - 2 * prompt_tokens
    prompts = []
    for i in range(n):
        for _attempt in range(20):
            start = rng.randrange(span)
            window = ids[start : start + prompt_tokens]
            filler = ids[start + prompt_tokens : start + 2 * prompt_tokens]
            text = _fit(counter, window, prompt_tokens, filler)
            if text is not None:
                prompts.append(Prompt(text, prompt_tokens))
                break
        else:
            raise InputError(f"dataset: could not cut prompt {i} of exactly {prompt_tokens} tokens from {dataset}")
    return prompts


def length_fields(flavor: str, output_tokens: int) -> dict[str, Any]:
    """Request fields that pin the output at exactly `output_tokens` on this server family."""
    if flavor == "vllm":
        return {"max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True}
    if flavor == "openai":
        return {"max_tokens": output_tokens, "ignore_eos": True}
    if flavor == "transformers":
        config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
        return {"max_tokens": output_tokens, "generation_config": json.dumps(config)}
    if flavor == "none":
        return {"max_tokens": output_tokens}
    raise InputError(f"flavor: {flavor!r} is not one of {', '.join(FLAVORS)}")


def request_body(api: Api, model: str, prompt: Prompt, output_tokens: int, flavor: str) -> bytes:
    """The JSON body of one streaming request, encoded once before the clock starts."""
    body: dict[str, Any] = {"model": model, "stream": True, "temperature": 0.0}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    # Usage on the stream is how output tokens are counted (vLLM bench serve does the same);
    # transformers serve ignores the field and always sends usage on the last chunk.
    body["stream_options"] = {"include_usage": True}
    body.update(length_fields(flavor, output_tokens))
    return json.dumps(body).encode()
