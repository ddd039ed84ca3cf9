"""SMTP's vocabulary, owned by neither the server nor the client.

Replies and enhanced status codes (``codes``: RFC 5321 4.2, RFC 3463), envelope
parameters (``parameters``: RFC 1870, 3461, 6152, 6531) and paths (``paths``:
RFC 5321 4.1.2). The pipeline, the queue and S/MIME raise refusals from this
catalogue; the SMTP server turns them into wire replies, the queue into DSNs.
"""
