"""GPTQ's memory-lean paths give what the straightforward ones give.

At 8B and 70B scale the Hessian of down_proj is 14336² / 28672² floats, so `forge.quant.gptq`
factors it in place and, for the streaming quantizer (`release=True`), rounds the layer's own
weights in place. These tests hold those paths to the plain computations on a tiny real Llama.
"""

from __future__ import annotations

import json

import pytest
import torch

from forge.quant.gptq import Parked, factor_inverse_hessian_, gptq_layer, gptq_quantize, park_
from forge.quant.presets import resolve_scheme
from forge.quant.rtn import ROW_BLOCK
from tests.tiny import layer_case, make_tiny_llama, make_tiny_model


def test_inverse_hessian_factor_is_computed_in_place_and_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(512, 96) @ (torch.randn(96, 96) * (torch.rand(96) * 2).exp())
    hessian = x.T @ x / x.shape[0]
    hessian[:, 7] = hessian[7, :] = 0  # a dead input channel
    h = hessian.clone()
    storage = h.data_ptr()
    dead = factor_inverse_hessian_(h)
    assert h.data_ptr() == storage and dead.nonzero().flatten().tolist() == [7]
    reference = hessian.double()
    reference[7, 7] = 1.0
    reference += 0.01 * torch.diagonal(reference).mean() * torch.eye(96, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(reference)), upper=True)
    torch.testing.assert_close(h.double(), upper, rtol=1e-3, atol=1e-6 * float(upper.abs().max()))
    assert torch.equal(h, h.triu())


@pytest.mark.parametrize(("order", "bf16"), [(False, False), (True, False), (False, True)])
def test_release_rounds_in_place_to_the_same_codes_and_frees_the_gram(tmp_path, order, bf16):
    """`release=True` (the streaming quantizer) gives the codes of the copying path, drops each
    Gram matrix once used and leaves each weight dequantized: the layer as served, in float32
    even where a weight waited as bfloat16 (`Parked`). The linears sharing an input (q/k/v,
    gate/up) give what GPTQ on each alone gives."""
    case = layer_case(make_tiny_llama(tmp_path / "m", num_layers=1))
    layer, names, stats = case.layer, case.names, case.stats
    if bf16:  # weights as read from a bfloat16 checkpoint
        for n in names:
            layer.get_submodule(n).weight.data = layer.get_submodule(n).weight.data.bfloat16().float()
    scheme = resolve_scheme("GPTQ_W4A16", group_size=32)
    dense = {n: layer.get_submodule(n).weight.clone() for n in names}
    grams = {n: stats.inputs[n].gram.clone() for n in names}
    kept = gptq_layer(layer, stats.inputs, set(names), scheme, order=order)
    for n in names:
        assert torch.equal(layer.get_submodule(n).weight, dense[n]) and torch.equal(stats.inputs[n].gram, grams[n])
        alone = gptq_quantize(dense[n], grams[n] / stats.inputs[n].tokens, scheme, order=order)
        assert torch.equal(kept[n].codes, alone.codes) and torch.equal(kept[n].scale, alone.scale), n
    if bf16:
        Parked(layer, names)  # as the streaming quantizer holds them until each is solved
        assert all(layer.get_submodule(n).weight.dtype == torch.bfloat16 for n in names)
    released = gptq_layer(layer, stats.inputs, set(names), scheme, order=order, release=True)
    for n in names:
        assert stats.inputs[n].gram is None
        assert torch.equal(released[n].codes, kept[n].codes) and torch.equal(released[n].scale, kept[n].scale), n
        assert layer.get_submodule(n).weight.dtype == torch.float32
        assert torch.equal(layer.get_submodule(n).weight, released[n].dequantize())


def test_a_parked_layer_computes_what_the_float32_layer_computes_and_is_float32_when_closed(tmp_path):
    """`Parked` (the streaming GPTQ path): bfloat16-exact weights wait as bfloat16, the layer's
    outputs are bit-identical to those of its float32 weights, and `close` restores float32."""
    case = layer_case(make_tiny_llama(tmp_path / "m", num_layers=1, dtype=torch.bfloat16))
    layer, names = case.layer, case.names
    before = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
    with torch.no_grad():
        expected = layer(case.hidden, **case.kwargs)
    parked = Parked(layer, names)
    assert all(layer.get_submodule(n).weight.dtype == torch.bfloat16 for n in names)
    with torch.no_grad():
        assert torch.equal(layer(case.hidden, **case.kwargs), expected)
    assert all(layer.get_submodule(n).weight.dtype == torch.bfloat16 for n in names)  # narrow again after each run
    parked.close()
    assert all(torch.equal(layer.get_submodule(n).weight, before[n]) for n in names)
    assert all(layer.get_submodule(n).weight.dtype == torch.float32 for n in names)
    with torch.no_grad():
        assert torch.equal(layer(case.hidden, **case.kwargs), expected)  # no hook left behind


def test_a_weight_waits_in_the_narrowest_dtype_that_holds_it_exactly():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(64, 32, generator=generator)
    for source, parked in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, None)):
        weight = torch.nn.Parameter(values.to(source).float(), requires_grad=False)
        park_(weight)
        assert weight.dtype == (parked or torch.float32)
        assert torch.equal(weight.float(), values.to(source).float())  # every value kept exactly
    # checked a block of rows at a time: one inexact value in a later block keeps the weight float32
    mixed = torch.randn(ROW_BLOCK + 3, 4, generator=generator).bfloat16().float()
    mixed[-1, -1] = 1 / 3
    weight = torch.nn.Parameter(mixed.clone(), requires_grad=False)
    park_(weight)
    assert weight.dtype == torch.float32 and torch.equal(weight, mixed)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_down_projections_are_solved_on_a_pass_of_their_own_to_the_same_codes(tmp_path, arch, monkeypatch):
    """The streaming GPTQ collects and solves each layer's down projections (the MLP's or each
    expert's) before the other Grams exist, so the widest Gram (70B: 28672², 3.06 GiB) never sits
    beside the rest; their outputs feed no other linear, so every code is what one pass gives."""
    from forge.architectures import Architecture
    from forge.quant import run

    source = make_tiny_model(tmp_path / arch, arch, dtype=torch.bfloat16)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    scheme = resolve_scheme("GPTQ_W4A16", group_size=32)
    passes, collect = [], run.collect_layer_stats

    def collect_layer_stats(layer, hidden, layer_kwargs, names, **options):
        passes.append(list(names))
        return collect(layer, hidden, layer_kwargs, names, **options)

    monkeypatch.setattr(run, "collect_layer_stats", collect_layer_stats)
    two = run.quantize_checkpoint(source, scheme, "gptq", tokens)
    downs, rest = passes[0::2], passes[1::2]
    assert len(downs) == len(rest) == 2  # two layers, two passes each
    assert all(d and all(n.endswith(("down_proj", "w2")) for n in d) for d in downs)
    assert not any(n.endswith(("down_proj", "w2")) for r in rest for n in r)
    monkeypatch.setattr(Architecture, "feeds_no_linear", lambda self, name: False)  # one pass, as before
    one = run.quantize_checkpoint(source, scheme, "gptq", tokens)
    assert set(two.linears) == set(one.linears) and two.calibration == one.calibration
    for name, q in one.linears.items():
        assert torch.equal(two.linears[name].codes, q.codes) and torch.equal(two.linears[name].scale, q.scale), name
