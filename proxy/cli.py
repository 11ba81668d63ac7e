"""Command line: ``mailproxy run``, ``authorize``, ``password set|add|remove|list``,
``token import`` and ``status``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import getpass
import json
import logging
import os
import secrets
import sys
import threading
import time
import webbrowser
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import Account, ConfigError, Settings, load_config

if TYPE_CHECKING:
    from .tokens.store import TokenState
    from .vault import Vault

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report in one line, with the exit code to use."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $MAILPROXY_CONFIG, else the "
                             "platform's config directory, e.g. ~/.config/mailproxy/config.toml)")
    parser = argparse.ArgumentParser(
        prog="mailproxy", parents=[config],
        description="Local IMAP/POP3/SMTP proxy that logs password-only mail clients in to "
                    "Gmail and Microsoft 365 with OAuth2.")
    parser.add_argument("--version", action="version", version=f"mailproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[config], help="run the proxy in the foreground",
                   description="Start the listeners and the background token refresher. "
                               "Stops cleanly on SIGTERM or SIGINT.")

    auth = sub.add_parser(
        "authorize", parents=[config], help="sign an account in and set its local password",
        description="Sign ACCOUNT in with the flow its configuration names (browser with a "
                    "loopback redirect, device code, client credentials or service account), "
                    "store the tokens in its encrypted vault and set the local password clients "
                    "log in with. Without a terminal, lines are read from standard input: the "
                    "redirected address (with --manual), then the local password.")
    auth.add_argument("account", metavar="ACCOUNT", help="the account's address")
    auth.add_argument("--manual", action="store_true",
                      help="headless: open the printed address anywhere and paste back the "
                           "address the browser was sent to")
    auth.add_argument("--no-browser", action="store_true",
                      help="do not try to open a browser on this machine")
    auth.add_argument("--generate-password", action="store_true",
                      help="make a random local password and print it once")
    auth.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                      help="how long to wait for the sign-in (default 300)")

    password = sub.add_parser(
        "password", parents=[config], help="manage local passwords",
        description="Local passwords are what clients log in with; each one opens the "
                    "account's token vault. Without a terminal, passwords are read from "
                    "standard input, one per line: the new one first, then (when the vault "
                    "must be opened and there is no master key) a current one.")
    psub = password.add_subparsers(dest="action", required=True, metavar="ACTION")
    pset = psub.add_parser("set", parents=[config], help="make this the only local password")
    padd = psub.add_parser("add", parents=[config],
                           help="add another local password (one per client or device)")
    padd.add_argument("--label", help="a name for it, e.g. the device (default: password-N)")
    prm = psub.add_parser("remove", parents=[config], help="remove one local password")
    plist = psub.add_parser("list", parents=[config], help="list an account's local passwords")
    for p in (pset, padd, prm, plist):
        p.add_argument("account", metavar="ACCOUNT", help="the account's address")
    prm.add_argument("label", metavar="LABEL", help="the label (or id) shown by `password list`")

    token = sub.add_parser("token", parents=[config], help="manage OAuth2 tokens",
                           description="Manage the tokens mailproxy keeps for each account.")
    tsub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    timport = tsub.add_parser(
        "import", parents=[config], help="import an existing refresh token",
        description="Store a refresh token obtained elsewhere for ACCOUNT. Without a terminal "
                    "it is read from the first line of standard input, and the account's local "
                    "password from the second (to open its vault, or to create it). The token "
                    "is then tried once against the token endpoint.")
    timport.add_argument("account", metavar="ACCOUNT", help="the account's address")
    timport.add_argument("--no-verify", action="store_true",
                         help="store the token without trying it")

    status = sub.add_parser(
        "status", parents=[config], help="show each account's token state",
        description="Authorized or not and why, locked or open, access token expiry, last and "
                    "next refresh, last error, notifications sent. Asks the running daemon; "
                    "without one, reads the state on disk.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings, path = load_config(args.config)
    except ConfigError as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(settings, path is None)
        if args.command == "status":
            return _status(settings, as_json=args.json)
        account = _account(settings, args.account)
        if args.command == "authorize":
            return asyncio.run(_authorize(settings, account, args))
        if args.command == "password":
            return _password(settings, account, args)
        return asyncio.run(_token_import(settings, account, verify=not args.no_verify))
    except CliError as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _account(settings: Settings, name: str) -> Account:
    account = settings.account(name)
    if account is None:
        known = ", ".join(a.address for a in settings.accounts) or "none configured"
        raise CliError(f"no account {name!r} in the configuration (accounts: {known})",
                       EXIT_USAGE)
    return account


def _read(prompt: str, *, secret: bool = True, confirm: bool = False,
          optional: bool = False) -> str | None:
    """One value: the next line of standard input when it is not a terminal (scripts), else
    a prompt (hidden for secrets, asked twice with ``confirm``)."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        value = line.rstrip("\r\n")
        if not value:
            if optional:
                return None
            raise CliError(f"expected a line on standard input for: {prompt.rstrip(': ')}",
                           EXIT_USAGE)
        return value
    ask = getpass.getpass if secret else input
    value = ask(prompt)
    if not value and optional:
        return None
    if confirm and ask("Again: ") != value:
        raise CliError("the two entries differ; nothing changed", EXIT_USAGE)
    if not value:
        raise CliError("empty input; nothing changed", EXIT_USAGE)
    return value


