"""Key material for the vault: AES-GCM sealing, password and master-key slot keys, and where a
master key comes from (systemd credential, key file, environment variable, OS keyring).

Pure functions over bytes; the vault file format lives in ``proxy.vault.format``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
import secrets
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16
# scrypt cost: ~50-100 ms and 32 MiB per derivation, paid once per process and password.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
# A file read back with larger costs is refused: a bad file must not exhaust memory or CPU.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
MIN_MASTER_KEY_BYTES = 32
HEX_KEY = re.compile(rb"[0-9a-fA-F]+")
BASE64_KEY = re.compile(rb"[A-Za-z0-9+/_-]+={0,2}")
CHAR_CLASSES = ((re.compile(rb"[a-z]"), 26), (re.compile(rb"[A-Z]"), 26),
                (re.compile(rb"[0-9]"), 10), (re.compile(rb"[^a-zA-Z0-9]"), 33))


class MasterKeyError(Exception):
    """A key could not be obtained or used; the message says what to fix."""


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed base64") from None


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext+tag). A fresh random nonce each time: a key seals a few thousand
    messages in its life, far from the 2^32 limit for random 96-bit nonces."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the key is wrong or the data was changed."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        return None


def encode_password(password: str) -> bytes:
    # NFC: the same password typed on two systems (composed vs decomposed accents) is the same
    # key. surrogateescape: a client's undecodable bytes still round-trip.
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ScryptParams:
    n: int
    r: int
    p: int
    salt: bytes

    @classmethod
    def fresh(cls) -> ScryptParams:
        return cls(SCRYPT_N, SCRYPT_R, SCRYPT_P, secrets.token_bytes(SALT_BYTES))

    def check(self) -> None:
        n, r, p = self.n, self.r, self.p
        if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p) > MAX_SCRYPT_MEMORY:
            raise ValueError("scrypt parameters out of range")
        if len(self.salt) < 8:
            raise ValueError("scrypt salt too short")


def scrypt_key(secret: bytes, params: ScryptParams) -> bytes:
    """Slow on purpose. OpenSSL's default maxmem is just short of n=2^15, r=8: allow what it
    needs (128*r*(n+p) bytes) plus headroom."""
    params.check()
    maxmem = 128 * params.r * (params.n + params.p) + 1024 * 1024
    return hashlib.scrypt(secret, salt=params.salt, n=params.n, r=params.r, p=params.p,
                          maxmem=maxmem, dklen=KEY_BYTES)


def master_slot_key(master: bytes, salt: bytes) -> bytes:
    """The master key is already high-entropy: HKDF, not a slow hash."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                info=b"mailproxy vault master slot").derive(master)


# -- master key sources ---------------------------------------------------------------------


def key_strength(text: bytes) -> float:
    """How many random bytes' worth a text key holds: hex and base64 count what they decode
    to; other text is estimated from the classes of characters it uses."""
    if HEX_KEY.fullmatch(text) and len(text) % 2 == 0:
        return len(text) / 2
    classes = [pattern.search(text) is not None for pattern, _ in CHAR_CLASSES]
    if BASE64_KEY.fullmatch(text) and all(classes[:3]):  # one-class words are not base64
        padded = text.replace(b"-", b"+").replace(b"_", b"/")
        try:
            return len(base64.b64decode(padded + b"=" * (-len(padded) % 4), validate=True))
        except binascii.Error:
            pass
    alphabet = sum(size for (_, size), used in zip(CHAR_CLASSES, classes, strict=True) if used)
    alphabet = min(alphabet, len(set(text)))  # "xxxx...": one symbol, however long
    return len(text) * math.log2(max(alphabet, 2)) / 8


def _from_text(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    if key_strength(text) < MIN_MASTER_KEY_BYTES:
        raise MasterKeyError(f"the master key from {where} is too short or too guessable (at "
                             f"least {MIN_MASTER_KEY_BYTES} random bytes' worth; make one with "
                             "`head -c 32 /dev/urandom | base64`)")
    return text


def _read_key_file(path: Path, where: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MasterKeyError(f"cannot read the master key from {where}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MasterKeyError(f"the master key file {path} is readable by others "
                            f"(mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
        return _from_text(f.read(), where)


def load_master_key(source: str, environ: dict[str, str] | None = None) -> bytes:
    """Read the master key named by ``[vault] master_key``; ``MasterKeyError`` says why not."""
    env = os.environ if environ is None else environ
    kind, _, name = source.partition(":")
    if kind == "credential":
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise MasterKeyError(f"master key {source!r}: no systemd credentials here "
                            "($CREDENTIALS_DIRECTORY is not set; add "
                            f"`LoadCredential={name}:/path/to/key` to the unit)")
        # systemd makes the credential file 0400 and owned by the service user.
        return _read_key_file(Path(directory) / name, f"systemd credential {name!r}")
    if kind == "file":
        return _read_key_file(Path(name).expanduser(), f"file {name}")
    if kind == "env":
        value = env.get(name)
        if not value:
            raise MasterKeyError(f"master key {source!r}: environment variable {name} is not set")
        return _from_text(value.encode(), f"environment variable {name}")
    if kind == "keyring":
        try:
            import keyring  # type: ignore[import-not-found,unused-ignore]  # optional
        except ImportError:
            raise MasterKeyError(f"master key {source!r} needs the `keyring` package "
                            "(pip install 'mailproxy[keyring]')") from None
        try:
            value = keyring.get_password(name, "master-key")
        except Exception as exc:  # keyring backends raise their own types
            raise MasterKeyError(f"master key {source!r}: keyring error: {exc}") from None
        if not value:
            raise MasterKeyError(f"master key {source!r}: no entry (service {name!r}, user "
                            "'master-key') in the OS keyring")
        return _from_text(value.encode(), f"keyring service {name!r}")
    raise MasterKeyError(f"unknown master key source {source!r}")
