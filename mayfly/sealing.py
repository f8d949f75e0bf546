"""Seal short-lived secrets (JIT configs) with AES-GCM so they pass between activities
through workflow history without ever being readable there."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mayfly.models import SealedSecret

# Fixed, public HKDF parameters: they separate Mayfly's uses of one operator secret, so the
# sealing key and the key id never coincide and neither equals a hash of the secret itself.
_HKDF_SALT = b"mayfly/sealing/v1"
_SEALING_INFO = b"aes-256-gcm jit-config sealing key"
_KEY_ID_INFO = b"sealing key id"


class SealingError(Exception):
    pass


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info).derive(secret)


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
    def from_secrets(cls, newest: str, previous: Sequence[str] = ()) -> Sealer:
        """The newest operator secret seals; it and every previous one open (key rotation).

        Each key's id is derived too, so a sealed value names the key it needs without
        revealing anything about it, and a rotation is visible in history."""
        keys: dict[str, bytes] = {}
        for secret in (newest, *previous):
            material = secret.encode()
            key_id = _hkdf(material, _KEY_ID_INFO, 6).hex()
            keys.setdefault(key_id, _hkdf(material, _SEALING_INFO, 32))
        return cls(keys, _hkdf(newest.encode(), _KEY_ID_INFO, 6).hex())

    @classmethod
    def ephemeral(cls) -> Sealer:
        """For a single process (the dev stack, tests): sealed values die with it, which is
        fine for JIT configs there. Production workers must share a configured secret_key."""
        return cls.from_secrets(base64.b64encode(os.urandom(32)).decode())

    @property
    def primary_key_id(self) -> str:
        return self._primary

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
            raise SealingError(
                f"no key with id {sealed.key_id!r}; was secret_key rotated without keeping the old one "
                "in previous_secret_keys?"
            )
        try:
            plaintext = aead.decrypt(
                base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext), context.encode()
            )
        except Exception as error:
            raise SealingError("sealed secret failed authentication") from error
        return plaintext.decode()
