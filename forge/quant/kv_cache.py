"""Calibrated FP8 KV-cache scales: `self_attn.k_scale` / `v_scale` per decoder layer.

The KV cache holds keys after rotary embedding (HF `apply_rotary_pos_emb` runs before
`past_key_values.update`), so the key scale is taken after RoPE: it bounds what is actually
stored. llm-compressor calibrates the same tensors (its `QuantizedKVCache` observes the key/value
states handed to the cache update, i.e. post-RoPE keys), and vLLM's FP8 KV cache divides the
post-RoPE key by `k_scale` when writing the cache (`reshape_and_cache_flash`). RoPE rotates pairs
of channels, so a pre-RoPE maximum could under- or over-state the stored range.
Scale = absmax / 448 (largest finite e4m3 value), one float32 scalar per tensor.
"""

from __future__ import annotations

import torch

from forge.quant.layerwise import LayerStats
from forge.quant.rtn import FP8_MAX, MIN_SCALE


def kv_cache_scales(stats: LayerStats, layer_index: int) -> dict[str, torch.Tensor]:
    """`model.layers.N.self_attn.{k,v}_scale` from one layer's calibrated k/v output maxima."""
    prefix = f"model.layers.{layer_index}.self_attn."
    return {
        prefix + "k_scale": (stats.k_absmax.float() / FP8_MAX).clamp(min=MIN_SCALE).reshape(()),
        prefix + "v_scale": (stats.v_absmax.float() / FP8_MAX).clamp(min=MIN_SCALE).reshape(()),
    }
