"""What a local (client-side) core knows about TLS on its connection: whether STARTTLS/STLS is
offered, whether passwords wait for TLS, and whether TLS is on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TlsOffer:
    available: bool = False  # the listener has a certificate: STARTTLS/STLS can be offered
    required: bool = False  # no password in the clear: LOGIN, USER/PASS, AUTH wait for TLS
    active: bool = False  # under TLS (an implicit-TLS listener, or after STARTTLS/STLS)

    @property
    def can_start(self) -> bool:
        return self.available and not self.active

    @property
    def passwords_allowed(self) -> bool:
        return self.active or not self.required
