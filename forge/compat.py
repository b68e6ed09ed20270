"""What can run where: the backend × scheme × GPU × model-shape rules, as one readable table.

Checked at plan time, before any download or quantization. Each rule returns the reason a
combination is impossible (naming what would work instead) or None when it is fine.
Sources: vLLM https://docs.vllm.ai/en/latest/features/quantization/supported_hardware.html, TGI
https://huggingface.co/docs/text-generation-inference/conceptual/quantization, LMDeploy TurboMind
https://lmdeploy.readthedocs.io/en/latest/quantization/w4a16.html, TensorRT-LLM
https://nvidia.github.io/TensorRT-LLM/reference/support-matrix.html (and each rule's own comment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forge.architectures import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture, num_experts
from forge.backends import export_format
from forge.backends.trtllm import check_trtllm_support
from forge.errors import InputError
from forge.formats.specs import format_problem, int4_group_problem
from forge.gpus import GPUProfile
from forge.quant.scheme import Scheme
from forge.untrusted import positive_int

if TYPE_CHECKING:
    from forge.recipe import Target

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelShape", "architecture_problem", "combination_problem"]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions quantization and tensor parallelism must divide, and the weights must have."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str
    vocab_size: int = 0
    num_layers: int = 0
    experts: int = 0  # MoE: experts per sparse layer
    expert_intermediate_size: int = 0  # MoE: each expert's MLP width
    # MoE: layers that keep a dense MLP (Qwen3-MoE `mlp_only_layers`, or off `decoder_sparse_step`)
    mlp_only_layers: tuple[int, ...] = ()
    sparse_step: int = 1

    @classmethod
    def from_config(cls, config: object, origin: str = "config.json") -> ModelShape:
        """The shape a config.json claims, refused (naming the key) unless every size is a positive
        integer and the attention heads fit together; checked against the weights by `check_weights`."""
        if not isinstance(config, dict):
            raise InputError(f"{origin}: not a JSON object")
        names = config.get("architectures") or [config.get("model_type", "?")]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{origin}: architectures must be a list of class names (got {names!r})")
        architecture = names[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise InputError(f"source: architecture {architecture} is not supported yet (forge maps {supported})")

        def size(key: str, default: object = None) -> int:
            value = config.get(key)
            value = default if value is None else value
            if value is None:
                raise InputError(f"{origin}: {key} is missing")
            if not positive_int(value):
                raise InputError(f"{origin}: {key} must be a positive integer (got {value!r})")
            return value

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise InputError(
                f"{origin}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        head_dim = size("head_dim", hidden // heads or None)
        if head_dim % 2:  # rotary embeddings rotate halves of each head
            raise InputError(f"{origin}: head_dim {head_dim} must be even")
        arch = ARCHITECTURES[architecture]
        moe: dict = {}
        if arch.moe:
            experts = num_experts(config)
            if not positive_int(experts):
                raise InputError(f"{origin}: num_local_experts / num_experts must be a positive integer")
            step = config.get("decoder_sparse_step") or 1
            only = config.get("mlp_only_layers") or []
            if not positive_int(step) or not isinstance(only, list) or not all(isinstance(i, int) for i in only):
                raise InputError(f"{origin}: decoder_sparse_step / mlp_only_layers are malformed")
            width = "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"
            moe = {"experts": experts, "expert_intermediate_size": size(width), "mlp_only_layers": tuple(only),
                   "sparse_step": step}  # fmt: skip
        return cls(
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            architecture=architecture,
            vocab_size=size("vocab_size"),
            num_layers=size("num_hidden_layers"),
            **moe,
        )

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    def sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` holds experts (transformers' Qwen3-MoE rule; all for Mixtral)."""
        return bool(self.experts) and layer not in self.mlp_only_layers and (layer + 1) % self.sparse_step == 0

    @property
    def has_dense_mlp(self) -> bool:
        return not self.experts or bool(self.mlp_only_layers) or self.sparse_step > 1

    def weight_shapes(self, layers: int) -> dict[str, tuple[int, ...]]:
        """The weights a transformers model of this architecture and shape has, by checkpoint name,
        for its first `layers` decoder layers (projections, fused parts, experts, routers, norms,
        q/k norms and biases as `forge.architectures` describes them)."""
        arch = self.arch
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size  # fmt: skip
        out_in = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "qkv_proj": (q + 2 * kv, h),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i), "gate_up_proj": (2 * i, h)}  # fmt: skip
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,),
                  "lm_head.weight": (self.vocab_size, h)}  # fmt: skip
        for n in range(layers):
            layer = f"model.layers.{n}."
            sparse = self.sparse(n)
            for name in arch.linears:
                if sparse and name.startswith("mlp."):
                    continue  # this layer's MLP is its experts
                shapes[f"{layer}{name}.weight"] = out_in[name.rsplit(".", 1)[-1]]
            if sparse:
                e_i = self.expert_intermediate_size
                gate, up, down = arch.expert_linears
                shapes[f"{layer}{arch.router}.weight"] = (self.experts, h)
                for e in range(self.experts):
                    prefix = f"{layer}{arch.experts}.{e}."
                    shapes.update({f"{prefix}{gate}.weight": (e_i, h), f"{prefix}{up}.weight": (e_i, h),
                                   f"{prefix}{down}.weight": (h, e_i)})  # fmt: skip
            for norm in arch.norms:
                shapes[f"{layer}{norm}.weight"] = (h,)
            if arch.qkv_bias:
                shapes.update({f"{layer}self_attn.q_proj.bias": (q,), f"{layer}self_attn.k_proj.bias": (kv,),
                               f"{layer}self_attn.v_proj.bias": (kv,)})  # fmt: skip
            if arch.qk_norm:
                shapes.update({f"{layer}self_attn.q_norm.weight": (self.head_dim,),
                               f"{layer}self_attn.k_norm.weight": (self.head_dim,)})  # fmt: skip
        return shapes

    def check_weights(self, found: Mapping[str, tuple[int, ...]], tied: bool, origin: str) -> None:
        """InputError unless the weights' headers have every tensor this shape implies, at its shape,
        and no layer beyond it: run before anything is allocated from the config's sizes, so a lying
        config.json (`hidden_size: 10000000`) is refused instead of allocating the model it describes."""
        sizes = (
            f"hidden_size {self.hidden_size}, intermediate_size {self.intermediate_size}, "
            f"vocab_size {self.vocab_size}, {self.num_heads} heads of {self.head_dim}, {self.num_kv_heads} KV heads"
        )
        layers = set()
        for name in found:  # first the layer count, so that `num_hidden_layers: 10**9` enumerates nothing
            index = name.split(".")[2] if name.startswith("model.layers.") else None
            if index is not None and (not index.isdigit() or int(index) >= self.num_layers):
                raise InputError(f"{origin}: tensor {name} is beyond config.json's num_hidden_layers {self.num_layers}")
            if index is not None:
                layers.add(int(index))
        if self.experts:  # then the expert count, so that `num_experts: 10**9` enumerates nothing either
            self._check_expert_count(found, layers, origin)
        present = self.num_layers if len(layers) == self.num_layers else min(set(range(len(layers) + 1)) - layers)
        expected = self.weight_shapes(min(self.num_layers, present + 1))
        for name, shape in expected.items():
            if name not in found:
                if name == "lm_head.weight" and tied:
                    continue
                raise InputError(f"{origin}: tensor {name} is missing from the weights (config.json: {self.num_layers} "
                                 f"layers{'' if tied else ', tie_word_embeddings false'})")  # fmt: skip
            if tuple(found[name]) != shape:
                got = list(found[name])
                raise InputError(
                    f"{origin}: tensor {name} has shape {got}, config.json implies {list(shape)} ({sizes})"
                )

    def _check_expert_count(self, found: Mapping[str, tuple[int, ...]], layers: set[int], origin: str) -> None:
        """Every expert index below the config's count and each present, checked by name only."""
        marker = f".{self.arch.experts}."
        seen: set[int] = set()
        for name in found:
            if marker not in name:
                continue
            index = name.split(marker, 1)[1].split(".", 1)[0]
            if not index.isdigit() or int(index) >= self.experts:
                raise InputError(f"{origin}: tensor {name} is beyond config.json's {self.experts} experts")
            seen.add(int(index))
        if len(seen) < self.experts and any(self.sparse(n) for n in layers):
            missing = min(set(range(len(seen) + 1)) - seen)
            raise InputError(
                f"{origin}: the tensors of expert {missing} are missing (config.json: {self.experts} experts)"
            )

    def output_dims(self) -> dict[str, int]:
        """Output width of each projection kind (the dimension int4 formats pack along their rows)."""
        dims = {
            "q_proj (heads × head_dim)": self.num_heads * self.head_dim,
            "k/v_proj (KV heads × head_dim)": self.num_kv_heads * self.head_dim,
            "o_proj/down_proj (hidden_size)": self.hidden_size,
        }
        if self.has_dense_mlp:
            dims["gate/up_proj (intermediate_size)"] = self.intermediate_size
        if self.experts:
            dims["expert gate/up_proj (expert intermediate size)"] = self.expert_intermediate_size
        return dims

    def input_dims(self, tp: int = 1) -> dict[str, int]:
        """Per-rank input width of each projection kind (row-parallel layers are split by tp)."""
        dims = {
            "q/k/v/gate/up_proj (hidden_size)": self.hidden_size,
            "o_proj (heads × head_dim / tp)": self.num_heads * self.head_dim // tp,
        }
        if self.has_dense_mlp:
            dims["down_proj (intermediate_size / tp)"] = self.intermediate_size // tp
        if self.experts:
            dims["expert down_proj (expert intermediate size / tp)"] = self.expert_intermediate_size // tp
        return dims


