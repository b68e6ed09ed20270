"""Mixture-of-experts layers as one `nn.Linear` per expert projection, for calibration.

transformers 5 loads MoE experts fused into 3-D parameters (`experts.gate_up_proj[E, 2I, H]`,
`experts.down_proj[E, H, I]`, see `MixtralExperts` / `Qwen3MoeExperts` in
https://github.com/huggingface/transformers/blob/main/src/transformers/models/mixtral/modeling_mixtral.py)
while checkpoints, and every format forge writes, keep one 2-D weight per expert and projection.
Calibration needs what each expert's projections see, so the fused module is swapped for an
equivalent one whose children carry the checkpoint's names (`experts.3.w1`): the same forward
hooks then record per-expert statistics, only over the tokens the router actually sent there.
"""

from __future__ import annotations

import torch
from torch import nn

from forge.architectures import Architecture


class UnfusedExperts(nn.ModuleList):
    """The fused experts module's function, one child per expert holding three `nn.Linear`."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        self.__dict__["act_fn"] = fused.act_fn  # not a child: children are the experts only
        gate_name, up_name, down_name = names
        inter = fused.down_proj.shape[-1]
        for e in range(fused.gate_up_proj.shape[0]):
            expert = nn.Module()
            for name, weight in (
                (gate_name, fused.gate_up_proj[e, :inter]),
                (up_name, fused.gate_up_proj[e, inter:]),
                (down_name, fused.down_proj[e]),
            ):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
                setattr(expert, name, linear)
            self.append(expert)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Route each token to its top-k experts and sum their weighted outputs (as the fused
        module does; an expert no token chose does not run, so its hooks see nothing)."""
        gate_name, up_name, down_name = self.names
        out = torch.zeros_like(hidden)
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            if token_idx.numel() == 0:
                continue
            x = hidden[token_idx]
            h = self.act_fn(getattr(expert, gate_name)(x)) * getattr(expert, up_name)(x)
            y = getattr(expert, down_name)(h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, arch: Architecture) -> None:
    """Replace every fused experts module of `model` by an `UnfusedExperts` (in place)."""
    for layer in model.model.layers:
        unfuse_layer_experts(layer, arch)


def unfuse_layer_experts(layer: nn.Module, arch: Architecture) -> None:
    """Replace the fused experts module of one decoder layer by an `UnfusedExperts` (in place)."""
    if not arch.moe:
        return
    path = arch.to_memory(arch.experts)
    try:
        fused = layer.get_submodule(path)
    except AttributeError:
        return  # a dense layer of a partly-MoE model (Qwen3-MoE `mlp_only_layers`)
    if isinstance(fused, UnfusedExperts) or not hasattr(fused, "gate_up_proj"):
        return
    parent, _, child = path.rpartition(".")
    setattr(layer.get_submodule(parent), child, UnfusedExperts(fused, arch.expert_linears))


def to_transformers_state(config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint-named state dict as transformers' loaded model names it, for `load_state_dict`.

    Only MoE architectures differ: their per-expert 2-D weights are stacked into the fused 3-D
    `experts.gate_up_proj` ([gate; up] rows per expert) and `experts.down_proj`, and renamed
    prefixes (Mixtral's `block_sparse_moe.` → `mlp.`) are applied. Dense architectures and
    configs forge has no record for come back unchanged.
    """
    from forge.architectures import ARCHITECTURES, architecture_name, num_experts

    arch = ARCHITECTURES.get(architecture_name(config))
    if arch is None or not arch.moe:
        return state
    gate, up, down = arch.expert_linears
    experts = num_experts(config)
    out: dict[str, torch.Tensor] = {}
    layers: set[str] = set()
    expert_prefix = f".{arch.experts}."
    for name, tensor in state.items():
        if name.startswith("model.layers.") and expert_prefix in name:
            layers.add(name.split(expert_prefix)[0])
            continue
        if name.startswith("model.layers."):
            layer, rest = name.split(".", 3)[2], name.split(".", 3)[3]
            name = f"model.layers.{layer}.{arch.to_memory(rest)}"
        out[name] = tensor
    fused = arch.to_memory(arch.experts)
    for layer in sorted(layers):
        prefix = f"{layer}.{arch.experts}"
        out[f"{layer}.{fused}.gate_up_proj"] = torch.stack(
            [
                torch.cat([state[f"{prefix}.{e}.{gate}.weight"], state[f"{prefix}.{e}.{up}.weight"]])
                for e in range(experts)
            ]
        )
        out[f"{layer}.{fused}.down_proj"] = torch.stack([state[f"{prefix}.{e}.{down}.weight"] for e in range(experts)])
    return out
