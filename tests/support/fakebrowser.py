"""Stands in for a browser (``BROWSER="python -m tests.support.fakebrowser %s"``): opens the
address, follows the sign-in redirect to the loopback listener, and exits."""

from __future__ import annotations

import sys

import httpx

if __name__ == "__main__":
    reply = httpx.get(sys.argv[1], follow_redirects=True, timeout=30)
    print(reply.status_code, file=sys.stderr)
