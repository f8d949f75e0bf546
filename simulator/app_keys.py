"""A GitHub App's key pair for the dev stack and the tests: the private half signs Mayfly's
App JWTs, the public half lets the simulator verify them."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class AppKeyPair:
    private_pem: str
    public_pem: str
    key: rsa.RSAPrivateKey

    def __repr__(self) -> str:
        return "AppKeyPair(<generated key>)"  # never print the private half


def generate_app_key() -> AppKeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return AppKeyPair(private_pem, public_pem, key)
