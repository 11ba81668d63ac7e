"""Which host names the admin page answers to (the Host header check against DNS rebinding) and
which one its links use. Pure functions on strings."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})
# Listening on every address: the links need a name browsers can reach instead.
WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (recognised, not bound)


def split_host(value: str, default_port: int) -> tuple[str, int | None]:
    """``name:port``, ``[v6]:port`` or a bare name -> (lower-case name without brackets, port
    or ``default_port``); port None when it is not a number."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:  # a bare name, or a bare IPv6 address
        host, port_text = value, ""
    if not port_text:
        return host.rstrip("."), default_port
    return host.rstrip("."), int(port_text) if port_text.isdigit() else None


def name_matches(host: str, pattern: str) -> bool:
    """A certificate name against a host name: equal, or ``*.example.org`` for one label."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:] and not _is_ip(host)
    if _is_ip(host) and _is_ip(pattern):
        return ipaddress.ip_address(host) == ipaddress.ip_address(pattern)
    return host == pattern


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def link_host(listen_host: str, names: list[str]) -> str:
    """The host for the page's links: the listen address, or for a wildcard the first name of
    the certificate that is not loopback (this machine's name for a generated one)."""
    if listen_host not in WILDCARDS:
        return listen_host
    for name in names:
        if "*" not in name and not is_loopback(name.lower()):
            return name
    return "::1" if listen_host == "::" else "127.0.0.1"


def host_allowed(value: str, *, listen_host: str, port: int, secure: bool,
                 names: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a Host header (``name:port``) names this page. Plain http (loopback only): the
    listen address, and the other loopback names when it is one of them. TLS: also every name
    of the certificate served, since a browser reaching the page under another name has
    refused the certificate first."""
    host, got_port = split_host(value, 443 if secure else 80)
    if got_port != port:
        return False
    listen = listen_host.lower()
    if host == listen and listen not in WILDCARDS:
        return True
    if host in LOOPBACK_NAMES and (listen in LOOPBACK_NAMES or (secure and listen in WILDCARDS)):
        return True
    return secure and any(name_matches(host, name) for name in names)
