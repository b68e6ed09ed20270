"""export: one quantized variant re-packed in one format (forge.formats), shared by every target
that loads that format."""

from __future__ import annotations

from dataclasses import dataclass

from forge.stages.base import Run

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    variant: str
    format: str
    tp: int  # the tensor-parallel degree it is served with: checks for every format, the split for trtllm
    recipe: str  # written into the export's metadata, with the next two
    source: dict  # the source's identity
    forge_version: str


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `quantized` (the codes and scales), `source` (config, tokenizer and dense tensors)."""
    from forge.digest import file_digests
    from forge.formats import FORMATS
    from forge.quant.model import open_quantized

    qm = open_quantized(run.deps["quantized"])  # streamed: peak memory follows the largest tensor
    metadata = {"forge_version": inputs.forge_version, "recipe": inputs.recipe, "variant": inputs.variant,
                "format": inputs.format, "source": inputs.source}  # fmt: skip
    with run.progress.task(f"export {inputs.variant} ({inputs.format})", total=None):
        FORMATS[inputs.format].write(qm, run.deps["source"] / "model", run.out / "model", metadata, tp_size=inputs.tp)
    return {"format": inputs.format, "variant": inputs.variant, "files": file_digests(run.out / "model")}
