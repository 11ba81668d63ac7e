"""SASL pieces: PLAIN decoding for local logins, XOAUTH2/OAUTHBEARER for upstream logins."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Literal

Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]


class SaslError(ValueError):
    """A client's SASL response that cannot be decoded; the message is safe to show."""


@dataclass(frozen=True)
class PlainCredentials:
    authzid: str
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of any accidental log line
        return f"PlainCredentials(authzid={self.authzid!r}, username={self.username!r})"


def b64decode_strict(data: bytes) -> bytes:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64") from None


def decode_plain(response: bytes) -> PlainCredentials:
    """Decode a base64 PLAIN response (RFC 4616: authzid NUL authcid NUL passwd)."""
    raw = b"" if response.strip() == b"=" else b64decode_strict(response)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response must be authzid NUL user NUL password")
    try:
        authzid, user, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise SaslError("PLAIN response is not UTF-8") from None
    if not user:
        raise SaslError("PLAIN response has an empty user name")
    return PlainCredentials(authzid, user, password)


def initial_response(mechanism: Mechanism, user: str, token: str,
                     host: str | None = None, port: int | None = None) -> bytes:
    """The base64 initial client response for XOAUTH2 or OAUTHBEARER (RFC 7628)."""
    if mechanism == "XOAUTH2":
        raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    else:
        gs2_user = user.replace("=", "=3D").replace(",", "=2C")
        hostport = ""
        if host:
            hostport += f"host={host}\x01"
        if port:
            hostport += f"port={port}\x01"
        raw = f"n,a={gs2_user},\x01{hostport}auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8"))


def failure_acknowledgement(mechanism: Mechanism) -> bytes:
    """What the client sends after a failure challenge: empty for XOAUTH2, %x01 for OAUTHBEARER."""
    return b"" if mechanism == "XOAUTH2" else base64.b64encode(b"\x01")


def parse_failure_challenge(challenge: bytes) -> dict[str, Any]:
    """Decode the base64 JSON error of a failure challenge; {} when it is not that shape."""
    try:
        value = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (binascii.Error, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def choose_mechanism(capabilities: frozenset[str], preference: str = "auto") -> Mechanism | None:
    """Pick the upstream mechanism from the capabilities (upper case, e.g. ``AUTH=XOAUTH2``)."""
    offered: list[Mechanism] = [
        m for m in ("XOAUTH2", "OAUTHBEARER") if f"AUTH={m}" in capabilities]
    if preference != "auto":
        wanted = preference.upper()
        return next((m for m in offered if m == wanted), None)
    return offered[0] if offered else None
