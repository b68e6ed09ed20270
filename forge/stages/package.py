"""package: the serving image of one artifact (its export, and its TensorRT-LLM engine when it has
one) on the backend's base image, as an OCI layout, assembled without a Docker daemon."""

from __future__ import annotations

from dataclasses import dataclass

from forge.serving import ServeSpec
from forge.stages.base import Run, local

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    variant: str
    backend: str
    gpu: str
    spec: ServeSpec
    tag: str  # the layout's tag: the first of `tags`
    builder: str  # package.builder
    base_digest: str | None  # the base image's manifest digest, resolved at plan time (None: keyed on its name)
    # Every tag it is pushed under (the push stage reads them): only the first is in the image.
    tags: tuple[str, ...] = local(())
    base: dict | None = local()  # forge.package.resolve_base: the image to pull (pinned by base_digest), notes
    registry: str | None = local()  # package.registry: the one registry the environment's credentials go to
    insecure_registries: tuple[str, ...] = local(())
    label: str = local("")  # the stage id, for messages
    retry: str = local("")  # the command that builds it later, for a base that became unreachable


def produce(inputs: Inputs, run: Run) -> dict:
    """Deps: `export` (the model directory), `engine` (TensorRT-LLM engine mode)."""
    from forge.errors import InfraError
    from forge.oci.registry import RegistryUnreachable
    from forge.package import package_artifact, pull_base_hint

    spec = inputs.spec
    engine = run.deps["engine"] / "engine" if "engine" in run.deps else None
    try:
        image = package_artifact(spec, run.deps["export"] / "model", run.out, inputs.tag, inputs.label, inputs.builder,
                                 inputs.base, inputs.registry, inputs.insecure_registries, engine)  # fmt: skip
    except RegistryUnreachable as error:  # answered at plan time, gone since: say how to finish later
        key = f"package.base_images.{inputs.backend}"
        raise InfraError(
            f"{inputs.label}: {error}; once {spec.base_image} can be pulled run `{inputs.retry}`, "
            f"or offline: {pull_base_hint(spec.base_image, inputs.backend, key)}"
        ) from None
    return {**image, "variant": inputs.variant, "backend": inputs.backend, "gpu": inputs.gpu}
