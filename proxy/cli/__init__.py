"""Command line: ``mailproxy run``, ``authorize``, ``password set|add|remove|list``,
``token import``, ``status`` and ``tls export-ca|info``; one module per command group, the
arguments in ``parser``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from ..config import ConfigError, load_config
from .common import EXIT_USAGE, CliError, find_account
from .parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, path = load_config(args.config)
    except ConfigError as exc:
        print(f"mailproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Each command's module is imported when that command runs (not to dodge a cycle: none of
    # them imports this package): `status` and `password` then start without loading the
    # daemon with aiosmtpd, the authorization flows or the token manager.
    try:
        if args.command == "run":
            from .run import run

            return run(settings, path is None)
        if args.command == "status":
            from .status import status

            return status(settings, as_json=args.json)
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
    except KeyboardInterrupt:
        return 130
