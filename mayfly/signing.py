"""GitHub's webhook signature (`X-Hub-Signature-256`): HMAC-SHA256 of the raw body, one function
for the starter that checks it and the simulator that sends it."""

from __future__ import annotations

import hashlib
import hmac


def signature_256(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_matches(secret: bytes, body: bytes, header: str | None) -> bool:
    """Constant-time check of a delivery's `X-Hub-Signature-256` header."""
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(signature_256(secret, body).encode(), header.encode())
