"""Perplexity, top-1 agreement and KL divergence of a dense model on fixed windows of text.

Every quantized variant is judged against the same baseline: the baseline pass writes what
determines the baseline's next-token distributions once (its final hidden states, fp32, one file
per window, and its output projection), and each compare pass streams them back and re-applies
the projection, so KL divergence and agreement never re-run the baseline's decoder.
The model is always a dense fp32 Hugging Face model built from a `(config, state)` pair, so any
format reader (`forge/formats/*.read`) or `QuantizedModel.dequantize()` can feed it.

Definitions follow the tools the field already trusts:
- perplexity: exp(mean NLL over every predicted token of every window), as vLLM's wikitext test
  (tests/models/language/generation_ppl_test/ppl_utils.py, adapted from
  https://huggingface.co/docs/transformers/perplexity) and the AWQ/GPTQ papers compute it;
- KL(baseline ‖ quantized) averaged over tokens, as llama.cpp's `perplexity --kl-divergence`
  (tools/perplexity/perplexity.cpp) reports "Mean KLD";
- top-1 agreement: the fraction of positions where both models' most likely next token is the
  same (llama.cpp's "Same top p"; vLLM's greedy `check_outputs_equal` on a per-token basis).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from forge.errors import InputError
from forge.quant.rtn import FP8_MAX

Progress = Callable[[int, int], None]

WINDOW = 1024  # vLLM's wikitext perplexity test, MAX_LENGTH (ppl_utils.py)
TOKEN_CHUNK = 256  # positions per log-softmax: 256 x 49152 fp32 logits = 50 MB, not 200 MB a window
BASELINE_FILE = "baseline.json"
HEAD_FILE = "lm_head.safetensors"
WINDOWS_FILE = "windows.safetensors"  # the token ids scored, [windows, window] int64
BASELINE_FORMAT = 2  # 1: fp16 log-probs (100.6 MB per SmolLM2 window); 2: hidden states (2.4 MB)
# A build compares several exports to one baseline in one process: the baseline's log-probabilities
# (of the baseline pass, or else of the first compare pass) are kept in memory for the compare
# passes when they take at most this many bytes (4 SmolLM2 windows: 0.8 GB), instead of projecting
# the stored states again (a sixth of a SmolLM2 compare pass here). Only the last baseline's are kept.
KEEP_BASELINE_BYTES = 1 << 30
_kept_baseline: dict[str, dict[tuple[int, int, int], torch.Tensor]] = {}

__all__ = [
    "WINDOW",
    "baseline_pass",
    "build_model",
    "compare_pass",
    "load_baseline",
    "load_windows",
    "simulate_dynamic_fp8_activations",
]


def load_windows(
    text_path: Path | str,
    tokenizer_dir: Path | str,
    window: int = WINDOW,
    max_windows: int | None = None,
) -> torch.Tensor:
    """The text as `[n, window]` token ids: tokenized once, cut into non-overlapping windows.

    The whole file is tokenized in one call with the tokenizer's default special tokens, exactly
    as vLLM's test (`tokenizer.encode("\\n\\n".join(dataset["text"]))`) and the HF perplexity
    guide (`tokenizer("\\n\\n".join(test["text"]))`) do: a BOS appears once at the start of the
    text if the tokenizer adds one (SmolLM2's does not), never at the start of every window, so
    window k > 0 starts mid-text. The tail shorter than a window is dropped (vLLM keeps it as a
    short last chunk; < 1 window of ~300 on wikitext-2) so every window has the same shape and
    batches stack without padding.
    """
    from transformers import AutoTokenizer

    if window < 2:
        raise InputError(f"window: {window} must be at least 2 tokens (one context, one target)")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{text_path}: not UTF-8 text (byte {error.start})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = leading_ids(tokenizer, text, None if max_windows is None else max_windows * window)
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(
            f"{text_path}: {len(ids)} tokens do not fill one window of {window}; use a longer text or a smaller window"
        )
    return torch.tensor(ids[: count * window], dtype=torch.long).reshape(count, window)


# Tokens beyond the ones needed that a prefix must yield before its first `needed` are trusted: the
# cut can only change how the text right before it is split (a pre-tokenizer's last word, a BPE
# merge across it), never tokens hundreds of positions earlier.
PREFIX_MARGIN = 256


def leading_ids(tokenizer, text: str, needed: int | None) -> list[int]:
    """The token ids of `text` (the first `needed` of them, or all): the same ids as tokenizing the
    whole text, from the shortest line-aligned prefix that yields `needed + PREFIX_MARGIN` tokens,
    so scoring 4 windows does not tokenize all of wikitext-2 (seconds per stage on a small CPU)."""
    chars = 0 if needed is None else 8 * (needed + PREFIX_MARGIN)  # ~4 characters per token of English
    while needed is not None and chars < len(text):
        prefix = text[: text.rfind("\n", 0, chars) + 1 or chars]
        ids = tokenizer(prefix).input_ids
        if len(ids) >= needed + PREFIX_MARGIN:
            return ids[:needed]
        chars *= 2
    ids = tokenizer(text).input_ids
    return ids if needed is None else ids[:needed]


def build_model(config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A dense fp32 causal LM in eval mode from an HF config dict and a dense HF state dict.

    Readers and `QuantizedModel.dequantize()` omit `lm_head.weight` when the embeddings are tied,
    so it is re-tied here; a checkpoint that does carry a distinct lm_head is evaluated untied,
    with exactly the tensors it holds. `quantization_config` is dropped: the weights are already
    dense, and transformers would otherwise try to set up a quantizer for them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise InputError("config.model_type: missing; cannot tell which architecture to build")
    embed = state.get("model.embed_tokens.weight")
    head = state.get("lm_head.weight")
    tied = bool(fields.get("tie_word_embeddings", False))
    if tied and head is not None and embed is not None and not torch.equal(head.float(), embed.float()):
        fields["tie_word_embeddings"] = False
        tied = False
    if not tied and head is None:
        raise InputError("state: lm_head.weight missing and config.tie_word_embeddings is not true")
    hf_config = AutoConfig.for_model(model_type, **fields)
    # Every parameter is loaded (or tied) below, so transformers' random initialization (~1.5 s for
    # SmolLM2 here, per model built) is skipped, as `from_pretrained` skips it; buffers computed in
    # the modules' constructors (rotary frequencies) are not initialization and stay.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    from forge.quant.moe import to_transformers_state

    # MoE checkpoints name one weight per expert; transformers holds them fused (forge.quant.moe).
    weights = to_transformers_state(config, {k: v.to(torch.float32) for k, v in state.items()})
    if tied:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise InputError(f"state: does not match config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()
    return model.eval()


# float32 bit patterns: the exponent field, 3 mantissa bits (e4m3's), and 2⁻⁹ (e4m3's smallest
# subnormal: the step below its smallest normal, 2⁻⁶).
F32_EXPONENT = 0x7F800000
E4M3_SHIFT = 3 << 23
E4M3_MIN_STEP = 118 << 23


def round_to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """`y.to(torch.float8_e4m3fn).float()` for float32 `y` within ±448, by arithmetic: e4m3 keeps 3
    mantissa bits, so y rounds (to nearest, ties to even) onto steps of 2^(⌊log₂|y|⌋ − 3), never finer
    than 2⁻⁹ (OCP FP8 spec, E4M3). Equal bit for bit (tests/test_eval.py), and ~6× faster here:
    torch's fp8 → float32 conversion took 9.9 ms for 1.5 M values at one thread, this 1.6 ms."""
    step = y.view(torch.int32).bitwise_and(F32_EXPONENT).sub_(E4M3_SHIFT).clamp_(min=E4M3_MIN_STEP)
    step = step.view(torch.float32)
    return torch.round(y / step).mul_(step)


def simulate_dynamic_fp8_activations(model: torch.nn.Module, linear_names: list[str]) -> list:
    """Round the inputs of the named linears to fp8 e4m3 per token, as FP8_DYNAMIC serving does.

    The dequantized weights alone measure weight rounding only; an FP8_DYNAMIC engine also
    quantizes every activation entering those linears, with one scale per token computed at run
    time: scale = max|x| / 448 (vLLM `scaled_fp8_quant(..., use_per_token_if_dynamic=True)`,
    compressed-tensors `strategy: token, dynamic: true`). Rounding the input and multiplying in
    fp32 equals the fp8 GEMM with fp32 accumulation up to summation order. Linears reading one
    input tensor (q/k/v, gate/up) share its rounding, computed once. Returns the hook handles
    (`handle.remove()` undoes it).
    """
    modules = dict(model.named_modules())
    missing = [name for name in linear_names if name not in modules]
    if missing:
        raise InputError(f"linears: {missing[:3]} are not modules of this model")
    # The input last rounded and its rounding. The same tensor object is the same values: a
    # decoder layer passes one normed tensor to q/k/v (gate/up) and changes none in place (and
    # inference-mode tensors keep no version counter to check that by).
    last: list = [None, None]

    def round_input(_module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x is not last[0]:
            scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
            codes = round_to_e4m3((x.float() / scale).clamp(-FP8_MAX, FP8_MAX))
            last[:] = [x, (codes * scale).to(x.dtype)]
        return (last[1], *args[1:])

    return [modules[name].register_forward_pre_hook(round_input) for name in linear_names]


# What the readers return beside the dense weights (compressed-tensors / ModelOpt scale names): the
# static activation scale of a linear's input, and the fp8 KV-cache scales of an attention block.
SCALE_SUFFIXES = (".input_scale", ".k_scale", ".v_scale")


def split_scales(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense weights a model loads, scales keyed by their tensor name) of a reader's state."""
    scales = {k: v for k, v in state.items() if k.endswith(SCALE_SUFFIXES)}
    return {k: v for k, v in state.items() if k not in scales}, scales


def simulate_static_fp8_activations(model: torch.nn.Module, input_scales: dict[str, torch.Tensor]) -> list:
    """Round each linear's input to fp8 e4m3 with its calibrated per-tensor scale, as FP8 (static)
    serving does: codes = clamp(x / input_scale, ±448) in e4m3, times input_scale (vLLM
    `scaled_fp8_quant(x, scale)`; compressed-tensors `strategy: tensor, dynamic: false`). Returns
    the hook handles."""
    modules = dict(model.named_modules())
    handles = []
    for name, scale in input_scales.items():
        module = modules.get(name.removesuffix(".input_scale"))
        if module is None:
            raise InputError(f"state: {name} belongs to no module of this model")
        s = scale.float().reshape(()).clamp(min=1e-12)

        def round_input(_module: torch.nn.Module, args: tuple, s: torch.Tensor = s) -> tuple:
            x = args[0]
            codes = round_to_e4m3((x.float() / s).clamp(-FP8_MAX, FP8_MAX))
            return ((codes * s).to(x.dtype), *args[1:])

        handles.append(module.register_forward_pre_hook(round_input))
    return handles


def _next_token_chunks(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, progress: Progress | None
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield `(window, start, hidden, targets)` for every chunk of predicted positions.

    The decoder runs on a batch of windows; callers project `hidden` (the decoder's final, normed
    states) to the vocabulary `TOKEN_CHUNK` positions at a time, so peak memory is one chunk of
    fp32 logits instead of `batch x window x vocab` (HF's forward materializes all logits: 200 MB
    per 1024-token window at SmolLM2's 49152 vocabulary). Only positions 0..T-2 have a next token,
    as in HF's shifted loss, so those are the ones scored.
    """
    decoder = model.get_decoder()
    total, length = windows.shape
    with torch.inference_mode():
        for first in range(0, total, batch_size):
            batch = windows[first : first + batch_size]
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
            for row in range(batch.shape[0]):
                for start in range(0, length - 1, TOKEN_CHUNK):
                    stop = min(start + TOKEN_CHUNK, length - 1)
                    yield first + row, start, hidden[row, start:stop], batch[row, start + 1 : stop + 1]
                if progress is not None:
                    progress(first + row + 1, total)


def _logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(head(hidden).float(), dim=-1)


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _window_file(directory: Path, index: int) -> Path:
    return directory / f"hidden-{index:05d}.safetensors"


def baseline_pass(
    model: torch.nn.Module,
    windows: torch.Tensor,
    out_dir: Path | str,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Perplexity of the reference model, and what its distributions come from, for every compare pass.

    `lm_head.safetensors` holds the output projection (fp32) and each window's file `hidden` (the
    decoder's final states, fp32, `[T-1, hidden]`) and `top1` (int32 argmax). A compare pass
    re-applies the projection to the stored states chunk by chunk, as this pass did, so it sees the
    baseline's fp32 log-probabilities exactly: 2.4 MB per 1024-token SmolLM2 window (hidden 576)
    instead of 100.6 MB for fp16 log-probs over its 49152-token vocabulary, plus 113 MB once for
    the projection.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = model.get_output_embeddings()
    projection = {"weight": head.weight.detach().float().contiguous()}
    if getattr(head, "bias", None) is not None:
        projection["bias"] = head.bias.detach().float().contiguous()
    save_file(projection, out / HEAD_FILE)
    save_file({"ids": windows.contiguous()}, out / WINDOWS_FILE)
    total, length = windows.shape
    nll = torch.zeros(total, dtype=torch.float64)
    parts: dict[int, list[torch.Tensor]] = {}
    tops: dict[int, list[torch.Tensor]] = {}
    keep = _logprob_bytes(windows, projection) <= KEEP_BASELINE_BYTES
    kept: dict[tuple[int, int, int], torch.Tensor] = {}
    project = _projection(projection)  # the stored projection of the stored states: as a compare pass
    began = time.perf_counter()
    for index, start, hidden, targets in _next_token_chunks(model, windows, batch_size, progress):
        logprobs = _logprobs(project, hidden.float())
        if keep:
            kept[index, start, start + logprobs.shape[0]] = logprobs
        nll[index] -= logprobs.gather(1, targets[:, None]).double().sum()
        parts.setdefault(index, []).append(hidden.float())
        tops.setdefault(index, []).append(logprobs.argmax(dim=-1).to(torch.int32))
        if sum(p.shape[0] for p in parts[index]) == length - 1:
            tensors = {"hidden": torch.cat(parts.pop(index)), "top1": torch.cat(tops.pop(index))}
            save_file(tensors, _window_file(out, index))
    seconds = time.perf_counter() - began
    tokens = total * (length - 1)
    result = {
        "perplexity": math.exp(float(nll.sum()) / tokens),
        "nll_per_window": [float(x) / (length - 1) for x in nll],
        "tokens": tokens,
        "windows": total,
        "window": length,
        "seconds": seconds,
    }
    meta = {"version": BASELINE_FORMAT, "windows_sha256": _windows_digest(windows), **result}
    (out / BASELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if keep:  # the first compare pass of this process need not project them again
        kept_baseline(out, _logprob_bytes(windows, projection)).update(kept)
    return result


def _logprob_bytes(windows: torch.Tensor, projection: dict[str, torch.Tensor]) -> int:
    """What the baseline's float32 log-probabilities over `windows` take, every predicted position."""
    total, length = windows.shape
    return total * (length - 1) * projection["weight"].shape[0] * 4


def _projection(tensors: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The baseline's output projection as stored (`HEAD_FILE`), as a function of the final states."""
    return partial(torch.nn.functional.linear, weight=tensors["weight"], bias=tensors.get("bias"))


def baseline_windows(baseline_dir: Path | str) -> torch.Tensor:
    """The token windows a baseline pass scored, for every compare pass against it: tokenizing the
    text again per export would give the same ids (the export carries the source's tokenizer) at
    seconds of CPU each."""
    path = Path(baseline_dir) / WINDOWS_FILE
    if not path.is_file():
        raise InputError(f"{baseline_dir}: no {WINDOWS_FILE}; run the baseline pass again")
    return load_file(path)["ids"]


def load_baseline(baseline_dir: Path | str) -> dict:
    """The metadata a baseline pass wrote (perplexity, window count, digest of the token ids)."""
    path = Path(baseline_dir) / BASELINE_FILE
    if not path.is_file():
        raise InputError(f"{baseline_dir}: no {BASELINE_FILE}; run the baseline pass first")
    return json.loads(path.read_text())


def _baseline_key(directory: Path) -> str:
    """What tells one baseline from another: its metadata, which holds the digest of the windows and
    the per-window NLLs of the model on them (the directory's path changes when the stage
    cache renames a finished pass into place)."""
    return (directory / BASELINE_FILE).read_text()


def kept_baseline(directory: Path, size: int) -> dict[tuple[int, int, int], torch.Tensor]:
    """The baseline log-probabilities kept from the baseline pass or earlier compare passes against
    `directory`, by (window, first position, end); an empty dict that keeps what is put in it (if
    `size` bytes fit `KEEP_BASELINE_BYTES`) for a baseline not seen last. A baseline rewritten in
    place by another model has other NLLs, so it is not mistaken for the old (`_baseline_key`)."""
    key = _baseline_key(directory)
    if key not in _kept_baseline:
        _kept_baseline.clear()
        if size > KEEP_BASELINE_BYTES:
            return {}
        _kept_baseline[key] = {}
    return _kept_baseline[key]


def compare_pass(
    model: torch.nn.Module,
    windows: torch.Tensor,
    baseline_dir: Path | str,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Perplexity of a candidate model plus its agreement and KL against a saved baseline.

    KL(P_baseline ‖ Q_candidate) = Σ_v P(v) (log P(v) − log Q(v)) per position, the direction
    llama.cpp uses: it weights the error by how likely the baseline thought each token was.
    `kl_p99` is the 99th percentile over positions (llama.cpp also reports it), which exposes
    rare catastrophic positions a mean hides.
    """
    directory = Path(baseline_dir)
    meta = load_baseline(directory)
    if meta.get("version") != BASELINE_FORMAT:
        raise InputError(f"{baseline_dir}: baseline format {meta.get('version')} is not {BASELINE_FORMAT}; rerun it")
    if meta.get("windows_sha256") != _windows_digest(windows):
        raise InputError(
            f"{baseline_dir}: the baseline was computed on different windows "
            f"({meta.get('windows')} x {meta.get('window')}); rerun the baseline pass on these windows"
        )
    total, length = windows.shape
    nll = torch.zeros(total, dtype=torch.float64)
    agree = 0
    kl_values: list[torch.Tensor] = []
    loaded_index, reference = -1, {}
    projection = load_file(directory / HEAD_FILE)
    base_head = _projection(projection)
    head = model.get_output_embeddings()
    kept = kept_baseline(directory, _logprob_bytes(windows, projection))
    began = time.perf_counter()
    for index, start, hidden, targets in _next_token_chunks(model, windows, batch_size, progress):
        if index != loaded_index:
            reference, loaded_index = load_file(_window_file(directory, index)), index
        logprobs = _logprobs(head, hidden)
        stop = start + logprobs.shape[0]
        base = kept.get((index, start, stop))
        if base is None:
            base = _logprobs(base_head, reference["hidden"][start:stop])
            kept[index, start, stop] = base
        kl_values.append((base.exp() * (base - logprobs)).sum(dim=-1))
        agree += int((logprobs.argmax(dim=-1) == reference["top1"][start:stop]).sum())
        nll[index] -= logprobs.gather(1, targets[:, None]).double().sum()
    seconds = time.perf_counter() - began
    tokens = total * (length - 1)
    kl = torch.cat(kl_values).double()
    ppl = math.exp(float(nll.sum()) / tokens)
    return {
        "perplexity": ppl,
        "baseline_perplexity": meta["perplexity"],
        "ppl_increase_pct": 100.0 * (ppl / meta["perplexity"] - 1.0),
        "top1_agreement": agree / tokens,
        "mean_kl": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl.float(), 0.99)) if kl.numel() else 0.0,
        "tokens": tokens,
        "windows": total,
        "seconds": seconds,
    }
