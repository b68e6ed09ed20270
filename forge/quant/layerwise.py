"""Run calibration tokens through a dense model one decoder layer at a time, collecting statistics.

AWQ, GPTQ, static FP8 and KV-cache scales all need the same thing: what each linear of decoder
layer i sees when the calibration text flows through the model. Running one layer at a time keeps
only one layer's activations alive, and lets an algorithm change layer i before layer i + 1's
inputs are computed (GPTQ feeds the quantized layer's outputs forward). The statistics are
accumulated in forward hooks, so memory is O(in_features²) per linear however many tokens are
used: the Gram matrix X^T X (GPTQ's Hessian, AWQ's output-error metric), mean |x| per channel
(AWQ's activation salience) and max |x| (static FP8 input scales). Where a linear sees fewer
calibration tokens than it has input channels, the inputs X themselves can be kept too: they are
then the smaller factor of the Gram matrix (AWQ's error measure costs out·in·tokens through X
instead of out·in² through X^T X).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from forge.formats.model_dir import Checkpoint

# Samples per forward chunk: bounds activation memory (chunk × seq_len × intermediate floats)
# without changing any statistic, since every statistic is a sum over tokens.
CHUNK_SAMPLES = 4


@dataclass
class InputStats:
    """Sums over calibration tokens of what one linear saw at its input (shared by q/k/v, gate/up)."""

    tokens: int = 0
    abs_sum: torch.Tensor | None = None  # [in] Σ|x|
    abs_max: torch.Tensor | None = None  # [in] max |x|
    gram: torch.Tensor | None = None  # [in, in] Σ x xᵀ, float32 (as the GPTQ reference accumulates H)
    inputs: torch.Tensor | None = None  # [tokens, in] the x themselves, float32, where tokens < in (then no gram)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    def full_gram(self) -> torch.Tensor:
        """Σ x xᵀ: as accumulated, or XᵀX of the kept inputs (a Gram is not kept beside them)."""
        return self.gram if self.gram is not None else self.inputs.T @ self.inputs


@dataclass
class LayerStats:
    """Per-linear input statistics of one decoder layer, plus k/v output maxima for KV scales."""

    inputs: dict[str, InputStats] = field(default_factory=dict)  # keyed by linear name in layer
    k_absmax: torch.Tensor | None = None  # scalar, after RoPE
    v_absmax: torch.Tensor | None = None  # scalar


def _attention(config: dict) -> str:
    """The attention implementation the architecture record names (SDPA unless that would change the function)."""
    from forge.architectures import ARCHITECTURES, architecture_name

    record = ARCHITECTURES.get(architecture_name(config))
    return record.attention if record is not None else "sdpa"


def load_float_model(model_dir: Path) -> nn.Module:
    """The dense checkpoint as a whole float32 `AutoModelForCausalLM` in eval mode (tests and
    small models; the quantizer builds a `StreamedModel` instead)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(model_dir) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=_attention(config))
    model.eval()
    model.requires_grad_(False)  # statistics only; lets algorithms edit weights in place
    return model


