"""Every architecture in `forge.architectures`, on tiny random models built from transformers' own
config classes: exports transformers loads, AWQ smoothing that keeps the float function, fused
and expert projections that round-trip bit for bit, dense tensors left unquantized, MoE
calibration that reports what each expert saw, plan-time limits, and `forge build` end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from forge.architectures import ARCHITECTURES, SUPPORTED_ARCHITECTURES, get_architecture
from forge.compat import ModelShape, architecture_problem
from forge.errors import InputError
from forge.eval.perplexity import build_model
from forge.formats import FORMATS
from forge.formats.model_dir import export_dtype, ignored_modules
from forge.quant import run
from forge.quant.awq import awq_layer, scale_groups
from forge.quant.layerwise import capture_layer_inputs, collect_layer_stats, layer_linear_names, load_float_model
from forge.quant.model import QuantizedModel
from forge.quant.moe import to_transformers_state, unfuse_experts
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import quantize_rtn, quantize_weight
from forge.quant.run import quantize_checkpoint
from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.tiny import make_tiny_model

ARCHS = [a for a in SUPPORTED_ARCHITECTURES if a != "LlamaForCausalLM"]  # Llama: test_formats / test_quant
DENSE = [a for a in ARCHS if not ARCHITECTURES[a].moe]
MOE = [a for a in ARCHS if ARCHITECTURES[a].moe]
FUSED_OR_EXPERT = ["Phi3ForCausalLM", *MOE]
CT, AWQ, MODELOPT = "compressed-tensors", "awq-gemm", "modelopt"
METADATA = {"recipe": "tiny", "variant": "test", "forge": "0.1.0"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per architecture (GQA 4 heads / 2 KV heads), written on first use."""
    root = tmp_path_factory.mktemp("archs")
    made: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, arch: str) -> Path:
            made[arch] = make_tiny_model(root / arch, arch)
            self[arch] = made[arch]
            return made[arch]

    return Lazy()


@cache
def rtn(source: Path, preset: str, group_size: int | None = None) -> QuantizedModel:
    config = json.loads((source / "config.json").read_text())
    return quantize_rtn(load_file(source / "model.safetensors"), config, resolve_scheme(preset, group_size=group_size))


def reference_model(source: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, tmp: Path) -> torch.nn.Module:
    """transformers' model of `source`'s config holding `state` (checkpoint names), loaded the way
    transformers loads any checkpoint, so MoE experts go through its own fusing."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (source / name).exists():
            (tmp / name).write_bytes((source / name).read_bytes())
    weights = {k: v.to(dtype).contiguous() for k, v in state.items() if not k.endswith(("_scale", "input_scale"))}
    if json.loads((source / "config.json").read_text()).get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------- the table


def test_table_names_every_quantizable_linear_of_each_model(models):
    """The table's quantizable pattern, routers and norms match the checkpoints transformers writes:
    every 2-D decoder-layer weight is either quantized or a router, and the plan-time weight shapes
    are exactly the checkpoint's."""
    for arch_name in ARCHS:
        source = models[arch_name]
        config = json.loads((source / "config.json").read_text())
        arch = get_architecture(config)
        state = load_file(source / "model.safetensors")
        pattern = arch.quantizable()
        for name, tensor in state.items():
            module = name.removesuffix(".weight")
            if name.startswith("model.layers.") and tensor.dim() == 2:
                router = arch.router is not None and module.endswith(arch.router)
                assert bool(pattern.match(module)) != router, (arch_name, name)
        shape = ModelShape.from_config(config)
        expected = shape.weight_shapes(shape.num_layers)
        if config.get("tie_word_embeddings"):
            expected.pop("lm_head.weight")
        assert expected == {k: tuple(v.shape) for k, v in state.items()}, arch_name


