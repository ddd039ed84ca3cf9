"""Cryptography: test PKI, TLS contexts, passwords, S/MIME, DKIM, OIDC tokens, keys and encryption at rest."""
