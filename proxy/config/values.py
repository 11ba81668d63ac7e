"""Value types of the configuration: addresses, durations, sizes, URLs, and the strict base."""

from __future__ import annotations

import contextlib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class ConfigError(Exception):
    """A configuration problem a person can fix; the message says where and what."""


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected 'host:port', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return host, number


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_hostport)]


def _check_optional_hostport(value: str) -> str:
    return value and _check_hostport(value)


# "" turns the listener off.
OptionalHostPort = Annotated[str, AfterValidator(_check_optional_hostport)]
# "auto": required when the listener's address is not a loopback address.
RequireTls = Literal["auto"] | bool
TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_oauth_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return value  # a token endpoint on this machine (tests, a local broker)
    raise ValueError(f"must be an https:// URL (http:// only on loopback), got {value!r}")


OAuthUrl = Annotated[str, AfterValidator(_check_oauth_url)]


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)i?B?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _duration(value: object) -> object:
    """Seconds, or a string with a unit: "90s", "30m", "12h", "5d"."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"expected seconds or a duration such as '30m', '12h', '5d', "
                             f"got {value!r}")
        return float(match[1]) * _DURATION_UNITS[match[2]]
    return value


def _byte_size(value: object) -> object:
    """Bytes, or a string with a unit: "512K", "100M", "2G" (powers of 1024)."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(f"expected bytes or a size such as '100M', '2G', got {value!r}")
        return int(match[1]) * _SIZE_UNITS[match[2].upper()]
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
ByteSize = Annotated[int, BeforeValidator(_byte_size), Field(ge=0)]

Delivery = Literal["relay", "queue"]


class Strict(BaseModel):
    """A table that refuses unknown keys (a misspelt key is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


def existing_file(value: Path | None) -> Path | None:
    """A configured file, ``~`` expanded; it must exist."""
    if value is None:
        return None
    value = value.expanduser()
    if not value.is_file():
        raise ValueError(f"file {str(value)!r} does not exist")
    return value


def check_tls_name(value: str) -> str:
    value = value.strip().rstrip(".")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(value))
    labels = value.removeprefix("*.").split(".")
    if not value or len(value) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels) or labels[-1].isdigit():  # all digits: a mistyped address
        raise ValueError(f"expected a host name or an IP address, got {value!r}")
    return value.lower()

