"""The admin page's HTTP side: routes, the session and CSRF guard, security headers, templates.

aiohttp serves it on the daemon's own loop; jinja2 renders it with autoescaping on. Every action
is a plain form POST (works without JavaScript); ``static/admin.js`` only refreshes the account
rows and runs the device-code countdown.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web

from .auth import Session
from .model import AccountView, AdminError, free_label
from .service import AdminService, generate_password

COOKIE = "mailproxy_admin"
_HERE = Path(__file__).resolve().parent
SERVICE = web.AppKey("service", AdminService)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
_SESSION = web.RequestKey("session", Session)
_PUBLIC = frozenset({"/livez", "/signin", "/oauth/callback"})
_LABEL = re.compile(r"[\w .@+-]{1,64}")
_PROVIDERS = {"gmail": "Google", "outlook": "Microsoft", "office365": "Microsoft 365"}
_FLOWS = {"authorization_code": "browser sign-in", "device_code": "device code",
          "client_credentials": "client credentials", "service_account": "service account"}
_SECURITY_HEADERS = {
    # No inline script or style anywhere; form-action is left open on purpose: the sign-in
    # form's answer redirects the browser to the provider.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def make_app(service: AdminService) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[SERVICE] = service
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["flowname"] = lambda flow: _FLOWS.get(flow, flow)
    env.filters["providername"] = lambda name: _PROVIDERS.get(name, "the provider")
    env.filters["q"] = lambda key: quote(key, safe="@")
    app[TEMPLATES] = env
    r = app.router
    r.add_get("/livez", _livez)
    r.add_get("/signin", _signin)
    r.add_get("/oauth/callback", _callback)
    r.add_get("/", _overview)
    r.add_get("/rows", _rows)
    r.add_post("/signout", _signout)
    r.add_get("/accounts/{key}", _account)
    r.add_post("/accounts/{key}/signin", _start_signin)
    r.add_post("/accounts/{key}/signin/cancel", _cancel_signin)
    r.add_get("/accounts/{key}/device", _device)
    r.add_get("/accounts/{key}/device.json", _device_json)
    r.add_post("/accounts/{key}/passwords", _add_password)
    r.add_post("/accounts/{key}/passwords/remove", _remove_password)
    r.add_static("/static", _HERE / "static")
    return app


# -- helpers --------------------------------------------------------------------------------


def relative(ts: float | None, now: float) -> str:
    """"in 52 min", "3 min ago", "just now", or an em dash."""
    if ts is None:
        return "—"
    delta = ts - now
    span = abs(delta)
    if span < 5:
        return "just now"
    if span < 60:
        rel = f"{int(span)} s"
    elif span < 5400:
        rel = f"{round(span / 60)} min"
    elif span < 2 * 86400:
        rel = f"{span / 3600:.1f} h"
    else:
        rel = f"{round(span / 86400)} days"
    return f"in {rel}" if delta > 0 else f"{rel} ago"


def clock_time(ts: float | None, now: float) -> str:
    """The daemon's local time of ``ts``: "21:05 UTC", with the date when not near today."""
    if ts is None:
        return ""
    local = datetime.fromtimestamp(ts).astimezone()
    fmt = "%H:%M" if abs(ts - now) < 20 * 3600 else "%Y-%m-%d %H:%M"
    return f"{local.strftime(fmt)} {local.tzname() or ''}".strip()


def _render(request: web.Request, template: str, status: int = 200,
            **context: Any) -> web.Response:
    service = request.app[SERVICE]
    backend = service.backend
    session: Session | None = request.get(_SESSION)
    now = backend.clock()
    page = request.app[TEMPLATES].get_template(template).render(
        session=session, csrf=session.csrf if session else "", now=now,
        rel=lambda ts: relative(ts, now), clock=lambda ts: clock_time(ts, now),
        when=lambda ts: "—" if ts is None else f"{relative(ts, now)} ({clock_time(ts, now)})",
        version=backend.version, pid=backend.pid,
        started=backend.started, **context)
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def _message(request: web.Request, status: int, title: str, text: str,
             link: tuple[str, str] | None = None) -> web.Response:
    return _render(request, "message.html", status, title=title, text=text, link=link)