def _need(value: str | None) -> str:
    assert value is not None
    return value


def _vault(settings: Settings) -> Vault:
    from .tokens.keys import MasterKeyError, load_master_key
    from .vault import Vault

    master = None
    if settings.vault.master_key:
        try:
            master = load_master_key(settings.vault.master_key)
        except MasterKeyError as exc:
            raise CliError(str(exc)) from None
    return Vault(settings.state_dir, master_key=master)


def _open(vault: Vault, account: Account, purpose: str) -> None:
    """Open an existing vault: the master key, else a current local password."""
    if vault.has_master_key and vault.open_with_master(account.key):
        return
    current = _need(_read(f"A current local password of {account.address} ({purpose}): "))
    if not vault.open_with_password(account.key, current):
        raise CliError(f"that password does not open the vault of {account.address}; nothing "
                       "changed")


def _run(settings: Settings, defaults: bool) -> int:
    from .daemon.control import ControlError
    from .daemon.server import serve
    from .tokens.keys import MasterKeyError

    log = logging.getLogger("mailproxy")
    if defaults:
        log.warning("no configuration file found; running with built-in defaults "
                    "(see config.example.toml)")
    if not settings.accounts:
        log.warning("no accounts configured: every login will be refused")
    try:
        asyncio.run(serve(settings))
    except (MasterKeyError, ControlError) as exc:
        raise CliError(f"cannot start: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return EXIT_OK


# -- password -------------------------------------------------------------------------------


def _password(settings: Settings, account: Account, args: argparse.Namespace) -> int:
    from .vault import VaultError

    vault = _vault(settings)
    key, address = account.key, account.address
    try:
        if args.action == "list":
            return _password_list(vault, account)
        if args.action == "remove":
            if not vault.exists(key):
                raise CliError(f"{address} has no local passwords yet", EXIT_USAGE)
            _open(vault, account, "to change its passwords")
            slot = vault.remove_slot(key, args.label)
            print(f"local password {slot.label!r} of {address} removed")
            return EXIT_OK
        new = _need(_read(f"New local password for {address}: ", confirm=True))
        if args.action == "set":
            if vault.exists(key):
                _open(vault, account, "to replace it")
                vault.replace_passwords(key, new)
            else:
                vault.create(key, password=new, state=_legacy_state(vault, key))
                vault.migrate(key)  # the vault exists now: this clears the plain files
            print(f"local password for {address} set (any others removed)")
            return EXIT_OK
        if not vault.exists(key):
            raise CliError(f"{address} has no vault yet: run `mailproxy authorize {address}` "
                           f"or `mailproxy password set {address}` first", EXIT_USAGE)
        _open(vault, account, "to add one")
        label = args.label or f"password-{len(vault.slots(key)) + 1}"
        vault.add_password(key, new, label)
        print(f"local password {label!r} added for {address}")
        return EXIT_OK
    except VaultError as exc:
        raise CliError(str(exc)) from None


def _legacy_state(vault: Vault, key: str) -> TokenState | None:
    """Tokens of the earlier plain store, to carry into a new vault (``migrate`` removes the
    plain files once the vault is on disk)."""
    from .tokens.store import FileTokenStore

    if not vault.has_legacy(key):
        return None
    return FileTokenStore(vault.state_dir).load(key)


def _password_list(vault: Vault, account: Account) -> int:
    slots = vault.slots(account.key)
    if not slots:
        print(f"{account.address}: no local passwords (run `mailproxy authorize "
              f"{account.address}`)")
        return EXIT_OK
    for slot in slots:
        created = datetime.fromtimestamp(slot.created, UTC).strftime("%Y-%m-%d %H:%M UTC")
        kind = {"password": "password", "master": "master key", "legacy": "migrated"}[slot.type]
        print(f"{slot.label:<24} {kind:<10} added {created}  (id {slot.id})")
    return EXIT_OK


# -- tokens ---------------------------------------------------------------------------------


def _store_grant(vault: Vault, account: Account, password: str | None,
                 fields: dict[str, Any]) -> None:
    """Put new tokens in the account's vault, opening it with ``password`` or the master key;
    a vault neither opens gets replaced (its old passwords then no longer work)."""
    from .tokens.store import TokenState

    key = account.key
    opened = False
    if vault.exists(key):
        if password is not None and vault.open_with_password(key, password):
            opened = True
        elif vault.has_master_key and vault.open_with_master(key):
            opened = True
            if password is not None:
                vault.add_password(key, password, f"password-{len(vault.slots(key)) + 1}")
    if opened:
        vault.update(key, lambda s: replace(s, **fields))
        return
    if password is None and not vault.has_master_key:
        raise CliError(f"a local password for {account.address} is needed to encrypt its "
                       "tokens", EXIT_USAGE)
    others = [s for s in vault.slots(key) if s.type == "password"] if vault.exists(key) else []
    vault.create(key, password=password, state=replace(TokenState(), **fields))
    vault.migrate(key)  # clears a leftover plain store
    if others:
        print(f"note: the earlier local passwords of {account.address} ({len(others)}) no "
              "longer work: none of them was given, so the vault was made anew",
              file=sys.stderr)


async def _token_import(settings: Settings, account: Account, *, verify: bool) -> int:
    from .tokens.errors import AuthorizationRequired, TokenError
    from .tokens.manager import TokenManager

    if account.flow in ("client_credentials", "service_account"):
        raise CliError(f"{account.address} uses flow {account.flow!r}: it needs no refresh "
                       "token", EXIT_USAGE)
    vault = _vault(settings)
    refresh_token = _need(_read(f"Refresh token for {account.address}: "))
    exists = vault.exists(account.key)
    prompt = (f"Local password of {account.address}: " if exists else
              f"New local password for {account.address}: ")
    optional = vault.has_master_key
    password = _read(prompt, confirm=not exists, optional=optional)
    if exists and password is not None and not vault.open_with_password(account.key, password) \
            and not (vault.has_master_key and vault.open_with_master(account.key)):
        raise CliError(f"that password does not open the vault of {account.address}; nothing "
                       "changed")
    now = time.time()
    _store_grant(vault, account, password, {
        "refresh_token": refresh_token, "access_token": None, "expires_at": None,
        "needs_authorization": None, "last_error": None, "authorized_at": now})
    print(f"refresh token for {account.address} stored")
    if not verify:
        return EXIT_OK
    try:
        async with TokenManager([account], vault, settings.tokens) as manager:
            token = await manager.get_token(account.key, force_refresh=True)
            remaining = max(0, int(token.expires_at - manager.clock()))
    except AuthorizationRequired as exc:
        raise CliError(f"the token endpoint refused this refresh token: {exc.reason}") from None
    except TokenError as exc:
        print(f"warning: could not try the token now ({exc.reason}); it is stored and will be "
              "used when the token endpoint is reachable", file=sys.stderr)
        return EXIT_OK
    print(f"token works: access token valid for {remaining} s")
    return EXIT_OK


# -- authorize ------------------------------------------------------------------------------


class _Console:
    """What the flows need from a person: messages on stderr, lines from stdin, a browser."""

    def __init__(self, browser: bool) -> None:
        self.browser = browser

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def ask(self, prompt: str) -> str:
        if sys.stdin.isatty():
            return input(prompt)
        print(prompt, file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def open_browser(self, url: str) -> bool:
        if not self.browser:
            return False
        # In a thread: webbrowser waits for some browsers to exit ($BROWSER, text browsers),
        # which would stall the loopback listener that has to answer that very browser.
        result: list[bool] = []

        def launch() -> None:
            try:
                result.append(webbrowser.open(url))
            except webbrowser.Error:
                result.append(False)

        thread = threading.Thread(target=launch, name="browser", daemon=True)
        thread.start()
        thread.join(2.0)
        return result[0] if result else True  # still running: a browser is up


@contextlib.contextmanager
def _one_authorization(settings: Settings, account: Account) -> Iterator[None]:
    """Only one ``authorize`` per account at a time: two would race for the same grant."""
    from .tokens.store import ensure_private_dir, safe_name

    directory = settings.state_dir / "vault"
    ensure_private_dir(directory)
    path = directory / safe_name(account.key, ".authorize")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise CliError(f"another `mailproxy authorize {account.address}` is already "
                           f"running (pid {holder}); finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def _authorize(settings: Settings, account: Account, args: argparse.Namespace) -> int:
    from .tokens.flows import FlowError, authorize

    vault = _vault(settings)
    with _one_authorization(settings, account):
        try:
            grant = await authorize(account, _Console(browser=not args.no_browser),
                                    manual=args.manual, timeout=args.timeout,
                                    request_timeout=settings.tokens.request_timeout)
        except FlowError as exc:
            raise CliError(str(exc)) from None
        except EOFError:
            raise CliError("no input: nothing was authorized", EXIT_USAGE) from None
        if args.generate_password:
            password = secrets.token_urlsafe(18)
        else:
            password = _need(_read(f"Local password for {account.address} (clients log in "
                                   "with it): ", confirm=True))
        now = time.time()
        fields: dict[str, Any] = {
            "access_token": grant.access_token, "expires_at": grant.expires_at,
            "needs_authorization": None, "last_error": None, "authorized_at": now,
            "last_refresh": now if grant.access_token else None}
        if account.flow in ("authorization_code", "device_code"):
            fields["refresh_token"] = grant.refresh_token
        _store_grant(vault, account, password, fields)
    print(f"{account.address} is authorized", end="")
    if grant.expires_at:
        print(f"; access token valid for {max(0, int(grant.expires_at - now))} s", end="")
    print()
    if args.generate_password:
        print(f"local password for {account.address} (shown once): {password}")
    return EXIT_OK


# -- status ---------------------------------------------------------------------------------


def _status(settings: Settings, *, as_json: bool) -> int:
    from .daemon.control import ControlError, query_sync

    try:
        reply = query_sync(settings.control_path, "status")
    except ControlError as exc:
        raise CliError(f"the daemon's status socket did not answer properly: {exc}") from None
    if reply is not None and "accounts" in reply:
        report: dict[str, Any] = {"source": "daemon", **reply}
    else:
        report = {"source": "disk", "accounts": [_disk_status(settings, a)
                                                 for a in settings.accounts]}
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_status(report))
    return EXIT_OK


def _disk_status(settings: Settings, account: Account) -> dict[str, Any]:
    from .vault import Vault

    vault = Vault(settings.state_dir)
    key = account.key
    base: dict[str, Any] = {"account": account.address, "flow": account.flow}
    try:
        exists = vault.exists(key)
        meta = vault.meta(key) if exists else {}
        slots = vault.slots(key) if exists else []
    except (OSError, ValueError) as exc:
        return {**base, "authorized": False, "needs_authorization": f"vault unreadable: {exc}"}
    if not exists:
        legacy = vault.has_legacy(key)  # moved into a vault at the next start or login
        return {**base, "authorized": legacy, "locked": None,
                "needs_authorization": None if legacy else "not authorized yet"}
    reason: str | None = meta.get("needs_authorization")
    app_only = account.flow in ("client_credentials", "service_account")
    if reason is None and not app_only and not meta.get("has_refresh_token"):
        reason = "not authorized yet"
    return {**base, "authorized": reason is None, "needs_authorization": reason,
            "locked": None, "expires_at": meta.get("expires_at"),
            "last_refresh": meta.get("last_refresh"), "last_error": meta.get("last_error"),
            "authorized_at": meta.get("authorized_at"),
            "passwords": sum(1 for s in slots if s.type != "master"),
            "master_key_slot": any(s.type == "master" for s in slots),
            "notifications": meta.get("notified") or {}}


def _when(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    stamp = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = value - time.time()
    if abs(delta) < 48 * 3600:
        rel = f"in {int(delta // 60)} min" if delta >= 0 else f"{int(-delta // 60)} min ago"
        return f"{stamp} ({rel})"
    return stamp


def render_status(report: dict[str, Any]) -> str:
    if report["source"] == "daemon":
        lines = [f"daemon running (pid {report.get('pid', '?')})"]
    else:
        lines = ["no daemon running: state on disk"]
    if not report["accounts"]:
        lines.append("no accounts configured")
    for st in report["accounts"]:
        if st.get("authorized"):
            state = "authorized"
        else:
            state = f"NOT AUTHORIZED: {st.get('needs_authorization')}"
        if st.get("locked") is True:
            state += ", vault locked (opens at the first client login)"
        elif st.get("locked") is False:
            state += ", vault open"
        lines.append(f"{st['account']} ({st.get('flow')}): {state}")
        for label, name in (("access token expires", "expires_at"),
                            ("last refresh", "last_refresh"), ("next refresh", "next_refresh"),
                            ("refresh token deadline", "refresh_token_deadline")):
            if st.get(name) is not None:
                lines.append(f"  {label}: {_when(st[name])}")
        if st.get("last_result"):
            lines.append(f"  last result: {st['last_result']}")
        if st.get("last_error"):
            lines.append(f"  last error: {st['last_error']}")
        for event, at in sorted((st.get("notifications") or {}).items()):
            lines.append(f"  notified: {event.split(':')[0]} at {_when(at)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
