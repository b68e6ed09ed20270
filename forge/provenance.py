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
from forge.report import gate_headline, report_gates

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
    params = _dig(statement, "predicate", "buildDefinition", "externalParameters")
    subjects = [_dig(s, "digest").get("sha256") for s in statement.get("subject") or [] if isinstance(s, dict)]
    byproducts = _byproducts(statement)
    report_digest = hashlib.sha256(report_bytes).hexdigest()
    report = _json_object(report_bytes)
    gates = report_gates(report)
    deferred = sum(g["state"] == "deferred" for g in gates)
    allowed = " (pushed with allow_deferred_gates)" if deferred and report.get("allow_deferred_gates") is True else ""
    return [
        Check(
            "statement type",
            statement.get("_type") == STATEMENT_TYPE and statement.get("predicateType") == PREDICATE_TYPE,
            f"{statement.get('_type')} / {statement.get('predicateType')}",
        ),  # fmt: skip
        Check("subject is this image", image_digest.split(":", 1)[1] in subjects, f"image {image_digest}"),
        Check(
            "recipe matches",
            _dig(params, "recipe").get("sha256") == recipe_digest(recipe),
            f"recipe {recipe.name} sha256 {recipe_digest(recipe)[:16]}…",
        ),  # fmt: skip
        Check(
            "build report untampered",
            byproducts.get("build.json") == report_digest,
            f"report sha256 {report_digest[:16]}…, provenance says {str(byproducts.get('build.json'))[:16]}…",
        ),  # fmt: skip
        Check("report is for this recipe", report.get("recipe") == recipe.model_dump(mode="json"), "report.recipe"),
        Check(  # a deferred gate was not measured: it passes only where the push explicitly allowed it
            "gates passed",
            not any(g["state"] == "failed" for g in gates) and (not deferred or bool(allowed)),
            f"{gate_headline(gates)}{allowed}" if gates else "the report has no gates",
        ),  # fmt: skip
    ]


def verify_image(image_ref: str, recipe: Recipe) -> tuple[str, list[Check]]:
    """Fetch the image's provenance and build report referrers and check them.

    Each push attaches one report and one provenance statement naming that report's digest, so
    an image pushed more than once carries several consistent pairs. The newest statement whose
    report is attached (by the `created` annotation forge writes, then by listing order) is
    checked against the recipe; every report must be named by some statement, so a report
    attached by anything but a forge push fails "build report untampered".

    Credentials: FORGE_REGISTRY_USERNAME/PASSWORD only when the image is on the recipe's
    package.registry (or, for a recipe that pushes nowhere, on the registry named on the command
    line); elsewhere docker's config.json entry for exactly that host, or none. Token services and
    redirects never get them unless they belong to that registry (see forge.oci.registry)."""
    from forge.oci import registry
    from forge.package import PROVENANCE_TYPE, registry_options

    package = recipe.package
    reference = registry.parse_reference(image_ref)
    credentials = registry.credentials_for(reference.host, package.registry or reference.host)
    options = registry_options(reference.host, getattr(package, "insecure_registries", ()))
    digest = registry.resolve_image(image_ref, credentials=credentials, options=options)
    name = f"{reference.host}/{reference.repository}"
    referrers = registry.list_referrers(image_ref, digest, credentials=credentials, options=options)
    statements = newest_first([d for d in referrers if d.artifact_type == PROVENANCE_TYPE])
    reports = newest_first([d for d in referrers if d.artifact_type == registry.BUILD_REPORT_TYPE])
    if not statements or not reports:
        return digest, [
            Check("attestations present", False, f"{len(statements)} provenance, {len(reports)} build reports")
        ]
    fetched: dict[str, bytes] = {}

    def fetch(descriptor) -> bytes:
        if descriptor.digest not in fetched:
            fetched[descriptor.digest] = registry.fetch_referrer_document(
                f"{name}@{digest}", descriptor.digest, credentials=credentials, options=options
            )
        return fetched[descriptor.digest]

    report_by_sha = {hashlib.sha256(fetch(r)).hexdigest(): r for r in reports}
    named: set[str] = set()
    chosen = None
    for statement in statements:
        document = _json_object(fetch(statement))
        report_sha = _byproducts(document).get("build.json")
        if report_sha in report_by_sha:
            named.add(report_sha)
            chosen = chosen or (document, fetch(report_by_sha[report_sha]))
    document, report_bytes = chosen or (_json_object(fetch(statements[0])), fetch(reports[0]))
    checks = verify_documents(digest, recipe, document, report_bytes)
    orphans = [sha for sha in report_by_sha if sha not in named]
    if orphans and chosen:
        checks.append(
            Check(
                "build report untampered",
                False,
                f"{len(orphans)} attached report(s) named by no provenance, e.g. sha256 {orphans[0][:16]}…",
            )
        )
    if len(statements) > 1:
        checks.append(Check("newest of the attached pairs checked", True, f"{len(statements)} pushes attached"))
    return digest, checks


def newest_first(descriptors: list) -> list:
    """Referrers newest first: by the `created` annotation forge attaches them with, then by the
    order the registry lists them in (the referrers tag schema appends)."""
    from forge.package import CREATED

    ranked = sorted(enumerate(descriptors), key=lambda item: (item[1].annotations.get(CREATED, ""), item[0]))
    return [d for _, d in reversed(ranked)]


def _dig(value: object, *keys: str) -> dict:
    """value[k1][k2]…, or {} where any step is missing or not an object (documents from a
    registry are untrusted: a junk one fails its checks, never raises)."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def _json_object(data: bytes) -> dict:
    try:
        document = json.loads(data)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _byproducts(statement: dict) -> dict:
    predicate = statement.get("predicate")
    run = predicate.get("runDetails") if isinstance(predicate, dict) else None
    items = run.get("byproducts") if isinstance(run, dict) else None
    return {b.get("name"): (b.get("digest") or {}).get("sha256") for b in items or [] if isinstance(b, dict)}