def group_size_problem(scheme: Scheme, shape: ModelShape, tp: int = 1) -> str | None:
    """int4 groups that do not tile every projection's input (per rank): `forge.formats.specs`' one rule."""
    return int4_group_problem(scheme, shape, tp)


def tensor_parallel_problem(shape: ModelShape, tp: int) -> str | None:
    """Why the model cannot be split over `tp` ranks, or None: the one rule `forge plan` applies to
    every target and the legacy TensorRT-LLM checkpoint writer applies again at export, so the two
    never disagree. Torch-free.

    Attention heads and the MLP split evenly. KV heads split evenly or, when tp is a multiple of
    them, are replicated: every rank keeps one KV head, the head its query heads read. vLLM does
    this, and so do both writers of TensorRT-LLM checkpoints: TRT-LLM's converters
    (`dup_kv_weight` / `dup_kv_bias` in tensorrt_llm/models/convert_utils.py, used by
    models/llama/convert.py and models/qwen/convert.py when num_key_value_heads < tp_size) and
    ModelOpt's export (`dup_kv_weight` in modelopt/torch/export/layer_utils.py); the engine then
    holds ceil(num_kv_heads / tp_size) KV heads per rank (tensorrt_llm/layers/attention.py).
    """
    where = f"tensor_parallel {tp}"
    if shape.num_heads % tp:
        return f"{where}: {shape.num_heads} attention heads cannot be split over {tp} GPUs"
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        return f"{where}: {shape.num_kv_heads} KV heads can neither be split nor replicated over {tp} GPUs"
    if shape.intermediate_size % tp:
        return f"{where}: intermediate_size {shape.intermediate_size} cannot be split over {tp} GPUs"
    return None


