"""quantize: one variant's canonical codes and scales (forge.quant), once per variant and shared
by every format it is exported to."""

from __future__ import annotations

from dataclasses import dataclass

from forge.quant.scheme import Scheme
from forge.stages.base import Run, local

VERSION = 9  # 2: the cache is written a layer at a time; dense tensors keep the source dtype;
# 3: float32 Gram matrices and GPTQ Hessian factors (GPTQ / AWQ codes can differ by rounding);
# 4: symmetric int4 scales are stored toward zero (`rtn.stored_toward_zero`): new symmetric codes
# 5: AWQ scales v_proj → o_proj under grouped-query attention too (`awq.ScaleGroup.shared`);
# 6: AWQ measures errors through the inputs where fewer tokens than channels, sums its weight
# salience in float64 a block of rows at a time (new AWQ codes); 7: where AWQ keeps the inputs it
# holds no Gram matrix, and clips with each group's XᵀX (AWQ codes can differ by rounding there);
# 8: no int4 scale is stored as 0 (`rtn.nonzero`): all-zero groups get codes again; 9: AWQ's
# errors through half the Gram matrix (`awq.quadratic_forms`: a near-tie may round the other way)


@dataclass(frozen=True)
class Inputs:
    variant: str
    preset: str  # the recipe's scheme name (FP8_DYNAMIC, AWQ_W4A16, …)
    scheme: Scheme
    algorithm: str
    # The calibration settings and every calibration file's digest; None when the scheme needs none.
    calibration: dict | None = None
    calibration_sources: tuple[str, ...] = local(())  # the same sources, files resolved to paths here


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `source` (the checkpoint, and its tokenizer for the calibration text)."""
    from forge.quant.calibration import load_calibration
    from forge.quant.run import quantize_to_cache

    source_dir = run.deps["source"] / "model"
    calibration = None
    if inputs.calibration is not None:
        cal = inputs.calibration
        calibration = load_calibration(list(inputs.calibration_sources), source_dir, cal["num_samples"],
                                       cal["seq_len"], cal["seed"])  # fmt: skip
    with run.progress.task(f"quantize {inputs.variant} ({inputs.preset})", total=None) as advance:
        # Streamed: each decoder layer is written to the cache as soon as it is quantized.
        qm = quantize_to_cache(source_dir, run.out, inputs.scheme, inputs.algorithm, calibration,
                               progress=lambda _what, done, total: advance(done, total))  # fmt: skip
    facts = {"variant": inputs.variant, "algorithm": inputs.algorithm, "linears": len(qm.linears)}
    # MoE: calibration tokens per expert and layer, and the linears left round-to-nearest for want of any.
    facts.update({k: v for k, v in qm.calibration.items() if v})
    return facts
