"""Local TLS: certificates (configured, or a local CA's), server contexts, per-session memory."""