# vLLM and TGI serve an FP8 checkpoint on Ampere (compute capability ≥ 8.0) weight-only: the FP8
# weights go through an FP8 Marlin kernel with 16-bit activations (W8A16). vLLM:
# https://docs.vllm.ai/en/latest/features/quantization/fp8.html and `is_fp8_marlin_supported` (≥ 8.0) in
# https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/layers/quantization/utils/marlin_utils_fp8.py;
# TGI: `GPTQMarlinFP8Linear` where the GPU has no FP8, in
# https://github.com/huggingface/text-generation-inference/blob/main/server/text_generation_server/layers/marlin/fp8.py
FP8_MARLIN_BACKENDS = ("vllm", "tgi")


def fp8_weight_only(scheme: Scheme, backend: str | None, gpu: GPUProfile) -> bool:
    """FP8 weights on a GPU without FP8 math that `backend` still serves, as W8A16."""
    return (
        scheme.weight_format == "fp8"
        and not gpu.fp8
        and backend in FP8_MARLIN_BACKENDS
        and gpu.compute_capability >= (8, 0)
    )


def combination_note(scheme: Scheme, backend: str, gpu: GPUProfile) -> str:
    """What a user should know about a combination that can be built ("" when nothing)."""
    if fp8_weight_only(scheme, backend, gpu):
        return (
            f"W8A16 on Ampere: {gpu.name} has no FP8 math, so {backend} runs the FP8 weights in its FP8 Marlin "
            "kernel with 16-bit activations (the same FP8 weights, slower than FP8 math on Ada or Hopper)"
        )
    return ""


