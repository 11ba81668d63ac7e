"""The daemon: listeners and shutdown (``server``), the status socket (``control``) and the
notification hooks (``notify``)."""
