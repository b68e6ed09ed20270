"""TensorRT-LLM: the legacy checkpoint round trip, trtllm-build / trtllm-serve command goldens,
mode rules, the engine cache key and what happens without a GPU.

Regenerate the golden files with FORGE_UPDATE_GOLDEN=1 after an intended change, and review the
diff: it is exactly what forge would run on a GPU machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from forge.backends import trtllm
from forge.compat import ModelShape, tensor_parallel_problem
from forge.errors import InputError
from forge.formats import trtllm_checkpoint as ckpt
from forge.gpus import GPUS, LocalGPU, LocalGPUs, _parse_smi, detect_local_gpus, gpu_listing, match_profile
from forge.quant.model import QuantizedModel, Scheme
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import quantize_rtn
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.golden import assert_golden
from tests.tiny import make_tiny_model

H100, A100 = GPUS["H100"], GPUS["A100-80GB"]


def check_golden(name: str, text: str) -> None:
    assert_golden(f"trtllm/{name}", text)


# ---------------------------------------------------------------- checkpoint numerics


@pytest.fixture(scope="module")
def tiny_state(tiny_model: Path) -> tuple[dict, dict]:
    state = load_file(tiny_model / "model.safetensors")
    return state, json.loads((tiny_model / "config.json").read_text())


def quantize(tiny_state, preset: str, **overrides) -> QuantizedModel:
    state, config = tiny_state
    return quantize_rtn(state, config, resolve_scheme(preset, **overrides))


def only_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(("input_scale", "k_scale", "v_scale"))}


def logits(config: dict, weights: dict[str, torch.Tensor], model_class=LlamaForCausalLM, config_class=LlamaConfig):
    """Run transformers' own model (Llama unless told) on fixed tokens with exactly these fp32 weights."""
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    model = model_class(config_class(**fields))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    tokens = torch.arange(3, 40).reshape(1, -1) % config["vocab_size"]
    with torch.no_grad():
        return model(tokens).logits


def served(qm) -> dict[str, torch.Tensor]:
    """`dequantize()` with the dense tensors in the model dtype, as the checkpoint holds them."""
    return qm.dequantize(dense_dtype=getattr(torch, qm.scheme.dtype))


CASES = {
    # name: (preset, overrides, bit-exact?); group 64 so that TP 2 keeps whole groups per rank
    "w4a16-sym": ("W4A16", {"group_size": 64}, True),
    "w4a16-sym-fp16-g128": ("W4A16", {"dtype": "float16"}, True),
    "awq-asym": ("AWQ_W4A16", {"group_size": 64, "dtype": "float16"}, False),
    "fp8-dynamic-kvfp8": ("FP8_DYNAMIC", {"kv_cache_dtype": "fp8"}, True),
}
# group 128 cannot split o_proj's 128 columns over 2 ranks (see test_layout_refusals_name_the_layer)
ROUNDTRIPS = [(case, tp) for case in CASES for tp in (1, 2) if (case, tp) != ("w4a16-sym-fp16-g128", 2)]