def gpu_problem(scheme: Scheme, gpu: GPUProfile, backend: str | None = None) -> str | None:
    cc = ".".join(map(str, gpu.compute_capability))
    if scheme.weight_format == "fp8" and not gpu.fp8 and not fp8_weight_only(scheme, backend, gpu):
        return (
            f"{gpu.name} (compute capability {cc}) cannot run FP8 (needs ≥ 8.9: L4, L40S, H100, H200, B200); "
            "use an int4 preset such as AWQ_W4A16"
        )
    if scheme.weight_format == "fp4" and not gpu.fp4:
        return f"{gpu.name} (compute capability {cc}) cannot serve NVFP4 (Blackwell only: B200)"
    if scheme.weight_format == "int4" and gpu.compute_capability < (8, 0):
        return f"{gpu.name} (compute capability {cc}) has no fast int4 kernels (needs Ampere ≥ 8.0)"
    if scheme.kv_cache_dtype == "fp8" and not gpu.fp8:
        return f"{gpu.name} cannot hold an fp8 KV cache efficiently (needs ≥ 8.9); use kv_cache_dtype: auto"
    return None


def vllm_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    if scheme.kv_cache_dtype in ("int8", "int4"):
        return f"vLLM has no {scheme.kv_cache_dtype} KV cache; use kv_cache_dtype fp8 or auto"
    return None


def tgi_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    if scheme.kv_cache_dtype in ("int8", "int4"):
        return f"TGI has no {scheme.kv_cache_dtype} KV cache; use kv_cache_dtype fp8 or auto"
    return None


def lmdeploy_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    # TurboMind: AWQ/GPTQ int4 with group 128 only; FP8 only as 128×128 blocks; KV by --quant-policy.
    if scheme.weight_format == "fp8":
        return "LMDeploy TurboMind takes FP8 only as 128×128 blocks, not per-tensor/per-channel; use AWQ_W4A16"
    if scheme.weight_format == "int4" and scheme.group_size != 128:
        return f"LMDeploy TurboMind takes int4 only with group_size 128 (got {scheme.group_size})"
    if scheme.kv_cache_dtype == "fp8":
        return "LMDeploy quantizes the KV cache online (kv_cache_dtype int8 or int4), not with fp8 scales"
    return None


def trtllm_problem(scheme: Scheme, gpu: GPUProfile, mode: str | None) -> str | None:
    return check_trtllm_support(scheme, gpu, mode or "pytorch")