# ---------------------------------------------------------------- transformers loads the exports


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_compressed_tensors_int4_export(tmp_path, models, arch):
    """transformers + compressed-tensors run forge's W4A16 export to the same logits as the model
    holding forge's own reader's dequantized weights (same tolerance as the Llama test)."""
    source = models[arch]
    qm = rtn(source, "W4A16", 32)
    out = tmp_path / "ct"
    FORMATS[CT].write(qm, source, out, METADATA)
    _, state = FORMATS[CT].read(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert model.dtype == torch.float16
    reference = reference_model(source, state, torch.float16, tmp_path / "ref")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=5e-3)


@pytest.mark.parametrize("arch", DENSE)
def test_transformers_decompresses_compressed_tensors_fp8_export(tmp_path, models, arch):
    """FP8_DYNAMIC: compressed-tensors fake-quantizes activations in forward, so the decompressed
    weights are the check (as for Llama)."""
    source = models[arch]
    qm = rtn(source, "FP8_DYNAMIC")
    out = tmp_path / "ct"
    FORMATS[CT].write(qm, source, out, METADATA)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits(model)  # the first forward decompresses
    weights = model.state_dict()
    for name, linear in qm.linears.items():
        assert torch.equal(weights[f"{name}.weight"], linear.dequantize()), name


# ---------------------------------------------------------------- AWQ smoothing keeps the function


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_smoothing_alone_keeps_the_float_outputs(tmp_path, arch):
    """Scales folded into every smoothing group (no rounding kept) leave each fp32 decoder layer's
    outputs unchanged: the groups name the right producers (Gemma's pre-feedforward norm with its
    (1 + w) weight, Phi-3's v / up row slices, an MoE router scaled with its experts, the v → o
    group's scales shared by the o_proj columns of one kv head under grouped-query attention)."""
    source = make_tiny_model(tmp_path / arch, arch, num_key_value_heads=2, seed=1)
    config = json.loads((source / "config.json").read_text())
    arch_record = get_architecture(config)
    model = load_float_model(source)
    unfuse_experts(model, arch_record)
    tokens = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    hidden, per_layer = capture_layer_inputs(model, tokens)
    scheme = resolve_scheme("AWQ_W4A16", group_size=32)
    router = (arch_record.to_memory(arch_record.router),) if arch_record.router else ()
    for index, layer in enumerate(model.model.layers):
        names = layer_linear_names(layer, router)
        stats, before = collect_layer_stats(layer, hidden, per_layer[index], names, gram=True, kv=False)
        groups = scale_groups(layer, arch_record, config)
        smooths = {g.smooth for g in groups}
        assert "self_attn.v_proj" in smooths or "self_attn.qkv_proj" in smooths  # v → o under GQA
        if arch_record.router:
            assert any(router[0] in g.balance for g in groups)
        originals = {g.smooth: layer.get_submodule(g.smooth).weight.clone() for g in groups}
        quantized = {n for n in names if n not in router}
        awq_layer(layer, stats.inputs, quantized, scheme, groups)
        for smooth, weight in originals.items():  # every group's scales were folded in
            assert not torch.equal(layer.get_submodule(smooth).weight, weight), (arch, smooth)
        after = torch.cat([layer(hidden[i : i + 2], **per_layer[index]) for i in range(0, hidden.shape[0], 2)])
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        hidden = before


# ---------------------------------------------------------------- exact round trips, dense tensors


def exports(qm: QuantizedModel) -> list[str]:
    return [f for f in (CT, AWQ, MODELOPT) if FORMATS[f].unsupported_reason(qm.scheme) is None]


