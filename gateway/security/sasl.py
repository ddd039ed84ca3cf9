"""SASL messages decoded once for every door (SMTP AUTH, IMAP AUTHENTICATE): pure functions from the
client's decoded response to what it says. What a door then does with it (the reply, the authorization
rule) stays in the door; how the bytes are read (334 / "+" continuations, base64, "*") too.
"""

from __future__ import annotations

from dataclasses import dataclass


class SaslMalformed(ValueError):
    """The response does not follow the mechanism's grammar."""


@dataclass(frozen=True)
class PlainResponse:
    authzid: str
    authcid: str
    password: str

    def authzid_differs(self) -> bool:
        """An authorization identity other than the login (acting as someone else: refused by our doors)."""
        return bool(self.authzid) and self.authzid.strip().lower() != self.authcid.strip().lower()


@dataclass(frozen=True)
class BearerResponse:
    """OAUTHBEARER (RFC 7628 3.1) or XOAUTH2: the user the token is for, and the token."""

    user: str
    token: str


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def decode_plain(message: bytes) -> PlainResponse:
    """RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise SaslMalformed("PLAIN is [authzid] NUL authcid NUL passwd")
    authzid, authcid, password = (_text(part) for part in parts)
    return PlainResponse(authzid, authcid, password)


def decode_login(username: bytes, password: bytes) -> PlainResponse:
    """draft-murchison-sasl-login: the answers to "Username:" and "Password:"."""
    return PlainResponse("", _text(username), _text(password))


def decode_external(message: bytes) -> str:
    """RFC 4422 A.1: the (possibly empty) authorization identity; the identity is the client certificate."""
    return _text(message).strip()


def decode_oauthbearer(message: bytes) -> BearerResponse:
    """RFC 7628 3.1: gs2-header "n,a=user," then kvpairs separated by ^A, "auth=Bearer <token>"."""
    header, _, rest = _text(message).partition("\x01")
    user = next((part[2:] for part in header.split(",") if part.startswith("a=")), "")
    pairs = _kvpairs(rest)
    # RFC 5801 4: "=2C" and "=3D" stand for "," and "=" in the gs2 authzid.
    return BearerResponse(user.replace("=2C", ",").replace("=3D", "="), bearer_token(pairs.get("auth", "")))


def decode_xoauth2(message: bytes) -> BearerResponse:
    """Google's XOAUTH2: "user=" user ^A "auth=Bearer " token ^A ^A."""
    pairs = _kvpairs(_text(message))
    return BearerResponse(pairs.get("user", ""), bearer_token(pairs.get("auth", "")))


def bearer_token(auth_value: str) -> str:
    """The token of "Bearer <token>" (RFC 6750 2.1), empty for any other scheme."""
    scheme, _, token = auth_value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _kvpairs(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split("\x01") if "=" in kv)