def assert_same_model(
    weights: dict, reference: dict, exact: bool, ours: torch.Tensor, expected: torch.Tensor,
    exact_suffixes: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """The reader's weights against forge's dequantized model, tensor by tensor, then the logits
    of a transformers model built from each: bit-exact, or within half an ulp of the stored dtype
    for asymmetric int4 ((8 - z) * scale is stored rounded to the checkpoint dtype)."""
    assert set(weights) == set(reference)
    for name, ref in reference.items():
        if exact or name.endswith(exact_suffixes):
            assert torch.equal(weights[name], ref), name
        else:
            bound = 8 * float(ref.abs().max()) * 2**-10 + 1e-7
            assert (weights[name] - ref).abs().max() <= bound, name
    if exact:
        assert torch.equal(ours, expected)
    else:
        assert torch.allclose(ours, expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(("case", "tp"), ROUNDTRIPS)
def test_checkpoint_roundtrip_reproduces_dequantize(tiny_state, tmp_path, case, tp):
    preset, overrides, exact = CASES[case]
    qm = quantize(tiny_state, preset, **overrides)
    files = ckpt.write(qm, tmp_path / "ckpt", tp)
    assert [f.name for f in files] == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]

    config, state = ckpt.read(tmp_path / "ckpt")
    weights = only_weights(state)
    reference = served(qm)
    assert_same_model(weights, reference, exact, logits(config, weights), logits(qm.config, reference))


def test_export_adds_tokenizer_and_metadata(tiny_state, tiny_model, tmp_path):
    qm = quantize(tiny_state, "FP8_DYNAMIC")
    assert ckpt.unsupported_reason(qm.scheme) is None
    tensor_dynamic = Scheme("X", "fp8", None, True, "tensor", "dynamic_token")
    assert "no FP8 mode" in ckpt.unsupported_reason(tensor_dynamic)
    files = ckpt.export(qm, tiny_model, tmp_path / "out", {"variant": "fp8"})
    names = {f.name for f in files}
    assert {"config.json", "rank0.safetensors", "tokenizer.json", "forge.json"} <= names
    with pytest.raises(InputError, match="not empty"):
        ckpt.export(qm, tiny_model, tmp_path / "out", {})


def test_checkpoint_layout_and_config(tiny_state, tmp_path):
    qm = quantize(tiny_state, "AWQ_W4A16", group_size=64)
    ckpt.write(qm, tmp_path, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert config["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert config["quantization"] == {
        "quant_algo": "W4A16_AWQ",
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head"],
        "group_size": 64,
        "has_zero_point": True,
        "pre_quant_scale": True,
    }
    rank1 = load_file(tmp_path / "rank1.safetensors")
    # vocab 381 is padded to 382 and split; q (2 heads) + k (1) + v (1) × 32 rows per rank, packed in pairs.
    assert rank1["lm_head.weight"].shape == (191, 128)
    assert rank1["transformer.vocab_embedding.weight"].shape == (config["vocab_size"], 128)
    qkv = "transformer.layers.0.attention.qkv"
    assert rank1[f"{qkv}.weight"].dtype == torch.int8 and rank1[f"{qkv}.weight"].shape == (64, 128)
    assert rank1[f"{qkv}.weights_scaling_factor"].shape == (128, 2)
    assert rank1[f"{qkv}.zero"].shape == (2, 128)
    assert rank1["transformer.layers.0.attention.dense.weight"].shape == (64, 64)  # row split: in / 2
    assert rank1["transformer.layers.0.attention.dense.prequant_scaling_factor"].shape == (64,)
    # tied embeddings: lm_head is written as a copy of the embedding (rows 191..381 on rank 1)
    assert torch.equal(rank1["lm_head.weight"][:190], rank1["transformer.vocab_embedding.weight"][191:])


def test_int4_packing_matches_modelopt_order(tiny_state, tmp_path):
    """Row 2j in the low nibble, 2j+1 in the high nibble, signed (ModelOpt to_quantized_weight)."""
    qm = quantize(tiny_state, "W4A16", group_size=64)
    ckpt.write(qm, tmp_path, 1)
    packed = load_file(tmp_path / "rank0.safetensors")["transformer.layers.1.mlp.proj.weight"]
    codes = qm.linears["model.layers.1.mlp.down_proj"].codes
    byte = int(packed[3, 5].view(torch.uint8))
    low, high = byte & 0xF, byte >> 4
    assert low - 16 * (low > 7) == int(codes[6, 5]) and high - 16 * (high > 7) == int(codes[7, 5])


def test_fp8_static_shares_one_scale_per_fused_layer(tiny_state, tmp_path):
    qm = quantize(tiny_state, "FP8", kv_cache_dtype="fp8")
    with pytest.raises(InputError, match="static input scales"):
        ckpt.write(qm, tmp_path / "uncalibrated", 1)
    for linear in qm.linears.values():
        linear.input_scale = torch.tensor([0.02])
    qm.kv_scales = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.v_scale": torch.tensor(0.25),
    }
    ckpt.write(qm, tmp_path / "c", 1)
    config, state = ckpt.read(tmp_path / "c")
    weights = only_weights(state)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    reference = served(qm)
    for name, ref in reference.items():
        if any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            assert torch.allclose(weights[name], ref, atol=float(ref.abs().max()) / 8), name  # one fp8 step
        else:
            assert torch.equal(weights[name], ref), name
    assert any("re-rounded" in n for n in ckpt.export_notes(qm))
    assert float(state["model.layers.0.self_attn.k_scale"]) == 0.5  # the larger of the pair
    assert float(state["model.layers.0.self_attn.v_scale"]) == 0.5
    assert float(state["model.layers.1.self_attn.v_scale"]) == 1.0  # uncalibrated layer
    assert torch.equal(state["model.layers.1.mlp.down_proj.input_scale"], torch.tensor([0.02]))


def test_ignored_layers_stay_dense_and_are_excluded(tiny_state, tmp_path):
    qm = quantize(tiny_state, "W4A16", group_size=64, ignore=("lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"))
    ckpt.write(qm, tmp_path, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"]["exclude_modules"] == ["lm_head", "transformer.layers.1.mlp.proj"]
    _, state = ckpt.read(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in served(qm).items())
    half = quantize(tiny_state, "W4A16", group_size=64, ignore=("lm_head", "k_proj"))
    with pytest.raises(InputError, match="quantize all of them or none"):
        ckpt.write(half, tmp_path / "half", 1)


@pytest.mark.parametrize(
    ("tp", "overrides", "message"),
    [
        (2, {}, "group_size: 128 does not divide the input of transformer.layers.*.attention.dense"),
        (3, {"group_size": 64}, "targets.tensor_parallel 3: 4 attention heads cannot be split over 3 GPUs"),
    ],
)
def test_layout_refusals_name_the_layer(tiny_state, tmp_path, tp, overrides, message):
    qm = quantize(tiny_state, "W4A16", **overrides)
    assert any(message in p for p in ckpt.layout_problems(qm.config, qm.scheme, tp))
    with pytest.raises(InputError, match=message.replace("*", r"\*")):
        ckpt.write(qm, tmp_path, tp)


# ---------------------------------------------------------------- tensor parallel beyond the KV heads


@pytest.mark.parametrize("case", ["w4a16-g32", "awq-asym-g32", "fp8-dynamic"])
def test_tp_beyond_kv_heads_replicates_them(tiny_state, tmp_path, case):
    """tp 4 over 2 KV heads: every rank holds one whole KV head, the one its query head reads
    (ranks 0-1 head 0, ranks 2-3 head 1), as TensorRT-LLM's dup_kv_weight lays it out; the reader
    merges the replicas back to `dequantize()` bit for bit."""
    preset, overrides = {
        "w4a16-g32": ("W4A16", {"group_size": 32}),
        "awq-asym-g32": ("W4A16_ASYM", {"group_size": 32, "dtype": "float16"}),
        "fp8-dynamic": ("FP8_DYNAMIC", {}),
    }[case]
    qm = quantize(tiny_state, preset, **overrides)
    ckpt.write(qm, tmp_path, 4)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(4)]
    qkv = "transformer.layers.0.attention.qkv"
    # 1 q head + 1 k head + 1 v head of 32 rows per rank (int4: two rows per byte)
    rows = 96 // (2 if qm.scheme.weight_format == "int4" else 1)
    assert all(r[f"{qkv}.weight"].shape == (rows, 128) for r in ranks)
    k_rows = slice(32 // (2 if qm.scheme.weight_format == "int4" else 1), None)
    assert torch.equal(ranks[0][f"{qkv}.weight"][k_rows], ranks[1][f"{qkv}.weight"][k_rows])
    assert not torch.equal(ranks[1][f"{qkv}.weight"][k_rows], ranks[2][f"{qkv}.weight"][k_rows])
    _, state = ckpt.read(tmp_path)
    weights = only_weights(state)
    for name, ref in served(qm).items():
        if qm.scheme.symmetric or qm.scheme.weight_format != "int4":
            assert torch.equal(weights[name], ref), name
        else:
            assert (weights[name] - ref).abs().max() <= 8 * float(ref.abs().max()) * 2**-10 + 1e-7, name


SHAPES = [(4, 2, 256), (4, 1, 256), (8, 2, 96), (6, 3, 128), (12, 4, 384), (32, 8, 11008), (14, 2, 4864)]


@pytest.mark.parametrize(("heads", "kv_heads", "intermediate"), SHAPES)
def test_plan_and_writer_share_one_tensor_parallel_rule(heads, kv_heads, intermediate):
    """For every tensor_parallel `forge plan` accepts, the writer lays the checkpoint out, and
    every one it refuses, the writer refuses with the same reason (before: tp 4 over 2 KV heads
    was planned and then refused at export, after quantization ran)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": heads * 32,
        "intermediate_size": intermediate, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 32, "max_position_embeddings": 64,
    }  # fmt: skip
    scheme = resolve_scheme("FP8_DYNAMIC")
    for tp in range(1, 17):
        planned = tensor_parallel_problem(ModelShape.from_config(config), tp)
        written = [p for p in ckpt.layout_problems(config, scheme, tp) if "tensor_parallel" in p]
        assert written == ([] if planned is None else [f"targets.{planned}"]), tp


def test_plan_refuses_and_plans_trtllm_tensor_parallel_like_the_writer(tiny_model, eval_text, tmp_path):
    """tp 4 over the tiny model's 2 KV heads: a planned TensorRT-LLM engine cell; tp 3: exit 2,
    naming the target and its tensor_parallel, before anything is quantized."""
    engine = {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}, "variants": ["fp8"]}
    recipe = tiny_recipe(tiny_model, eval_text, targets=[{**engine, "tensor_parallel": 4}])
    code, output = run_cli("plan", str(write_recipe(tmp_path / "ok", recipe)), "--json", "--artifacts-dir",
                           str(tmp_path / "a"))  # fmt: skip
    assert code == 0, output
    cells = json.loads(output)["artifacts"]
    assert [(c["status"], c["tensor_parallel"]) for c in cells] == [("planned", 4)]
    recipe["targets"][0]["tensor_parallel"] = 3
    code, output = run_cli("plan", str(write_recipe(tmp_path / "bad", recipe)), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 2, output
    assert "targets[0]" in output and "tensor_parallel 3: 4 attention heads cannot be split over 3 GPUs" in output


# ---------------------------------------------------------------- Qwen2 (QWenForCausalLM, qwen_type qwen2)


@pytest.fixture(scope="module")
def qwen2_sources(tmp_path_factory) -> dict[bool, tuple[dict, dict]]:
    """Tiny random Qwen2s (4 heads of 32 over 2 KV heads, random q/k/v biases, rope theta 1e6),
    with tied and untied embeddings: tied → (state, config)."""
    root = tmp_path_factory.mktemp("qwen2")
    out = {}
    for tied in (True, False):
        path = make_tiny_model(root / f"tied-{tied}", "Qwen2ForCausalLM", tie_word_embeddings=tied, rope_theta=1e6)
        out[tied] = load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())
    return out


def qwen2_logits(config: dict, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return logits(config, weights, Qwen2ForCausalLM, Qwen2Config)


QWEN2_ROUNDTRIPS = [(case, tp, tied) for case, tp in ROUNDTRIPS for tied in (True, False) if tp == 2 or tied]


@pytest.mark.parametrize(("case", "tp", "tied"), QWEN2_ROUNDTRIPS)
def test_qwen2_checkpoint_roundtrip_reproduces_dequantize(qwen2_sources, tmp_path, case, tp, tied):
    """A Qwen2 checkpoint (q/k/v biases in attention.qkv.bias) reads back to `dequantize()`, and
    transformers' Qwen2ForCausalLM holding what the reader returns gives forge's own logits."""
    preset, overrides, exact = CASES[case]
    state, config = qwen2_sources[tied]
    qm = quantize_rtn(state, config, resolve_scheme(preset, **overrides))
    ckpt.write(qm, tmp_path / "ckpt", tp)
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (written["architecture"], written["qwen_type"], written["attn_bias"]) == ("Qwen2ForCausalLM", "qwen2", True)
    assert written["rotary_base"] == 1e6 and written["tie_word_embeddings"] is tied
    assert written["mlp_bias"] is False and written["moe_intermediate_size"] == 0

    read_config, read_state = ckpt.read(tmp_path / "ckpt")
    weights = only_weights(read_state)
    reference = served(qm)
    assert "model.layers.1.self_attn.k_proj.bias" in weights and ("lm_head.weight" in weights) is not tied
    ours, expected = qwen2_logits(read_config, weights), qwen2_logits(qm.config, reference)
    assert_same_model(weights, reference, exact, ours, expected, exact_suffixes=("bias",))


def test_qwen2_fp8_static_and_replica_check(qwen2_sources, tmp_path):
    """FP8 (static) Qwen2 at tp 4: one weight and activation scale per fused layer, biases exact;
    a checkpoint whose replicated KV heads disagree is refused by the reader."""
    state, config = qwen2_sources[True]
    qm = quantize_rtn(state, config, resolve_scheme("FP8"))
    for linear in qm.linears.values():
        linear.input_scale = torch.tensor([0.02])
    ckpt.write(qm, tmp_path, 4)
    assert json.loads((tmp_path / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    _, read_state = ckpt.read(tmp_path)
    for name, ref in served(qm).items():
        if name.endswith("_proj.weight") and "self_attn" in name and "o_proj" not in name:
            assert torch.allclose(read_state[name], ref, atol=float(ref.abs().max()) / 8), name  # one fp8 step
        else:
            assert torch.equal(read_state[name], ref), name
    rank1 = load_file(tmp_path / "rank1.safetensors")
    rank1["transformer.layers.0.attention.qkv.bias"][-1] += 1  # rank 1's copy of v head 0
    save_file(rank1, tmp_path / "rank1.safetensors")
    with pytest.raises(InputError, match="rank1 qkv bias: replicated KV head differs from rank0"):
        ckpt.read(tmp_path)


@pytest.mark.parametrize("tp", [2, 4])
def test_qwen2_qkv_bias_is_split_per_rank(qwen2_sources, tmp_path, tp):
    """Each rank's attention.qkv.bias is its q slice, then its k and v slices (convert_hf_qwen);
    at tp 4 over 2 KV heads the k/v slices are the replicated head's."""
    state, config = qwen2_sources[False]
    qm = quantize_rtn(state, config, resolve_scheme("W4A16", group_size=32))
    ckpt.write(qm, tmp_path, tp)
    dtype = getattr(torch, qm.scheme.dtype)
    hf = {p: qm.dense[f"model.layers.0.self_attn.{p}_proj.bias"].to(dtype) for p in "qkv"}
    for rank in range(tp):
        bias = load_file(tmp_path / f"rank{rank}.safetensors")["transformer.layers.0.attention.qkv.bias"]
        q = hf["q"].chunk(tp)[rank]
        kv_head = rank * 2 // tp  # 2 KV heads of 32 rows
        k, v = (hf[p][kv_head * 32 : (kv_head + 1) * 32] if tp > 2 else hf[p].chunk(tp)[rank] for p in "kv")
        assert bias.dtype == dtype and torch.equal(bias, torch.cat([q, k, v])), rank
    assert "transformer.layers.0.attention.dense.bias" not in load_file(tmp_path / "rank0.safetensors")


def test_sliding_window_stays_refused(qwen2_sources):
    """Neither LLaMAConfig nor QWenConfig carries a window: Mistral with sliding_window, or a Qwen2
    with use_sliding_window, is refused; Qwen2's usual unused window (use_sliding_window false) is not."""
    _, config = qwen2_sources[False]
    scheme = resolve_scheme("FP8_DYNAMIC")
    assert ckpt.layout_problems({**config, "use_sliding_window": False, "sliding_window": 32768}, scheme, 1) == []
    assert any("sliding-window" in p for p in ckpt.layout_problems(
        {**config, "use_sliding_window": True, "sliding_window": 32768}, scheme, 1))  # fmt: skip
    mistral = {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096}
    mistral.pop("use_sliding_window", None)
    assert any("sliding-window" in p for p in ckpt.layout_problems(mistral, scheme, 1))


# ---------------------------------------------------------------- commands (golden files)

LIMITS = trtllm.Limits(max_batch_size=64, max_input_len=2048, max_seq_len=4096, max_num_tokens=8192)
WORKLOAD = trtllm.Workload(concurrency=16, prompt_tokens=1024, output_tokens=128)
SCHEMES = {
    "fp8": resolve_scheme("FP8", kv_cache_dtype="fp8"),
    "fp8-dynamic": resolve_scheme("FP8_DYNAMIC"),
    "w4a16-awq": resolve_scheme("AWQ_W4A16"),
    "w4a16-awq-sym": resolve_scheme("AWQ_W4A16", symmetric=True),
}
BUILDS = [
    ("fp8", H100, LIMITS),
    ("fp8-dynamic", H100, LIMITS),
    ("w4a16-awq", H100, trtllm.Limits(64, 2048, 4096, 8192, tp_size=2)),
    ("w4a16-awq", A100, LIMITS),
]


@pytest.mark.parametrize(("scheme", "gpu", "limits"), BUILDS, ids=lambda v: getattr(v, "name", None))
def test_trtllm_build_argv_golden(scheme, gpu, limits):
    assert trtllm.check_trtllm_support(SCHEMES[scheme], gpu, "engine") is None
    doc = {
        "argv": trtllm.build_argv("/data/ckpt", "/data/engine", limits, SCHEMES[scheme]),
        "docker": trtllm.docker_build_argv("/data/ckpt", "/data/engine", limits, SCHEMES[scheme], "1.2.1"),
        "build_config": trtllm.build_config(limits, SCHEMES[scheme]),
    }
    check_golden(f"build-{scheme}-{gpu.name}-tp{limits.tp_size}.json", json.dumps(doc, indent=2) + "\n")


SERVES = [
    ("fp8", H100, "pytorch", "1.3.0"),
    ("w4a16-awq-sym", H100, "pytorch", "1.3.0"),
    ("w4a16-awq-sym", A100, "pytorch", "1.3.0"),
    ("fp8", H100, "engine", "1.2.1"),
    ("w4a16-awq", A100, "engine", "1.2.1"),
]


@pytest.mark.parametrize(("scheme", "gpu", "mode", "version"), SERVES, ids=lambda v: getattr(v, "name", v))
def test_trtllm_serve_argv_and_config_golden(scheme, gpu, mode, version):
    model = "/models/engine" if mode == "engine" else "/models/checkpoint"
    plan = trtllm.serve_plan(
        model, SCHEMES[scheme], gpu, LIMITS, WORKLOAD, mode, version,
        tokenizer_dir="/models/tokenizer" if mode == "engine" else None,
    )  # fmt: skip
    stem = f"serve-{scheme}-{gpu.name}-{mode}-{version}"
    check_golden(f"{stem}.json", json.dumps({"argv": plan.argv, "image": plan.image}, indent=2) + "\n")
    check_golden(f"{stem}.yaml", plan.config_yaml)
    options = yaml.safe_load(plan.config_yaml)
    assert ("--config" in plan.argv) == (version == "1.3.0")
    if mode == "pytorch":
        assert options["cuda_graph_config"]["batch_sizes"][-1] == LIMITS.max_batch_size
        assert options["kv_cache_config"]["dtype"] == ("fp8" if SCHEMES[scheme].kv_cache_dtype == "fp8" else "auto")
    else:
        assert "cuda_graph_config" not in options  # TorchLlmArgs only; TrtLlmArgs would reject it


def test_serve_options_follow_gpu_and_workload():
    small = trtllm.serve_options(SCHEMES["fp8"], GPUS["L4"], LIMITS, WORKLOAD, "pytorch")
    assert small["kv_cache_config"]["free_gpu_memory_fraction"] == 0.85
    assert small["enable_chunked_prefill"] is True  # 16 × 1024 prompt tokens > 8192 per step
    light = trtllm.serve_options(SCHEMES["fp8"], H100, LIMITS, trtllm.Workload(4, 256, 64), "pytorch")
    assert light["enable_chunked_prefill"] is False
    assert trtllm.cuda_graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def test_engine_with_fp8_kv_outside_fp8_loses_paged_context():
    """builder.py drops paged context FMHA for fp8 KV unless the algorithm is FP8: no chunking, no reuse."""
    awq_kv8 = resolve_scheme("AWQ_W4A16", kv_cache_dtype="fp8")
    argv = trtllm.build_argv("c", "e", LIMITS, awq_kv8)
    assert argv[argv.index("--use_paged_context_fmha") + 1] == "disable"
    assert argv[argv.index("--use_fp8_context_fmha") + 1] == "disable"
    options = trtllm.serve_options(awq_kv8, H100, LIMITS, WORKLOAD, "engine")
    assert options["enable_chunked_prefill"] is False and options["kv_cache_config"]["enable_block_reuse"] is False
    long_prompts = trtllm.Limits(64, 8192, 16384, 4096)
    assert "needs chunked prefill" in trtllm.limits_problem(awq_kv8, long_prompts, "engine")
    assert trtllm.limits_problem(awq_kv8, long_prompts, "pytorch") is None
    assert trtllm.limits_problem(SCHEMES["fp8"], long_prompts, "engine") is None


def test_support_table():
    assert "needs ≥ 8.9" in trtllm.check_trtllm_support(SCHEMES["fp8"], A100, "engine")
    assert "needs ≥ 8.9" in trtllm.check_trtllm_support(SCHEMES["fp8-dynamic"], A100, "pytorch")
    assert trtllm.check_trtllm_support(SCHEMES["w4a16-awq"], A100, "engine") is None
    assert "symmetric" in trtllm.check_trtllm_support(SCHEMES["w4a16-awq"], A100, "pytorch")
    assert "SM 10.x" in trtllm.check_trtllm_support(SCHEMES["w4a16-awq"], GPUS["B200"], "engine")
    assert "Ampere" in trtllm.check_trtllm_support(SCHEMES["w4a16-awq"], GPUS["T4"], "engine")
    assert "group_size 64 or 128" in trtllm.check_trtllm_support(resolve_scheme("W4A16", group_size=32), H100, "engine")
    with pytest.raises(InputError, match="cannot run FP8"):
        trtllm.serve_plan("/m", SCHEMES["fp8"], A100, LIMITS, WORKLOAD, "pytorch", "1.3.0")


# ---------------------------------------------------------------- modes and versions


def test_default_mode_follows_version():
    assert trtllm.default_mode("1.2.1") == "engine"
    assert trtllm.default_mode("1.2.0rc5") == "engine"
    assert trtllm.default_mode("0.21.0") == "engine"
    assert trtllm.default_mode("1.3.0rc2") == "pytorch"
    assert trtllm.resolve_mode(None, "2.0.0") == "pytorch"
    assert trtllm.resolve_mode("pytorch", "1.2.1") == "pytorch"
    with pytest.raises(InputError, match="#15763"):
        trtllm.resolve_mode("engine", "1.3.0")
    with pytest.raises(InputError, match="not a TensorRT-LLM version"):
        trtllm.default_mode("latest")


# ---------------------------------------------------------------- engine builds


def test_engine_cache_key_pins_sm_and_version(tiny_state, tmp_path):
    qm = quantize(tiny_state, "FP8_DYNAMIC")
    ckpt.write(qm, tmp_path / "ckpt", 1)
    key = trtllm.engine_cache_key(tmp_path / "ckpt", LIMITS, qm.scheme, "1.2.1", "sm_90")
    assert set(key) == {"checkpoint_digest", "build_config", "trtllm_version", "gpu_sm", "key"}
    other_sm = trtllm.engine_cache_key(tmp_path / "ckpt", LIMITS, qm.scheme, "1.2.1", "sm_89")
    other_version = trtllm.engine_cache_key(tmp_path / "ckpt", LIMITS, qm.scheme, "1.2.0", "sm_90")
    assert len({key["key"], other_sm["key"], other_version["key"]}) == 3
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1"}))
    assert not trtllm.engine_reusable(engine, key)
    (engine / "forge-engine.json").write_text(json.dumps(key))
    assert trtllm.engine_reusable(engine, key)
    assert not trtllm.engine_reusable(engine, other_sm)
    (engine / "config.json").write_text(json.dumps({"version": "1.2.0"}))
    assert not trtllm.engine_reusable(engine, key)  # built by another TRT-LLM: never reused


def test_engine_build_without_gpu_is_deferred_with_the_command(tiny_state, tmp_path):
    qm = quantize(tiny_state, "FP8_DYNAMIC")
    ckpt.write(qm, tmp_path / "ckpt", 1)
    bare = trtllm.Toolchain(None, LocalGPUs((), "none", "no NVIDIA GPU detected (nvidia-smi not found)"),
                            False, "docker CLI not found")  # fmt: skip
    with pytest.raises(trtllm.EngineBuildDeferred) as info:
        trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, H100, toolchain=bare)
    assert info.value.reason == (
        "no NVIDIA GPU detected (nvidia-smi not found); "
        "tensorrt_llm not importable and no Docker engine (docker CLI not found)"
    )
    assert info.value.command == trtllm.docker_build_argv(
        tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, "1.2.1"
    )
    # And on this machine as it really is: nothing to build with unless a GPU is here.
    toolchain = trtllm.probe_toolchain()
    if not toolchain.gpus:
        with pytest.raises(trtllm.EngineBuildDeferred, match="no NVIDIA GPU detected"):
            trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, H100, toolchain=toolchain)
    with pytest.raises(InputError, match="removed after 1.2.x"):
        trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, H100, "1.3.0", bare)


