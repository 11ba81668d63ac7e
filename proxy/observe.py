"""What the daemon's parts report at the edges (a login's verdict, a session's end, a token
request's result, a message's fate) for metrics; the default ``Observer`` ignores it all."""

from __future__ import annotations


class Observer:
    """Told what happened; does nothing here. ``proxy.daemon.metrics.Metrics`` counts it."""

    def login(self, proto: str, result: str, seconds: float) -> None:
        """A client login's verdict: ``ok`` or the refusal's kind."""

    def upstream_auth(self, proto: str, mechanism: str, result: str) -> None:
        """An upstream SASL exchange: ``ok``, ``rejected`` or ``temporary``."""

    def spare(self, proto: str, result: str) -> None:
        """A client login looked for a logged-in spare upstream session: ``hit``, ``miss``
        (none ready) or ``stale`` (one was there but unusable: closed by the server, too old,
        its account changed)."""

    def session_ended(self, proto: str, received: int, sent: int) -> None:
        """A client connection closed; bytes received from and sent to the client."""

    def token_request(self, account: str, grant: str, result: str) -> None:
        """A request to a token endpoint: ``ok``, ``transient`` or ``permanent``."""

    def smtp_message(self, result: str) -> None:
        """A message's final reply: ``accepted``, ``rejected`` or ``failed``."""
