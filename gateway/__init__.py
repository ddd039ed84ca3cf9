"""Secure health messaging gateway: an MSSanté-style mail operator."""

__version__ = "0.1.0"