def _same_origin(request: web.Request, service: AdminService) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, _, netloc = origin.partition("://")
        if scheme != ("https" if service.secure else "http") or not service.host_allowed(netloc):
            return False
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    service = request.app[SERVICE]
    response: web.StreamResponse
    if not service.host_allowed(request.host):
        # A DNS name pointed at 127.0.0.1 by someone else (rebinding) is not us.
        response = web.Response(status=421, text="wrong host for the mailproxy admin page\n")
    elif request.path in _PUBLIC or request.path.startswith("/static/"):
        response = await _call(request, handler)
    else:
        session = service.gate.session(request.cookies.get(COOKIE))
        if session is None:
            response = _message(
                request, 401, "Sign in first",
                "This page needs a sign-in. On the machine mailproxy runs on, run "
                "`mailproxy admin` (with the same --config) and open the link it prints. "
                "A link works once, for a few minutes; a session ends after 30 minutes idle.")
        else:
            request[_SESSION] = session
            if request.method == "POST":
                form = await request.post()
                token = form.get("csrf")
                if not _same_origin(request, service) or not session.check_csrf(
                        token if isinstance(token, str) else None):
                    response = _message(
                        request, 403, "Refused",
                        "This form was not sent by the admin page (its check token is missing "
                        "or out of date). Go back, reload the page and try again.",
                        ("/", "Back to the accounts"))
                else:
                    response = await _call(request, handler)
            else:
                response = await _call(request, handler)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _call(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        return _message(request, 404, "Not found", "There is no such page here.",
                        ("/", "Back to the accounts"))
    except web.HTTPMethodNotAllowed:
        return _message(request, 405, "Not allowed", "This address does not take that request.")
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _account_path(key: str) -> str:
    return "/accounts/" + quote(key, safe="@")


async def _find(request: web.Request) -> AccountView:
    key = request.match_info["key"].casefold()
    for view in await request.app[SERVICE].backend.accounts():
        if view.key == key:
            return view
    raise web.HTTPNotFound()


async def _form_text(request: web.Request, name: str) -> str:
    value = (await request.post()).get(name)
    return value.strip() if isinstance(value, str) else ""


# -- public ---------------------------------------------------------------------------------


async def _livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _signin(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    got = service.gate.redeem(request.query.get("token", ""))
    if got is None:
        return _message(request, 403, "This sign-in link does not work",
                        "It was used already, it is older than a few minutes, or it is "
                        "incomplete. Run `mailproxy admin` again for a new one.")
    cookie, _ = got
    response = _see_other("/")
    response.set_cookie(COOKIE, cookie, path="/", httponly=True, samesite="Strict",
                        secure=service.secure)
    return response


async def _callback(request: web.Request) -> web.Response:
    """The provider's redirect. It carries no session cookie (SameSite=Strict on a cross-site
    redirect): the single-use state of a sign-in started from a session proves it."""
    service = request.app[SERVICE]
    pending = service.take_code(request.query.get("state"))
    if pending is None:
        return _message(request, 400, "Not a sign-in started here",
                        "This answer does not belong to a sign-in this page is waiting for "
                        "(used already, or started more than 15 minutes ago). Start the "
                        "sign-in again from the admin page.", ("/", "Back to the accounts"))
    back = _account_path(pending.key)
    error = request.query.get("error")
    code = request.query.get("code")
    if error or not code:
        description = " ".join(request.query.get("error_description", "").split())[:300]
        reason = error or "no authorization code"
        service.abandon_code(pending, f"the provider answered {reason}"
                             + (f" ({description})" if description else "")
                             + "; start again and accept the requested access")
        ok = False
    else:
        ok = (await service.finish_code(pending, code)).ok
    # A same-site navigation from here brings the Strict cookie along; a redirect would not.
    return _render(request, "callback.html", ok=ok, back=back)


# -- pages ----------------------------------------------------------------------------------


async def _overview(request: web.Request) -> web.Response:
    accounts = await request.app[SERVICE].backend.accounts()
    return _render(request, "overview.html", accounts=accounts)


async def _rows(request: web.Request) -> web.Response:
    accounts = await request.app[SERVICE].backend.accounts()
    return _render(request, "rows.html", accounts=accounts)


async def _signout(request: web.Request) -> web.Response:
    request.app[SERVICE].gate.end(request.cookies.get(COOKIE))
    request.pop(_SESSION, None)
    response = _message(request, 200, "Signed out",
                        "Run `mailproxy admin` for a new sign-in link.")
    response.del_cookie(COOKIE, path="/")
    return response


async def _account(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    session: Session = request[_SESSION]
    try:
        passwords = await service.backend.passwords(view.key)
        password_error = None
    except AdminError as exc:
        passwords, password_error = [], str(exc)
    need = await service.backend.password_need(view.key)
    return _render(request, "account.html", a=view, passwords=passwords,
                   password_error=password_error, need=need, once=session.take(view.key),
                   outcome=service.outcomes.get(view.key),
                   device=service.device_signins.get(view.key),
                   pending=service.pending_code(view.key),
                   callback=service.callback_uri(request.host))


async def _start_signin(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    session: Session = request[_SESSION]
    need = await service.backend.password_need(view.key)
    password: str | None = None
    generated = False
    if need != "none":
        password = await _form_text(request, "password") or None
        if password is None:
            password, generated = generate_password(), True
    back = _account_path(view.key)
    try:
        if view.flow == "authorization_code":
            return _see_other(await service.begin_code(
                view.key, session, password, generated, service.callback_uri(request.host)))
        if view.flow == "device_code":
            await service.begin_device(view.key, session, password, generated)
            return _see_other(back + "/device")
    except AdminError as exc:
        service.note(view.key, False, str(exc))
        return _see_other(back)
    await service.test_app(view.key, session, password, generated)
    return _see_other(back)


async def _cancel_signin(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    if await service.cancel(view.key):
        service.note(view.key, False, "the sign-in was cancelled; nothing changed")
    return _see_other(_account_path(view.key))


async def _device(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    job = service.device_signins.get(view.key)
    if job is None:
        return _see_other(_account_path(view.key))
    return _render(request, "device.html", a=view, job=job)


async def _device_json(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    job = service.device_signins.get(view.key)
    if job is None:
        return web.json_response({"state": "none"})
    left = None if job.code is None else max(0.0, job.code.expires_at - service.clock())
    return web.json_response({"state": job.state, "message": job.message, "expires_in": left,
                              "user_code": job.code.user_code if job.code else None})


async def _add_password(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    session: Session = request[_SESSION]
    label = await _form_text(request, "label")
    typed = await _form_text(request, "password")
    try:
        if not label:
            label = free_label([p.label for p in await service.backend.passwords(view.key)])
        if not _LABEL.fullmatch(label):
            raise AdminError("a label is 1 to 64 letters, digits, spaces or . @ + - _")
        password = typed or generate_password()
        await service.backend.add_password(view.key, label, password)
    except AdminError as exc:
        service.note(view.key, False, f"the password was not added: {exc}")
    else:
        if not typed:
            session.once.setdefault(view.key, []).append((f"password:{label}", password))
        service.note(view.key, True, f"local password {label!r} added")
    return _see_other(_account_path(view.key))


async def _remove_password(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    view = await _find(request)
    label = await _form_text(request, "label")
    try:
        await service.backend.remove_password(view.key, label)
    except AdminError as exc:
        service.note(view.key, False, f"the password was not removed: {exc}")
    else:
        service.note(view.key, True, f"local password {label!r} removed")
    return _see_other(_account_path(view.key))
