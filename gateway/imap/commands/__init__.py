"""One module per IMAP command family; each exposes ``HANDLERS`` for the session's ``COMMANDS`` table."""