class StreamedModel:
    """The float32 model of a checkpoint with its weights on the meta device until needed.

    Calibration needs the embeddings once (to compute layer 0's inputs) and then one decoder
    layer at a time, so only those are ever real: 8B parameters in float32 would be 32 GB. The
    model is built by transformers from the config on the meta device and its computed buffers
    (rotary `inv_freq`, Gemma's embedding scale) are recomputed on the CPU by the model's own
    `_init_weights`, as `from_pretrained` does for buffers a checkpoint does not hold; weights
    come from the checkpoint, cast to float32 as `from_pretrained(dtype=float32)` casts them.
    """

    def __init__(self, model_dir: Path, source: Checkpoint):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = json.loads((Path(model_dir) / "config.json").read_text())
        hf_config = AutoConfig.from_pretrained(model_dir)
        attention = _attention(self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attention)
        model.eval()
        model.requires_grad_(False)
        self.model, self.source = model, source
        self.layers = decoder_layers(model)

    def _materialize(self, module: nn.Module, prefix: str, state: dict[str, torch.Tensor], copy: bool) -> None:
        """Give `module` real buffers and the checkpoint's weights (`state`, checkpoint names under
        `prefix`); `copy` when the caller keeps `state`: algorithms edit the weights in place."""
        from forge.errors import InputError
        from forge.quant.moe import to_transformers_state

        _init_buffers(self.model, module)
        floats = {k: v.to(torch.float32, copy=copy) if v.is_floating_point() else v for k, v in state.items()}
        floats = to_transformers_state(self.config, floats)
        local = {k.removeprefix(prefix): v for k, v in floats.items() if k.startswith(prefix)}
        expected = {k for k, v in module.state_dict().items() if v.is_meta}
        if missing := sorted(expected - set(local)):
            raise InputError(f"source: tensor {prefix}{missing[0]} is missing from the checkpoint")
        module.load_state_dict({k: local[k] for k in expected}, strict=False, assign=True)
        module.requires_grad_(False)

    def embed(self, tokens: torch.LongTensor) -> tuple[torch.Tensor, list[dict]]:
        """`capture_layer_inputs` with only what runs before layer 0 made real, released after."""
        outer = [(n, m) for n, m in self.model.model.named_children() if m is not self.layers]
        present = set(self.source.names)
        for name, module in outer:
            prefix = f"model.{name}."
            _init_buffers(self.model, module)
            wanted = [f"{prefix}{k}" for k, v in module.state_dict().items() if v.is_meta]
            state = {k: self.source.read_as(k, torch.float32) for k in wanted if k in present}
            self._materialize(module, prefix, state, copy=False)
        try:
            return capture_layer_inputs(self.model, tokens)
        finally:
            for _, module in outer:
                module.to("meta")

    def layer(self, index: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer `index` with real float32 weights from `state` (its checkpoint tensors)."""
        layer = self.layers[index]
        self._materialize(layer, f"model.layers.{index}.", state, copy=True)
        return layer

    def release(self, index: int) -> None:
        """Back to the meta device: the layer's memory is freed."""
        self.layers[index].to("meta")


def _init_buffers(model: nn.Module, root: nn.Module) -> None:
    """Real CPU values for the meta buffers under `root`, from the model's own `_init_weights`
    (transformers' initializer for buffers no checkpoint holds), before any weight is loaded:
    parameters still on meta make its weight initialization a no-op."""
    for module in root.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        model._init_weights(module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


class _Stop(Exception):
    """Raised from a pre-hook to end a forward pass once the inputs it needs are captured."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, tokens: torch.LongTensor) -> tuple[torch.Tensor, list[dict]]:
    """Layer-0 inputs of every sample and, per decoder layer, the keyword arguments the model's
    own forward hands it (causal or sliding-window mask, rotary cos/sin, position ids). No decoder
    layer runs (they pass their input on while their arguments are recorded), so they may be on
    the meta device (`StreamedModel`).

    The model runs itself, so whatever an architecture does before its first layer (Gemma's
    √hidden embedding scale, per-layer-type masks and rotary tables) is exactly what serving does,
    without forge re-implementing any of it. The keyword arguments are captured from one sample
    (batch 1), which broadcasts over the calibration chunks as the inputs are causal and unpadded.
    """
    layers = decoder_layers(model)
    captured: dict = {}

    def first(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layers[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        model.model(input_ids=tokens, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    per_layer: list[dict] = []

    def keep(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            per_layer.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:  # the arguments are all that is wanted: no layer needs to compute
        layer.forward = _passthrough
    try:
        model.model(input_ids=tokens[:1], use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
        for handle in handles:
            handle.remove()
    return captured["hidden"].float(), per_layer


def _passthrough(*args, **kwargs) -> torch.Tensor:
    """A decoder layer's stand-in while its arguments are captured: hands its input on."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def embed(model: nn.Module, tokens: torch.LongTensor) -> tuple[torch.Tensor, dict]:
    """Layer-0 inputs and layer 0's keyword arguments (every layer's, when they are all alike)."""
    hidden, per_layer = capture_layer_inputs(model, tokens)
    return hidden, per_layer[0]


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


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF `apply_rotary_pos_emb` on `[batch, heads, seq, head_dim]` keys; a table narrower than
    the head (Phi-3 `partial_rotary_factor`) rotates the leading channels and passes the rest."""
    rotary = cos.shape[-1]
    if rotary == k.shape[-1]:
        return k * cos + _rotate_half(k) * sin
    k_rot, k_pass = k[..., :rotary], k[..., rotary:]
    return torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)


@dataclass(frozen=True)
class KVSources:
    """Where a layer's cached keys and values appear: the module whose output holds them and,
    for a fused projection, its row range. Keys come from the q/k norm when there is one
    (Qwen3 normalizes each key head before RoPE)."""

    k_module: str = "self_attn.k_proj"
    v_module: str = "self_attn.v_proj"
    k_rows: tuple[int, int] | None = None
    v_rows: tuple[int, int] | None = None


@torch.no_grad()
def collect_layer_stats(
    layer: nn.Module,
    hidden: torch.Tensor,
    layer_kwargs: dict,
    linear_names: list[str],
    *,
    gram: bool,
    kv: bool,
    kv_sources: KVSources | None = None,
    inputs: bool = False,
) -> tuple[LayerStats, torch.Tensor]:
    """One pass of the calibration samples through `layer`: its input statistics and its outputs.

    Linears fed the same tensor (q/k/v, gate/up) share one `InputStats`, so the Gram matrix of a
    shared input is computed once. With `inputs`, the inputs of every linear wider than the
    calibration's token count are kept instead of its Gram matrix (`InputStats.inputs`: at 70B,
    down_proj's Gram is 28672² floats, 3.06 GiB, its 1024 inputs 0.11 GiB). With `kv`, the maxima of
    the keys (after RoPE, what the KV cache stores) and values are recorded too, read where
    `kv_sources` says they appear.
    Modules of `linear_names` that never run (an MoE expert no token was routed to) get no entry.
    """
    sources = kv_sources or KVSources()
    stats = LayerStats()
    # id(tensor) -> (tensor, stats); holding the tensor keeps its id from being reused in the chunk.
    by_tensor: dict[int, tuple[torch.Tensor, InputStats]] = {}
    hooks = []
    rope = layer_kwargs.get("position_embeddings")
    head_dim = getattr(layer.self_attn, "head_dim", None)
    tokens = hidden.shape[0] * hidden.shape[1]  # an MoE expert sees a subset of them

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
                if inputs and flat.shape[1] > tokens:  # the inputs themselves: XᵀX on demand, no Gram
                    entry.inputs = flat.clone() if entry.inputs is None else torch.cat([entry.inputs, flat])
                elif gram:  # accumulated in place: at 8B down_proj's is 14336² floats, a copy is 0.77 GiB
                    if entry.gram is None:
                        entry.gram = torch.zeros(flat.shape[1], flat.shape[1])
                    entry.gram.addmm_(flat.T, flat)
                by_tensor[id(x)] = (x, entry)
            else:
                stats.inputs[name] = seen[1]

        return hook

    def record_kv(rows: tuple[int, int] | None, key: bool):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            out = output if rows is None else output[..., rows[0] : rows[1]]
            if key:
                batch, seq = out.shape[:2]
                k = out.reshape(batch, seq, -1, head_dim).transpose(1, 2)
                cos, sin = (t.unsqueeze(1) for t in rope)  # [1, 1, seq, rotary_dim]
                m = apply_rope(k, cos, sin).abs().amax()  # RoPE as in HF apply_rotary_pos_emb
                stats.k_absmax = m if stats.k_absmax is None else torch.maximum(stats.k_absmax, m)
            else:
                m = out.abs().amax()
                stats.v_absmax = m if stats.v_absmax is None else torch.maximum(stats.v_absmax, m)

        return hook

    for name in linear_names:
        hooks.append(layer.get_submodule(name).register_forward_hook(record_input(name)))
    if kv:
        hooks.append(layer.get_submodule(sources.k_module).register_forward_hook(record_kv(sources.k_rows, True)))
        hooks.append(layer.get_submodule(sources.v_module).register_forward_hook(record_kv(sources.v_rows, False)))
    try:
        outputs = []
        for part in _chunks(hidden.shape[0]):
            by_tensor.clear()
            outputs.append(layer(hidden[part], **layer_kwargs))
    finally:
        for h in hooks:
            h.remove()
    return stats, torch.cat(outputs)


def layer_linear_names(layer: nn.Module, extra: tuple[str, ...] = ()) -> list[str]:
    """Names (relative to the layer) of its nn.Linear modules, in module order, plus those of
    `extra` the layer has (an MoE router, which is no nn.Linear but reads the experts' input)."""
    names = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
    present = {name for name, _ in layer.named_modules()}
    return names + [name for name in extra if name in present and name not in names]
