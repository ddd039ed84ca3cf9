"""The pure parts of the SMTP side: paths (RFC 5321 4.1.2), parameters and xtext (RFC 3461 4),
the streaming header/MIME scan, the limiters, and the trace-field filter. No sockets here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline.limits import ConcurrencyLimiter, RateLimiter
from gateway.pipeline.parse import ParseLimits, scan_message
from gateway.queue.local_delivery import without_forged_results
from gateway.mail.codes import MailRefusal
from gateway.mail.parameters import (
    decode_xtext,
    encode_xtext,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from gateway.mail.paths import SmtpPath, parse_path, split_path_argument


# --------------------------------------------------------------------------- paths

@pytest.mark.parametrize("text, local, domain, route, quoted", [
    ("<a.b@c.example>", "a.b", "c.example", (), False),
    ("<@x.example,@y.example:a@c.example>", "a", "c.example", ("x.example", "y.example"), False),
    ('<"a b@c"@d.example>', "a b@c", "d.example", (), True),
    ("<a%b@c.example>", "a%b", "c.example", (), False),
    ("a@c.example", "a", "c.example", (), False),
    ("<élodie@hôpital.example>", "élodie", "hôpital.example", (), False),
])
def test_paths(text: str, local: str, domain: str, route: tuple[str, ...], quoted: bool) -> None:
    path = parse_path(text, allow_null=False)
    assert path is not None
    assert (path.local_part, path.domain, path.source_route, path.quoted) == (local, domain, route, quoted)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(MailRefusal) as refused:
        parse_path("<>", allow_null=False)
    assert refused.value.reply.enhanced == "5.1.3"


@pytest.mark.parametrize("bad", ["<a@>", "<@x:>", "<a@b>", "<a..b@c.example>", '<"unterminated@c.example>', "<a@-c.example>"])
def test_malformed_paths(bad: str) -> None:
    with pytest.raises(MailRefusal) as refused:
        parse_path(bad, allow_null=False)
    assert refused.value.reply.code == 553


def test_split_path_argument_respects_quotes() -> None:
    assert split_path_argument('<"x>y"@c.example> SIZE=10') == ('<"x>y"@c.example>', "SIZE=10")
    assert split_path_argument("a@b.example BODY=8BITMIME") == ("a@b.example", "BODY=8BITMIME")


# --------------------------------------------------------------------------- parameters

def test_mail_parameters() -> None:
    params = parse_mail_parameters("SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=ab+2Bc AUTH=<>")
    assert (params.size, params.body, params.smtputf8, params.ret, params.envid, params.auth) == (
        1000, "8BITMIME", True, "HDRS", "ab+c", "<>")


@pytest.mark.parametrize("text, code", [
    ("SIZE=abc", 501), ("SIZE=1 SIZE=2", 501), ("BODY=BINARYMIME", 501), ("SMTPUTF8=yes", 501),
    ("RET=NONE", 501), ("ENVID=" + "x" * 101, 501), ("ENVID=a+zz", 501), ("FOO=1", 555), ("=x", 501),
])
def test_bad_mail_parameters(text: str, code: int) -> None:
    with pytest.raises(MailRefusal) as refused:
        parse_mail_parameters(text)
    assert refused.value.reply.code == code


def test_rcpt_parameters() -> None:
    params = parse_rcpt_parameters("NOTIFY=failure,DELAY ORCPT=rfc822;a+2Bb@c.example")
    assert params.notify == frozenset({"FAILURE", "DELAY"}) and params.orcpt == "rfc822;a+b@c.example"
    assert parse_rcpt_parameters("NOTIFY=NEVER").notify == frozenset({"NEVER"})
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=rfc822", "ORCPT=;a@b.example"):
        with pytest.raises(MailRefusal):
            parse_rcpt_parameters(bad)


@given(st.text(min_size=0, max_size=60))
def test_xtext_round_trip(value: str) -> None:
    encoded = encode_xtext(value)
    assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
    assert decode_xtext(encoded) == value


# --------------------------------------------------------------------------- streaming scan

LIMITS = ParseLimits(max_header_count=50, max_header_bytes=64 * 1024, max_mime_depth=5)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "m.eml"
    path.write_bytes(data)
    return path


def test_headers_are_unfolded(tmp_path: Path) -> None:
    facts = scan_message(_write(tmp_path, b"Subject: a\r\n  folded\r\nX-MSS-MES: FIN\r\n\r\nbody\r\n"), LIMITS)
    assert facts.subject == "a folded" and facts.get("x-mss-mes") == "FIN" and facts.mime_depth == 0


def test_mime_depth_follows_boundaries(tmp_path: Path) -> None:
    data = (b"Content-Type: multipart/mixed; boundary=outer\r\n\r\npreamble\r\n--outer\r\n"
            b"Content-Type: multipart/alternative;\r\n boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\nx\r\n"
            b"--inner--\r\n--outer\r\nContent-Type: text/plain\r\n\r\n--not-a-boundary\r\n--outer--\r\n")
    assert scan_message(_write(tmp_path, data), LIMITS).mime_depth == 2


def test_header_section_bounds(tmp_path: Path) -> None:
    many = b"".join(b"X-%d: v\r\n" % n for n in range(51)) + b"\r\n"
    with pytest.raises(MailRefusal) as refused:
        scan_message(_write(tmp_path, many), LIMITS)
    assert (refused.value.reply.code, refused.value.reply.enhanced) == (554, "5.6.0")


# --------------------------------------------------------------------------- limiters

def test_concurrency_slots_release_once() -> None:
    limiter = ConcurrencyLimiter(2)
    first, second = limiter.try_acquire("ip"), limiter.try_acquire("ip")
    assert first and second and limiter.try_acquire("ip") is None
    first.release()
    first.release()                                    # idempotent: cannot free someone else's slot
    assert limiter.snapshot() == {"ip": 1}
    second.release()
    assert limiter.snapshot() == {}


def test_rate_limiter_window() -> None:
    now = [0.0]
    limiter = RateLimiter(2, window=60, clock=lambda: now[0])
    assert limiter.allow("u") and limiter.allow("u") and not limiter.allow("u")
    now[0] = 61
    assert limiter.allow("u")
    assert RateLimiter(0).allow("anyone")               # 0 = unlimited


# --------------------------------------------------------------------------- trace filter

def test_forged_authentication_results_are_removed_from_the_header_only() -> None:
    message = [b"Authentication-Results: gw.example; auth=pass\r\n", b"\tsmtp.auth=forged\r\n",
               b"Authentication-Results: other.example; dkim=pass\r\n", b"Subject: s\r\n", b"\r\n",
               b"Authentication-Results: gw.example; body text stays\r\n"]
    assert list(without_forged_results(message, "gw.example")) == [
        b"Authentication-Results: other.example; dkim=pass\r\n", b"Subject: s\r\n", b"\r\n",
        b"Authentication-Results: gw.example; body text stays\r\n"]


@given(st.text(max_size=80))
def test_paths_and_parameters_refuse_garbage_with_a_reply(text: str) -> None:
    """Whatever a client sends after MAIL FROM:/RCPT TO:, the answer is a path or an SMTP refusal."""
    try:
        path_text, params = split_path_argument(text)
        parse_path(path_text, allow_null=True)
        parse_mail_parameters(params)
        parse_rcpt_parameters(params)
    except MailRefusal as refusal:
        assert 500 <= refusal.reply.code < 600


_PATH_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(lambda local, domain, wrap: f"<{local}@{domain}>" if wrap else f"{local}@{domain}",
              st.text(alphabet='ab."\\ %!@<>,:-[]é', max_size=12), st.text(alphabet="ab.-[]1é@", max_size=12),
              st.booleans()))


def _outcome(parse: Callable[..., SmtpPath | None], text: str, allow_null: bool, allow_postmaster: bool) -> object:
    try:
        return parse(text, allow_null=allow_null, allow_postmaster=allow_postmaster)
    except MailRefusal as refusal:
        return refusal.reply, str(refusal)


@given(_PATH_TEXT, st.booleans(), st.booleans())
def test_a_path_parsed_again_is_parsed_the_same(text: str, allow_null: bool, allow_postmaster: bool) -> None:
    """The cache of parsed paths answers what parsing answers, a refusal included, the first time and after."""
    from gateway.mail.paths import _parse_path
    expected = _outcome(_parse_path, text, allow_null, allow_postmaster)
    assert _outcome(parse_path, text, allow_null, allow_postmaster) == expected
    assert _outcome(parse_path, text, allow_null, allow_postmaster) == expected


@given(st.text(alphabet='ab"\\<> @=x', max_size=30))
def test_split_path_argument_without_quotes_as_with_the_scanner(text: str) -> None:
    """The shortcut for a path without quotes ends it where the quote-aware scan ends it."""
    from gateway.mail.paths import split_path_argument as split
    try:
        split_text = split(text)
    except MailRefusal:
        split_text = None
    scanned = _scan_split(text)
    assert split_text == scanned


def _scan_split(argument: str) -> tuple[str, str] | None:
    """``split_path_argument`` as it was: a character scan that follows quotes and backslashes."""
    text = argument.lstrip()
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest.strip()
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[: index + 1], text[index + 1:].strip()
    return None


def test_the_received_date_is_now_to_the_second() -> None:
    """RFC 5321 4.4 / RFC 5322 3.3: the Received field's date, formatted once a second, is the date of now."""
    from email.utils import format_datetime

    from gateway.pipeline.trace import _DATE
    from gateway.storage.models import utcnow
    for _ in range(3):
        before = format_datetime(utcnow())
        dated = _DATE.now()
        after = format_datetime(utcnow())
        assert dated in (before, after)


