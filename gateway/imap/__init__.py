"""Our asyncio IMAP4rev1 server: protocol/ (pure parsing and serialising), the session state machine, command families."""
