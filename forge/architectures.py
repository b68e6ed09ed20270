"""What forge knows about each decoder architecture it quantizes: one record per Hugging Face class.

Every quantizer, format writer and compatibility rule reads this table instead of naming an
architecture itself, so adding one is one record plus its tests. Torch-free: planning imports it.

Names are the checkpoint's (safetensors) names relative to a decoder layer `model.layers.N.`;
`{e}` stands for an expert index. The facts come from transformers' own model code
(https://github.com/huggingface/transformers/tree/main/src/transformers/models/<type>/modeling_<type>.py):
which projections exist, which are fused (Phi-3 `qkv_proj` / `gate_up_proj`), which norm feeds
which projections, where Gemma's RMSNorm scales by (1 + weight), and how transformers 5 renames
MoE blocks in memory (Mixtral's `block_sparse_moe` is `mlp` once loaded, its experts fused into
3-D `gate_up_proj` / `down_proj` parameters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from forge.errors import InputError

EXPERT = "{e}"


@dataclass(frozen=True)
class Smoothing:
    """One AWQ scale group: `smooth` produces the input every `balance` module reads.

    `smooth_part` names a row slice of a fused `smooth` linear (Phi-3's `v` of `qkv_proj`, `up`
    of `gate_up_proj`). `balance` may hold modules that are never quantized (an MoE router reads
    the same normed input as its experts): they are scaled so the float function is unchanged,
    but take no part in the scale search. `values`: `smooth` produces the attention values
    `balance` reads; under grouped-query attention each value channel feeds one o_proj column
    per query head sharing its kv head, so those columns share its scale (`forge.quant.awq`).
    """

    smooth: str
    balance: tuple[str, ...]
    smooth_part: str | None = None
    values: bool = False
    per_expert: bool = False  # `{e}` in the names: one group per expert


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face `*ForCausalLM` class, as the quantizers, writers and planner need it."""

    name: str
    model_type: str
    family: str  # what backend rules key on: llama, mistral, qwen2, qwen3, gemma2, phi3, mixtral, qwen3_moe
    linears: tuple[str, ...]  # dense-layer projections, checkpoint names relative to a layer
    smoothing: tuple[Smoothing, ...]
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # fused linear -> its parts, in row order; sizes come from the config (`fused_rows`).
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    experts: str | None = None  # prefix of the per-expert linears, e.g. "mlp.experts"
    expert_linears: tuple[str, str, str] | None = None  # (gate, up, down) names under `{experts}.{e}.`
    router: str | None = None  # never quantized: a few rows that pick experts
    memory_renames: tuple[tuple[str, str], ...] = ()  # checkpoint prefix -> transformers' module prefix
    norm_plus_one: bool = False  # Gemma RMSNorm computes x̂ · (1 + weight)
    # transformers attention implementation calibration runs: SDPA drops Gemma 2's attention-logit
    # soft-capping (only `eager_attention_forward` in modeling_gemma2.py applies `softcap`).
    attention: str = "sdpa"
    qkv_bias: bool = False  # Qwen2: q/k/v carry biases
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    tied_embeddings_default: bool = False  # transformers config default for tie_word_embeddings
    # Legacy TensorRT-LLM checkpoint (trtllm-build input): the TRT-LLM architecture and model
    # family written to config.json, or the reason forge cannot write one.
    trtllm: tuple[str, str] | None = None
    trtllm_reason: str = ""
    # llama.cpp `general.architecture` values forge reads as this class (`source.gguf_config`; only
    # the architectures with Llama's tensor layout, plus Qwen's biases and q/k norms).
    gguf: tuple[str, ...] = ()

    @property
    def moe(self) -> bool:
        return self.experts is not None

    def expert_names(self, index: int) -> tuple[str, ...]:
        """The three linears of expert `index`, relative to the decoder layer."""
        return tuple(f"{self.experts}.{index}.{n}" for n in self.expert_linears)

    def quantizable(self) -> re.Pattern:
        """Full checkpoint module names of the linears forge quantizes (never routers, norms, embeddings)."""
        names = [re.escape(n) for n in self.linears]
        if self.experts:
            names += [rf"{re.escape(self.experts)}\.\d+\.{re.escape(n)}" for n in self.expert_linears]
        return re.compile(rf"^model\.layers\.\d+\.({'|'.join(names)})$")

    def feeds_no_linear(self, name: str) -> bool:
        """Whether a layer-relative checkpoint name is a down projection (the MLP's or an expert's),
        whose output goes to the residual stream and so into no other linear of its layer."""
        if name == "mlp.down_proj":
            return True
        down = rf"{re.escape(self.experts)}\.\d+\.{re.escape(self.expert_linears[2])}" if self.experts else None
        return down is not None and re.fullmatch(down, name) is not None

    def never_quantized(self) -> tuple[str, ...]:
        """Linear-shaped modules that stay in the source dtype in every export (routers)."""
        return (self.router,) if self.router else ()

    def to_memory(self, name: str) -> str:
        """A layer-relative checkpoint name as transformers' loaded module calls it."""
        for old, new in self.memory_renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def to_checkpoint(self, name: str) -> str:
        for old, new in self.memory_renames:
            if name.startswith(new):
                return old + name[len(new) :]
        return name


