"""Format writers and readers on the tiny Llama: exact round trips, complete model dirs, and
cross-checks against code forge did not write (transformers + compressed-tensors decompression,
compressed-tensors' own AutoAWQ converter)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forge.errors import InputError
from forge.formats import FORMATS, get_format
from forge.formats.model_dir import INDEX_NAME, WEIGHTS_NAME, export_dtype
from forge.quant.model import QuantizedModel
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import quantize_rtn
from tests.tiny import make_tiny_llama

CT, AWQ, MODELOPT = "compressed-tensors", "awq-gemm", "modelopt"
SUPPORTED = {
    CT: ["FP8_DYNAMIC", "FP8_static", "W4A16_g32", "W4A16_ASYM_g64", "kv_fp8"],
    AWQ: ["W4A16_g32", "W4A16_ASYM_g64"],
    MODELOPT: ["FP8_DYNAMIC", "FP8_static", "W4A16_g32", "kv_fp8"],
}
UNSUPPORTED = [(AWQ, "FP8_DYNAMIC"), (AWQ, "FP8_static"), (AWQ, "kv_fp8"), (MODELOPT, "W4A16_ASYM_g64")]
METADATA = {"recipe": "tiny", "variant": "test", "forge": "0.1.0"}
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def source(tiny_model) -> Path:
    return tiny_model  # conftest's session-wide tiny Llama (tied embeddings)


@cache
def quantized(source: Path, case: str) -> QuantizedModel:
    """One QuantizedModel per case, built once per session (tests never mutate it)."""
    state = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    preset, group, kv = {
        "FP8_DYNAMIC": ("FP8_DYNAMIC", None, None),
        "FP8_static": ("FP8", None, None),
        "W4A16_g32": ("W4A16", 32, None),
        "W4A16_ASYM_g64": ("W4A16_ASYM", 64, None),
        "kv_fp8": ("FP8_DYNAMIC", None, "fp8"),
    }[case]
    qm = quantize_rtn(state, config, resolve_scheme(preset, group_size=group, kv_cache_dtype=kv))
    if case == "FP8_static":  # a fake calibration: distinct per layer so a mix-up shows
        for i, name in enumerate(sorted(qm.linears)):
            qm.linears[name].input_scale = torch.tensor([0.002 * (i + 1)], dtype=torch.float32)
    if kv:
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.self_attn."
            qm.kv_scales[prefix + "k_scale"] = torch.tensor(0.01 * (layer + 1))
            qm.kv_scales[prefix + "v_scale"] = torch.tensor(0.02 * (layer + 1))
    return qm


def expected_state(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """What a reader must return: `dequantize()` exactly, unquantized tensors as stored."""
    dtype = export_dtype(qm.scheme)
    state = qm.dequantize()
    for name, tensor in qm.dense.items():
        state[name] = tensor.to(dtype).to(torch.float32)
    for name, linear in qm.linears.items():
        if linear.input_scale is not None:
            state[f"{name}.input_scale"] = linear.input_scale.float().reshape(1)
    state.update({name: scale.float().reshape(()) for name, scale in qm.kv_scales.items()})
    return state


def export(tmp_path: Path, fmt: str, qm: QuantizedModel, source: Path, name: str = "out", **options) -> Path:
    out = tmp_path / name
    FORMATS[fmt].write(qm, source, out, METADATA, **options)
    return out


def tiny_model(source: Path, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(source)).eval()
    weights = {k: v for k, v in state.items() if not k.endswith(("input_scale", "k_scale", "v_scale"))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied head
    return model


def logits(model: torch.nn.Module, source: Path) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(source)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def tensor_names(directory: Path) -> set[str]:
    names = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            names |= set(f.keys())
    return names


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(("fmt", "case"), [(f, c) for f, cases in SUPPORTED.items() for c in cases])
def test_round_trip_is_exact_and_reproduces_logits(tmp_path, source, fmt, case):
    qm = quantized(source, case)
    out = export(tmp_path, fmt, qm, source)
    config, state = FORMATS[fmt].read(out)

    expected = expected_state(qm)
    assert set(state) == set(expected)
    for name in sorted(expected):
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], expected[name]), name
    for name, linear in qm.linears.items():  # the int4/fp8 weights are dequantize() bit for bit
        assert torch.equal(state[f"{name}.weight"], linear.dequantize())
    assert config["quantization_config"]["quant_method"] in ("compressed-tensors", "awq", "modelopt")

    # Dense tensors are rounded once, to the export dtype: the export is that model exactly.
    reference = logits(tiny_model(source, qm.dequantize(dense_dtype=export_dtype(qm.scheme))), source)
    rebuilt = logits(tiny_model(source, state), source)
    assert torch.equal(rebuilt, reference)


@pytest.mark.parametrize(("fmt", "case"), UNSUPPORTED)
def test_unsupported_scheme_is_an_input_error(tmp_path, source, fmt, case):
    qm = quantized(source, case)
    assert FORMATS[fmt].unsupported_reason(qm.scheme) is not None or qm.kv_scales
    with pytest.raises(InputError, match=fmt):
        export(tmp_path, fmt, qm, source)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- complete model directories


@pytest.mark.parametrize(("fmt", "case"), [(CT, "kv_fp8"), (AWQ, "W4A16_ASYM_g64"), (MODELOPT, "W4A16_g32")])
def test_export_is_a_complete_model_dir(tmp_path, source, fmt, case):
    qm = quantized(source, case)
    out = export(tmp_path, fmt, qm, source)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((out / "forge.json").read_text()) == METADATA
    config = json.loads((out / "config.json").read_text())
    dtype = str(export_dtype(qm.scheme)).removeprefix("torch.")
    assert config["torch_dtype"] == config["dtype"] == dtype
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensor_names(out)  # tied: stored once, as the embedding
    assert (out / WEIGHTS_NAME).is_file() and not (out / INDEX_NAME).exists()

    messages = [{"role": "user", "content": "hi"}]
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source)
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)


def test_untied_lm_head_is_written_once(tmp_path):
    untied = make_tiny_llama(tmp_path / "untied", tie_word_embeddings=False)
    qm = quantized(untied, "W4A16_g32")
    assert "lm_head.weight" in qm.dense
    for fmt in (CT, AWQ, MODELOPT):
        out = export(tmp_path, fmt, qm, untied, name=fmt)
        assert "lm_head.weight" in tensor_names(out)
        _, state = FORMATS[fmt].read(out)
        assert torch.equal(state["lm_head.weight"], qm.dense["lm_head.weight"].half().float())


def test_ignore_lists_agree_across_formats(tmp_path, source):
    qm = quantized(source, "W4A16_g32")
    qm = replace(qm, scheme=replace(qm.scheme, ignore=("lm_head", "re:.*layers\\.1\\.mlp\\.down_proj")))
    down = "model.layers.1.mlp.down_proj"
    kept = qm.linears[down].dequantize().to(torch.bfloat16)
    linears = {k: v for k, v in qm.linears.items() if k != down}
    qm = replace(qm, linears=linears, dense={**qm.dense, f"{down}.weight": kept})  # never mutate the cache
    lists = {}
    for fmt in (CT, AWQ, MODELOPT):
        out = export(tmp_path, fmt, qm, source, name=fmt)
        qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
        lists[fmt] = qconfig.get("ignore", qconfig.get("modules_to_not_convert"))
        assert f"{down}.weight" in tensor_names(out)  # kept dense, under its HF name
        _, state = FORMATS[fmt].read(out)
        assert torch.equal(state[f"{down}.weight"], qm.dense[f"{down}.weight"].half().float())
    hf_quant = json.loads((tmp_path / MODELOPT / "hf_quant_config.json").read_text())["quantization"]
    assert lists[CT] == lists[AWQ] == lists[MODELOPT] == hf_quant["exclude_modules"] == ["lm_head", down]


def test_config_blocks_match_upstream_shapes(tmp_path, source):
    from compressed_tensors.quantization import QuantizationConfig

    for case in SUPPORTED[CT]:
        qconfig = json.loads((export(tmp_path, CT, quantized(source, case), source, case) / "config.json").read_text())
        block = qconfig["quantization_config"]
        parsed = QuantizationConfig.model_validate(
            {k: v for k, v in block.items() if k in QuantizationConfig.model_fields}
        )
        assert parsed.quantization_status == "compressed" and block["version"] == "0.19.0"
        assert (parsed.kv_cache_scheme is not None) == (case == "kv_fp8")

    awq = json.loads((export(tmp_path, AWQ, quantized(source, "W4A16_g32"), source, "awq") / "config.json").read_text())
    assert awq["quantization_config"] == {
        "bits": 4,
        "group_size": 32,
        "modules_to_not_convert": ["lm_head"],
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }

    out = export(tmp_path, MODELOPT, quantized(source, "W4A16_g32"), source, "mo")
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"] == {
        "exclude_modules": ["lm_head"],
        "group_size": 32,
        "has_zero_point": False,
        "kv_cache_quant_algo": None,
        "pre_quant_scale": True,
        "quant_algo": "W4A16_AWQ",
    }
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "modelopt" and block["quant_algo"] == "W4A16_AWQ"
    out = export(tmp_path, MODELOPT, quantized(source, "kv_fp8"), source, "mo_kv")
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN" and hf_quant["kv_cache_quant_algo"] == "FP8"
    assert "model.layers.0.self_attn.k_proj.k_scale" in tensor_names(out)  # ModelOpt's KV scale names


# ---------------------------------------------------------------- sharding and determinism


@pytest.mark.parametrize(("fmt", "case"), [(CT, "W4A16_ASYM_g64"), (AWQ, "W4A16_g32"), (MODELOPT, "FP8_static")])
def test_sharding_writes_an_index_and_reads_back(tmp_path, source, fmt, case):
    qm = quantized(source, case)
    limit = 60_000
    out = export(tmp_path, fmt, qm, source, max_shard_bytes=limit)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / WEIGHTS_NAME).exists()
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    total = 0
    for path in shards:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
            size = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
        assert {n for n, shard in index["weight_map"].items() if shard == path.name} == names
        modules = {n.rsplit(".", 1)[0] for n in names}
        assert size <= limit or len(modules) == 1, path.name  # only a single oversized unit may pass
        total += size
    assert index["metadata"]["total_size"] == total

    _, sharded = FORMATS[fmt].read(out)
    _, whole = FORMATS[fmt].read(export(tmp_path, fmt, qm, source, name="whole"))
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


@pytest.mark.parametrize(("fmt", "case"), [(CT, "kv_fp8"), (AWQ, "W4A16_ASYM_g64"), (MODELOPT, "FP8_static")])
def test_exports_are_byte_identical(tmp_path, source, fmt, case):
    qm = quantized(source, case)
    first = export(tmp_path, fmt, qm, source, name="a", max_shard_bytes=200_000)
    second = export(tmp_path, fmt, qm, source, name="b", max_shard_bytes=200_000)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fmt", [CT, AWQ, MODELOPT])
def test_group_size_that_does_not_divide_names_the_layer(tmp_path, source, fmt):
    qm = quantized(source, "W4A16_g32")
    bad = replace(qm, scheme=replace(qm.scheme, group_size=48))
    with pytest.raises(InputError, match=r"group size 48 does not divide model\.layers\.0\.mlp\.down_proj = 256"):
        export(tmp_path, fmt, bad, source)


@pytest.mark.parametrize("fmt", [CT, AWQ])
def test_tensor_parallel_groups_must_tile_each_rank(tmp_path, source, fmt):
    qm = quantized(source, "W4A16_ASYM_g64")  # down_proj: 256 inputs = 4 groups of 64
    per_rank = r"group size 64 does not divide model\.layers\.0\.mlp\.down_proj per rank at tensor_parallel 8 = 32"
    with pytest.raises(InputError, match=per_rank):
        export(tmp_path, fmt, qm, source, name="tp8", tp_size=8)
    tp2, tp1 = export(tmp_path, fmt, qm, source, name="tp2", tp_size=2), export(tmp_path, fmt, qm, source)
    assert (tp2 / WEIGHTS_NAME).read_bytes() == (tp1 / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize(
    ("fmt", "case", "dropped"),
    [
        (CT, "W4A16_ASYM_g64", "model.layers.1.mlp.up_proj.weight_zero_point"),
        (CT, "FP8_DYNAMIC", "model.layers.0.self_attn.q_proj.weight"),
        (AWQ, "W4A16_g32", "model.layers.1.self_attn.o_proj.qzeros"),
        (MODELOPT, "W4A16_g32", "model.layers.0.mlp.gate_proj.weight"),
    ],
)
def test_missing_tensor_on_read_names_it(tmp_path, source, fmt, case, dropped):
    out = export(tmp_path, fmt, quantized(source, case), source)
    tensors = load_file(out / WEIGHTS_NAME)
    del tensors[dropped]
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(InputError, match=re.escape(f"{fmt}: tensor {dropped} is missing")):
        FORMATS[fmt].read(out)


def test_index_naming_a_missing_tensor_is_an_input_error(tmp_path, source):
    out = export(tmp_path, CT, quantized(source, "W4A16_g32"), source, max_shard_bytes=100_000)
    index = json.loads((out / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight_packed"] = sorted(index["weight_map"].values())[0]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"model\.layers\.9\.mlp\.up_proj\.weight_packed is missing"):
        FORMATS[CT].read(out)


def test_reader_rejects_another_format_and_writer_a_used_dir(tmp_path, source):
    out = export(tmp_path, AWQ, quantized(source, "W4A16_g32"), source)
    with pytest.raises(InputError, match="expected 'compressed-tensors'"):
        FORMATS[CT].read(out)
    with pytest.raises(InputError, match="not empty"):
        export(tmp_path, CT, quantized(source, "W4A16_g32"), source)
    with pytest.raises(InputError, match="not one of"):
        get_format("gguf")


def test_kv_fp8_without_scales_is_an_input_error(tmp_path, source):
    qm = quantized(source, "kv_fp8")
    bare = replace(qm, kv_scales={})
    for fmt in (CT, MODELOPT):
        with pytest.raises(InputError, match="needs calibrated k/v scales"):
            export(tmp_path, fmt, bare, source, name=fmt)


# ---------------------------------------------------------------- cross-checks with code forge did not write


@pytest.mark.parametrize("case", ["W4A16_g32", "W4A16_ASYM_g64", "FP8_DYNAMIC", "FP8_static", "kv_fp8"])
def test_transformers_loads_compressed_tensors_export(tmp_path, source, case):
    """transformers + compressed-tensors decompress forge's export to forge's weights, exactly.

    int4 runs on CPU in the export's float16, so logits are compared too. The FP8 schemes load
    in float32 (scales stay float32: compressed-tensors creates scale parameters in the model
    dtype) and compressed-tensors fake-quantizes fp8 activations in forward, so for them the
    decompressed weights are the check.
    """
    qm = quantized(source, case)
    out = export(tmp_path, CT, qm, source)
    int4 = qm.scheme.weight_format == "int4"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto" if int4 else torch.float32).eval()
    got = logits(model, source)  # the first forward decompresses
    weights = model.state_dict()
    expected = expected_state(qm)
    dtype = torch.float16 if int4 else torch.float32
    assert model.dtype == dtype
    for name in [k for k in expected if k.endswith(".weight")]:
        assert torch.equal(weights[name], expected[name].to(dtype)), name
    for name, scale in qm.kv_scales.items():
        assert torch.equal(weights[name].float().reshape(()), scale), name
    if int4:
        reference = LlamaForCausalLM(LlamaConfig.from_pretrained(source)).to(torch.float16).eval()
        reference.load_state_dict({k: v.half() for k, v in expected.items()}, strict=False)
        # float16 CPU matmuls in a different order: about one float16 ulp of logits near 2 (~2e-3)
        torch.testing.assert_close(got, logits(reference, source), rtol=0, atol=5e-3)


def test_int4_packing_matches_compressed_tensors_packer():
    """forge's byte-wise packer against compressed-tensors' own `pack_to_int32` (dense bit packing)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from forge.formats.compressed_tensors import pack_int4_rows

    generator = torch.Generator().manual_seed(0)
    signed = torch.randint(-8, 8, (24, 64), dtype=torch.int8, generator=generator)
    assert torch.equal(pack_int4_rows(signed, offset=8), pack_to_int32(signed, 4))
    zero = torch.randint(0, 16, (24, 4), dtype=torch.int8, generator=generator)  # uint4, [out, groups]
    theirs = pack_to_int32(zero - 8, 4, packed_dim=0)  # compressed-tensors keeps zero points signed
    assert torch.equal(pack_int4_rows(zero.t().contiguous()).t(), theirs)


