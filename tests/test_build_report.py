"""The typed build report: its committed JSON Schema is generated from the model and current, and
the model refuses what forge never writes."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from forge.build_report import SCHEMA_PATH, BuildReport, schema_text, typed_report


def minimal_report(**overrides) -> dict:
    report = {
        "forge_version": "0.0.0",
        "status": "passed",
        "recipe": {"name": "r"},
        "recipe_file": "r.yaml",
        "inputs": {"source": {"kind": "path"}, "model_config": {}},
        "tools": {"python": "3.11"},
        "stages": [
            {
                "id": "source",
                "kind": "source",
                "key": "k" * 64,
                "status": "cached",
                "seconds": 1.5,
                "files": {"model/config.json": {"sha256": "0" * 64, "bytes": 2}},
            }
        ],  # fmt: skip
        "artifacts": [],
        "impossible": [],
        "validation": {"accuracy": [], "tasks": [], "throughput": [], "deferred": []},
        "gates": {"passed": 0, "failed": 0, "deferred": 0},
        "images": [],
        "model_images": [],
        "seconds": 2.0,
    }
    return {**report, **overrides}


def test_committed_schema_is_current():
    assert SCHEMA_PATH.read_text() == schema_text(), (
        "regenerate: python -m forge.build_report > forge/build_report.schema.json"
    )


def test_typed_report_keeps_the_keys_it_was_given():
    report = minimal_report()
    assert typed_report(report) == report  # a stage's own facts (files) pass through; nothing is added
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(report)


@pytest.mark.parametrize(
    "broken",
    [
        {"status": "ok"},  # not a build status
        {"stages": [{"id": "engine/x", "kind": "engine", "key": None, "status": "not-implemented"}]},
        {"stages": [{"id": "x", "kind": "compile", "key": None, "status": "ran"}]},  # not a stage kind
        {"gates": {"passed": 1, "failed": 0}},  # deferred gates are always counted on their own
        {"surprise": 1},  # the top level is closed
    ],
)
def test_the_model_and_the_schema_refuse_what_forge_never_writes(broken):
    report = minimal_report(**broken)
    with pytest.raises(ValidationError):
        BuildReport.model_validate(report)
    assert list(jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).iter_errors(report))
