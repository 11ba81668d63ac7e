"""The outbound queue: a spool that answers 250 only once a message is durable, an SQLite
index, and a delivery worker per account (back-off, lifetime, rate limits, DSNs).

Light on purpose: ``proxy.queue.admin`` (the CLI) imports no asyncio upstream code.
"""