@pytest.mark.parametrize("case", ["W4A16_g32", "W4A16_ASYM_g64"])
def test_compressed_tensors_awq_converter_agrees_with_forge(tmp_path, source, case):
    """compressed-tensors' AutoAWQ → compressed-tensors converter, run on forge's AWQ export,
    yields forge's weights; for asymmetric schemes its tensors equal forge's own CT export."""
    from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    qm = quantized(source, case)
    awq = export(tmp_path, AWQ, qm, source, name="awq")
    converted = tmp_path / "converted"
    convert_checkpoint(awq, converted, AutoAWQConverter.from_pretrained(str(awq)), device="cpu")
    _, forge_state = FORMATS[AWQ].read(awq)

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    logits(model, source)  # decompress
    weights = model.state_dict()
    for name in qm.linears:
        assert torch.equal(weights[f"{name}.weight"], forge_state[f"{name}.weight"].half()), name

    theirs = load_file(converted / WEIGHTS_NAME)
    ours = load_file(export(tmp_path, CT, qm, source, name="ct") / WEIGHTS_NAME)
    for name in qm.linears:
        for part in ("weight_packed", "weight_scale", "weight_shape"):
            assert torch.equal(theirs[f"{name}.{part}"], ours[f"{name}.{part}"]), (name, part)
        if not qm.scheme.symmetric:
            assert torch.equal(theirs[f"{name}.weight_zero_point"], ours[f"{name}.weight_zero_point"])
