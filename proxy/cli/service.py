"""``mailproxy reload`` (the running daemon re-reads its configuration) and ``mailproxy health``
(for a container's HEALTHCHECK: the daemon's ``/livez``, or its control socket)."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from ..config import Settings, parse_hostport
from ..daemon.control import ControlError, query_sync
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError

# A reload may open listeners and vaults: give it longer than a status query.
RELOAD_TIMEOUT = 30.0
HEALTH_TIMEOUT = 5.0


def reload(settings: Settings) -> int:
    """Exit 0 when the daemon took the new configuration, 2 when it refused it (the old one
    keeps serving), 1 when no daemon answers."""
    try:
        reply = query_sync(settings.control_path, "reload", timeout=RELOAD_TIMEOUT)
    except ControlError as exc:
        raise CliError(str(exc)) from None
    if reply is None:
        raise CliError(f"no daemon is running (no status socket at {settings.control_path})")
    if reply.get("ok"):
        for line in reply.get("changes") or []:
            print(f"reloaded: {line}")
        return EXIT_OK
    reason = reply.get("error") or "unknown reason"
    print(f"mailproxy: reload refused, the running configuration stays: {reason}",
          file=sys.stderr)
    return EXIT_USAGE


def _probe_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104  # a wildcard listener answers on loopback
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def health(settings: Settings) -> int:
    """Exit 0 when the daemon answers: ``/livez`` with ``[metrics] listen``, else the status
    socket; 1 (and why on stderr) when it does not."""
    if settings.metrics.listen:
        host, port = parse_hostport(settings.metrics.listen)
        host = _probe_host(host)
        url = f"http://[{host}]:{port}/livez" if ":" in host else f"http://{host}:{port}/livez"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT) as answer:  # noqa: S310
                if answer.status == 200:
                    print("ok")
                    return EXIT_OK
                reason = f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", exc))
        print(f"mailproxy: unhealthy: {url} did not answer: {reason}", file=sys.stderr)
        return EXIT_FAIL
    try:
        reply = query_sync(settings.control_path, "status", timeout=HEALTH_TIMEOUT)
    except ControlError as exc:
        print(f"mailproxy: unhealthy: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if reply is None or "error" in reply:
        why = "no daemon is running" if reply is None else reply["error"]
        print(f"mailproxy: unhealthy: {why} (status socket {settings.control_path})",
              file=sys.stderr)
        return EXIT_FAIL
    print("ok")
    return EXIT_OK
