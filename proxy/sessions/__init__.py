"""The asyncio shells of the IMAP and POP3 sessions: run a sans-IO core, log in, splice."""
