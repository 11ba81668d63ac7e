"""Test support code: a throwaway CA, an OAuth2 token endpoint and a private Dovecot.

Nothing here is imported by ``proxy/``; it only serves the tests and the benchmark.
"""
