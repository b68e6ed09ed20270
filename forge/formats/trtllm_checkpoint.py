"""The legacy TensorRT-LLM checkpoint: what `trtllm-build` (TRT-LLM ≤ 1.2.x) turns into engines.

A directory with `config.json` (a `PretrainedConfig` dict) and one `rank{N}.safetensors` per
tensor-parallel rank, each rank already holding only its shard. forge writes it straight from a
`QuantizedModel`, re-packing the same integer codes and scales every other format gets, so the
engine serves exactly the weights `QuantizedModel.dequantize()` describes (see `export_notes`
for the few places TensorRT-LLM's own layout forces a rounding).

Where each detail comes from (TensorRT-LLM 1.2.x sources, read, not copied):
- Llama names: `tensorrt_llm/models/llama/convert.py` (`load_weights_from_hf_safetensors`) and
  `get_prefix_and_param_name_map`: `mlp.fc` = HF `gate_proj` (the activated half), `mlp.gate` =
  HF `up_proj`, `mlp.proj` = `down_proj`, `attention.dense` = `o_proj`, `post_layernorm` =
  `post_attention_layernorm`, `transformer.ln_f` = `model.norm`.
- Qwen2 uses the same names (`get_qwen_key_list` in `tensorrt_llm/models/qwen/utils.py`: qwen2
  `mlp.gate` = `up_proj`, `mlp.fc` = `gate_proj`) plus `attention.qkv.bias`: each rank's q, k
  and v bias slices concatenated in that order, in the model dtype (`convert_hf_qwen` in
  `tensorrt_llm/models/qwen/convert.py`); `attention.dense` has no bias (QWenDecoderLayer
  `dense_bias=False`, `tensorrt_llm/models/qwen/model.py`).
- Config fields: `tensorrt_llm/models/llama/config.py` (`LLaMAConfig.from_hugging_face`) and
  `tensorrt_llm/models/qwen/config.py` (`QWenConfig.from_hugging_face`, `to_dict`).
- KV heads fewer than ranks: each KV head is repeated tp / num_kv_heads times before the split
  (`dup_kv_weight` / `dup_kv_bias`, `tensorrt_llm/models/convert_utils.py`), so every rank holds
  the one KV head its query heads read; the rule is `forge.compat.tensor_parallel_problem`.
- Quantized layer parameters: `tensorrt_llm/quantization/layers.py` (`FP8Linear`,
  `Fp8RowwiseLinear`, `WeightOnlyGroupwiseQuantLinear`) and the load-time fix-ups in
  `tensorrt_llm/models/modeling_utils.py` (`preprocess_perlayer_weights`).
- int4 packing: ModelOpt `modelopt/torch/export/quant_utils.py` (`to_quantized_weight`, in
  `model_config_utils.py` in older releases; the writer of TRT-LLM W4A16_AWQ checkpoints): two
  output rows per int8, low nibble = even row, signed nibbles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from forge.architectures import ARCHITECTURES, architecture_name, trtllm_problem
from forge.compat import ModelShape, tensor_parallel_problem
from forge.errors import InputError
from forge.formats.model_dir import TensorSpec, Unit, copy_source_files, write_json, write_safetensors
from forge.formats.specs import SPECS, trtllm_algo
from forge.quant.model import QuantizedLinear, QuantizedModel, Scheme
from forge.untrusted import positive_int, read_json, safetensors_header

FORMAT = "trtllm-checkpoint"
# What `config.json`'s `architecture` names (`forge.architectures`, `trtllm`): Llama and Mistral
# convert with LLaMAForCausalLM, Qwen2 with QWenForCausalLM (tensorrt_llm/models/__init__.py
# MODEL_MAP maps "Qwen2ForCausalLM" to it). The writer lays out exactly these two.
ARCHITECTURE = "LlamaForCausalLM"
QWEN2 = "Qwen2ForCausalLM"
ARCHITECTURES_WRITTEN = (ARCHITECTURE, QWEN2)

# TensorRT-LLM module inside `transformer.layers.{i}` → (HF projections it fuses, how TP splits it).
# "column": output rows are split over ranks; "row": input columns are split and the outputs summed.
# Source: models/llama/convert.py (split dims 0 for qkv/fc/gate, 1 for dense/proj).
LAYER_LINEARS: dict[str, tuple[tuple[str, ...], str]] = {
    "attention.qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "column"),
    "attention.dense": (("self_attn.o_proj",), "row"),
    "mlp.fc": (("mlp.gate_proj",), "column"),
    "mlp.gate": (("mlp.up_proj",), "column"),
    "mlp.proj": (("mlp.down_proj",), "row"),
}

# Group sizes TensorRT-LLM's fine-grained int4 GEMM (cutlass fpA_intB, FINEGRAINED_SCALE[_AND_ZEROS])
# accepts; the same kernels, vendored in onnxruntime's contrib ops, enforce 64 or 128.
TRTLLM_INT4_GROUP_SIZES = (64, 128)


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama config that the checkpoint layout and TP split depend on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: dict) -> LlamaShape:
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )


# ---------------------------------------------------------------- plan-time rules


def quant_algo(scheme: Scheme) -> str:
    """TensorRT-LLM's `QuantAlgo` for a forge scheme (`specs.trtllm_algo`); InputError when none fits."""
    if (algo := trtllm_algo(scheme)) is None:
        raise InputError(SPECS[FORMAT].scheme_problem(scheme))
    return algo


