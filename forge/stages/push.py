"""push: an image (serving or model image) uploaded to package.registry with the build report and
its SLSA provenance attached as referrers, and signed when FORGE_SIGNING_KEY names a key.

Not cached content but an effect on a registry: it has no key, runs after every gate was judged
(only when all passed), and uploads only the blobs the registry lacks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forge.progress import Progress

VERSION = 1


@dataclass(frozen=True)
class Inputs:
    variant: str
    tags: tuple[str, ...]
    registry: str
    repository: str
    insecure_registries: tuple[str, ...] = ()
    # Gate stages of its cell deferred to a GPU builder: set when it is pushed anyway (allow_deferred_gates).
    deferred_gates: tuple[str, ...] = ()


def push_images(pushes: list[tuple[str, Inputs, Path]], report: dict, recipe, progress: Progress) -> list[dict]:
    """Push every (stage id, inputs, image entry), then attach the build report and its SLSA
    provenance as referrers.

    The report attached is the one written to build.json minus the push results themselves
    (those only exist afterwards); provenance names that document's digest."""
    from forge.oci.registry import BUILD_REPORT_TYPE
    from forge.oci.signing import signing_key_from_env
    from forge.package import PROVENANCE_TYPE, attach_documents, push_artifact, sign_pushed
    from forge.provenance import provenance_statement

    report_bytes = json.dumps(report, indent=2).encode()
    key = signing_key_from_env()  # FORGE_SIGNING_KEY: read before the first upload, so a bad key pushes nothing
    pushed = []
    with progress.task("push images", total=len(pushes)) as advance:
        for done, (stage_id, inputs, entry) in enumerate(pushes, 1):
            image = json.loads((entry / "stage.json").read_text())
            result = push_artifact(entry / "layout", image["tag"], inputs.registry, inputs.repository,
                                   list(inputs.tags), inputs.insecure_registries)  # fmt: skip
            name = f"{inputs.registry}/{inputs.repository}"
            statement = provenance_statement(report, recipe, name, result["digest"], image, report_bytes)
            referrers = attach_documents(
                f"{name}@{result['digest']}",
                {BUILD_REPORT_TYPE: report_bytes, PROVENANCE_TYPE: json.dumps(statement, indent=2).encode()},
                inputs.insecure_registries,
            )
            signature = sign_pushed(f"{name}@{result['digest']}", key, inputs.insecure_registries) if key else None
            pushed.append({"stage": stage_id, **result, "referrers": referrers, "signature": signature})
            advance(done, len(pushes))
    return pushed
