"""Cosign-compatible image signatures with a key (no Fulcio/Rekor: keyless signing needs the
public Sigstore services, which an offline release pipeline cannot reach).

The format is cosign's "simple signing" one
(https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md): in the image's own
repository, the tag `sha256-<hex>.sig` names an OCI manifest whose layers are JSON payloads
(`application/vnd.dev.cosign.simplesigning.v1+json`) that state the image's name and manifest
digest; each layer's annotation `dev.cosignproject.cosign/signature` holds the base64 ECDSA P-256
/ SHA-256 signature (ASN.1 DER) of that payload: what `cosign verify --key pub.pem
--insecure-ignore-tlog IMAGE` checks (not run here: no cosign binary on these machines; the
tests verify with openssl).

Keys: a PEM EC P-256 private key (PKCS#8 or SEC1, `openssl ecparam -name prime256v1 -genkey`),
optionally encrypted with FORGE_SIGNING_KEY_PASSWORD; cosign's own encrypted key file format is
not read (export the key to PEM first).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from forge.errors import InputError
from forge.oci import layout
from forge.oci.layout import Descriptor
from forge.oci.registry import (
    Credentials,
    Registry,
    RegistryError,
    RegistryOptions,
    _Blob,
    _push_blob,
    _repository_scope,
    fetch_blob,
    fetch_manifest,
    parse_reference,
    put_manifest,
)

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
KEY_ENV = "FORGE_SIGNING_KEY"
PASSWORD_ENV = "FORGE_SIGNING_KEY_PASSWORD"


def signature_tag(digest: str) -> str:
    algorithm, _, hex_digest = layout.check_digest(digest).partition(":")
    return f"{algorithm}-{hex_digest}.sig"


def payload(repository_name: str, digest: str) -> bytes:
    """The simple-signing payload for `host/repository` at manifest `digest`."""
    document = {
        "critical": {
            "identity": {"docker-reference": repository_name},
            "image": {"docker-manifest-digest": digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": None,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def load_private_key(path: Path, password: str | None = None):
    """The EC P-256 private key in a PEM file, or InputError naming the file (never its contents)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"{KEY_ENV}: cannot read {path}: {error.strerror}") from None
    if b"ENCRYPTED SIGSTORE PRIVATE KEY" in data:
        raise InputError(f"{KEY_ENV}: {path} is cosign's own encrypted key format; export it as a PEM EC key")
    try:
        key = load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as error:
        raise InputError(f"{KEY_ENV}: {path} is not a PEM private key forge can open ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise InputError(f"{KEY_ENV}: {path} must be an EC P-256 (prime256v1) key, as cosign's are")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as error:
        raise InputError(f"--key: cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise InputError(f"--key: {path} is not a PEM public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"--key: {path} is not an EC public key")
    return key


def signing_key_from_env():
    """The key named by FORGE_SIGNING_KEY, or None when images are not to be signed."""
    path = os.environ.get(KEY_ENV)
    return load_private_key(Path(path), os.environ.get(PASSWORD_ENV)) if path else None


def sign_image(
    ref: str, key, *, credentials: Credentials | None = None, options: RegistryOptions | None = None
) -> dict:
    """Sign the pushed image `host/repository@sha256:…`: push the payload and the `.sig` manifest."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    reference = parse_reference(ref)
    if not reference.digest:
        raise InputError(f"{ref}: sign an image by digest (host/repository@sha256:…)")
    name = f"{reference.host}/{reference.repository}"
    body = payload(name, reference.digest)
    signature = base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()
    payload_blob = _Blob(layout.sha256_digest(body), len(body), data=body)
    config = layout.canonical_json({
        "architecture": "", "os": "", "config": {}, "created": "0001-01-01T00:00:00Z",
        "rootfs": {"type": "layers", "diff_ids": [payload_blob.digest]},
    })  # fmt: skip
    config_blob = _Blob(layout.sha256_digest(config), len(config), data=config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": layout.MANIFEST,
        "config": Descriptor(layout.CONFIG, config_blob.digest, config_blob.size).to_json(),
        "layers": [
            {
                **Descriptor(SIMPLE_SIGNING, payload_blob.digest, payload_blob.size).to_json(),
                "annotations": {SIGNATURE_ANNOTATION: signature},
            }
        ],  # fmt: skip
    }
    options = options or RegistryOptions()
    tag = signature_tag(reference.digest)
    with Registry(reference.host, credentials=credentials, options=options, env_credentials=True,
                  operation=f"signing {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull,push")])
        for blob in (config_blob, payload_blob):
            _push_blob(reg, reference.repository, blob, options)
        data = layout.canonical_json(manifest)
        put_manifest(reg, reference.repository, tag, data, layout.MANIFEST)
    return {"tag": tag, "manifest": layout.sha256_digest(data), "payload": payload_blob.digest}


@dataclass(frozen=True)
class SignatureCheck:
    passed: bool
    detail: str


def verify_signature(
    ref: str, digest: str, public_key, work: Path, *, credentials: Credentials | None = None,
    options: RegistryOptions | None = None,
) -> SignatureCheck:  # fmt: skip
    """Does a signature under `sha256-<hex>.sig` verify with `public_key` and name exactly this
    image (repository and manifest digest)? Reads the payloads into `work`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    reference = parse_reference(ref)
    name = f"{reference.host}/{reference.repository}"
    tag = signature_tag(digest)
    with Registry(reference.host, credentials=credentials, options=options or RegistryOptions(),
                  env_credentials=True, operation=f"reading the signatures of {ref}") as reg:  # fmt: skip
        reg.authenticate([_repository_scope(reference.repository, "pull")])
        try:
            manifest = fetch_manifest(reg, reference.repository, tag).json()
        except RegistryError as error:
            if error.status == 404:
                return SignatureCheck(False, f"no signature ({tag} not found)")
            raise
        layers = [
            d for d in manifest.get("layers") or [] if isinstance(d, dict) and d.get("mediaType") == SIMPLE_SIGNING
        ]
        for i, desc in enumerate(layers):
            path = work / f"payload-{i}.json"
            fetch_blob(reg, reference.repository, desc["digest"], path)
            body = path.read_bytes()
            try:
                encoded = (desc.get("annotations") or {}).get(SIGNATURE_ANNOTATION, "")
                signature = base64.b64decode(encoded, validate=True)
                public_key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
                critical = json.loads(body)["critical"]
            except (InvalidSignature, binascii.Error, ValueError, KeyError, TypeError):
                continue
            if (
                critical.get("image", {}).get("docker-manifest-digest") == digest
                and critical.get("identity", {}).get("docker-reference") == name
            ):
                return SignatureCheck(True, f"signed for {name}@{digest} ({tag})")
    return SignatureCheck(False, f"none of {len(layers)} signature(s) in {tag} verifies with the key for this image")