def layout_problems(hf_config: dict, scheme: Scheme, tp_size: int) -> list[str]:
    """Every reason this model/scheme cannot be laid out over `tp_size` ranks (empty when fine)."""
    problems = []
    name = architecture_name(hf_config)
    arch = ARCHITECTURES.get(name)
    reason = f"{name}: not a known architecture" if arch is None else trtllm_problem(arch)
    if reason is None and arch.trtllm[0] not in ARCHITECTURES_WRITTEN:
        reason = f"{name}: converts with TensorRT-LLM's {arch.trtllm[0]}, which this writer does not lay out"
    if reason is not None:
        problems.append(f"source: the TensorRT-LLM checkpoint writer cannot take {reason}")
        return problems
    if hf_config.get("sliding_window") is not None and hf_config.get("use_sliding_window", True):
        # Mistral v0.1 style local attention (or Qwen2 with use_sliding_window): neither
        # LLaMAConfig nor QWenConfig.from_hugging_face carries a window.
        problems.append("source: sliding-window attention is not laid out by the TRT-LLM writer")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        problems.append("source: Llama with attention/MLP biases is not supported by the TRT-LLM writer")
    if scheme.dtype not in ("float16", "bfloat16"):
        problems.append(f"scheme.dtype: TensorRT-LLM quantized kernels run in float16/bfloat16, not {scheme.dtype}")
    if scheme.kv_cache_dtype not in ("auto", "fp8"):
        problems.append(
            f"scheme.kv_cache_dtype: TRT-LLM checkpoints hold fp8 KV scales only, not {scheme.kv_cache_dtype}"
        )
    shape = LlamaShape.from_hf_config(hf_config)
    # The plan's own rule (compat), so a cell `forge plan` accepts is one this writer lays out.
    split = tensor_parallel_problem(ModelShape.from_config(hf_config), tp_size)
    if split:
        problems.append(f"targets.{split}")
    if problems or scheme.weight_format != "int4":
        return problems
    group = scheme.group_size
    per_rank = f" per rank at tensor_parallel {tp_size}" if tp_size > 1 else ""
    # Row-split layers see 1/tp of their input columns per rank; every rank needs whole groups.
    inputs = {
        "attention.qkv, mlp.fc, mlp.gate (hidden_size)": (shape.hidden_size, ""),
        "attention.dense (o_proj)": (shape.num_heads * shape.head_dim // tp_size, per_rank),
        "mlp.proj (down_proj)": (shape.intermediate_size // tp_size, per_rank),
    }
    for layer, (width, where) in inputs.items():
        if width % group:
            problems.append(
                f"scheme.group_size: {group} does not divide the input of transformer.layers.*.{layer}, {width}{where}"
            )
    # Two output rows share one int8 (ModelOpt's pack), so every rank needs an even row count.
    rows = {
        "attention.qkv": shape.head_dim,
        "mlp.fc / mlp.gate": shape.intermediate_size // tp_size,
        "attention.dense / mlp.proj": shape.hidden_size,
    }
    for layer, count in rows.items():
        if count % 2:
            problems.append(f"source: {layer} has an odd number of output rows ({count}); int4 packs pairs")
    return problems


def check_layout(hf_config: dict, scheme: Scheme, tp_size: int) -> None:
    problems = layout_problems(hf_config, scheme, tp_size)
    if problems:
        raise InputError("\n".join(problems))


def quantization_block(scheme: Scheme, exclude_modules: list[str]) -> dict:
    """config.json's `quantization` (TensorRT-LLM `QuantConfig` fields)."""
    algo = quant_algo(scheme)
    block: dict = {
        "quant_algo": algo,
        "kv_cache_quant_algo": "FP8" if scheme.kv_cache_dtype == "fp8" else None,
        "exclude_modules": exclude_modules,
    }
    if algo == "W4A16_AWQ":
        # ModelOpt's W4A16_AWQ export sets pre_quant_scale true (quant_utils.
        # process_layer_quant_config); forge folds AWQ's smoothing into the weights, so the
        # prequant_scaling_factor it writes is all ones. has_zero_point adds the `zero` parameter
        # of WeightOnlyGroupwiseQuantLinear for asymmetric codes.
        block.update(group_size=scheme.group_size, has_zero_point=not scheme.symmetric, pre_quant_scale=True)
    else:
        block.update(has_zero_point=False, pre_quant_scale=False)
    return block


def _rope(hf_config: dict) -> tuple[float, dict | None]:
    """rotary_base and rotary_scaling from either transformers 5 `rope_parameters` or v4 keys."""
    params = dict(hf_config.get("rope_parameters") or {})
    base = params.pop("rope_theta", None) or hf_config.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None)
    if rope_type in (None, "default"):
        scaling = hf_config.get("rope_scaling")
        return float(base), scaling
    # LLaMAConfig passes HF's rope_scaling through (`{"type": "llama3", "factor": ...}`).
    return float(base), {"type": rope_type, **params}


def checkpoint_config(hf_config: dict, scheme: Scheme, tp_size: int, exclude_modules: list[str]) -> dict:
    """The `PretrainedConfig` dict `trtllm-build` reads: the fields of LLaMAConfig.from_hugging_face,
    and for Qwen2 those QWenConfig.from_hugging_face adds (`qwen_type`, `attn_bias` true, ...)."""
    shape = LlamaShape.from_hf_config(hf_config)
    rotary_base, rotary_scaling = _rope(hf_config)
    qwen2 = architecture_name(hf_config) == QWEN2
    config = {
        "architecture": QWEN2 if qwen2 else ARCHITECTURE,
        "dtype": scheme.dtype,
        "logits_dtype": "float32",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_size": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "hidden_act": hf_config.get("hidden_act", "silu"),
        "norm_epsilon": hf_config.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "attn_bias": qwen2,  # Qwen2's q/k/v biases (o_proj and the MLP have none)
        "mlp_bias": False,
        "use_parallel_embedding": False,  # every rank holds the whole vocab_embedding
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "quantization": quantization_block(scheme, exclude_modules),
    }
    if qwen2:
        # QWenConfig: QWenDecoderLayer picks its MLP width and extra blocks by `qwen_type`; the rest
        # are the values from_hugging_face writes for a plain Qwen2 (no MoE, no logn attention).
        config.update(
            qwen_type="qwen2",
            seq_length=hf_config.get("seq_length", 8192),
            use_logn_attn=False,
            disable_weight_only_quant_plugin=False,
            moe_intermediate_size=0,
            moe_shared_expert_intermediate_size=0,
            num_labels=1,
        )
    return config


# ---------------------------------------------------------------- writer


def _chunk(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return torch.chunk(t, tp, dim=dim)[rank]


def _rank_rows(t: torch.Tensor, tp: int, rank: int, heads: int | None) -> torch.Tensor:
    """Rank `rank`'s output rows of one column-parallel part holding `heads` equal blocks of rows.

    1/tp of the rows, unless the part is K or V with fewer heads than ranks: then TensorRT-LLM
    repeats each head tp / heads times before the split (`dup_kv_weight`), so this rank holds
    head rank // (tp / heads) whole. Used for codes, scales, zero points and biases alike.
    """
    if heads is None or heads % tp == 0:
        return _chunk(t, tp, rank, 0)
    size = t.shape[0] // heads
    head = rank // (tp // heads)
    return t[head * size : (head + 1) * size]


def _pack_int4_rows(signed: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], `[out, in]` → int8 `[out / 2, in]`, row 2j low nibble, 2j+1 high."""
    nibbles = signed.to(torch.int16) & 0xF
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return packed.to(torch.uint8).view(torch.int8).contiguous()


def _module_kind(qm: QuantizedModel, layer: int, parts: tuple[str, ...]) -> str:
    quantized = [f"model.layers.{layer}.{p}" in qm.linears for p in parts]
    if all(quantized):
        return "quantized"
    if not any(quantized):
        return "dense"
    names = ", ".join(f"model.layers.{layer}.{p}" for p in parts)
    raise InputError(f"scheme.ignore: TensorRT-LLM fuses {names} into one layer; quantize all of them or none")


def _fp8_tensor_requantized(linears: list[QuantizedLinear]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One per-tensor scale for a fused layer: the largest, as TRT-LLM's FP8Linear.postprocess does.

    Codes whose own scale is smaller are re-rounded onto the shared scale; identical scales
    (the usual case after calibration of a shared input) keep every code unchanged.
    """
    scales = [lin.scale.reshape(-1)[0].to(torch.float32) for lin in linears]
    shared = torch.stack(scales).max()
    codes = []
    for lin, scale in zip(linears, scales, strict=True):
        if torch.equal(scale, shared):
            codes.append(lin.codes)
        else:
            codes.append((lin.codes.to(torch.float32) * (scale / shared)).to(torch.float8_e4m3fn))
    return codes, shared.reshape(1)


def _quantized_module(
    qm: QuantizedModel,
    algo: str,
    prefix: str,
    parts: list[QuantizedLinear],
    split: str,
    tp: int,
    rank: int,
    heads: tuple[int | None, ...],
) -> dict[str, torch.Tensor]:
    """One TRT-LLM linear's tensors for one rank, from its HF parts (fused along the out dim);
    `heads[i]` is part i's head count where KV heads may be replicated (see `_rank_rows`)."""
    dtype = getattr(torch, qm.scheme.dtype)
    out: dict[str, torch.Tensor] = {}

    def shard(tensors: list[torch.Tensor], dim_for_row: int = 1) -> torch.Tensor:
        # Column split: each part (q, k, v …) gives its own rank slice of rows, fused in order.
        if split == "column":
            return torch.cat([_rank_rows(t, tp, rank, h) for t, h in zip(tensors, heads, strict=True)], dim=0)
        return _chunk(torch.cat(tensors, dim=0), tp, rank, dim_for_row)

    if algo == "W4A16_AWQ":
        asym = parts[0].zero_point is not None
        codes = shard([p.codes for p in parts])
        signed = (codes - 8) if asym else codes  # uint4 [0, 15] → int4 [-8, 7]: w = q·s + (8 − z)·s
        scale = shard([p.scale for p in parts])
        out[f"{prefix}.weight"] = _pack_int4_rows(signed.to(torch.int8))
        # [out, in / group] in the checkpoint; TRT-LLM transposes it and casts it to `dtype` at load
        # (modeling_utils.preprocess_perlayer_weights). Kept in forge's fp16 so no bits are lost here.
        out[f"{prefix}.weights_scaling_factor"] = scale.to(torch.float16).contiguous()
        out[f"{prefix}.prequant_scaling_factor"] = torch.ones(codes.shape[1], dtype=dtype)
        if asym:
            zero = shard([p.zero_point for p in parts]).to(torch.float32)
            # WeightOnlyGroupwiseQuantLinear.zero is [in / group, out] in the model dtype, used as
            # q·s + zero (the GPTQ converters store (8 − z)·s the same way); not transposed at load.
            zero_x_scale = (8.0 - zero) * scale.to(torch.float32)
            out[f"{prefix}.zero"] = zero_x_scale.t().contiguous().to(dtype)
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        out[f"{prefix}.weight"] = shard([p.codes for p in parts]).contiguous()
        # Fp8RowwiseLinear.per_channel_scale: fp32 [out]; replicated (not split) on row-split layers.
        scales = [p.scale.to(torch.float32).reshape(-1, 1) for p in parts]
        col = shard(scales) if split == "column" else torch.cat(scales, dim=0)
        out[f"{prefix}.per_channel_scale"] = col.reshape(-1).contiguous()
    else:  # FP8: FP8Linear / FP8RowLinear hold one fp32 weight and one fp32 activation scale
        codes, weight_scale = _fp8_tensor_requantized(parts)
        missing = [p for p in parts if p.input_scale is None]
        if missing:
            raise InputError(
                f"scheme: {qm.scheme.preset} needs calibrated static input scales; {prefix} has none "
                "(use FP8_DYNAMIC or calibrate)"
            )
        act_scale = torch.stack([p.input_scale.reshape(-1)[0].to(torch.float32) for p in parts]).max()
        out[f"{prefix}.weight"] = shard(codes).contiguous()
        out[f"{prefix}.weights_scaling_factor"] = weight_scale
        out[f"{prefix}.activation_scaling_factor"] = act_scale.reshape(1)
    return out


def _rank_units(qm: QuantizedModel, shape: LlamaShape, algo: str | None, tp: int, rank: int) -> list[Unit]:
    """Rank `rank`'s tensors as units of `model_dir.write_safetensors`: the embedding, the final
    norm, the lm_head and each decoder layer, so the rank file is written one unit at a time.

    A unit's dtypes and shapes are learnt by producing it once before the file is written (the
    header comes first); the second production writes it. Twice the packing work, one unit's
    memory instead of the whole rank's.
    """
    producers: list[tuple[str, Callable[[], dict[str, torch.Tensor]]]] = [
        ("embedding", lambda: _embedding(qm)),
        ("final_norm", lambda: _final_norm(qm)),
        ("lm_head", lambda: _lm_head(qm, shape, tp, rank)),
    ]
    producers += [
        (f"layer.{i:05d}", lambda i=i: _layer_tensors(qm, shape, algo, tp, rank, i)) for i in range(shape.num_layers)
    ]
    units = []
    for key, produce in producers:
        specs = tuple(TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in sorted(produce().items()))
        units.append(Unit(key, specs, lambda produce=produce: {k: v.contiguous() for k, v in produce().items()}))
    return units


def _embedding(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, qm.scheme.dtype)
    return {"transformer.vocab_embedding.weight": qm.dense["model.embed_tokens.weight"].to(dtype)}


def _final_norm(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    return {"transformer.ln_f.weight": qm.dense["model.norm.weight"].to(getattr(torch, qm.scheme.dtype))}


def _lm_head(qm: QuantizedModel, shape: LlamaShape, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TensorRT-LLM always builds an lm_head; with tied embeddings it is a copy of the embedding
    (convert.py falls back to vocab_embedding). Rows are padded to a multiple of tp with zeros
    (pad_vocab_size), then column-split over vocab."""
    dtype = getattr(torch, qm.scheme.dtype)
    name = "lm_head.weight" if "lm_head.weight" in qm.dense else "model.embed_tokens.weight"
    lm_head = qm.dense[name].to(dtype)
    padded = -(-shape.vocab_size // tp) * tp
    if padded != shape.vocab_size:
        lm_head = torch.nn.functional.pad(lm_head, (0, 0, 0, padded - shape.vocab_size))
    return {"lm_head.weight": _chunk(lm_head, tp, rank, 0).clone()}  # its own storage, not the embedding's


def _layer_tensors(
    qm: QuantizedModel, shape: LlamaShape, algo: str | None, tp: int, rank: int, i: int
) -> dict[str, torch.Tensor]:
    """Decoder layer `i`'s tensors for rank `rank`."""
    dtype = getattr(torch, qm.scheme.dtype)
    dense = qm.dense
    kv_heads = shape.num_kv_heads
    tensors: dict[str, torch.Tensor] = {}
    hf = f"model.layers.{i}"
    trt = f"transformer.layers.{i}"
    tensors[f"{trt}.input_layernorm.weight"] = dense[f"{hf}.input_layernorm.weight"].to(dtype)
    tensors[f"{trt}.post_layernorm.weight"] = dense[f"{hf}.post_attention_layernorm.weight"].to(dtype)
    for module, (parts, split) in LAYER_LINEARS.items():
        prefix = f"{trt}.{module}"
        heads = (None, kv_heads, kv_heads) if module == "attention.qkv" else (None,) * len(parts)
        if any(f"{hf}.{p}.bias" in dense for p in parts):
            # Never quantized: the model dtype, split like the weight's rows (convert_hf_qwen).
            biases = [dense[f"{hf}.{p}.bias"].to(dtype) for p in parts]
            tensors[f"{prefix}.bias"] = torch.cat(
                [_rank_rows(b, tp, rank, h) for b, h in zip(biases, heads, strict=True)]
            )
        if algo is not None and _module_kind(qm, i, parts) == "quantized":
            linears = [qm.linears[f"{hf}.{p}"] for p in parts]
            tensors.update(_quantized_module(qm, algo, prefix, linears, split, tp, rank, heads))
            continue
        weights = [dense[f"{hf}.{p}.weight"].to(dtype) for p in parts]
        if split == "column":
            tensors[f"{prefix}.weight"] = torch.cat(
                [_rank_rows(w, tp, rank, h) for w, h in zip(weights, heads, strict=True)], dim=0
            )
        else:
            tensors[f"{prefix}.weight"] = _chunk(weights[0], tp, rank, 1)
    if qm.scheme.kv_cache_dtype == "fp8":
        # One scale for K and V (the attention plugin's kv_cache_scaling_factor, fp32 [1]); the
        # larger of the calibrated pair, as preprocess_weights merges k/v scales. 1.0 when
        # uncalibrated. The reciprocal is written too (older preprocess versions do not add it).
        pair = [qm.kv_scales.get(f"{hf}.self_attn.{k}_scale") for k in ("k", "v")]
        known = [s.reshape(-1)[0].to(torch.float32) for s in pair if s is not None]
        kv = torch.stack(known).max() if known else torch.tensor(1.0)
        tensors[f"{trt}.attention.kv_cache_scaling_factor"] = kv.reshape(1)
        tensors[f"{trt}.attention.kv_cache_rcp_scaling_factor"] = (1.0 / kv).reshape(1)
    return tensors


def excluded_modules(qm: QuantizedModel, shape: LlamaShape) -> list[str]:
    """TRT-LLM module names left unquantized: matched with fnmatch against full module names
    (quantization/quantize.py `quantize_layers`), so `lm_head` plus any ignored decoder layer."""
    names = ["lm_head"]
    for i in range(shape.num_layers):
        for module, (parts, _) in LAYER_LINEARS.items():
            if _module_kind(qm, i, parts) == "dense":
                names.append(f"transformer.layers.{i}.{module}")
    return names


def write(qm: QuantizedModel, out_dir: Path, tp_size: int) -> list[Path]:
    """Write `config.json` and `rank{N}.safetensors` for `tp_size` ranks; returns the files written."""
    check_layout(qm.config, qm.scheme, tp_size)
    algo = quant_algo(qm.scheme)
    shape = LlamaShape.from_hf_config(qm.config)
    if qm.linears:
        asym = {lin.zero_point is not None for lin in qm.linears.values()}
        if algo == "W4A16_AWQ" and asym != {not qm.scheme.symmetric}:
            raise InputError("scheme.symmetric: the quantized codes do not match the scheme's zero points")
    excluded = excluded_modules(qm, shape)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN" and len(excluded) > 1:
        # fp8_rowwise_quantize swaps whole Attention / GatedMLP blocks, not single linears.
        raise InputError(
            "scheme.ignore: TensorRT-LLM FP8_PER_CHANNEL_PER_TOKEN quantizes whole attention and MLP "
            f"blocks; it cannot leave {excluded[1]} unquantized"
        )
    if not qm.config.get("tie_word_embeddings") and "lm_head.weight" not in qm.dense:
        raise InputError("source: untied embeddings but no lm_head.weight among the dense tensors")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.safetensors"):  # a rewrite at a smaller TP must not keep old ranks
        stale.unlink()
    config = checkpoint_config(qm.config, qm.scheme, tp_size, excluded)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    written = [config_path]
    for rank in range(tp_size):
        path = out_dir / f"rank{rank}.safetensors"
        write_safetensors(path, _rank_units(qm, shape, algo, tp_size, rank))  # streamed, a unit at a time
        written.append(path)
    return written


def unsupported_reason(scheme: Scheme) -> str | None:
    """Why this format cannot hold `scheme` (for planning), or None: its spec's answer."""
    return SPECS[FORMAT].scheme_problem(scheme)


def export(
    qm: QuantizedModel,
    source_dir: Path,
    out_dir: Path,
    metadata: dict,
    *,
    max_shard_bytes: int | None = None,
    tp_size: int = 1,
) -> list[Path]:
    """`write` with the signature of forge.formats' registry: the checkpoint plus the source's
    tokenizer files (engine-mode trtllm-serve takes them with --tokenizer) and `forge.json`.

    The rank files are never split: trtllm-build reads exactly one `rank{N}.safetensors` per rank,
    so `max_shard_bytes` is accepted for the common signature and ignored.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"export: {out_dir} is not empty; exports are written into a fresh directory")
    written = write(qm, out_dir, tp_size)
    written += copy_source_files(Path(source_dir), out_dir)
    written.append(write_json(out_dir / "forge.json", metadata))
    return sorted(written)


def export_notes(qm: QuantizedModel) -> list[str]:
    """Where the TRT-LLM checkpoint (or TRT-LLM at load) cannot keep forge's numbers bit for bit."""
    notes = []
    scheme = qm.scheme
    if scheme.weight_format == "int4" and not scheme.symmetric:
        notes.append(
            f"asymmetric int4: TRT-LLM stores zero points premultiplied, (8 - z) * scale in {scheme.dtype}; "
            "the rounding of that product moves weights by at most half a unit in its last place"
        )
    if scheme.weight_format == "int4" and scheme.dtype != "float16":
        notes.append(
            f"int4 scales are float16 in the checkpoint; TRT-LLM casts them to {scheme.dtype} when it "
            "builds the engine (modeling_utils.preprocess_perlayer_weights)"
        )
    if scheme.weight_format == "fp8" and scheme.weight_granularity == "tensor":
        for name in sorted({n.rsplit(".", 1)[0] for n in qm.linears if n.endswith("q_proj")}):
            parts = [qm.linears[f"{name}.{p}_proj"] for p in "qkv"]
            if len({float(p.scale.reshape(-1)[0]) for p in parts}) > 1:
                notes.append(f"{name}.q/k/v_proj: FP8 per-tensor scales differ; re-rounded onto the largest")
            inputs = {float(p.input_scale.reshape(-1)[0]) for p in parts if p.input_scale is not None}
            if len(inputs) > 1:
                notes.append(f"{name}.q/k/v_proj: input scales differ; the fused layer takes the largest")
    if scheme.kv_cache_dtype == "fp8":
        notes.append("fp8 KV cache: one scale per layer for K and V (the larger of k_scale, v_scale)")
    return notes


# ---------------------------------------------------------------- reader
#
# Written from the format's definition, not by inverting the writer: each rank is dequantized to
# dense weights on its own, then the dense shards are merged. A packing or split bug in `write`
# therefore shows up as a mismatch against `QuantizedModel.dequantize()` instead of cancelling out.


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 `[rows / 2, cols]` → signed int4 values `[rows, cols]` (rows 2j: low nibble, 2j+1: high)."""
    raw = packed.view(torch.uint8).to(torch.int16)
    low, high = raw % 16, raw // 16
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    rows, cols = raw.shape
    return torch.stack([low, high], dim=1).reshape(rows * 2, cols).to(torch.float32)


def _dense_linear(tensors: dict[str, torch.Tensor], prefix: str, algo: str | None) -> torch.Tensor:
    """One rank's linear weight as fp32 `[out, in]`, following the layer's own parameters."""
    weight = tensors[f"{prefix}.weight"]
    if algo == "W4A16_AWQ" and weight.dtype == torch.int8:
        q = _unpack_int4(weight)
        scale = tensors[f"{prefix}.weights_scaling_factor"].to(torch.float32)
        group = q.shape[1] // scale.shape[1]
        w = q * scale.repeat_interleave(group, dim=1)
        if f"{prefix}.zero" in tensors:
            w = w + tensors[f"{prefix}.zero"].to(torch.float32).t().repeat_interleave(group, dim=1)
        return w
    if weight.dtype == torch.float8_e4m3fn and f"{prefix}.per_channel_scale" in tensors:
        return weight.to(torch.float32) * tensors[f"{prefix}.per_channel_scale"].to(torch.float32)[:, None]
    if weight.dtype == torch.float8_e4m3fn:
        return weight.to(torch.float32) * tensors[f"{prefix}.weights_scaling_factor"].to(torch.float32)
    return weight.to(torch.float32)


def _hf_config(config: dict) -> dict:
    rope = {"rope_type": "default", "rope_theta": config.get("rotary_base", 10000.0)}
    scaling = config.get("rotary_scaling")
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling.get("type"))
    qwen2 = config["architecture"] == QWEN2
    hf = {
        "architectures": [config["architecture"]],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_size"],
        "hidden_act": config.get("hidden_act", "silu"),
        "rms_norm_eps": config["norm_epsilon"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_parameters": rope,
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": config["dtype"],
    }
    if qwen2:  # Qwen2Config: q/k/v always carry biases; the writer refuses sliding windows
        del hf["attention_bias"], hf["mlp_bias"]
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _load_ranks(directory: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    directory = Path(directory)
    config = read_json(directory / "config.json", f"{FORMAT}: config.json")
    mapping = config.get("mapping")
    if not isinstance(mapping, dict) or not positive_int(mapping.get("tp_size")):
        raise InputError(f"{FORMAT}: config.json: mapping.tp_size must be a positive integer")
    if mapping.get("pp_size", 1) != 1:
        raise InputError(f"{directory}: pipeline-parallel checkpoints are not supported")
    files = [directory / f"rank{r}.safetensors" for r in range(mapping["tp_size"])]
    for file in files:
        safetensors_header(file, f"{FORMAT}: {file.name}")
    ranks = [load_file(file) for file in files]
    return config, ranks


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A TRT-LLM Llama or Qwen2 checkpoint as (HF-style config, fp32 HF-named state dict), ranks merged.

    Like the other formats' readers, static activation scales come back as `<module>.input_scale`
    (`[1]`) and fp8 KV scales as `...self_attn.k_scale` / `v_scale` (0-d), all float32. With
    fewer KV heads than ranks, each rank holds ceil(num_kv_heads / tp) KV heads (attention.py);
    the first rank of each run of tp / num_kv_heads replicas gives that head, and the replicas
    must agree.
    """
    config, ranks = _load_ranks(directory)
    algo = (config.get("quantization") or {}).get("quant_algo")
    heads, kv_heads, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    tp = len(ranks)
    if not all(positive_int(n) for n in (heads, kv_heads, head)) or heads % tp or (kv_heads % tp and tp % kv_heads):
        raise InputError(
            f"{FORMAT}: config.json: {heads} attention heads / {kv_heads} KV heads do not lay out over {tp} ranks"
        )
    kv_per_rank = -(-kv_heads // tp)
    replicas = tp // kv_heads if kv_heads < tp else 1
    sizes = [heads // tp * head, kv_per_rank * head, kv_per_rank * head]

    def merge_qkv(per_rank: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """q, k, v (in HF row order) from each rank's fused rows, dropping KV replicas."""
        split = [torch.split(t, sizes, dim=0) for t in per_rank]
        for r in range(tp):
            for j in (1, 2):
                first = r - r % replicas
                if not torch.equal(split[r][j], split[first][j]):
                    raise InputError(f"{FORMAT}: rank{r} {what}: replicated KV head differs from rank{first}")
        return [torch.cat([split[r][j] for r in range(tp) if j == 0 or r % replicas == 0], dim=0) for j in range(3)]

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": ranks[0]["transformer.vocab_embedding.weight"].to(torch.float32),
        "model.norm.weight": ranks[0]["transformer.ln_f.weight"].to(torch.float32),
    }
    lm_head = torch.cat([r["lm_head.weight"] for r in ranks], dim=0)[: config["vocab_size"]]
    if not config.get("tie_word_embeddings"):
        state["lm_head.weight"] = lm_head.to(torch.float32)
    for i in range(config["num_hidden_layers"]):
        trt, hf = f"transformer.layers.{i}", f"model.layers.{i}"
        state[f"{hf}.input_layernorm.weight"] = ranks[0][f"{trt}.input_layernorm.weight"].to(torch.float32)
        state[f"{hf}.post_attention_layernorm.weight"] = ranks[0][f"{trt}.post_layernorm.weight"].to(torch.float32)
        qkv = merge_qkv([_dense_linear(r, f"{trt}.attention.qkv", algo) for r in ranks], f"{trt}.attention.qkv")
        for name, weight in zip(("q_proj", "k_proj", "v_proj"), qkv, strict=True):
            state[f"{hf}.self_attn.{name}.weight"] = weight
        if config.get("attn_bias"):
            biases = [r[f"{trt}.attention.qkv.bias"].to(torch.float32) for r in ranks]
            for name, bias in zip(("q_proj", "k_proj", "v_proj"), merge_qkv(biases, "qkv bias"), strict=True):
                state[f"{hf}.self_attn.{name}.bias"] = bias
        for trt_name, hf_name, dim in (
            ("attention.dense", "self_attn.o_proj", 1),  # row-parallel: input columns were split
            ("mlp.fc", "mlp.gate_proj", 0),
            ("mlp.gate", "mlp.up_proj", 0),
            ("mlp.proj", "mlp.down_proj", 1),
        ):
            shards = [_dense_linear(r, f"{trt}.{trt_name}", algo) for r in ranks]
            state[f"{hf}.{hf_name}.weight"] = torch.cat(shards, dim=dim)
        # Static activation scales: one per TRT-LLM layer, so every HF projection it fuses shares it.
        for trt_name, hf_names in (
            ("attention.qkv", ("q_proj", "k_proj", "v_proj")),
            ("attention.dense", ("o_proj",)),
        ):
            scale = ranks[0].get(f"{trt}.{trt_name}.activation_scaling_factor")
            for name in hf_names if scale is not None else ():
                state[f"{hf}.self_attn.{name}.input_scale"] = scale.to(torch.float32).reshape(1)
        for trt_name, hf_name in (
            ("mlp.fc", "gate_proj"),
            ("mlp.gate", "up_proj"),
            ("mlp.proj", "down_proj"),
        ):
            scale = ranks[0].get(f"{trt}.{trt_name}.activation_scaling_factor")
            if scale is not None:
                state[f"{hf}.mlp.{hf_name}.input_scale"] = scale.to(torch.float32).reshape(1)
        # One fp8 KV scale per layer stands for both K and V.
        kv = ranks[0].get(f"{trt}.attention.kv_cache_scaling_factor")
        if kv is not None:
            for name in ("k_scale", "v_scale"):
                state[f"{hf}.self_attn.{name}"] = kv.to(torch.float32).reshape(())
    return _hf_config(config), state
