"""Server ``SSLContext``s for the local listeners, one per oldest TLS version, rebuilt when the
certificate changes on disk (a configured one replaced by ACME, or ours re-issued).

A context in use is never changed: a change builds new ones, and each new connection asks for
the current one. Stamps (inode, mtime) are compared at most every ``check_every`` seconds when a
connection asks, and by the daemon on a timer; loading and key parsing happen in a thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import Settings, TlsVersion, is_loopback_host, parse_hostport
from ..tokens.store import Stamp, file_stamp
from .certs import CertificateError, ensure_local_certificates, local_files, wanted_names

log = logging.getLogger("mailproxy.tls")

_VERSIONS: dict[TlsVersion, ssl.TLSVersion] = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
# TLS 1.0/1.1 know only CBC suites with SHA-1 MACs (and some devices only RSA key exchange);
# OpenSSL 3 refuses those handshakes below security level 0. Modern suites still come first.
LEGACY_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:RSA+AESGCM:RSA+AES"
                  ":!aNULL:!eNULL:!MD5:!DSS:!AESCCM:@SECLEVEL=0")

Pair = tuple[Path, Path | None]


class TlsSetupError(Exception):
    """The certificate cannot be made or loaded; the message says which file and why."""


def build_server_context(pairs: Iterable[Pair], min_version: TlsVersion) -> ssl.SSLContext:
    """A fresh server context serving ``pairs`` (certificate chain file, key file or None when
    the key is in the chain file). Blocks: reads and parses the files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if min_version in ("1.0", "1.1"):
        with warnings.catch_warnings():  # the ssl module deprecates naming these versions
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = _VERSIONS[min_version]
        context.set_ciphers(LEGACY_CIPHERS)
    else:
        context.minimum_version = _VERSIONS[min_version]
    for cert, key in pairs:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            where = str(cert) if key is None else f"{cert} with {key}"
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            raise TlsSetupError(f"cannot load the TLS certificate {where}: {reason}") from None
    return context


def following_context(current: Callable[[], ssl.SSLContext],
                      min_version: TlsVersion) -> ssl.SSLContext:
    """For a server that takes one context for good (aiohttp's ``TCPSite(ssl_context=...)``):
    it carries the version settings and, at each ClientHello, hands the connection over to
    ``current()`` (``sni_callback`` runs for every ClientHello, with or without a server
    name), so a replaced certificate, or a reload's new contexts, reach the next connection."""
    outer = build_server_context([], min_version)

    def use_current(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                    context: ssl.SSLContext) -> None:
        obj.context = current()

    outer.sni_callback = use_current
    return outer


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ServerTls:
    """The current server contexts, per oldest TLS version in use."""

    def __init__(self, settings: Settings, *, versions: Iterable[TlsVersion] | None = None,
                 now: Callable[[], dt.datetime] = _utcnow,
                 monotonic: Callable[[], float] = time.monotonic,
                 check_every: float = 1.0, hostname: str | None = None) -> None:
        self._tls = settings.tls
        self._state_dir = settings.state_dir
        if versions is None:  # those the three protocol tables ask for
            versions = (settings.imap.tls_min_version, settings.pop3.tls_min_version,
                        settings.smtp.tls_min_version)
        self._versions = tuple(dict.fromkeys(versions))
        self._now = now
        self._monotonic = monotonic
        self._check_every = check_every
        self._hostname = hostname
        self._names = wanted_names(self._tls.names, hostname)
        self._pairs: list[Pair]
        if self._tls.cert_file is not None:
            self._pairs = [(self._tls.cert_file, self._tls.key_file)]
        else:
            self._pairs = list(local_files(self._state_dir).pairs())
        self._contexts: dict[TlsVersion, ssl.SSLContext] = {}
        self._stamps: tuple[Stamp | None, ...] | None = None
        self._renew_at: dt.datetime | None = None
        self._checked = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def generated(self) -> bool:
        """Whether mailproxy makes the certificate itself (no ``[tls] cert_file``)."""
        return self._tls.cert_file is None

    @property
    def files(self) -> list[Pair]:
        return list(self._pairs)

    async def start(self) -> None:
        """Create or renew our certificate as needed and build the contexts; raises
        ``TlsSetupError`` when there is nothing usable."""
        async with self._lock:
            self._checked = self._monotonic()
            contexts = await asyncio.to_thread(self._reload, True)
            assert contexts is not None
            self._contexts = contexts

    def current(self, min_version: TlsVersion) -> ssl.SSLContext:
        """The context for new connections now (no check of the files)."""
        return self._contexts[min_version]

    async def context(self, min_version: TlsVersion) -> ssl.SSLContext:
        """The context for a new connection, after a look at the files when the last one is
        more than ``check_every`` seconds old."""
        if self._monotonic() - self._checked >= self._check_every:
            await self.refresh()
        return self._contexts[min_version]

    async def refresh(self) -> bool:
        """Look at the files (renewing ours when due) and rebuild the contexts if they
        changed; True when new contexts are in use. A file that cannot be loaded (half
        written, a certificate without its new key yet) keeps the old contexts and is tried
        again at the next check."""
        async with self._lock:
            if self._monotonic() - self._checked < self._check_every and self._contexts:
                return False  # another connection just looked
            self._checked = self._monotonic()
            try:
                contexts = await asyncio.to_thread(self._reload, False)
            except TlsSetupError as exc:
                log.warning("%s; still serving the previous certificate", exc)
                return False
            if contexts is None:
                return False
            self._contexts = contexts
            return True

    def _reload(self, first: bool) -> dict[TlsVersion, ssl.SSLContext] | None:
        """In a thread: renew if due, then build new contexts if the files changed."""
        if self.generated and (first or self._renew_at is None
                               or self._now() >= self._renew_at):
            try:
                issued = ensure_local_certificates(self._state_dir, self._names, self._now(),
                                                   self._hostname)
            except CertificateError as exc:
                raise TlsSetupError(str(exc)) from None
            except OSError as exc:
                raise TlsSetupError(f"cannot create the local TLS certificate in "
                                    f"{local_files(self._state_dir).dir}: {exc}") from None
            self._renew_at = issued.renew_at
        stamps = tuple(file_stamp(path) for pair in self._pairs for path in pair if path)
        if stamps == self._stamps:
            return None
        contexts = {version: build_server_context(self._pairs, version)
                    for version in self._versions}
        self._stamps = stamps
        if not first:
            log.info("TLS certificate changed on disk: new connections use the new one")
        return contexts


def startup_warnings(settings: Settings) -> list[str]:
    """Sentences for the log at start: old TLS versions on, passwords allowed in the clear off
    loopback."""
    out = []
    for proto in ("imap", "pop3", "smtp"):
        listener = getattr(settings, proto)
        if listener.tls_min_version in ("1.0", "1.1"):
            out.append(f"[{proto}] tls_min_version = {listener.tls_min_version!r}: TLS "
                       f"{listener.tls_min_version} and its weak ciphers are accepted on the "
                       f"{proto.upper()} listeners; use this only for devices that know "
                       "nothing newer")
        host = parse_hostport(listener.listen)[0]
        if listener.require_tls is False and not is_loopback_host(host):
            out.append(f"[{proto}] listen = {listener.listen!r} is not a loopback address and "
                       "require_tls = false: clients may send their password in the clear "
                       "over the network")
    return out
