"""A real ECDSA P-256 key pair written as PEM files, for the signing tests."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def key_pair(directory: Path) -> tuple[Path, Path]:
    """(private PKCS#8 PEM, public PEM) of a fresh key, as cosign's key-based signing uses."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "cosign.key.pem", directory / "cosign.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public
