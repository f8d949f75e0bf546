"""Seal short-lived secrets (JIT configs) with AES-GCM so they pass between activities
through workflow history without ever being readable there."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mayfly.models import SealedSecret


class SealingError(Exception):
    pass


class Sealer:
    def __init__(self, keys: dict[str, bytes], primary_key_id: str) -> None:
        if primary_key_id not in keys:
            raise ValueError(f"primary key {primary_key_id!r} is not among the keys")
        for key_id, key in keys.items():
            if len(key) != 32:
                raise ValueError(f"key {key_id!r} must be 32 bytes, got {len(key)}")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._primary = primary_key_id

    @classmethod
    def from_secret(cls, secret: str) -> Sealer:
        """One key from an operator-supplied string; its id is derived so rotation is visible."""
        key = hashlib.sha256(secret.encode()).digest()
        key_id = hashlib.sha256(b"mayfly-key-id" + key).hexdigest()[:12]
        return cls({key_id: key}, key_id)

    @classmethod
    def ephemeral(cls) -> Sealer:
        """For a single process (dev, tests): sealed values die with it, which is fine for JIT configs."""
        return cls.from_secret(base64.b64encode(os.urandom(32)).decode())

    def seal(self, plaintext: str, *, context: str) -> SealedSecret:
        nonce = os.urandom(12)
        # The context is bound as associated data so a sealed value cannot be replayed
        # for another runner.
        ciphertext = self._keys[self._primary].encrypt(nonce, plaintext.encode(), context.encode())
        return SealedSecret(
            key_id=self._primary,
            nonce=base64.b64encode(nonce).decode(),
            ciphertext=base64.b64encode(ciphertext).decode(),
        )

    def open(self, sealed: SealedSecret, *, context: str) -> str:
        aead = self._keys.get(sealed.key_id)
        if aead is None:
            raise SealingError(f"no key with id {sealed.key_id!r}; was the worker secret_key rotated?")
        try:
            plaintext = aead.decrypt(
                base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext), context.encode()
            )
        except Exception as error:
            raise SealingError("sealed secret failed authentication") from error
        return plaintext.decode()
