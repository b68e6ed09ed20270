"""Tiny real Llama checkpoints for fast tests: random weights, a real tokenizer, real config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from forge.quant.layerwise import LayerStats

_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "forge turns one recipe into quantized artifacts for every serving backend.",
    "Perplexity measures how surprised a language model is by held-out text.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    directory: Path,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a 2-layer Llama with random weights and a trained BPE tokenizer to `directory`."""
    tokenizer = make_tokenizer(512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Spread the weights a little so quantization error is measurable but not overwhelming.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(architecture: str, vocab_size: int, *, num_layers: int = 2, num_experts: int = 4, **overrides):
    """A small real config of `architecture` from transformers' own config class: hidden 128,
    4 heads of 32 over 2 KV heads (a real grouped-query ratio), widths that take groups of
    32, 64 and 128, and a few experts for the mixture-of-experts models."""
    from transformers import (
        Gemma2Config,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    classes = {
        "LlamaForCausalLM": (LlamaConfig, {}),
        "MistralForCausalLM": (MistralConfig, {"sliding_window": None}),
        "Qwen2ForCausalLM": (Qwen2Config, {}),
        "Qwen3ForCausalLM": (Qwen3Config, {}),
        # sliding window shorter than the calibration windows: the local layers' masks matter
        "Gemma2ForCausalLM": (Gemma2Config, {"sliding_window": 16, "tie_word_embeddings": True}),
        "Phi3ForCausalLM": (Phi3Config, {"pad_token_id": None, "partial_rotary_factor": 0.5}),
        "MixtralForCausalLM": (
            MixtralConfig,
            {"num_local_experts": num_experts, "num_experts_per_tok": 2, "intermediate_size": 128},
        ),
        "Qwen3MoeForCausalLM": (
            Qwen3MoeConfig,
            {"num_experts": num_experts, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
        ),
    }
    config_class, specific = classes[architecture]
    fields = {**common, **specific, **overrides}
    if architecture == "Phi3ForCausalLM":
        fields.pop("head_dim")  # Phi-3 derives it from hidden_size / heads
    return config_class(**fields)


def make_tiny_model(
    directory: Path, architecture: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """Write a tiny random `architecture` model (see `tiny_config`) and a BPE tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(512)
    config = tiny_config(
        architecture,
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
            elif "norm" in name:  # random norms, so smoothing groups folded into the wrong norm show
                p.copy_(torch.rand_like(p) + 0.5 - (1.0 if getattr(config, "model_type", "") == "gemma2" else 0.0))
            elif p.dim() == 1:
                p.normal_(0.0, 0.05)  # biases
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass
class LayerCase:
    """Decoder layer 0 of a tiny checkpoint as calibration sees it: the loaded model, the layer,
    its inputs and keyword arguments, its linears' names, their statistics and the layer's outputs."""

    model: torch.nn.Module
    layer: torch.nn.Module
    hidden: torch.Tensor
    kwargs: dict
    names: list[str]
    stats: LayerStats
    outputs: torch.Tensor


def layer_case(directory: Path, *, num_samples: int = 4, seq_len: int = 64, inputs: bool = False) -> LayerCase:
    """`LayerCase` of `directory`'s first layer with Gram matrices, on `pydoc_topics` calibration."""
    from forge.quant.calibration import load_calibration
    from forge.quant.layerwise import collect_layer_stats, decoder_layers, embed, layer_linear_names, load_float_model

    calibration = load_calibration(["pydoc_topics"], directory, num_samples=num_samples, seq_len=seq_len, seed=0)
    model = load_float_model(directory)
    layer = decoder_layers(model)[0]
    hidden, kwargs = embed(model, calibration)
    names = layer_linear_names(layer)
    stats, outputs = collect_layer_stats(layer, hidden, kwargs, names, gram=True, kv=False, inputs=inputs)
    return LayerCase(model, layer, hidden, kwargs, names, stats, outputs)
