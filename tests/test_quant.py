"""Calibrated quantization (AWQ, GPTQ, static FP8, KV-cache scales) on tiny real Llamas.

Every check runs the product path, `quantize_checkpoint`, on a 2-layer model built here, and
compares what it stored with what the dense model computes; llm-compressor's `oneshot` is the
independent reference for the round-to-nearest schemes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from forge.errors import InputError
from forge.quant.calibration import load_calibration
from forge.quant.gptq import gptq_quantize
from forge.quant.model import QuantizedLinear, QuantizedModel, Scheme, save_quantized
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import FP8_MAX, int4_codes, int4_qparams, quantize_int4
from forge.quant.run import quantize_checkpoint
from tests.tiny import layer_case, make_tiny_llama

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    """conftest's 2-layer Llama: hidden 128, intermediate 256, 4 heads, 2 kv heads of 32."""
    return tiny_model


@pytest.fixture(scope="module")
def outlier_tiny(tmp_path_factory) -> Path:
    """A tiny Llama whose norms make a few input channels 20× larger, as real LLMs have."""
    directory = make_tiny_llama(tmp_path_factory.mktemp("outliers"), seed=1)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[5, 40, 77, 100]] *= 20.0
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calibration(tiny) -> torch.LongTensor:
    return load_calibration(["pydoc_topics"], tiny, num_samples=8, seq_len=64, seed=0)


