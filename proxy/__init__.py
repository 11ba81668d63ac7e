"""mailproxy: local IMAP/POP3/SMTP listeners that log in upstream with OAuth2."""

__version__ = "0.1.0"