@given(st.sampled_from([(250, "2.0.0"), (354, ""), (550, "5.1.1"), (421, "4.7.0")]),
       st.text(alphabet="ab {}\n%é", max_size=30))
def test_a_reply_is_its_wire_lines_joined_once(codes_: tuple[int, str], text: str) -> None:
    """RFC 5321 4.2.1: the wire text of a reply (continuation lines for a multi-line text), built once per reply;
    ``format`` gives the reply ``dataclasses.replace`` gave."""
    from dataclasses import replace

    from gateway.mail.codes import Reply
    reply = Reply(codes_[0], codes_[1], text)
    assert str(reply) == "\r\n".join(reply.lines())
    assert str(reply) is str(reply)
    template = Reply(codes_[0], codes_[1], "queued as {queue_id}: " + text.replace("{", "").replace("}", ""))
    assert template.format(queue_id="0abc") == replace(template, text=template.text.format(queue_id="0abc"))


@given(st.text(alphabet="ab :\t\r\n\x0b\x85é", max_size=40))
def test_a_one_line_field_is_split_as_a_folded_one(text: str) -> None:
    """RFC 5322 2.2.3: the shortcut for a field on one line gives what unfolding gives."""
    from gateway.pipeline.parse import _split_field, _unfolded
    raw = text.encode()
    name, _, value = raw.decode("utf-8", errors="replace").partition(":")
    assert _split_field(raw) == (name.strip(), _unfolded(value))


@given(st.one_of(st.text(max_size=30), st.builds("{}@{}".format, st.text(alphabet="aB.-_+é", max_size=10),
                                                  st.text(alphabet="aB.-é", max_size=12))))
def test_a_canonical_address_asked_again_is_the_same(address: str) -> None:
    """The directory key of an address (kept for the addresses seen last) is what computing it gives; a
    malformed address is refused each time with the same error."""
    from gateway.directory.addresses import AddressError, normalise_address

    def outcome(normalise: Callable[..., str]) -> object:
        try:
            return normalise(address)
        except AddressError as error:
            return str(error)

    expected = outcome(normalise_address.__wrapped__)
    assert outcome(normalise_address) == expected
    assert outcome(normalise_address) == expected


def test_a_path_names_its_address_once() -> None:
    path = parse_path('<"a b"@c.example>', allow_null=False)
    assert path is not None and path.address == '"a b"@c.example' and path.address is path.address