def dense_model(directory: Path, quantized: QuantizedModel | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if quantized is not None:
        missing, unexpected = model.load_state_dict(quantized.dequantize(torch.float32), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def last_hidden(model: torch.nn.Module, tokens: torch.LongTensor) -> torch.Tensor:
    return model(tokens, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def linear_io(model: torch.nn.Module, tokens: torch.LongTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every decoder linear's (max |input|, output) on `tokens`, keyed by module name."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0].abs().amax(), out))
        )
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and name.endswith(LINEARS)
    ]
    model(tokens)
    for h in hooks:
        h.remove()
    return seen


# ---------------------------------------------------------------- calibration data


def test_calibration_is_deterministic_and_seeded(tiny):
    a = load_calibration(["pydoc_topics"], tiny, num_samples=4, seq_len=32, seed=0)
    b = load_calibration(["pydoc_topics"], tiny, num_samples=4, seq_len=32, seed=0)
    c = load_calibration(["pydoc_topics"], tiny, num_samples=4, seq_len=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_reads_text_and_jsonl_files(tiny, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": f"forge turns one recipe into artifacts, line {i}."}) for i in range(30))
    )
    tokens = load_calibration([tmp_path / "b.jsonl"], tiny, 2, 32, text_field="body")
    assert tokens.shape == (2, 32)
    assert "recipe" in AutoTokenizer.from_pretrained(tiny).decode(tokens.flatten())
    both = load_calibration([tmp_path / "a.txt", tmp_path / "b.jsonl"], tiny, 6, 32, text_field="body")
    assert both.shape == (6, 32)
    with pytest.raises(InputError, match="a.txt"):
        load_calibration([tmp_path / "a.txt"], tiny, 64, 32)


def test_calibration_errors_name_the_source(tiny, tmp_path):
    with pytest.raises(InputError, match="missing.txt"):
        load_calibration([tmp_path / "missing.txt"], tiny, 2, 16)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InputError, match="short.txt"):
        load_calibration([tmp_path / "short.txt"], tiny, 2, 16)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1 .*'text'"):
        load_calibration([tmp_path / "bad.jsonl"], tiny, 2, 16)


# ---------------------------------------------------------------- dispatcher checks


def test_group_size_that_does_not_divide_names_the_layer(tiny, calibration):
    scheme = resolve_scheme("AWQ_W4A16", group_size=96)  # hidden 128 is not a multiple of 96
    expected = r"group_size: group size 96 does not divide model\.layers\.0\.mlp\.down_proj = 256; use group_size 128"
    with pytest.raises(InputError, match=expected):
        quantize_checkpoint(tiny, scheme, "awq", calibration)


def test_calibrated_schemes_refuse_missing_calibration(tiny):
    with pytest.raises(InputError, match="calibration"):
        quantize_checkpoint(tiny, resolve_scheme("GPTQ_W4A16"), "gptq", None)


@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_ignore_patterns_are_respected(tiny, calibration, algorithm):
    preset = {"awq": "AWQ_W4A16", "gptq": "GPTQ_W4A16"}[algorithm]
    scheme = resolve_scheme(preset, group_size=64, ignore=("lm_head", "re:.*mlp\\.down_proj"))
    q = quantize_checkpoint(tiny, scheme, algorithm, calibration)
    assert len(q.linears) == 2 * 6
    assert not any(name.endswith("down_proj") for name in q.linears)
    assert q.dense["model.layers.1.mlp.down_proj.weight"].shape == (128, 256)
    assert "model.layers.1.mlp.up_proj" in q.linears


# ---------------------------------------------------------------- AWQ


def test_awq_is_deterministic(tiny, calibration, tmp_path):
    scheme = resolve_scheme("AWQ_W4A16", group_size=64, kv_cache_dtype="fp8")
    for run in ("a", "b"):
        save_quantized(quantize_checkpoint(tiny, scheme, "awq", calibration), tmp_path / run)
    a = (tmp_path / "a" / "quantized.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "quantized.safetensors").read_bytes()


def test_awq_beats_rtn_on_outlier_channels(outlier_tiny):
    calibration = load_calibration(["pydoc_topics"], outlier_tiny, num_samples=8, seq_len=64, seed=0)
    held_out = load_calibration(["pydoc_topics"], outlier_tiny, num_samples=4, seq_len=64, seed=7)
    reference = last_hidden(dense_model(outlier_tiny), held_out)
    errors = {}
    for algorithm in ("rtn", "awq"):
        scheme = resolve_scheme("AWQ_W4A16", group_size=64, dtype="float32")
        q = quantize_checkpoint(outlier_tiny, scheme, algorithm, calibration)
        out = last_hidden(dense_model(outlier_tiny, q), held_out)
        errors[algorithm] = (out - reference).pow(2).mean().item()
    assert errors["awq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_awq_scale_folding_keeps_the_float_function(tmp_path, kv_heads):
    """Scales folded into norms / producer linears leave the dense layer's outputs unchanged.

    v_proj → o_proj is a scale group with and without grouped-query attention (with 2 kv heads
    for 4 heads, each v channel's scale multiplies the two o_proj columns reading it).
    """
    from forge.architectures import get_architecture
    from forge.quant.awq import awq_layer, scale_groups
    from forge.quant.layerwise import run_layer

    case = layer_case(make_tiny_llama(tmp_path / "m", num_layers=1, num_kv_heads=kv_heads))
    layer, names = case.layer, case.names
    norm = layer.input_layernorm.weight.clone()
    scheme = resolve_scheme("AWQ_W4A16", group_size=64)
    config = case.model.config.to_dict()
    groups = scale_groups(layer, get_architecture(config), config)
    linears, errors = awq_layer(layer, case.stats.inputs, set(names), scheme, groups)
    assert not torch.equal(layer.input_layernorm.weight, norm)  # scales were folded in
    torch.testing.assert_close(run_layer(layer, case.hidden, case.kwargs), case.outputs, rtol=1e-4, atol=1e-5)
    assert "self_attn.v_proj" in errors
    for rtn_error, awq_error in errors.values():
        assert awq_error <= rtn_error
    assert errors["self_attn.v_proj"][1] < errors["self_attn.v_proj"][0]  # o_proj found a better scale
    assert set(linears) == set(names)
    for linear in linears.values():
        assert linear.codes.dtype == torch.int8 and 0 <= int(linear.codes.min()) <= int(linear.codes.max()) <= 15
        assert linear.scale.dtype == torch.float16 and linear.scale.shape[1] == linear.codes.shape[1] // 64


def test_awq_keeps_the_inputs_of_linears_wider_than_the_calibration_instead_of_their_gram(tmp_path):
    """192 calibration tokens: only down_proj (256 inputs; the others read 128) keeps its inputs X,
    and no Gram beside them: XᵀX is the Gram the other collection accumulates, and stays the
    statistics of what down_proj reads after AWQ divided X by the folded scales."""
    from forge.architectures import get_architecture
    from forge.quant.awq import awq_layer, scale_groups

    model = make_tiny_llama(tmp_path / "m", num_layers=1)
    case = layer_case(model, num_samples=2, seq_len=96, inputs=True)
    grams = layer_case(model, num_samples=2, seq_len=96).stats.inputs
    stats = case.stats.inputs
    assert {n for n in case.names if stats[n].inputs is not None} == {"mlp.down_proj"}
    down = stats["mlp.down_proj"]
    assert down.inputs.shape == (192, 256) and down.gram is None
    assert all(stats[n].gram is not None for n in case.names if n != "mlp.down_proj")
    torch.testing.assert_close(down.full_gram(), grams["mlp.down_proj"].gram, rtol=1e-4, atol=1e-4)
    before = down.inputs.clone()
    config = case.model.config.to_dict()
    groups = scale_groups(case.layer, get_architecture(config), config)
    awq_layer(case.layer, stats, set(case.names), resolve_scheme("AWQ_W4A16", group_size=64), groups)
    assert not torch.allclose(down.inputs, before)  # up_proj → down_proj scales were folded
    scale = (before / down.inputs)[0]  # x / s, per input channel
    torch.testing.assert_close(before / scale, down.inputs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clipping_through_kept_inputs_chooses_what_the_gram_chooses(symmetric):
    """Fewer tokens than inputs: each group's XᵀX gives the clipping search the blocks the Gram does."""
    from forge.quant.awq import group_grams, search_clip
    from forge.quant.layerwise import InputStats

    torch.manual_seed(1)
    x = torch.randn(96, 256) * (torch.rand(256) * 2).exp()
    w = torch.randn(40, 256) * 0.05
    w[torch.rand_like(w) < 0.02] *= 8  # outliers worth clipping
    scheme = resolve_scheme("AWQ_W4A16", group_size=64, symmetric=symmetric)
    with_gram, with_x = InputStats(tokens=96, gram=x.T @ x), InputStats(tokens=96, inputs=x)
    torch.testing.assert_close(group_grams(with_x, 64), group_grams(with_gram, 64), rtol=1e-5, atol=1e-3)
    (clipped, grid), (clipped_x, grid_x) = search_clip(w, with_gram, scheme), search_clip(w, with_x, scheme)
    assert torch.equal(clipped_x, clipped) and not torch.equal(clipped, w)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grid_x, grid, strict=True))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_scale_search_through_the_inputs_equals_the_search_through_the_gram(symmetric):
    """Fewer tokens than inputs: ‖ΔXᵀ‖² picks the scales ΔGΔᵀ picks, with the same errors."""
    from forge.quant.awq import ScaleGroup, search_scales
    from forge.quant.layerwise import InputStats

    torch.manual_seed(0)
    x = torch.randn(96, 256) * (torch.rand(256) * 3).exp()  # uneven channels: scales matter
    w = torch.randn(64, 256) * 0.05
    common = {"tokens": 96, "abs_sum": x.abs().sum(0).double(), "gram": x.T @ x}
    scheme = resolve_scheme("AWQ_W4A16", group_size=64, symmetric=symmetric)
    group = ScaleGroup("norm", ("a", "b"))
    through_gram = search_scales([w, w.flip(0)], [True, True], InputStats(**common), scheme, group)
    through_x = search_scales([w, w.flip(0)], [True, True], InputStats(**common, inputs=x), scheme, group)
    assert torch.equal(through_x[0], through_gram[0]) and not torch.equal(through_gram[0], torch.ones(256))
    assert through_x[1:] == pytest.approx(through_gram[1:], rel=1e-4)


@pytest.mark.parametrize("size", [3, 50, 256])  # fewer inputs than blocks, uneven blocks, even blocks
def test_awq_error_through_half_the_gram_equals_the_whole_quadratic_form(size):
    """`quadratic_forms` multiplies only G's blocks on and above the diagonal: the same Σ δGδᵀ per
    candidate as the whole product, to float32 rounding (a dropped or doubled block is far off)."""
    from forge.quant.awq import quadratic_forms

    torch.manual_seed(0)
    x = torch.randn(512, size) @ torch.randn(size, size)  # correlated inputs: off-diagonal blocks matter
    gram, delta = x.T @ x, torch.randn(5, 7, size)
    exact = torch.einsum("cri,ij,crj->c", delta.double(), gram.double(), delta.double())
    torch.testing.assert_close(quadratic_forms(delta, gram).double(), exact, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- GPTQ


def test_gptq_has_lower_output_error_than_rtn():
    torch.manual_seed(0)
    mixing = torch.randn(128, 128) * (torch.rand(128) * 3).exp()  # correlated, uneven channels
    x = torch.randn(2048, 128) @ mixing
    w = torch.randn(64, 128) * 0.05
    hessian = x.T @ x / x.shape[0]
    scheme = resolve_scheme("GPTQ_W4A16", group_size=32)

    def error(linear) -> float:
        delta = linear.dequantize() - w
        return ((delta @ hessian) * delta).sum().item()

    gptq = gptq_quantize(w, hessian, scheme)
    rtn = quantize_int4(w, scheme)
    assert error(gptq) < 0.7 * error(rtn), (error(gptq), error(rtn))
    assert gptq.zero_point is None and int(gptq.codes.min()) >= -8 and int(gptq.codes.max()) <= 7


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_act_order_keeps_static_groups_and_the_format(symmetric):
    """Act-order rounds columns by descending H_jj but stores codes in the original order, on
    grids computed from the original groups up front: the stored format does not change."""
    from forge.quant.gptq import static_grid

    torch.manual_seed(0)
    x = torch.randn(1024, 128) @ (torch.randn(128, 128) * (torch.rand(128) * 3).exp())  # correlated
    w = torch.randn(48, 128) * 0.05
    hessian = x.T @ x / x.shape[0]
    scheme = resolve_scheme("GPTQ_W4A16", group_size=32, symmetric=symmetric)
    ordered = gptq_quantize(w, hessian, scheme, order=True)
    scale, zero = static_grid(w, scheme)
    torch.testing.assert_close(ordered.scale, scale, rtol=0, atol=0)
    if symmetric:
        assert ordered.zero_point is None
    else:
        assert torch.equal(ordered.zero_point, zero)

    def error(linear) -> float:
        delta = linear.dequantize() - w
        return ((delta @ hessian) * delta).sum().item()

    assert error(ordered) < 0.8 * error(quantize_int4(w, scheme))


def test_awq_with_gptq_rounding_beats_awq_alone_on_its_layer(tmp_path):
    """AWQ scales, then GPTQ onto the clipped grids: lower output error per linear, same format."""
    from forge.architectures import get_architecture
    from forge.quant import awq

    directory = make_tiny_llama(tmp_path / "m", num_layers=1)
    scheme = resolve_scheme("AWQ_W4A16", group_size=64)
    errors = {}
    for gptq in (False, True):
        case = layer_case(directory)
        layer, stats = case.layer, case.stats
        config = case.model.config.to_dict()
        groups = awq.scale_groups(layer, get_architecture(config), config)
        with awq.options(gptq=gptq):
            linears, _ = awq.awq_layer(layer, stats.inputs, set(case.names), scheme, groups)
        total = 0.0
        for name, q in linears.items():
            assert q.zero_point is not None and 0 <= int(q.codes.min()) <= int(q.codes.max()) <= 15
            delta = q.dequantize() - layer.get_submodule(name).weight.float()
            gram = stats.inputs[name].gram.float()
            total += ((delta @ gram) * delta).sum().item()
        errors[gptq] = total
    assert errors[True] < errors[False], errors


def clip_case(symmetric: bool):
    """A weight with outliers and correlated inputs, as the clipping search sees them."""
    from forge.quant.layerwise import InputStats

    torch.manual_seed(0)
    x = torch.randn(2048, 128) @ (torch.randn(128, 128) * (torch.rand(128) * 2).exp()) / 8
    w = torch.randn(40, 128) * 0.05
    w[:, ::17] *= 6  # outliers: clipping them buys finer steps for the rest
    stats = InputStats(tokens=x.shape[0], gram=(x.T @ x).double())
    return w, stats, resolve_scheme("AWQ_W4A16", group_size=32, symmetric=symmetric)


def row_errors(w: torch.Tensor, clipped_grid, stats) -> torch.Tensor:
    """Each row's output error ΔGΔᵀ for `w` rounded onto the chosen grid."""
    from forge.quant.rtn import int4_codes

    clipped, (scale, zero) = clipped_grid
    delta = QuantizedLinear(int4_codes(clipped, scale, zero, 32), scale, zero).dequantize() - w
    return ((delta @ (stats.gram.float() / stats.tokens)) * delta).sum(-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_searches_a_block_of_rows_at_a_time_to_the_whole_weights_choices(symmetric, monkeypatch):
    """Temporaries capped at 8 rows' worth of floats (8B shapes cap them at 1024 rows): the same
    clipping choices and scales as with the whole weight in one block."""
    from forge.quant import awq

    w, stats, scheme = clip_case(symmetric)
    stats.abs_sum = torch.rand(128, dtype=torch.float64) * stats.tokens
    group = awq.ScaleGroup("norm", ("a", "b"))
    whole = awq.search_clip(w, stats, scheme), awq.search_scales([w, w * 2], [True, True], stats, scheme, group)
    monkeypatch.setattr(awq, "BATCH_ELEMENTS", 8 * 128)
    (clipped, grid), (scales, rtn_error, error) = (
        awq.search_clip(w, stats, scheme),
        awq.search_scales([w, w * 2], [True, True], stats, scheme, group),
    )
    assert torch.equal(clipped, whole[0][0]) and all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(grid, whole[0][1], strict=True)
    )
    assert torch.equal(scales, whole[1][0]) and (rtn_error, error) == pytest.approx(whole[1][1:], rel=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_grid_is_the_clipped_weights_own(symmetric):
    """The grid `search_clip` returns is the one `int4_qparams` computes from the clipped weights
    (the default factors never widen), and `on_grid` is codes-then-dequantize for any shape."""
    from forge.quant import awq
    from forge.quant.rtn import int4_codes, int4_qparams

    w, stats, scheme = clip_case(symmetric)
    clipped, (scale, zero) = awq.search_clip(w, stats, scheme)
    expected_scale, expected_zero = int4_qparams(clipped, 32, symmetric, scheme.scale_dtype)
    assert torch.equal(scale, expected_scale)
    assert zero is None if symmetric else torch.equal(zero, expected_zero)
    assert not torch.equal(clipped, w)  # the outliers were clipped somewhere
    deq = QuantizedLinear(int4_codes(clipped, scale, zero, 32), scale, zero).dequantize()
    assert torch.equal(awq.on_grid(clipped.reshape(40, 4, 32), scale, zero).reshape(40, 128), deq)  # bit for bit


@pytest.mark.parametrize(("symmetric", "changes"), [
    (True, {"widen": True}), (False, {"split_ends": True}), (True, {"joint": True}), (False, {"joint": True}),
])  # fmt: skip
def test_wider_clip_searches_never_lose(symmetric, changes):
    """More candidate ranges, or the choices revisited against the whole Gram matrix, give every
    row an output error no larger than the per-group search's, and lower overall."""
    from forge.quant import awq

    w, stats, scheme = clip_case(symmetric)
    base = row_errors(w, awq.search_clip(w, stats, scheme), stats)
    with awq.options(**changes):
        wider = awq.search_clip(w, stats, scheme)
    better = row_errors(w, wider, stats)
    if "joint" in changes:  # coordinate descent on each row's total: never worse, row by row
        assert bool((better <= base * (1 + 1e-5)).all())
    assert float(better.sum()) < float(base.sum())
    if changes.get("widen"):
        scale = wider[1][0].float()
        amax = w.abs().reshape(40, 4, 32).amax(-1)
        assert bool((scale > amax / 7.5 * 1.01).any())  # some groups chose a range past max|w|


def test_gptq_is_deterministic_and_beats_rtn_end_to_end(tiny, calibration, tmp_path):
    scheme = resolve_scheme("GPTQ_W4A16", group_size=64, dtype="float32")
    runs = [quantize_checkpoint(tiny, scheme, "gptq", calibration) for _ in range(2)]
    for run, q in zip("ab", runs, strict=True):
        save_quantized(q, tmp_path / run)
    assert (tmp_path / "a/quantized.safetensors").read_bytes() == (tmp_path / "b/quantized.safetensors").read_bytes()
    held_out = load_calibration(["pydoc_topics"], tiny, num_samples=4, seq_len=64, seed=7)
    reference = last_hidden(dense_model(tiny), held_out)
    rtn = quantize_checkpoint(tiny, scheme, "rtn", None)
    err = {
        name: (last_hidden(dense_model(tiny, q), held_out) - reference).pow(2).mean().item()
        for name, q in (("gptq", runs[0]), ("rtn", rtn))
    }
    assert err["gptq"] < err["rtn"], err


# ---------------------------------------------------------------- FP8 static and KV scales


def test_fp8_static_input_scales_are_calibrated_absmax(tiny, calibration):
    q = quantize_checkpoint(tiny, resolve_scheme("FP8"), "rtn", calibration)
    observed = linear_io(dense_model(tiny), calibration)
    assert set(q.linears) == set(observed)
    for name, linear in q.linears.items():
        assert linear.codes.dtype == torch.float8_e4m3fn and linear.scale.shape == (1,)
        assert linear.input_scale.dtype == torch.float32 and linear.input_scale.shape == (1,)
        expected = observed[name][0] / FP8_MAX
        torch.testing.assert_close(linear.input_scale[0], expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", ["W4A16", "AWQ_W4A16"])
def test_kv_cache_scales_are_post_rope_absmax(tiny, calibration, preset):
    """RTN calibrates KV scales on the dense model; AWQ on the quantized model it serves."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    scheme = resolve_scheme(preset, group_size=64, kv_cache_dtype="fp8", dtype="float32")
    q = quantize_checkpoint(tiny, scheme, "awq" if preset.startswith("AWQ") else "rtn", calibration)
    assert sorted(q.kv_scales) == sorted(
        f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in ("k", "v")
    )
    model = dense_model(tiny, q if preset.startswith("AWQ") else None)
    observed = linear_io(model, calibration)
    positions = torch.arange(calibration.shape[1]).unsqueeze(0)
    cos, sin = model.model.rotary_emb(observed["model.layers.0.self_attn.k_proj"][1], positions)
    for i in range(2):
        k_scale, v_scale = (q.kv_scales[f"model.layers.{i}.self_attn.{kv}_scale"] for kv in ("k", "v"))
        assert k_scale.dtype == torch.float32 and k_scale.shape == () and float(k_scale) > 0
        k = observed[f"model.layers.{i}.self_attn.k_proj"][1]
        k = k.reshape(*k.shape[:2], -1, 32).transpose(1, 2)  # 2 kv heads of 32
        k_rope, _ = apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(k_scale, k_rope.abs().amax() / FP8_MAX, rtol=1e-5, atol=0)
        assert float(k_scale) != pytest.approx(float(k.abs().amax() / FP8_MAX), rel=1e-6)  # RoPE mattered
        v = observed[f"model.layers.{i}.self_attn.v_proj"][1]
        torch.testing.assert_close(v_scale, v.abs().amax() / FP8_MAX, rtol=1e-5, atol=0)


def test_no_kv_scales_or_calibration_without_fp8_kv_cache(tiny):
    assert quantize_checkpoint(tiny, resolve_scheme("W4A16"), "rtn", None).kv_scales == {}


# ---------------------------------------------------------------- cross-check with llm-compressor


def llmcompressor_codes(
    directory: Path, preset: str, scale_dtype: torch.dtype | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """llm-compressor `oneshot` with `preset`: per linear (codes, scale, zero point)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.scale_dtype = scale_dtype
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    result = {}
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and name.endswith(LINEARS):
            args = module.quantization_scheme.weights
            codes = quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
            result[name] = (codes, module.weight_scale.detach(), module.weight_zero_point.detach())
    return result


def test_fp8_dynamic_matches_llmcompressor_exactly(tiny):
    ours = quantize_checkpoint(tiny, resolve_scheme("FP8_DYNAMIC"), "rtn", None)
    theirs = llmcompressor_codes(tiny, "FP8_DYNAMIC")
    assert set(ours.linears) == set(theirs)
    for name, (codes, scale, _) in theirs.items():
        assert torch.equal(ours.linears[name].scale, scale)
        assert torch.equal(ours.linears[name].codes.float(), codes.float())


def test_int4_symmetric_rtn_matches_llmcompressor_but_keeps_each_groups_extreme(tiny):
    """Same rules as llm-compressor storing fp16 scales, except where rounding a scale to fp16 went
    up: forge stores the fp16 value just below (`rtn.stored_toward_zero`). So every group's
    largest weight keeps its full reach, code -8 when negative (7 when positive), where a scale
    rounded up (or a float32 one, by a coin flip of its last bit) gives some of them -7."""
    ours = quantize_checkpoint(tiny, resolve_scheme("W4A16"), "rtn", None)
    source = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).state_dict()
    lowered = 0
    for name, (codes, scale, zero) in llmcompressor_codes(tiny, "W4A16", torch.float16).items():
        linear = ours.linears[name]
        scale = scale.to(linear.scale.dtype)  # fp16 values, held in float32 by compressed-tensors
        same = linear.scale == scale
        below = linear.scale == torch.nextafter(scale, torch.zeros_like(scale))
        assert bool((same | below).all()) and not zero.any()
        per_element = same.repeat_interleave(linear.codes.shape[1] // same.shape[1], dim=1)
        assert torch.equal(linear.codes.int()[per_element], codes.int()[per_element])
        weight = source[f"{name}.weight"].reshape(*same.shape, -1)
        extreme = weight.abs().argmax(-1, keepdim=True)
        expected = torch.where(weight.gather(-1, extreme) < 0, -8, 7)
        assert torch.equal(linear.codes.int().reshape(*same.shape, -1).gather(-1, extreme), expected)
        lowered += int(below.sum())
    assert lowered > 0  # the tiny model has such groups: the rule was exercised


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_scales_of_zero_and_tiny_groups_are_positive_and_their_codes_exact(symmetric, dtype):
    """An all-zero group (a pruned or dead channel) and one of weights far below float16's smallest
    step: the stored scale is positive in its dtype, the codes read back to the group's values
    (zeros exactly), and the ordinary group beside them keeps its round-to-nearest codes."""
    weight = torch.zeros(3, 8)
    weight[1, :4] = torch.tensor([1e-9, -2e-9, 3e-9, 0.0])
    weight[2, :4] = torch.tensor([0.5, -0.25, 0.125, 1.0])
    scale, zero = int4_qparams(weight, 4, symmetric, dtype)
    read = QuantizedLinear(int4_codes(weight, scale, zero, 4), scale, zero).dequantize()
    assert scale.dtype == dtype and bool((scale > 0).all())
    assert torch.equal(read[0], torch.zeros(8)) and torch.equal(read[1:, 4:], torch.zeros(2, 4))
    assert float((read[1] - weight[1]).abs().max()) < 1e-7
    step = scale[2, 0].float()
    offset = 0 if zero is None else zero[2, 0].float()
    expected = (
        torch.round(weight[2, :4] / step + offset).clamp(-8 if zero is None else 0, 7 if zero is None else 15) - offset
    ) * step
    assert torch.equal(read[2, :4], expected)


def test_int4_asymmetric_rtn_matches_llmcompressor_up_to_zero_point_rounding(tiny):
    """compressed-tensors keeps codes and zero points signed (-8..7), forge unsigned (0..15).

    The one real difference: compressed-tensors derives the zero point from the scale before
    rounding it to fp16 (`calculate_qparams`: zero point in step 1, scale_dtype rounding in
    step 3), forge from the fp16 scale it stores. Where min / scale sits within fp16 rounding of
    a .5 boundary the zero points differ by one, and so does every code of that group.
    """
    ours = quantize_checkpoint(tiny, resolve_scheme("W4A16_ASYM"), "rtn", None)
    groups = zero_mismatch = code_mismatch_elsewhere = 0
    for name, (codes, scale, zero) in llmcompressor_codes(tiny, "W4A16_ASYM", torch.float16).items():
        linear = ours.linears[name]
        assert torch.equal(linear.scale.float(), scale.float())
        zero_diff = linear.zero_point.int() - (zero.int() + 8)
        assert int(zero_diff.abs().max()) <= 1
        groups += zero_diff.numel()
        zero_mismatch += int((zero_diff != 0).sum())
        same_zero = (zero_diff == 0).repeat_interleave(128, dim=1)
        code_mismatch_elsewhere += int(((linear.codes.int() != codes.int() + 8) & same_zero).sum())
    assert zero_mismatch / groups < 0.01, (zero_mismatch, groups)
    assert code_mismatch_elsewhere <= 2, code_mismatch_elsewhere  # float ties: round(x/s + z) vs round(x/s) + z


def test_scheme_fields_used_by_quantizers():
    """The quantizers rely on these preset facts; a preset edit that breaks them fails here."""
    awq, gptq = resolve_scheme("AWQ_W4A16"), resolve_scheme("GPTQ_W4A16")
    assert isinstance(awq, Scheme) and not awq.symmetric and awq.group_size == 128
    assert gptq.symmetric and gptq.group_size == 128 and gptq.weight_format == "int4"


def test_tuned_rounding_keeps_awqs_grids_and_lowers_the_error_on_held_out_text(outlier_tiny):
    """AWQ_TUNED_W4A16 in layer 0: AWQ's own scales and zero points (so every format stores it as
    it stores AWQ), codes moved by one step at most where tuning moved them (layer 1 sees the tuned
    layer 0's outputs, so its AWQ grids differ); every layer's calibration error lowered (the report
    says by how much), and the model's error on text it was not tuned on too."""
    calibration = load_calibration(["pydoc_topics"], outlier_tiny, num_samples=8, seq_len=64, seed=0)
    held_out = load_calibration(["pydoc_topics"], outlier_tiny, num_samples=4, seq_len=64, seed=7)
    reference = last_hidden(dense_model(outlier_tiny), held_out)
    scheme = resolve_scheme("AWQ_TUNED_W4A16", group_size=64, dtype="float32")
    awq = quantize_checkpoint(outlier_tiny, scheme, "awq", calibration)
    tuned = quantize_checkpoint(outlier_tiny, scheme, "awq_tuned", calibration)
    assert awq.linears.keys() == tuned.linears.keys() and awq.dense.keys() == tuned.dense.keys()
    changed = 0
    for name, q in tuned.linears.items():
        if not name.startswith("model.layers.0."):
            continue
        assert torch.equal(q.scale, awq.linears[name].scale)
        assert torch.equal(q.zero_point, awq.linears[name].zero_point)
        assert q.codes.dtype == torch.int8 and 0 <= int(q.codes.min()) <= int(q.codes.max()) <= 15
        moved = (q.codes.int() - awq.linears[name].codes.int()).abs()
        assert int(moved.max()) <= 1  # an offset within ±0.5 moves a code one step at most
        changed += int(moved.sum())
    assert changed > 0
    errors = tuned.calibration["tuned_output_error"]
    assert sorted(errors) == ["0", "1"] and all(after < before for before, after in errors.values()), errors
    held_out_error = {
        name: (last_hidden(dense_model(outlier_tiny, q), held_out) - reference).pow(2).mean().item()
        for name, q in (("awq", awq), ("tuned", tuned))
    }
    assert held_out_error["tuned"] < held_out_error["awq"], held_out_error


def test_tuned_rounding_is_deterministic(tiny, calibration, tmp_path):
    scheme = resolve_scheme("AWQ_TUNED_W4A16", group_size=64)
    for run in ("a", "b"):
        save_quantized(quantize_checkpoint(tiny, scheme, "awq_tuned", calibration), tmp_path / run)
    a = (tmp_path / "a" / "quantized.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "quantized.safetensors").read_bytes()


def test_tuning_without_a_better_point_keeps_awqs_own_codes(tiny, calibration, monkeypatch):
    """No step taken (STEPS = 0): no offsets better than 0 were found, and AWQ's linears come back."""
    from forge.quant import rounding

    scheme = resolve_scheme("AWQ_TUNED_W4A16", group_size=64)
    monkeypatch.setattr(rounding, "STEPS", 0)
    tuned = quantize_checkpoint(tiny, scheme, "awq_tuned", calibration)
    awq = quantize_checkpoint(tiny, scheme, "awq", calibration)
    for name, q in awq.linears.items():
        assert torch.equal(tuned.linears[name].codes, q.codes)
    assert all(before == after for before, after in tuned.calibration["tuned_output_error"].values())


@pytest.mark.parametrize("symmetric", [True, False])
def test_tuning_offsets_of_zero_are_round_to_nearest(symmetric):
    """The tuning starts where AWQ ends: with offsets 0, the straight-through codes are the
    round-to-nearest codes `rtn.int4_codes` stores."""
    from forge.quant.rounding import Grids

    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    scale, zero = int4_qparams(weight, 64, symmetric, torch.float16)
    grids = Grids({"w": weight}, {"w": QuantizedLinear(weight, scale, zero)}, 64)
    assert torch.equal(grids.codes("w", torch.zeros_like(weight)).to(torch.int8), int4_codes(weight, scale, zero, 64))


def test_tuned_awq_reports_progress_within_each_layer_in_order(tiny, calibration, monkeypatch):
    """AWQ's searches fill the first part of each layer's progress, the tuning the rest; never backwards."""
    from forge.quant import rounding

    monkeypatch.setattr(rounding, "STEPS", 2 * rounding.CHECK_EVERY)  # a check halfway through each layer's tuning
    seen: list[tuple[str, float, int]] = []
    scheme = resolve_scheme("AWQ_TUNED_W4A16", group_size=64)
    quantize_checkpoint(tiny, scheme, "awq_tuned", calibration, progress=lambda *a: seen.append(a))
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == 2 and {t for _, _, t in seen} == {2}
    assert {"awq", "tune"} <= {stage for stage, _, _ in seen}
    assert any(stage == "tune" and 0 < d < 1 for stage, d, _ in seen)
