"""``mailproxy admin``: a one-time sign-in link to the running daemon's admin page, printed as
the last line and opened in a browser."""

from __future__ import annotations

from ..admin.model import LINK_COMMAND
from ..config import Settings
from ..daemon.control import ControlError, query_sync
from .common import EXIT_OK, CliError, open_browser


def admin(settings: Settings, *, browser: bool) -> int:
    try:
        reply = query_sync(settings.control_path, LINK_COMMAND)
    except ControlError as exc:
        raise CliError(f"the daemon's status socket did not answer properly: {exc}") from None
    if reply is None:
        raise CliError(f"no mailproxy daemon is running (no status socket at "
                       f"{settings.control_path}); start it with `mailproxy run`")
    url = reply.get("url")
    if not isinstance(url, str):
        raise CliError(str(reply.get("error") or "the daemon gave no sign-in link"))
    certificates = reply.get("certificates")
    if isinstance(certificates, list) and certificates:
        trust = ("its local CA (`mailproxy tls export-ca`, also on the page's TLS section)"
                 if reply.get("local_ca") else "the certificate's issuer")
        print(f"The page is served over TLS. A browser that does not yet trust {trust} warns "
              "first; go on only if the certificate it shows has one of these fingerprints:")
        for line in certificates:
            print(f"  {line}")
    where = "" if url.startswith("https://") else " on this machine"
    if browser and open_browser(url):
        print("Opened the admin page in a browser. If it did not appear, open this link "
              "(it works once, within 5 minutes):", flush=True)
    else:
        print(f"Open this link in a browser{where} (it works once, within 5 minutes):",
              flush=True)
    print(url, flush=True)
    return EXIT_OK
