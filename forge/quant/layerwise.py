"""Run calibration tokens through a dense model one decoder layer at a time, collecting statistics.

AWQ, GPTQ, static FP8 and KV-cache scales all need the same thing: what each linear of decoder
layer i sees when the calibration text flows through the model. Running one layer at a time keeps
only one layer's activations alive, and lets an algorithm change layer i before layer i + 1's
inputs are computed (GPTQ feeds the quantized layer's outputs forward). The statistics are
accumulated in forward hooks, so memory is O(in_features²) per linear however many tokens are
used: the Gram matrix X^T X (GPTQ's Hessian, AWQ's output-error metric), mean |x| per channel
(AWQ's activation salience) and max |x| (static FP8 input scales).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Samples per forward chunk: bounds activation memory (chunk × seq_len × intermediate floats)
# without changing any statistic, since every statistic is a sum over tokens.
CHUNK_SAMPLES = 4


@dataclass
class InputStats:
    """Sums over calibration tokens of what one linear saw at its input (shared by q/k/v, gate/up)."""

    tokens: int = 0
    abs_sum: torch.Tensor | None = None  # [in] Σ|x|
    abs_max: torch.Tensor | None = None  # [in] max |x|
    gram: torch.Tensor | None = None  # [in, in] Σ x xᵀ (float64 accumulator)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens


@dataclass
class LayerStats:
    """Per-linear input statistics of one decoder layer, plus k/v output maxima for KV scales."""

    inputs: dict[str, InputStats] = field(default_factory=dict)  # keyed by linear name in layer
    k_absmax: torch.Tensor | None = None  # scalar, after RoPE
    v_absmax: torch.Tensor | None = None  # scalar


def load_float_model(model_dir: Path) -> nn.Module:
    """The dense checkpoint as a float32 `AutoModelForCausalLM` in eval mode (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)  # statistics only; lets algorithms edit weights in place
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def embed(model: nn.Module, tokens: torch.LongTensor) -> tuple[torch.Tensor, dict]:
    """Layer-0 inputs and the keyword arguments every decoder layer takes (RoPE, causal mask)."""
    from transformers.masking_utils import create_causal_mask

    hidden = model.model.embed_tokens(tokens).float()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=hidden[:1],
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )
    return hidden, {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": model.model.rotary_emb(hidden[:1], position_ids=position_ids),
    }


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK_SAMPLES):
        yield slice(start, min(start + CHUNK_SAMPLES, n))


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """The layer's outputs for every calibration sample, computed in fixed-size chunks."""
    return torch.cat([layer(hidden[part], **layer_kwargs) for part in _chunks(hidden.shape[0])])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def collect_layer_stats(
    layer: nn.Module,
    hidden: torch.Tensor,
    layer_kwargs: dict,
    linear_names: list[str],
    *,
    gram: bool,
    kv: bool,
) -> tuple[LayerStats, torch.Tensor]:
    """One pass of the calibration samples through `layer`: its input statistics and its outputs.

    Linears fed the same tensor (q/k/v, gate/up) share one `InputStats`, so the Gram matrix of a
    shared input is computed once. With `kv`, the maxima of the k_proj (after RoPE, what the KV
    cache stores) and v_proj outputs are recorded too.
    """
    stats = LayerStats()
    # id(tensor) -> (tensor, stats); holding the tensor keeps its id from being reused in the chunk.
    by_tensor: dict[int, tuple[torch.Tensor, InputStats]] = {}
    hooks = []
    rope = layer_kwargs.get("position_embeddings")
    head_dim = getattr(layer.self_attn, "head_dim", None)

    def record_input(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            seen = by_tensor.get(id(x))
            if seen is None:
                entry = stats.inputs.setdefault(name, InputStats())
                flat = x.reshape(-1, x.shape[-1]).float()
                entry.tokens += flat.shape[0]
                abs_sum = flat.abs().sum(0, dtype=torch.float64)
                abs_max = flat.abs().amax(0)
                entry.abs_sum = abs_sum if entry.abs_sum is None else entry.abs_sum + abs_sum
                entry.abs_max = abs_max if entry.abs_max is None else torch.maximum(entry.abs_max, abs_max)
                if gram:
                    g = (flat.T @ flat).double()
                    entry.gram = g if entry.gram is None else entry.gram + g
                by_tensor[id(x)] = (x, entry)
            else:
                stats.inputs[name] = seen[1]
            if kv and name.endswith("k_proj"):
                batch, seq, _ = output.shape
                k = output.reshape(batch, seq, -1, head_dim).transpose(1, 2)
                cos, sin = (t.unsqueeze(1) for t in rope)  # [1, 1, seq, head_dim]
                k = k * cos + _rotate_half(k) * sin  # RoPE as in HF apply_rotary_pos_emb
                m = k.abs().amax()
                stats.k_absmax = m if stats.k_absmax is None else torch.maximum(stats.k_absmax, m)
            if kv and name.endswith("v_proj"):
                m = output.abs().amax()
                stats.v_absmax = m if stats.v_absmax is None else torch.maximum(stats.v_absmax, m)

        return hook

    for name in linear_names:
        hooks.append(layer.get_submodule(name).register_forward_hook(record_input(name)))
    try:
        outputs = []
        for part in _chunks(hidden.shape[0]):
            by_tensor.clear()
            outputs.append(layer(hidden[part], **layer_kwargs))
    finally:
        for h in hooks:
            h.remove()
    return stats, torch.cat(outputs)


def layer_linear_names(layer: nn.Module) -> list[str]:
    """Names (relative to the layer) of its nn.Linear modules, in module order."""
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
