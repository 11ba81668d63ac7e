"""The whole admin page as one aiohttp application: the account pages (``web``), the queue
(``queueweb``) and TLS (``tlsweb``) sections."""

from __future__ import annotations

from aiohttp import web

from . import queueweb, tlsweb
from . import web as pages
from .service import AdminService


def make_app(service: AdminService) -> web.Application:
    app = pages.make_app(service)
    queueweb.add_routes(app.router)
    tlsweb.add_routes(app.router)
    return app