def test_engine_build_runs_in_docker_once_and_then_reuses(tiny_state, tmp_path, monkeypatch):
    """Docker and a GPU are faked (neither exists here); the decision and the cache are real."""
    qm = quantize(tiny_state, "FP8_DYNAMIC")
    ckpt.write(qm, tmp_path / "ckpt", 1)
    h100 = LocalGPU(0, "NVIDIA H100 80GB HBM3", (9, 0), 81559, "H100")
    toolchain = trtllm.Toolchain(None, LocalGPUs((h100,), "nvidia-smi"), True)
    runs = []

    def fake_run(argv, **kwargs):
        runs.append(argv)
        (tmp_path / "engine" / "config.json").write_text(json.dumps({"version": "1.2.1"}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(trtllm.subprocess, "run", fake_run)
    build = trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, H100, toolchain=toolchain)
    assert build.runner == "docker" and runs == [build.command] and build.command[:2] == ["docker", "run"]
    again = trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", LIMITS, qm.scheme, H100, toolchain=toolchain)
    assert again.runner == "cached" and len(runs) == 1
    # An L40S (sm_89) target cannot use an H100 (sm_90) to build on.
    with pytest.raises(trtllm.EngineBuildDeferred, match="must be built on sm_89; found sm_90"):
        trtllm.build_engine(tmp_path / "ckpt", tmp_path / "l40s", LIMITS, qm.scheme, GPUS["L40S"], toolchain=toolchain)


@pytest.mark.gpu
def test_engine_builds_on_a_gpu(tiny_state, tmp_path):
    toolchain = trtllm.probe_toolchain()
    if not toolchain.gpus:
        pytest.skip(toolchain.gpus.reason)
    if toolchain.trtllm_version is None:
        pytest.skip("tensorrt_llm is not importable")
    if not trtllm.engine_mode_available(toolchain.trtllm_version):
        pytest.skip(f"tensorrt_llm {toolchain.trtllm_version} has no trtllm-build (removed after 1.2.x)")
    local = toolchain.gpus.gpus[0]
    gpu = GPUS.get(local.profile or "")
    if gpu is None:
        pytest.skip(f"no forge profile for {local.name}")
    preset = "FP8_DYNAMIC" if gpu.fp8 and gpu.compute_capability < (10, 0) else "W4A16"
    qm = quantize(tiny_state, preset, dtype="float16")
    ckpt.write(qm, tmp_path / "ckpt", 1)
    limits = trtllm.Limits(4, 64, 128, 256)
    build = trtllm.build_engine(tmp_path / "ckpt", tmp_path / "engine", limits, qm.scheme, gpu,
                                toolchain.trtllm_version, toolchain)  # fmt: skip
    assert (build.engine_dir / "rank0.engine").exists()
    assert trtllm.engine_reusable(build.engine_dir, build.key)


# ---------------------------------------------------------------- GPU detection


def test_gpu_detection_never_raises():
    local = detect_local_gpus()
    assert isinstance(local, LocalGPUs)
    assert bool(local.gpus) or local.reason.startswith("no NVIDIA GPU detected")
    listing = gpu_listing(local)
    assert {p["name"] for p in listing["profiles"]} == set(GPUS)
    assert listing["local_reason"] == local.reason


def test_nvidia_smi_output_maps_to_profiles():
    out = "0, NVIDIA H100 80GB HBM3, 9.0, 81559\n1, NVIDIA A100-SXM4-40GB, [N/A], 40960\n"
    h100, a100 = _parse_smi(out)
    assert (h100.profile, h100.sm, a100.profile, a100.sm) == ("H100", "sm_90", "A100-40GB", "sm_80")
    assert match_profile("NVIDIA L40S").name == "L40S" and match_profile("NVIDIA L4").name == "L4"
    assert match_profile("NVIDIA GeForce RTX 4090") is None