@pytest.mark.parametrize("arch", FUSED_OR_EXPERT)
@pytest.mark.parametrize(
    ("preset", "group"), [("W4A16", 32), ("W4A16_ASYM", 64), ("W4A16_ASYM", 128), ("FP8_DYNAMIC", None)]
)
def test_fused_and_expert_projections_round_trip_exactly(tmp_path, models, arch, preset, group):
    """Phi-3's fused qkv_proj / gate_up_proj and every MoE expert projection read back from every
    format that takes the scheme as `dequantize()` bit for bit; everything else as stored. Group 128
    on hidden 128 leaves one group per row: zero points packed from a single row."""
    source = models[arch]
    qm = rtn(source, preset, group)
    special = [n for n in qm.linears if n.endswith(("qkv_proj", "gate_up_proj")) or ".experts." in n]
    assert special
    formats = exports(qm)
    assert CT in formats and len(formats) >= 2
    for fmt in formats:
        out = tmp_path / fmt
        FORMATS[fmt].write(qm, source, out, METADATA)
        _, state = FORMATS[fmt].read(out)
        dtype = export_dtype(qm.scheme)
        assert set(state) == {f"{n}.weight" for n in qm.linears} | set(qm.dense), fmt
        for name, linear in qm.linears.items():
            assert torch.equal(state[f"{name}.weight"], linear.dequantize()), (fmt, name)
        for name, tensor in qm.dense.items():
            assert torch.equal(state[name], tensor.to(dtype).float()), (fmt, name)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_evaluation_model_skips_random_init_and_equals_transformers_own_load(tmp_path, models, arch):
    """`build_model` constructs without random initialization: every parameter and buffer, and
    the logits, must equal transformers' own `from_pretrained` of the same checkpoint."""
    source = models[arch]
    state = load_file(source / "model.safetensors")
    built = build_model(json.loads((source / "config.json").read_text()), state)
    reference = reference_model(source, state, torch.float32, tmp_path / "ref")
    mine, theirs = dict(built.state_dict(keep_vars=False)), dict(reference.state_dict())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    buffers = dict(reference.named_buffers())  # non-persistent ones (rotary frequencies) included
    assert all(torch.equal(b, buffers[k]) for k, b in built.named_buffers())
    assert torch.equal(logits(built), logits(reference))


@pytest.mark.parametrize("arch", ARCHS)
def test_routers_norms_and_embeddings_stay_dense_in_every_export(tmp_path, arch):
    """No router, norm or embedding is quantized in any export of a bfloat16 checkpoint: each is one
    plain tensor under its own name, equal to the source weight, in the source's bfloat16 (FP8
    exports) or the float16 the int4 kernels require (AWQ GEMM, TurboMind); routers are in every
    format's ignore list."""
    source = make_tiny_model(tmp_path / "src", arch, dtype=torch.bfloat16)
    record = ARCHITECTURES[arch]
    state = load_file(source / "model.safetensors")
    dense = [n for n in state if n.startswith("model.embed_tokens") or "norm" in n]
    routers = [n for n in state if record.router and n.endswith(f"{record.router}.weight")]
    assert bool(routers) == record.moe
    for preset, group in (("W4A16", 32), ("FP8_DYNAMIC", None)):
        qm = rtn(source, preset, group)
        assert {n.removesuffix(".weight") for n in routers} <= set(ignored_modules(qm))
        dtype = export_dtype(qm.scheme)
        assert dtype == (torch.bfloat16 if preset == "FP8_DYNAMIC" else torch.float16)
        for fmt in exports(qm):
            out = tmp_path / f"{preset}-{fmt}"
            FORMATS[fmt].write(qm, source, out, METADATA)
            stored = {}
            for path in out.glob("*.safetensors"):
                with safe_open(path, framework="pt") as f:
                    stored.update({k: f.get_tensor(k) for k in f.keys()})
            for name in dense + routers:
                module = name.removesuffix(".weight")
                assert not [k for k in stored if k.startswith(module + ".") and k != name], (fmt, name)
                assert stored[name].dtype == dtype, (fmt, name)
                assert torch.equal(stored[name], state[name].to(dtype)), (fmt, name)


