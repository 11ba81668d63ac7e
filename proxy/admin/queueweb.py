"""The admin page's queue section: the outbound queue's messages per account, retry, and
delete behind a confirmation page (plain forms, no script needed)."""

from __future__ import annotations

import re

from aiohttp import web

from . import web as pages
from .model import AdminError, QueuedView

# Where the last queue action's result waits for the next queue page (not an account key).
_NOTE = " queue"
_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/queue", _queue)
    router.add_post("/queue/retry", _retry)
    router.add_get("/queue/{id}/delete", _confirm_delete)
    router.add_post("/queue/{id}/delete", _delete)


def size(n: int) -> str:
    """1234 -> "1.2 kB"; bytes as a person reads them."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


async def _queue(request: web.Request) -> web.Response:
    service = request.app[pages.SERVICE]
    messages = await service.backend.queue()
    accounts = await service.backend.accounts()
    known = {a.key for a in accounts}
    groups: dict[str, list[QueuedView]] = {}
    for m in messages or []:
        groups.setdefault(m.account, []).append(m)
    # Every configured account with a message, then any left from an account since removed.
    order = [a.key for a in accounts if a.key in groups] + [k for k in groups if k not in known]
    return pages._render(request, "queue.html", messages=messages, groups=groups, order=order,
                         size=size, outcome=service.outcomes.pop(_NOTE, None))


async def _retry(request: web.Request) -> web.Response:
    service = request.app[pages.SERVICE]
    message_id = await pages._form_text(request, "id") or None
    account = await pages._form_text(request, "account") or None
    try:
        if message_id is None and account is None:
            raise AdminError("say which message or account to retry")
        count = await service.backend.queue_retry(message_id, account)
    except AdminError as exc:
        service.note(_NOTE, False, f"nothing was retried: {exc}")
    else:
        what = (f"message {message_id}" if message_id else
                f"{count} message{'' if count == 1 else 's'} of {account}")
        service.note(_NOTE, True, f"{what} will be tried now; reload in a few seconds to see "
                                  "how it went")
    return pages._see_other("/queue")


async def _find(request: web.Request) -> QueuedView:
    message_id = request.match_info["id"]
    if _ID.fullmatch(message_id):
        for m in await request.app[pages.SERVICE].backend.queue() or []:
            if m.id == message_id:
                return m
    raise web.HTTPNotFound()


async def _confirm_delete(request: web.Request) -> web.Response:
    try:
        message = await _find(request)
    except web.HTTPNotFound:
        return pages._message(request, 404, "Not in the queue",
                              "This message is no longer queued: it was delivered or deleted "
                              "meanwhile.", ("/queue", "Back to the queue"))
    return pages._render(request, "queue_delete.html", m=message, size=size)


async def _delete(request: web.Request) -> web.Response:
    service = request.app[pages.SERVICE]
    message_id = request.match_info["id"]
    try:
        if not _ID.fullmatch(message_id):
            raise AdminError(f"no message {message_id!r} in the queue")
        gone = await service.backend.queue_delete(message_id)
    except AdminError as exc:
        service.note(_NOTE, False, f"nothing was deleted: {exc}")
    else:
        to = ", ".join(gone.recipients)
        service.note(_NOTE, True, f"message {gone.id} ({gone.sender or 'bounce'} → {to}) "
                                  "deleted without sending it; nobody was notified")
    return pages._see_other("/queue")
