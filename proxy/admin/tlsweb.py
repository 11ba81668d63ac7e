"""The admin page's TLS section: the listeners' certificates (names, expiry, SHA-256
fingerprints, as ``mailproxy tls info``) and a download of mailproxy's own CA certificate."""

from __future__ import annotations

from aiohttp import web

from . import web as pages
from .model import AdminError

# The name and type of the CA download: PEM text, as `mailproxy tls export-ca` prints it. The
# type is the one browsers and phones know for CA certificates (Firefox offers to trust it).
CA_FILENAME = "mailproxy-ca.pem"
CA_CONTENT_TYPE = "application/x-x509-ca-cert"
# A certificate this close to its end is shown as a warning (ours is renewed 30 days before).
WARN_DAYS = 21


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/tls", _tls)
    router.add_get("/tls/" + CA_FILENAME, _ca)


def fingerprint_lines(sha256: str) -> list[str]:
    """"AB:CD:…" (32 bytes) in two lines of 16, easier to compare by eye."""
    parts = sha256.split(":")
    return [":".join(parts[i:i + 16]) for i in range(0, len(parts), 16)]


async def _tls(request: web.Request) -> web.Response:
    service = request.app[pages.SERVICE]
    view = await service.backend.tls()
    return pages._render(request, "tls.html", tls=view, secure=service.secure,
                         warn_days=WARN_DAYS, fingerprint_lines=fingerprint_lines,
                         ca_filename=CA_FILENAME)


async def _ca(request: web.Request) -> web.Response:
    try:
        pem = await request.app[pages.SERVICE].backend.local_ca()
    except AdminError as exc:
        return pages._message(request, 404, "No CA to download", str(exc),
                              ("/tls", "Back to TLS"))
    return web.Response(
        body=pem.encode("ascii"), content_type=CA_CONTENT_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{CA_FILENAME}"'})
