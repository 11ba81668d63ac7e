"""Command line: ``mailproxy run``, ``authorize``, ``password set|add|remove|list``,
``token import``, ``status``, ``admin``, ``queue list|show|retry|delete``, ``reload``,
``health``, ``check`` and ``tls export-ca|info``; one module per command group (the queue's
in ``proxy.queue.admin``), the arguments in ``parser``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from .. import logs
from ..config import ConfigError, load_config, unknown_env_variables
from .common import EXIT_FAIL, EXIT_USAGE, CliError, find_account, permission_denied
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and argv is None:
        # Entered here, not by ``proxy.launch`` (which restarts before this import).
        from ..daemon.memory import use_c_allocator

        use_c_allocator()
    try:
        settings, path = load_config(args.config)
    except ConfigError as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(settings.log_level, settings.log_format)
    for name in unknown_env_variables(settings):
        logging.getLogger("mailproxy").warning(
            "environment variable %s sets nothing (misspelt? settings are MAILPROXY_<KEY> or "
            "MAILPROXY_<SECTION>__<KEY>, e.g. MAILPROXY_IMAP__LISTEN)", name)
    # Each command's module is imported when that command runs (not to dodge a cycle: none of
    # them imports this package): `status` and `password` then start without loading the
    # daemon with aiosmtpd, the authorization flows or the token manager.
    try:
        if args.command == "run":
            from .run import run

            return run(settings, path)
        if args.command == "status":
            from .status import status

            return status(settings, as_json=args.json)
        if args.command in ("reload", "health"):
            from . import service

            return service.reload(settings) if args.command == "reload" \
                else service.health(settings)
        if args.command == "check":
            from .check import check

            return asyncio.run(check(settings, args.accounts, send_test=args.send_test,
                                     as_json=args.json))
        if args.command == "admin":
            from .admin import admin

            return admin(settings, browser=not args.no_browser)
        if args.command == "queue":
            from ..queue import admin as queue_admin

            return queue_admin.run(settings.queue_dir, args)
        if args.command == "tls":
            from .tls import tls

            return tls(settings, args.action)
        account = find_account(settings, args.account)
        if args.command == "authorize":
            from .authorize import authorize

            return asyncio.run(authorize(settings, account, args))
        if args.command == "password":
            from .password import password

            return password(settings, account, args)
        from .token import token_import

        return asyncio.run(token_import(settings, account, verify=not args.no_verify))
    except CliError as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return exc.code
    except PermissionError as exc:
        print(f"mailproxy: {permission_denied(settings, exc)}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
