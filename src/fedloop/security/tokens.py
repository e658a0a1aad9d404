"""Secrets for enrollment and authentication: made random, stored only as hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets

ENROLLMENT_PREFIX = "fle_"  # one-time enrollment token, exchanged at registration
CREDENTIAL_PREFIX = "flc_"  # an agent's own credential
ADMIN_PREFIX = "fla_"  # admin token for API writes and dashboard controls

# The `kind` of a stored token row (fedloop.store.db.TokenRow).
ENROLLMENT = "enrollment"
CREDENTIAL = "credential"
ADMIN = "admin"


def new_secret(prefix: str) -> str:
    """Return a fresh 256-bit secret, URL-safe, with a prefix that says what it is."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Return the hash stored in place of `secret`.

    A plain SHA-256 suffices: the secrets are 256-bit random, so there is nothing to brute-force
    and a slow password hash would only slow every request.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    """Return whether `secret` hashes to `stored_hash`, in constant time."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def bearer(header: str | None) -> str | None:
    """Return the token of an `Authorization: Bearer …` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