# backend → its rule; each backend module picks its formats, this table says what it can load.
BACKEND_RULES: dict[str, Callable[[Scheme, GPUProfile, str | None], str | None]] = {
    "vllm": vllm_problem,
    "tgi": tgi_problem,
    "lmdeploy": lmdeploy_problem,
    "trtllm": trtllm_problem,
}


# Which backend serves which architecture (the `family` of `forge.architectures`), with the
# upstream list each fact comes from. vLLM serves all eight families, with compressed-tensors
# W4A16 / FP8 and AWQ for their MoE experts too
# (https://docs.vllm.ai/en/latest/models/supported_models.html), so it has no entry here.
_TGI_MODELS = "https://huggingface.co/docs/text-generation-inference/supported_models"
# TurboMind's own architecture list decides whether LMDeploy runs a model on it (forge starts
# `--backend turbomind`): v0.16.0 `SUPPORTED_ARCHS` holds Llama, Qwen2, Qwen3, Qwen3-MoE and Mixtral
# (https://github.com/InternLM/lmdeploy/blob/v0.16.0/lmdeploy/turbomind/supported_models.py);
# MistralForCausalLM left it after v0.12, Gemma and Phi-3 were never in it (PyTorch engine only).
_TURBOMIND_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# TensorRT-LLM PyTorch backend models (https://nvidia.github.io/TensorRT-LLM/models/supported-models.html):
# Llama, Mistral, Mixtral, Phi-3 (Phi-4), Qwen2, Qwen3, Qwen3-MoE, Gemma 3 — not Gemma 2.
_TRTLLM_PYTORCH_FAMILIES = ("llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe")


def architecture_problem(architecture: str, backend: str, scheme: Scheme, trtllm_mode: str | None) -> str | None:
    """Why `backend` cannot serve (or forge cannot export for it) this architecture, or None."""
    arch = ARCHITECTURES[architecture]
    if backend == "tgi" and arch.family in ("qwen3", "qwen3_moe"):
        return f"TGI has no {architecture} model ({_TGI_MODELS}); use vllm"
    if backend == "lmdeploy" and arch.family not in _TURBOMIND_FAMILIES:
        return f"LMDeploy TurboMind (v0.16.0) does not run {architecture} (not in its SUPPORTED_ARCHS); use vllm"
    if backend == "trtllm":
        if (trtllm_mode or "pytorch") == "pytorch" and arch.family not in _TRTLLM_PYTORCH_FAMILIES:
            return f"the TensorRT-LLM PyTorch backend has no {architecture} model; use vllm"
        if trtllm_mode == "engine" and arch.trtllm is None:  # engines are built from the legacy checkpoint
            return f"no TensorRT-LLM engine for {architecture}: {arch.trtllm_reason}; use mode: pytorch"
    return None


def combination_problem(
    scheme: Scheme,
    backend: str,
    gpu: GPUProfile,
    shape: ModelShape,
    tp: int,
    trtllm_mode: str | None,
    target: Target | None = None,
) -> str | None:
    """Why (scheme, backend, gpu, tp) cannot be built or served, or None when it can.

    With the recipe `target`, the spec of the format the backend picks for it is asked too
    (`forge.formats.specs`), the same spec its writer refuses with, so the plan never accepts a
    cell that the export stage would refuse after quantizing.
    """
    return (
        gpu_problem(scheme, gpu, backend)
        or BACKEND_RULES[backend](scheme, gpu, trtllm_mode)
        or architecture_problem(shape.architecture, backend, scheme, trtllm_mode)
        or tensor_parallel_problem(shape, tp)
        or group_size_problem(scheme, shape, tp)
        or (None if target is None else format_problem(planned_format(backend, scheme, target), scheme, shape, tp))
    )


def planned_format(backend: str, scheme: Scheme, target: Target) -> str:
    """The format `backend` exports `scheme` in for `target` (its record's choice)."""
    return export_format(backend, scheme, target)