# ---------------------------------------------------------------- calibrated quantizers on every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_quantizers_run_and_beat_rtn_where_they_should(models, arch):
    """GPTQ and AWQ quantize every linear of each architecture, static FP8 gives every linear an input
    scale, and the FP8 KV cache gets one positive k/v scale per layer (keys read after Qwen3's k norm
    and Phi-3's partial rotary)."""
    source = models[arch]
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    state = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    expected = set(rtn(source, "W4A16", 32).linears)
    for preset, algorithm in (("GPTQ_W4A16", "gptq"), ("AWQ_W4A16", "awq")):
        qm = quantize_checkpoint(source, resolve_scheme(preset, group_size=32), algorithm, tokens)
        assert set(qm.linears) == expected
        assert not qm.calibration["rtn_fallback"]
        assert set(qm.dense) == set(rtn(source, "W4A16", 32).dense)
    qm = quantize_checkpoint(source, resolve_scheme("FP8", kv_cache_dtype="fp8"), "rtn", tokens)
    assert all(linear.input_scale is not None and float(linear.input_scale) > 0 for linear in qm.linears.values())
    assert len(qm.kv_scales) == 2 * config["num_hidden_layers"]
    assert all(float(s) > 0 for s in qm.kv_scales.values())
    assert set(state) >= {f"{n}.weight" for n in qm.linears}


def test_moe_calibration_reports_expert_tokens_and_falls_back_to_rtn(tmp_path, monkeypatch):
    """Two calibration tokens reach at most four of eight experts per layer (top-2 routing): the
    report counts each expert's tokens, and every expert that saw none is round-to-nearest,
    named in the report; the experts that saw tokens are GPTQ-solved."""
    source = make_tiny_model(tmp_path / "moe", "Qwen3MoeForCausalLM", num_experts=8)
    tokens = torch.tensor([[5, 17]])
    scheme = resolve_scheme("GPTQ_W4A16", group_size=32)
    qm = quantize_checkpoint(source, scheme, "gptq", tokens)
    state = load_file(source / "model.safetensors")
    counts = qm.calibration["expert_tokens"]
    assert set(counts) == {"0", "1"}
    fallback = set(qm.calibration["rtn_fallback"])
    solved: list[bool] = []
    for layer, per_expert in counts.items():
        assert len(per_expert) == 8 and sum(per_expert) == 2 * 2  # two tokens, two experts each
        for expert, seen in enumerate(per_expert):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            names = [prefix + n for n in ("gate_proj", "up_proj", "down_proj")]
            assert all((n in fallback) == (seen == 0) for n in names), (layer, expert, seen)
            for n in names:
                plain = quantize_weight(state[f"{n}.weight"], scheme)
                same = torch.equal(qm.linears[n].codes, plain.codes) and torch.equal(qm.linears[n].scale, plain.scale)
                if seen == 0:
                    assert same, n
                else:
                    solved.append(not same)
    assert any(solved)  # the experts that saw tokens went through GPTQ's error feedback
    awq = quantize_checkpoint(source, resolve_scheme("AWQ_W4A16", group_size=32), "awq", tokens)
    assert set(awq.calibration["rtn_fallback"]) == fallback
    # Tuned rounding runs the unfused experts like any module. An expert no token reaches gets no
    # gradient (this raised before) and keeps its codes.
    # With the attention already int4, the router may send a token to an expert the dense pass did
    # not (here a second choice 0.142 vs 0.129), and that expert is tuned like the others.
    # The report then names only the experts whose codes tuning left as they came (in layer 0,
    # whose inputs both runs share, AWQ's own).
    tunings, tune = [], run.tune_rounding  # per layer: which codes tuning left as they came

    def tune_rounding(layer, linears, *args):
        tuned = tune(layer, linears, *args)
        tunings.append({n: torch.equal(q.codes, tuned[0][n].codes) for n, q in linears.items()})
        return tuned

    monkeypatch.setattr("forge.quant.run.tune_rounding", tune_rounding)
    tuned = quantize_checkpoint(source, resolve_scheme("AWQ_TUNED_W4A16", group_size=32), "awq_tuned", tokens)
    untouched = {f"model.layers.{i}.{n}" for i, kept in enumerate(tunings) for n, same in kept.items() if same}
    assert set(tuned.calibration["rtn_fallback"]) == fallback & untouched < fallback  # one was reached
    kept = [n for n in tuned.calibration["rtn_fallback"] if n.startswith("model.layers.0.")]
    assert kept and all(torch.equal(tuned.linears[n].codes, awq.linears[n].codes) for n in kept)
    errors = tuned.calibration["tuned_output_error"]
    assert set(errors) == {"0", "1"} and all(after <= before for before, after in errors.values())
    assert any(after < before for before, after in errors.values())


