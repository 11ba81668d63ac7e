"""The command line's arguments and every ``--help`` text, built without importing any
command's code (so ``--help`` and a usage error stay quick)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..queue import admin as queue_admin


def build_parser() -> argparse.ArgumentParser:
    config_help = ("configuration file (default: $MAILPROXY_CONFIG, else the platform's config "
                   "directory, e.g. ~/.config/mailproxy/config.toml)")
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--config", metavar="PATH", help=config_help)
    # After the command, --config is optional too; SUPPRESS keeps the subcommand from
    # overwriting a --config given before it (`mailproxy --config X status`).
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(
        prog="mailproxy", parents=[top],
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
    auth.add_argument("--replace", action="store_true",
                      help="without a master key, replace an existing vault that the password "
                           "does not open (every other local password of it stops working)")

    password = sub.add_parser(
        "password", parents=[config], help="manage local passwords",
        description="Local passwords are what clients log in with; each one opens the "
                    "account's token vault. Without a terminal, passwords are read from "
                    "standard input, one per line: the new one first, then (when the vault "
                    "must be opened and there is no master key) a current one.")
    psub = password.add_subparsers(dest="action", required=True, metavar="ACTION")
    pset = psub.add_parser(
        "set", parents=[config], help="make this the only local password",
        description="Set ACCOUNT's local password, removing any others. Creates the vault "
                    "when there is none yet; otherwise opens it with the master key or a "
                    "current local password (asked after the new one).")
    padd = psub.add_parser(
        "add", parents=[config], help="add another local password (one per client or device)",
        description="Add a local password to ACCOUNT's vault, keeping the others: one per "
                    "client or device, so one can be removed alone. The vault must exist "
                    "(`authorize` or `password set` first).")
    padd.add_argument("--label", help="a name for it, e.g. the device (default: password-N)")
    prm = psub.add_parser(
        "remove", parents=[config], help="remove one local password",
        description="Remove the local password LABEL from ACCOUNT's vault; clients using it "
                    "can no longer log in. Needs the master key or a current local password.")
    plist = psub.add_parser(
        "list", parents=[config], help="list an account's local passwords",
        description="List the labels, kinds and creation times of ACCOUNT's local passwords "
                    "(never the passwords). Needs no password.")
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

    sub.add_parser(
        "reload", parents=[config], help="make the running daemon re-read its configuration",
        description="The daemon re-reads its configuration file (as on SIGHUP) and applies the "
                    "difference: accounts, listeners, limits, notifications, metrics. Sessions "
                    "in flight go on. A configuration that does not load is refused (exit 2) "
                    "and the running one stays.")
    sub.add_parser(
        "health", parents=[config], help="exit 0 when the running daemon answers",
        description="For a container HEALTHCHECK or a monitor: asks the daemon's /livez "
                    "([metrics] listen) or, when metrics are off, its status socket.")

    check = sub.add_parser(
        "check", parents=[config], help="test each account step by step",
        description="For each ACCOUNT (default: all): the configuration, the vault, a token "
                    "(with the master key, else the local password read from standard input "
                    "or a prompt), an upstream login over each configured protocol and, with "
                    "--send-test, a real message. Each step is OK or FAIL with what to do. "
                    "Exit 0 only when every step passed.")
    check.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="the accounts to check")
    check.add_argument("--send-test", metavar="ADDRESS",
                       help="also send a short test message to ADDRESS through the account")
    check.add_argument("--json", action="store_true", help="machine-readable output")

    admin = sub.add_parser(
        "admin", parents=[config], help="open the admin page in a browser",
        description="Ask the running daemon for a one-time sign-in link to its admin page "
                    "([admin] listen), print it (as the last line) and open it in a browser. "
                    "The link works once, within 5 minutes.")
    admin.add_argument("--no-browser", action="store_true",
                       help="only print the link (e.g. to open it through an SSH tunnel)")
    queue_admin.add_parser(sub, [config])

    tls = sub.add_parser("tls", parents=[config], help="the local listeners' TLS certificate",
                         description="Show the certificate the local TLS listeners serve.")
    tlssub = tls.add_subparsers(dest="action", required=True, metavar="ACTION")
    tlssub.add_parser("export-ca", parents=[config],
                      help="print the local CA certificate (PEM) for clients to trust",
                      description="Print the CA that signs mailproxy's own certificate, in "
                                  "PEM, for clients and devices to trust.")
    tlssub.add_parser("info", parents=[config],
                      help="subject, names, expiry and SHA-256 fingerprints",
                      description="Print subject, names, expiry and SHA-256 fingerprints of "
                                  "the certificate served and of the local CA.")
    return parser
