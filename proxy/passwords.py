"""The password hashes of the earlier plain store (``state_dir/passwords/<account>.scrypt``).

Local passwords now live as key slots in the vault (``proxy.tokens.vault``); these functions are
kept to verify an old hash once, when its account is migrated into a vault, and to write one in
the migration tests.
"""

from __future__ import annotations

import hmac

from .tokens.keys import ScryptParams, b64d, b64e, scrypt_key


def legacy_encode(password: str) -> bytes:
    # The earlier store did not normalize: surrogateescape only.
    return password.encode("utf-8", "surrogateescape")


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt_b64$hash_b64``, as the earlier store wrote it."""
    params = ScryptParams.fresh()
    digest = scrypt_key(legacy_encode(password), params)
    return f"scrypt${params.n}${params.r}${params.p}${b64e(params.salt)}${b64e(digest)}"


def check_password(stored: str, secret: bytes) -> bool:
    """Slow: runs scrypt. Raises ValueError if ``stored`` is not such a hash."""
    parts = stored.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt$n$r$p$salt$hash string")
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise ValueError("malformed number") from None
    expected = b64d(parts[5])
    if not expected:
        raise ValueError("empty hash")
    return hmac.compare_digest(scrypt_key(secret, ScryptParams(n, r, p, b64d(parts[4]))),
                               expected)
