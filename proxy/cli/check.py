"""``mailproxy check``: each account step by step (configuration, vault, token, upstream login
per protocol, optionally a test message), OK or FAIL with one sentence and the fix."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal

from ..config import Account, Settings
from ..daemon.control import ControlError, query_sync
from ..login import Refusal, Upstream, UpstreamError, authorize_hint
from ..tokens.errors import AuthorizationRequired, TokenError
from ..tokens.manager import TokenManager
from ..vault import Vault
from .common import EXIT_FAIL, EXIT_OK, CliError, find_account, open_vault, read
from .explain import explain

Proto = Literal["imap", "pop3", "smtp"]


@dataclass
class Step:
    step: str
    ok: bool
    text: str


@dataclass
class Report:
    account: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    def add(self, step: str, ok: bool, text: str) -> bool:
        self.steps.append(Step(step, ok, " ".join(text.split())))
        return ok


def _with_fix(text: str, account: Account) -> str:
    fix = explain(text, account)
    return f"{text}. Fix: {fix}" if fix else text


async def check(settings: Settings, names: list[str], *, send_test: str | None,
                as_json: bool) -> int:
    accounts = [find_account(settings, name) for name in names] or list(settings.accounts)
    if not accounts:
        raise CliError("no accounts configured")
    vault = open_vault(settings)
    try:
        # With a daemon running, it owns the refreshes: a second refresher racing it could
        # use a rotated refresh token twice. Without one, prove the refresh token works.
        daemon = query_sync(settings.control_path, "status") is not None
    except ControlError:
        daemon = True
    reports = [await _check_account(settings, vault, account, send_test, refresh=not daemon)
               for account in accounts]
    if as_json:
        print(json.dumps([{"account": r.account, "ok": r.ok,
                           "steps": [asdict(s) for s in r.steps]} for r in reports], indent=2))
    else:
        for report in reports:
            print(report.account)
            for step in report.steps:
                print(f"  {'OK  ' if step.ok else 'FAIL'} {step.step}: {step.text}")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAIL


async def _check_account(settings: Settings, vault: Vault, account: Account,
                         send_test: str | None, *, refresh: bool) -> Report:
    report = Report(account.address)
    protos: list[Proto] = [p for p in ("imap", "pop3", "smtp") if account.server(p) is not None]
    report.add("configuration", True, f"provider {account.provider}, flow {account.flow}, "
               + ", ".join(f"{p} {account.server(p)}" for p in protos))
    key = account.key
    if not vault.exists(key) and not vault.has_legacy(key):
        report.add("vault", False, f"no token vault: the account is not authorized yet; "
                   f"{authorize_hint(account)}")
        return report
    report.add("vault", True, f"token vault present in {settings.state_dir}")
    if not (vault.has_master_key and vault.open_with_master(key)):
        try:
            password = read(f"Local password of {account.address}: ", optional=True)
        except CliError as exc:
            password, reason = None, str(exc)
        else:
            reason = "no master key and no local password given"
        if password is None:
            report.add("token", False, f"{reason} (set [vault] master_key, or give the local "
                       "password on standard input)")
            return report
        if not await vault.unlock(key, password):
            report.add("token", False, "that local password does not open the vault")
            return report
    tokens = TokenManager([account], vault, settings.tokens)
    try:
        token = await tokens.get_token(key, force_refresh=refresh)
    except AuthorizationRequired as exc:
        report.add("token", False, _with_fix(f"the token endpoint refused: {exc.reason}",
                                             account))
        return report
    except TokenError as exc:
        report.add("token", False, f"no token for now (temporary): {exc.reason}; try again")
        return report
    finally:
        await tokens.aclose()
    left = (token.expires_at - time.time()) / 60
    report.add("token", True, ("refreshed" if token.fresh else "cached (the running daemon "
               "refreshes it)") + f", valid for {left:.0f} more minutes")
    for proto in protos:
        await _login(report, account, proto, token.value,
                     send_test if proto == "smtp" else None)
    if send_test and "smtp" not in protos:
        report.add("test message", False, "the account has no smtp_server to send through")
    return report


def _upstream(account: Account, proto: Proto) -> Upstream:
    if proto == "smtp":
        from ..smtp.upstream import SmtpUpstreamSession

        return SmtpUpstreamSession(account)
    if proto == "imap":
        from ..sessions.imap import ImapUpstreamSession

        return ImapUpstreamSession(account)
    from ..sessions.pop3 import Pop3UpstreamSession

    return Pop3UpstreamSession(account)


async def _login(report: Report, account: Account, proto: Proto, token: str,
                 send_test: str | None) -> None:
    step = f"{proto} login"
    upstream = _upstream(account, proto)
    try:
        try:
            await upstream.connect()
        except UpstreamError as exc:
            report.add(step, False, f"cannot reach {upstream.description}: {exc}; check "
                       f"{proto}_server and that this machine can connect to it")
            return
        try:
            rejection = await upstream.authenticate(token)
        except Refusal as refusal:
            report.add(step, False, refusal.text)
            return
        if rejection is not None:
            kind = "temporarily refused" if rejection.temporary else "refused"
            report.add(step, False, _with_fix(
                f"{upstream.description} {kind} the token: {rejection.text}", account))
            return
        report.add(step, True, f"logged in at {upstream.description} with "
                   f"{getattr(upstream, 'mechanism', 'OAuth2')}")
        if send_test is not None:
            from ..smtp.upstream import SmtpUpstreamSession

            assert isinstance(upstream, SmtpUpstreamSession)
            await _send_test(report, account, upstream, send_test)
    finally:
        upstream.close()


async def _send_test(report: Report, account: Account, upstream: object,
                     recipient: str) -> None:
    from ..smtp.upstream import SmtpUpstreamSession, UpstreamGone, one_line

    assert isinstance(upstream, SmtpUpstreamSession)
    message = EmailMessage()
    message["From"] = account.address
    message["To"] = recipient
    message["Subject"] = "mailproxy test message"
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=account.address.rpartition("@")[2])
    message.set_content(f"This message was sent by `mailproxy check --send-test` for "
                        f"{account.address}.\n")
    body = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    step = "test message"
    try:
        for response in (await upstream.mail(account.address, []),
                         await upstream.rcpt(recipient, [])):
            if response.code >= 300:
                report.add(step, False, _with_fix(f"{upstream.description} refused: "
                                                  f"{one_line(response)}", account))
                return
        upstream.start_data()
        response = await upstream.data_reply()
        if response.code != 354:
            report.add(step, False, _with_fix(f"{upstream.description} refused DATA: "
                                              f"{one_line(response)}", account))
            return
        if upstream.send(body + b".\r\n"):
            await upstream.drain()
        response = await upstream.finish_data()
    except UpstreamGone as exc:
        report.add(step, False, f"connection to {upstream.description} lost: {exc}")
        return
    if response.code >= 300:
        report.add(step, False, _with_fix(f"{upstream.description} refused the message: "
                                          f"{one_line(response)}", account))
        return
    report.add(step, True, f"sent to {recipient}: {one_line(response)}")
    await upstream.quit()
