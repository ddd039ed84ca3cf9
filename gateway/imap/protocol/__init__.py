"""The pure IMAP protocol layer: no I/O, no storage.

- ``reader``: assemble one command from bytes (literals, continuation requests, limits).
- ``parser``: ``parse_command(raw, options) -> Command`` (``commands`` holds the dataclasses).
- ``response``: serialisers for everything the server writes; ``structure`` for ENVELOPE/BODYSTRUCTURE.
- ``capabilities``: the one declared capability list.
- ``errors``: ``ImapError`` and friends, each knowing its wire form.
"""