def fused_rows(arch: Architecture, config: dict, fused: str) -> dict[str, tuple[int, int]]:
    """Row ranges `[start, stop)` of each part of a fused linear, from the model's config."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    sizes = {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}
    sizes["gate"] = sizes["up"] = config.get("intermediate_size", 0)
    rows, start = {}, 0
    for part in arch.fused[fused]:
        rows[part] = (start, start + sizes[part])
        start += sizes[part]
    return rows


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_ATTENTION_GROUPS = (
    Smoothing("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Smoothing("self_attn.v_proj", ("self_attn.o_proj",), values=True),
)
# AutoAWQ's Llama mappings (awq/models/llama.py): the same for Mistral, Qwen2 and Qwen3 (q/k norms
# sit after q_proj / k_proj, so they change none of these producers).
_LLAMA_GROUPS = (
    *_ATTENTION_GROUPS,
    Smoothing("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smoothing("mlp.up_proj", ("mlp.down_proj",)),
)
# TensorRT-LLM 1.2 `examples/models/core/llama/convert_checkpoint.py` converts Llama and Mistral
# with the LLaMAForCausalLM model (tensorrt_llm/models/__init__.py MODEL_MAP maps
# MistralForCausalLM to it); Qwen2 goes through `QWenForCausalLM` (models/qwen/convert.py), whose
# config.json keeps `architecture: Qwen2ForCausalLM` with `qwen_type: qwen2` (models/qwen/config.py).


def _moe_groups(experts: str, gate: str, up: str, down: str, router: str) -> tuple[Smoothing, ...]:
    """Every expert reads the layer's post-attention norm output, as the router does: one group
    scales all experts' gate/up columns and the router's, then each expert's up → down."""
    return (
        *_ATTENTION_GROUPS,
        Smoothing(
            "post_attention_layernorm",
            (f"{experts}.{EXPERT}.{gate}", f"{experts}.{EXPERT}.{up}", router),
        ),
        Smoothing(f"{experts}.{EXPERT}.{up}", (f"{experts}.{EXPERT}.{down}",), per_expert=True),
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "LlamaForCausalLM",
            "llama",
            "llama",
            _LLAMA_LINEARS,
            _LLAMA_GROUPS,
            trtllm=("LlamaForCausalLM", "llama"),
            gguf=("llama",),
        ),
        Architecture(
            "MistralForCausalLM",
            "mistral",
            "mistral",
            _LLAMA_LINEARS,
            _LLAMA_GROUPS,
            trtllm=("LlamaForCausalLM", "llama"),
            # llama.cpp writes Mistral GGUFs as `llama`: they load as LlamaForCausalLM.
        ),
        Architecture(
            "Qwen2ForCausalLM",
            "qwen2",
            "qwen2",
            _LLAMA_LINEARS,
            _LLAMA_GROUPS,
            qkv_bias=True,
            tied_embeddings_default=False,
            trtllm=("Qwen2ForCausalLM", "qwen2"),
            gguf=("qwen2",),
        ),
        Architecture(
            "Qwen3ForCausalLM",
            "qwen3",
            "qwen3",
            _LLAMA_LINEARS,
            _LLAMA_GROUPS,
            qk_norm=True,
            trtllm_reason="TensorRT-LLM 1.2's legacy checkpoint converter has no Qwen3 (the PyTorch backend serves it)",
            gguf=("qwen3",),
        ),
        Architecture(
            "Gemma2ForCausalLM",
            "gemma2",
            "gemma2",
            _LLAMA_LINEARS,
            (
                *_ATTENTION_GROUPS,
                # Gemma 2 normalizes the MLP input with pre_feedforward_layernorm; post_attention and
                # post_feedforward norms act on o_proj / down_proj outputs and feed no linear.
                Smoothing("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                Smoothing("mlp.up_proj", ("mlp.down_proj",)),
            ),
            norms=(
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ),
            norm_plus_one=True,
            attention="eager",
            tied_embeddings_default=True,
            trtllm_reason="forge's legacy TensorRT-LLM writer has no Gemma layout (soft-capping, (1 + w) norms)",
        ),
        Architecture(
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
            (
                Smoothing("input_layernorm", ("self_attn.qkv_proj",)),
                Smoothing("self_attn.qkv_proj", ("self_attn.o_proj",), smooth_part="v", values=True),
                Smoothing("post_attention_layernorm", ("mlp.gate_up_proj",)),
                Smoothing("mlp.gate_up_proj", ("mlp.down_proj",), smooth_part="up"),
            ),
            fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")},
            trtllm_reason="forge's legacy TensorRT-LLM writer has no Phi-3 layout (fused qkv / gate_up)",
        ),
        Architecture(
            "MixtralForCausalLM",
            "mixtral",
            "mixtral",
            _LLAMA_LINEARS[:4],
            _moe_groups("block_sparse_moe.experts", "w1", "w3", "w2", "block_sparse_moe.gate"),
            experts="block_sparse_moe.experts",
            expert_linears=("w1", "w3", "w2"),
            router="block_sparse_moe.gate",
            memory_renames=(("block_sparse_moe.", "mlp."),),
            trtllm_reason="forge's legacy TensorRT-LLM writer has no MoE layout",
        ),
        Architecture(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            "qwen3_moe",
            # mlp.* : the dense layers `mlp_only_layers` / `decoder_sparse_step` leave in place
            _LLAMA_LINEARS,
            _moe_groups("mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate"),
            experts="mlp.experts",
            expert_linears=("gate_proj", "up_proj", "down_proj"),
            router="mlp.gate",
            qk_norm=True,
            trtllm_reason="forge's legacy TensorRT-LLM writer has no MoE layout",
        ),
    )
}

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# Any architecture's quantizable linear: for callers holding a state dict without its config.
ANY_QUANTIZABLE = re.compile("|".join(f"(?:{a.quantizable().pattern})" for a in ARCHITECTURES.values()))


def architecture_name(config: dict) -> str:
    names = config.get("architectures") or [config.get("model_type", "?")]
    return names[0] if isinstance(names, list) and names else str(names)


def get_architecture(config: dict) -> Architecture:
    """The record for a config.json, or an InputError naming the supported classes."""
    name = architecture_name(config)
    if name not in ARCHITECTURES:
        raise InputError(
            f"source: architecture {name} is not supported yet (forge maps {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return ARCHITECTURES[name]


def trtllm_problem(arch: Architecture) -> str | None:
    """Why the legacy TensorRT-LLM checkpoint cannot be written for `arch`, or None."""
    return None if arch.trtllm else f"{arch.name}: {arch.trtllm_reason}"


def num_experts(config: dict) -> int:
    """Experts per MoE layer (`num_local_experts` in Mixtral, `num_experts` in Qwen3-MoE)."""
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)