def test_moe_state_converts_to_transformers_names(models):
    """The evaluator's conversion of checkpoint names gives transformers' model every weight."""
    for arch in MOE:
        source = models[arch]
        config = json.loads((source / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        converted = to_transformers_state(config, load_file(source / "model.safetensors"))
        reference = model.state_dict()
        assert set(converted) == set(reference) - {"lm_head.weight"} | ({"lm_head.weight"} & set(converted))
        for name, tensor in converted.items():
            assert torch.equal(tensor, reference[name]), name


# ---------------------------------------------------------------- plan-time limits


def test_backend_limits_per_architecture():
    """The compatibility table's architecture limits, one fact per backend."""
    scheme = resolve_scheme("AWQ_W4A16", group_size=128)
    assert architecture_problem("Qwen3ForCausalLM", "tgi", scheme, None)
    assert architecture_problem("Qwen2ForCausalLM", "tgi", scheme, None) is None
    assert architecture_problem("Gemma2ForCausalLM", "lmdeploy", scheme, None)
    assert architecture_problem("MistralForCausalLM", "lmdeploy", scheme, None)
    assert architecture_problem("MixtralForCausalLM", "lmdeploy", scheme, None) is None
    assert architecture_problem("Gemma2ForCausalLM", "trtllm", scheme, "pytorch")
    assert architecture_problem("Qwen3MoeForCausalLM", "trtllm", scheme, "pytorch") is None
    assert architecture_problem("MistralForCausalLM", "trtllm", scheme, "engine") is None
    assert architecture_problem("Qwen2ForCausalLM", "trtllm", scheme, "engine") is None  # QWenForCausalLM
    assert "no Phi-3 layout" in architecture_problem("Phi3ForCausalLM", "trtllm", scheme, "engine")
    for arch in SUPPORTED_ARCHITECTURES:
        assert architecture_problem(arch, "vllm", scheme, None) is None


def test_plan_lists_impossible_cells_with_reasons(tmp_path, models, eval_text):
    """`forge plan` on a Gemma 2 recipe: vLLM is planned, LMDeploy and TGI-or-not are decided by
    the table, and each impossible cell carries its reason."""
    recipe = tiny_recipe(
        models["Gemma2ForCausalLM"],
        eval_text,
        variants=[{"name": "int4", "scheme": "AWQ_W4A16", "group_size": 128}],
        targets=[{"backend": "vllm", "gpus": ["H100"]}, {"backend": "lmdeploy", "gpus": ["H100"]}],
    )
    path = write_recipe(tmp_path / "r", recipe)
    code, output = run_cli("plan", str(path), "--json", "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    cells = {a["backend"]: a for a in json.loads(output)["artifacts"]}
    assert cells["vllm"]["status"] == "planned"
    assert cells["lmdeploy"]["status"] == "impossible"
    assert "Gemma2ForCausalLM" in json.dumps(cells["lmdeploy"]) and "SUPPORTED_ARCHS" in json.dumps(cells["lmdeploy"])


# ---------------------------------------------------------------- forge build, one variant per architecture

BUILDS = {
    "MistralForCausalLM": {"scheme": "GPTQ_W4A16", "group_size": 32},
    "Qwen2ForCausalLM": {"scheme": "AWQ_W4A16", "group_size": 64},
    "Qwen3ForCausalLM": {"scheme": "W4A16", "group_size": 128},
    "Gemma2ForCausalLM": {"scheme": "AWQ_W4A16", "group_size": 128},
    "Phi3ForCausalLM": {"scheme": "GPTQ_W4A16", "group_size": 64},
    "MixtralForCausalLM": {"scheme": "AWQ_W4A16", "group_size": 32},
    "Qwen3MoeForCausalLM": {"scheme": "FP8_DYNAMIC"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_forge_build_each_architecture(tmp_path, models, eval_text, arch):
    """`forge build` through the CLI: quantize, export to compressed-tensors for vLLM, and pass
    the accuracy gates on the exported weights."""
    variant = {"name": "v", **BUILDS[arch]}
    if variant["scheme"] not in ("FP8_DYNAMIC", "W4A16"):
        variant["calibration"] = {"sources": ["pydoc_topics"], "num_samples": 4, "seq_len": 64}
    recipe = tiny_recipe(models[arch], eval_text, variants=[variant], targets=[{"backend": "vllm", "gpus": ["H100"]}])
    path = write_recipe(tmp_path / "r", recipe)
    code, output = run_cli("build", str(path), "--artifacts-dir", str(tmp_path / "a"))
    assert code == 0, output
    report = json.loads((tmp_path / "a" / "tiny" / "build.json").read_text())
    text = json.dumps(report)
    assert "compressed-tensors" in text and '"fail"' not in text
    quantize = next(s for s in report["stages"] if s["id"] == "quantize/v")
    calibrated = "calibration" in variant
    if ARCHITECTURES[arch].moe and calibrated:  # the stage report counts what each expert saw
        counts = quantize["expert_tokens"]
        assert len(counts) == 2 and all(len(c) == 4 and sum(c) == 2 * 4 * 64 for c in counts.values())
    else:
        assert "expert_tokens" not in quantize


# ---------------------------------------------------------------- legacy TensorRT-LLM checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_trtllm_checkpoint_for_the_architectures_it_converts(tmp_path, models, arch):
    """Mistral (TensorRT-LLM's LLaMA model) and Qwen2 (its QWen model) checkpoints read back to
    `dequantize()` bit for bit (FP8 per-channel). Every other architecture is refused with the
    table's reason, at plan time and by the writer alike."""
    from forge.formats import trtllm_checkpoint

    source = models[arch]
    qm = rtn(source, "FP8_DYNAMIC")
    qm = QuantizedModel(qm.config, replace(qm.scheme, dtype="float16"), qm.dense, qm.linears)
    record = ARCHITECTURES[arch]
    scheme = qm.scheme
    if record.trtllm is None:
        assert architecture_problem(arch, "trtllm", scheme, "engine") is not None
        with pytest.raises(InputError, match=arch):
            trtllm_checkpoint.write(qm, tmp_path / "ckpt", 1)
        return
    assert architecture_problem(arch, "trtllm", scheme, "engine") is None
    trtllm_checkpoint.write(qm, tmp_path / "ckpt", 1)
    config, state = trtllm_checkpoint.read(tmp_path / "ckpt")
    assert config["architectures"] == [record.trtllm[0]]
    for name, linear in qm.linears.items():
        assert torch.equal(state[f"{name}.weight"], linear.dequantize()), name


# ---------------------------------------------------------------- GGUF sources


def write_gguf(path: Path, arch: str) -> Path:
    """A tiny real GGUF of llama.cpp architecture `arch`: one block, hidden 64, 4 heads (2 KV) of 16."""
    import numpy as np
    from gguf import GGUFWriter

    hidden, ff, kv, vocab = 64, 128, 2, 40
    writer = GGUFWriter(str(path), arch)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(kv)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")  # SentencePiece: tokens and scores are all transformers needs to convert it
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv * 16, hidden),
              "blk.0.attn_v.weight": (kv * 16, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}  # fmt: skip
    if arch == "qwen2":
        shapes |= {"blk.0.attn_q.bias": (hidden,), "blk.0.attn_k.bias": (kv * 16,), "blk.0.attn_v.bias": (kv * 16,)}
    if arch == "qwen3":
        shapes |= {"blk.0.attn_q_norm.weight": (16,), "blk.0.attn_k_norm.weight": (16,)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("gguf_arch", "expected"), [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_gguf_sources_map_to_their_architecture(tmp_path, gguf_arch, expected):
    """A Qwen2 / Qwen3 GGUF's header maps to its transformers class, its biases and q/k norms
    checked against the shapes the config implies; an architecture forge does not read is refused."""
    from forge.source import gguf_config

    config = gguf_config(write_gguf(tmp_path / "m.gguf", gguf_arch))
    assert config["architectures"] == [expected] and config["model_type"] == gguf_arch
    with pytest.raises(InputError, match="GGUF architecture 'gemma2' is not one forge reads"):
        gguf_config(write_gguf(tmp_path / "g.gguf", "gemma2"))


def test_gemma2_calibrates_with_the_soft_capped_attention(models):
    """SDPA would drop Gemma 2's attention-logit soft-capping, so its calibration model runs eager
    attention, as served; the others keep SDPA."""
    assert load_float_model(models["Gemma2ForCausalLM"]).config._attn_implementation == "eager"
    assert load_float_model(models["Qwen3ForCausalLM"]).config._attn_implementation == "sdpa"


def test_config_lying_about_experts_is_refused_before_anything_is_enumerated(models):
    """`num_experts: 10**9` (or fewer experts than the weights hold) is refused by name from the
    headers alone, without enumerating the experts it claims."""
    source = models["Qwen3MoeForCausalLM"]
    config = json.loads((source / "config.json").read_text())
    found = {k: tuple(v.shape) for k, v in load_file(source / "model.safetensors").items()}
    for experts, message in ((10**9, "the tensors of expert 4 are missing"), (2, "is beyond config.json's 2 experts")):
        shape = ModelShape.from_config({**config, "num_local_experts": experts, "num_experts": experts})
        with pytest.raises(InputError, match=message):
            shape.check_weights(found, False, "source")
    ModelShape.from_config(config).check_weights(found, False, "source")  # the truth passes


# ---------------------------------------------------------------- Qwen2 TensorRT-LLM engines


def test_plan_plans_a_qwen2_trtllm_engine_cell(tmp_path, models, eval_text):
    """`forge plan` on a Qwen2 recipe plans TensorRT-LLM engine cells (the legacy checkpoint's
    QWenForCausalLM layout) for FP8 and int4 (W4A16_AWQ), at tp 1 and at tp 4 over its 2 KV heads."""
    engine = {"backend": "trtllm", "gpus": ["H100"], "trtllm": {"mode": "engine"}}
    recipe = tiny_recipe(
        models["Qwen2ForCausalLM"],
        eval_text,
        variants=[{"name": "fp8", "scheme": "FP8_DYNAMIC"}, {"name": "int4", "scheme": "W4A16", "group_size": 64}],
        targets=[engine, {**engine, "tensor_parallel": 4, "variants": ["fp8"]}],
    )
    code, output = run_cli("plan", str(write_recipe(tmp_path / "r", recipe)), "--json", "--artifacts-dir",
                           str(tmp_path / "a"))  # fmt: skip
    assert code == 0, output
    cells = json.loads(output)["artifacts"]
    assert {(c["variant"], c["tensor_parallel"], c["status"], c["format"]) for c in cells} == {
        ("fp8", 1, "planned", "trtllm-checkpoint"),
        ("int4", 1, "planned", "trtllm-checkpoint"),
        ("fp8", 4, "planned", "trtllm-checkpoint"),
    }


def test_gguf_conversion_parses_the_file_once_with_the_same_bytes(tmp_path, monkeypatch):
    """`convert_gguf` memoizes gguf's reader and name map while transformers converts the file;
    the checkpoint it writes is byte for byte the one transformers writes without the memo, and
    gguf's own functions are back in place afterwards."""
    import contextlib

    import gguf

    from forge import source

    path = write_gguf(tmp_path / "m.gguf", "llama")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    opened = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: opened.append(a) or reader(*a, **k))
    source.convert_gguf(path, tmp_path / "memo")
    memoized = len(opened)
    monkeypatch.setattr(source, "gguf_parsed_once", contextlib.nullcontext)
    source.convert_gguf(path, tmp_path / "plain")
    assert memoized == 1 and len(opened) > 2  # once with the memo, once per transformers step without
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "memo" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    monkeypatch.undo()
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
