"""Command line: ``mailproxy run``, ``password set``, ``token import``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import Account, ConfigError, Settings, load_config

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
        description="Local IMAP proxy that logs password-only mail clients in to Gmail and "
                    "Microsoft 365 with OAuth2.")
    parser.add_argument("--version", action="version", version=f"mailproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[config], help="run the proxy in the foreground",
                   description="Start the listeners and the background token refresher. "
                               "Stops cleanly on SIGTERM or SIGINT.")

    password = sub.add_parser("password", parents=[config], help="manage local passwords",
                              description="Local passwords are what clients log in with.")
    psub = password.add_subparsers(dest="action", required=True, metavar="ACTION")
    pset = psub.add_parser("set", parents=[config], help="set an account's local password",
                           description="Set the password clients use for ACCOUNT. Read from "
                                       "standard input (first line) when it is not a terminal; "
                                       "otherwise asked for twice.")
    pset.add_argument("account", metavar="ACCOUNT", help="the account's address")

    token = sub.add_parser("token", parents=[config], help="manage OAuth2 tokens",
                           description="Manage the tokens mailproxy keeps for each account.")
    tsub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    timport = tsub.add_parser(
        "import", parents=[config], help="import an existing refresh token",
        description="Store a refresh token obtained elsewhere (another tool, a script) for "
                    "ACCOUNT, read from the first line of standard input (or asked for on a "
                    "terminal). The token is then tried once against the token endpoint.")
    timport.add_argument("account", metavar="ACCOUNT", help="the account's address")
    timport.add_argument("--no-verify", action="store_true",
                         help="store the token without trying it")
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
        if args.command == "password":
            return _password_set(settings, args.account)
        return asyncio.run(_token_import(settings, args.account, verify=not args.no_verify))
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


def _read_secret(prompt: str, *, confirm: bool) -> str:
    if not sys.stdin.isatty():
        value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            raise CliError("nothing on standard input", EXIT_USAGE)
        return value
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise CliError("the two entries differ; nothing changed", EXIT_USAGE)
    if not value:
        raise CliError("empty input; nothing changed", EXIT_USAGE)
    return value


def _run(settings: Settings, defaults: bool) -> int:
    from .server import serve

    log = logging.getLogger("mailproxy")
    if defaults:
        log.warning("no configuration file found; running with built-in defaults "
                    "(see config.example.toml)")
    if not settings.accounts:
        log.warning("no accounts configured: every login will be refused")
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return EXIT_OK


def _password_set(settings: Settings, name: str) -> int:
    from .passwords import PasswordBook

    account = _account(settings, name)
    password = _read_secret(f"New local password for {account.address}: ", confirm=True)
    PasswordBook(settings.state_dir).set(account.key, password)
    print(f"local password for {account.address} set")
    return EXIT_OK


async def _token_import(settings: Settings, name: str, *, verify: bool) -> int:
    from .tokens.errors import AuthorizationRequired, TokenError
    from .tokens.manager import TokenManager
    from .tokens.store import FileTokenStore, TokenState

    account = _account(settings, name)
    if account.flow == "client_credentials":
        raise CliError(f"{account.address} uses flow 'client_credentials': it needs no "
                       "refresh token", EXIT_USAGE)
    refresh_token = _read_secret(f"Refresh token for {account.address}: ", confirm=False)
    store = FileTokenStore(settings.state_dir)
    store.save(account.key, TokenState(refresh_token=refresh_token))
    print(f"refresh token for {account.address} stored")
    if not verify:
        return EXIT_OK
    try:
        async with TokenManager([account], store, settings.tokens) as manager:
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


if __name__ == "__main__":
    sys.exit(main())
