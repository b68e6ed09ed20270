"""SLSA v1 provenance for pushed images, and `forge verify` that checks it against a recipe.

The statement follows in-toto Statement v1 (github.com/in-toto/attestation, spec/v1) with the
SLSA Build provenance v1 predicate (slsa.dev/spec/v1.0/provenance). The build report pushed
beside it is listed as a byproduct by digest, so a report edited after the build no longer
matches its provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from forge import __version__
from forge.digest import json_digest
from forge.recipe import Recipe

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://forge.dev/build-types/recipe/v1"


def recipe_digest(recipe: Recipe) -> str:
    return json_digest(recipe.model_dump(mode="json"))


def provenance_statement(
    report: dict, recipe: Recipe, image_name: str, image_digest: str, artifact: dict, report_bytes: bytes
) -> dict:
    source = report["inputs"]["source"]
    dependencies = [{"uri": f"forge-source:{source.get('kind')}", "digest": {"sha256": json_digest(source)}}]
    if artifact.get("base_digest"):
        dependencies.append({"uri": artifact["base"], "digest": {"sha256": artifact["base_digest"].split(":", 1)[1]}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": image_name, "digest": {"sha256": image_digest.split(":", 1)[1]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"name": recipe.name, "sha256": recipe_digest(recipe)},
                    "artifact": {k: artifact[k] for k in ("variant", "backend", "gpu")},
                },
                "internalParameters": {"tools": report["tools"]},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": f"https://forge.dev/builder/forge@{__version__}"},
                "byproducts": [{"name": "build.json", "digest": {"sha256": hashlib.sha256(report_bytes).hexdigest()}}],
            },
        },
    }


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def verify_documents(image_digest: str, recipe: Recipe, statement: dict, report_bytes: bytes) -> list[Check]:
    """Every check `forge verify` makes on the documents fetched from the registry."""
    predicate = statement.get("predicate", {})
    params = predicate.get("buildDefinition", {}).get("externalParameters", {})
    subjects = [s.get("digest", {}).get("sha256") for s in statement.get("subject", [])]
    byproducts = {b.get("name"): b.get("digest", {}).get("sha256") for b in predicate.get("runDetails", {}).get(
        "byproducts", [])}  # fmt: skip
    report_digest = hashlib.sha256(report_bytes).hexdigest()
    try:
        report = json.loads(report_bytes)
    except ValueError:
        report = {}
    gates = report.get("validation", {}).get("accuracy", [])
    return [
        Check(
            "statement type",
            statement.get("_type") == STATEMENT_TYPE and statement.get("predicateType") == PREDICATE_TYPE,
            f"{statement.get('_type')} / {statement.get('predicateType')}",
        ),  # fmt: skip
        Check("subject is this image", image_digest.split(":", 1)[1] in subjects, f"image {image_digest}"),
        Check(
            "recipe matches",
            params.get("recipe", {}).get("sha256") == recipe_digest(recipe),
            f"recipe {recipe.name} sha256 {recipe_digest(recipe)[:16]}…",
        ),  # fmt: skip
        Check(
            "build report untampered",
            byproducts.get("build.json") == report_digest,
            f"report sha256 {report_digest[:16]}…, provenance says {str(byproducts.get('build.json'))[:16]}…",
        ),  # fmt: skip
        Check("report is for this recipe", report.get("recipe") == recipe.model_dump(mode="json"), "report.recipe"),
        Check(
            "gates passed",
            all(g.get("passed") for g in gates),
            f"{sum(g.get('passed', False) for g in gates)}/{len(gates)} accuracy gates",
        ),  # fmt: skip
    ]


def verify_image(image_ref: str, recipe: Recipe) -> tuple[str, list[Check]]:
    """Fetch the image's provenance and build report referrers and check them; every build
    report attached to the image must be the one the provenance names."""
    from forge.oci import registry
    from forge.package import PROVENANCE_TYPE

    reference = registry.parse_reference(image_ref)
    credentials = registry.resolve_credentials(reference.host)
    digest = registry.resolve_image(image_ref, credentials=credentials)
    name = f"{reference.host}/{reference.repository}"
    referrers = registry.list_referrers(image_ref, digest, credentials=credentials)
    statements = [d for d in referrers if d.artifact_type == PROVENANCE_TYPE]
    reports = [d for d in referrers if d.artifact_type == registry.BUILD_REPORT_TYPE]
    if not statements or not reports:
        return digest, [
            Check("attestations present", False, f"{len(statements)} provenance, {len(reports)} build reports")
        ]

    def fetch(descriptor) -> bytes:
        return registry.fetch_referrer_document(f"{name}@{digest}", descriptor.digest, credentials=credentials)

    checks = []
    for statement in statements:
        try:
            document = json.loads(fetch(statement))
        except ValueError:
            document = {}
        for report in reports:
            checks += verify_documents(digest, recipe, document, fetch(report))
    return digest, checks
