"""SMTP submission relay: aiosmtpd locally, aiosmtplib upstream with XOAUTH2/OAUTHBEARER."""

from .service import SmtpService

__all__ = ["SmtpService"]
