"""Plans for the CI-renderer tests (tests/test_ci.py, tests/test_gpu_release.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from forge.cache import Cache
from forge.ci import GPU_STAGE_KINDS
from forge.plan import Plan, make_plan
from forge.recipe import parse_recipe
from tests.conftest import tiny_recipe

BACKENDS = ("vllm", "tgi", "lmdeploy", "trtllm")


def matrix_recipe(model: Path, eval_text: Path) -> dict:
    """2 variants × 4 backends × 2 GPUs, throughput on: FP8 on the A100 only as W8A16 (vLLM, TGI), never on LMDeploy."""
    data = tiny_recipe(
        model,
        eval_text,
        variants=[
            {"name": "fp8", "scheme": "FP8_DYNAMIC"},
            {"name": "awq", "scheme": "AWQ_W4A16", "group_size": 128},
        ],
        targets=[
            {
                "backend": b,
                "gpus": ["H100", "A100"],
                **({"trtllm": {"mode": "engine"}} if b == "trtllm" else {}),
            }
            for b in BACKENDS
        ],
    )
    data["validation"]["throughput"] = {"enabled": True}
    return data


def plan_of(data: dict, tmp_path: Path) -> Plan:
    return make_plan(parse_recipe(json.dumps(data)), tmp_path, Cache(tmp_path / "cache"))


def with_gpu_stages_deferred(plan: Plan) -> Plan:
    """The plan as it reads once engine/throughput are wired in: GPU stages deferred on a CPU host.

    plan.py marks them `not-implemented` today (its engine branch already computes the deferral
    reason); flipping the status is the only thing this changes.
    """
    stages = [
        replace(s, status="deferred", reason="needs a GPU", command=f"forge build recipe.yaml --only {s.id}")
        if s.kind in GPU_STAGE_KINDS
        else s
        for s in plan.stages
    ]
    return replace(plan, stages=stages)
