"""Sans-IO protocol logic: bytes in, events and bytes out. Never imports asyncio or sockets."""
