"""The streaming quantizer against the whole-model one, and dense tensors rounded once on export.

The reference keeps the previous method here: the whole checkpoint loaded in float32 by
`from_pretrained`, every layer's arguments captured by running the model's layers for real.
The product path builds the model on the meta device, makes one layer real at a time and writes
each layer's part to the cache as it is done; both must give the same tensors, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from forge.architectures import get_architecture
from forge.formats import FORMATS
from forge.formats.model_dir import Checkpoint
from forge.quant.calibration import load_calibration
from forge.quant.layerwise import _Stop, decoder_layers, load_float_model
from forge.quant.model import INDEX, load_quantized, open_quantized
from forge.quant.moe import unfuse_experts
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import quantizable_linears, quantize_weight, split_state
from forge.quant.run import calibrated_quantize, layer_groups, quantize_checkpoint, quantize_to_cache
from tests.tiny import make_tiny_llama, make_tiny_model

CASES = [
    ("LlamaForCausalLM", "W4A16", "rtn", {}),
    ("LlamaForCausalLM", "FP8_DYNAMIC", "rtn", {}),
    ("LlamaForCausalLM", "FP8", "rtn", {"kv_cache_dtype": "fp8"}),
    ("LlamaForCausalLM", "GPTQ_W4A16", "gptq", {"group_size": 32}),
    ("LlamaForCausalLM", "AWQ_W4A16", "awq", {"group_size": 32, "kv_cache_dtype": "fp8"}),
    ("Qwen2ForCausalLM", "AWQ_W4A16", "awq", {"group_size": 32}),
    ("Gemma2ForCausalLM", "GPTQ_W4A16", "gptq", {"group_size": 32}),
    ("MixtralForCausalLM", "AWQ_W4A16", "awq", {"group_size": 32}),
    ("MixtralForCausalLM", "GPTQ_W4A16", "gptq", {"group_size": 32}),  # parked experts run through hooks
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streaming")

    class Lazy(dict):
        def __missing__(self, arch: str) -> Path:
            self[arch] = make_tiny_model(root / arch, arch, dtype=torch.bfloat16)
            return self[arch]

    return Lazy()


class WholeModel:
    """The previous method, as a `StreamedModel` stand-in: every weight loaded up front."""

    def __init__(self, source: Path):
        self.config = json.loads((source / "config.json").read_text())
        self.model = load_float_model(source)
        unfuse_experts(self.model, get_architecture(self.config))
        self.layers = decoder_layers(self.model)

    @torch.no_grad()
    def embed(self, tokens: torch.LongTensor) -> tuple[torch.Tensor, list[dict]]:
        """Layer 0's inputs, and each layer's arguments captured while the real layers run."""
        captured: dict = {}
        per_layer: list[dict] = []

        def first(_module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        def keep(_module, _args, kwargs):
            per_layer.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        handle = self.layers[0].register_forward_pre_hook(first, with_kwargs=True)
        try:
            self.model.model(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        handle.remove()
        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in self.layers]
        self.model.model(input_ids=tokens[:1], use_cache=False)
        for h in handles:
            h.remove()
        return captured["hidden"].float(), per_layer

    def layer(self, index: int, _state: dict) -> torch.nn.Module:
        return self.layers[index]

    def release(self, index: int) -> None:
        pass


def whole_model_reference(source: Path, scheme, algorithm: str, tokens: torch.LongTensor | None) -> dict:
    """Every tensor of the previous method's result, by cache name."""
    config = json.loads((source / "config.json").read_text())
    state = load_file(source / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    if algorithm == "rtn" and tokens is None:
        dense, names = split_state(state, config, scheme)
        linears = {n: quantize_weight(state[f"{n}.weight"], scheme) for n in names}
        kv: dict = {}
    else:
        checkpoint = Checkpoint(source, "source")
        layers, rest = layer_groups(checkpoint.names)
        names = quantizable_linears(checkpoint.shapes(), scheme, config)
        dense, _ = split_state({n: state[n] for n in rest}, config, scheme)
        linears, kv = {}, {}
        groups = [layers[i] for i in sorted(layers)]
        for part in calibrated_quantize(WholeModel(source), checkpoint, groups, names, scheme, algorithm, tokens):
            dense.update(part.dense)
            linears.update(part.linears)
            kv.update(part.kv_scales)
    out.update({f"dense::{k}": v for k, v in dense.items()})
    for name, q in linears.items():
        for part in ("codes", "scale", "zero_point", "input_scale"):
            if getattr(q, part) is not None:
                out[f"linear::{name}::{part}"] = getattr(q, part)
    out.update({f"kv::{k}": v for k, v in kv.items()})
    return out


def cache_tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    qm = load_quantized(directory)
    out = {f"dense::{k}": v for k, v in qm.dense.items()}
    for name, q in qm.linears.items():
        for part in ("codes", "scale", "zero_point", "input_scale"):
            if getattr(q, part) is not None:
                out[f"linear::{name}::{part}"] = getattr(q, part)
    out.update({f"kv::{k}": v for k, v in qm.kv_scales.items()})
    return out


def assert_bit_equal(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize(("arch", "preset", "algorithm", "options"), CASES, ids=lambda c: str(c))
def test_streamed_quantization_equals_the_whole_model_method(tmp_path, sources, arch, preset, algorithm, options):
    source = sources[arch]
    scheme = resolve_scheme(preset, **options)
    calibrated = algorithm != "rtn" or scheme.activations == "static_tensor" or scheme.kv_cache_dtype == "fp8"
    tokens = load_calibration(["pydoc_topics"], source, num_samples=4, seq_len=32, seed=0) if calibrated else None
    reference = whole_model_reference(source, scheme, algorithm, tokens)

    streamed = quantize_to_cache(source, tmp_path / "cache", scheme, algorithm, tokens)
    assert (tmp_path / "cache" / INDEX).is_file()
    assert len(list((tmp_path / "cache").glob("quantized-*.safetensors"))) > 2  # one part per layer, at least
    assert_bit_equal(cache_tensors_of(tmp_path / "cache"), reference)
    assert sorted(streamed.linears) == sorted(open_quantized(tmp_path / "cache").linears)

    in_memory = quantize_checkpoint(source, scheme, algorithm, tokens)
    flat = {f"dense::{k}": v for k, v in in_memory.dense.items()}
    assert {k for k in reference if k.startswith("dense::")} == set(flat)
    assert_bit_equal({**flat, **{k: v for k, v in reference.items() if not k.startswith("dense::")}}, reference)
    for name, q in in_memory.linears.items():
        assert torch.equal(q.dequantize(), streamed.linears[name].dequantize()), name


def test_dense_tensors_keep_the_source_dtype(tmp_path):
    source = make_tiny_llama(tmp_path / "src", dtype=torch.bfloat16, tie_word_embeddings=False)
    qm = quantize_checkpoint(source, resolve_scheme("W4A16"), "rtn", None)
    state = load_file(source / "model.safetensors")
    for name, tensor in qm.dense.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[name]), name


@pytest.mark.parametrize(("fmt", "preset", "algorithm"), [("compressed-tensors", "W4A16", "rtn"),
                                                          ("awq-gemm", "AWQ_W4A16", "awq"),
                                                          ("modelopt", "W4A16", "rtn")])  # fmt: skip
def test_int4_export_rounds_dense_tensors_once(tmp_path, fmt, preset, algorithm):
    """An int4 export is float16: its embedding is source.to(float16), not a float16 copy of a
    bfloat16 copy; AWQ's folded norms are their float32 values cast once."""
    source = make_tiny_llama(tmp_path / "src", dtype=torch.bfloat16, tie_word_embeddings=False)
    scheme = resolve_scheme(preset, group_size=32)
    tokens = load_calibration(["pydoc_topics"], source, num_samples=4, seq_len=32, seed=0)
    quantize_to_cache(source, tmp_path / "cache", scheme, algorithm, tokens if algorithm != "rtn" else None)
    qm = open_quantized(tmp_path / "cache")
    assert FORMATS[fmt].unsupported_reason(scheme) is None  # ModelOpt's int4 is symmetric only
    FORMATS[fmt].write(qm, source, tmp_path / "out", {})
    state = load_file(source / "model.safetensors")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            exported = f.get_tensor(name)
            assert exported.dtype == torch.float16
            assert torch.equal(exported, state[name].to(torch.float16)), name
        if algorithm == "awq":
            norm = "model.layers.0.input_layernorm.weight"
            assert qm.dense[norm].dtype == torch.float32  # computed by AWQ, kept as computed
            assert torch.equal(f.get_tensor(norm), qm.dense[norm].to(torch.float16))


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "FP8_DYNAMIC", "FP8"])
def test_row_blocks_give_the_codes_of_the_whole_weight(preset):
    """`quantize_weight` rounds a tall weight a block of rows at a time: the same codes and scales
    as quantizing it whole (the previous method)."""
    from forge.quant.rtn import ROW_BLOCK, _quantize_whole

    scheme = resolve_scheme(preset)
    weight = (torch.randn(2 * ROW_BLOCK + 100, 256, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    ours, whole = quantize_weight(weight, scheme), _quantize_whole(weight, scheme)
    for part in ("codes", "scale", "zero_point"):
        a, b = getattr(ours, part), getattr(whole, part)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a.float(), b.float())), part


def test_read_as_casts_a_block_of_rows_at_a_time_to_the_whole_tensors_cast(tmp_path):
    """`Checkpoint.read_as` reads a tall tensor through one mapping per block of rows: the result is
    the whole tensor's cast, for a last block shorter than the others and for 1-D tensors too."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(10, 4, generator=generator).bfloat16(), "norm": torch.randn(4).bfloat16()}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path, "source")
    for name, tensor in tensors.items():
        read = checkpoint.read_as(name, torch.float32, rows=3)
        assert read.dtype == torch.float32 and torch.equal(read, tensor.float()), name
