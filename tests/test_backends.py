"""Every backend record is complete and true to the rest of forge: the recipe's choices and schema come
from the records, each serve command is the argv its image runs, each export format is a format forge
writes, each load-generator flavour is one the load generator speaks."""

from __future__ import annotations

import json
import re

import pytest

from forge.backends import BACKEND_NAMES, BACKENDS, MODULES, RECORDS, base_image
from forge.backends.record import BackendRecord
from forge.formats import FORMATS
from forge.gpus import lookup_gpu
from forge.loadgen.workload import FLAVORS
from forge.quant.presets import PRESETS, resolve_scheme
from forge.recipe import SCHEMA_PATH, Target, parse_recipe
from forge.serving import MODEL_DIR, serve_spec
from tests.conftest import tiny_recipe

# The distribution reference grammar, loosely: [host[:port]/]path components, then a tag.
IMAGE_REF = re.compile(r"^([a-z0-9.-]+(:[0-9]+)?/)?[a-z0-9._-]+(/[a-z0-9._-]+)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def targets_of(name: str) -> list[Target]:
    if name == "trtllm":
        return [Target(backend=name, gpus=["H100"], trtllm={"mode": mode}) for mode in ("engine", "pytorch")]
    return [Target(backend=name, gpus=["H100"])]


def test_the_recipe_choices_and_schema_come_from_the_records():
    assert BACKEND_NAMES == tuple(RECORDS) == tuple(BACKENDS) == tuple(m.RECORD.name for m in MODULES)
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$defs"]["Target"]["properties"]["backend"]["enum"] == list(BACKEND_NAMES)
    with pytest.raises(Exception, match="backend"):
        Target(backend="sglang", gpus=["H100"])


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_every_record_is_complete_and_consistent(name, tiny_model, eval_text, tmp_path):
    record = RECORDS[name]
    assert isinstance(record, BackendRecord) and record.name == name and BACKENDS[name].RECORD is record
    assert 0 < record.port < 65536 and record.health_path.startswith("/")
    assert record.user == "root" or re.fullmatch(r"\d+(:\d+)?", record.user)
    assert record.trust_remote_code_flag is None or record.trust_remote_code_flag.startswith("--")
    assert record.loadgen_flavor in FLAVORS and record.loadgen_flavor != "transformers"
    compared = set()
    for target in targets_of(name):
        assert IMAGE_REF.match(record.image(target)), record.image(target)
        assert base_image(name, target) == record.image(target)
        for preset in ("FP8_DYNAMIC", "AWQ_W4A16", "W4A16_ASYM"):
            scheme = resolve_scheme(preset)
            problem = record.problems(scheme, lookup_gpu("H100"), target.trtllm.mode if name == "trtllm" else None)
            assert problem is None or (isinstance(problem, str) and problem)
            if problem is not None or PRESETS[preset].algorithm == "none":
                continue
            assert record.export_format(scheme, target) in FORMATS
            argv = record.serve_command(MODEL_DIR, scheme, target)
            assert argv and all(isinstance(a, str) for a in argv)
            assert str(record.port) in argv or name == "trtllm" and record.port == 8000  # trtllm-serve's default
            # The record's command is what the image runs (forge.serving builds the image's entrypoint).
            data = tiny_recipe(tiny_model, eval_text, targets=[target.model_dump(exclude_none=True)])
            spec = serve_spec(parse_recipe(json.dumps(data)), "fp8", scheme, target, "H100", "rev")
            assert spec.argv == argv and spec.port == record.port and spec.health_path == record.health_path
            assert spec.user == record.user and spec.base_image == record.image(target)
            compared.add(target.trtllm.mode if name == "trtllm" else name)
    assert len(compared) == len(targets_of(name)), compared  # every target (both TensorRT-LLM modes) was served


def test_tgi_serves_every_awq_preset_as_autoawq_gemm_and_the_rest_as_compressed_tensors():
    """AWQ_TUNED_W4A16 stores what AWQ_W4A16 stores (same scaled weights and asymmetric grids)."""
    from forge.backends import tgi

    target = Target.model_validate({"backend": "tgi", "gpus": ["H100"]})
    formats = {preset: tgi.export_format(resolve_scheme(preset), target) for preset in PRESETS}
    assert formats["AWQ_W4A16"] == formats["AWQ_TUNED_W4A16"] == "awq-gemm"
    assert {f for p, f in formats.items() if not p.startswith("AWQ_")} == {"compressed-tensors"}
