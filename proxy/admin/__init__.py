"""The local admin page: every account at a glance, sign-in and local passwords from a browser."""
