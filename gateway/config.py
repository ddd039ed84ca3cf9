"""Settings: one TOML file, environment overrides, validated once at start.

Resolution order (later wins):
  1. the embedded defaults below (every key documented in config/gateway.toml),
  2. the TOML file (``--config``, else ``$GATEWAY_CONFIG``, else
     ``<data_dir>/gateway.toml`` when it exists),
  3. environment variables ``GATEWAY_<KEY>`` for top-level keys and
     ``GATEWAY_<SECTION>_<KEY>`` for keys in a section, e.g.
     ``GATEWAY_DATABASE_URL`` or ``GATEWAY_SMTP_MAX_MESSAGE_SIZE``.

A bad value stops the start with a ``ConfigError`` that names the key, where it
came from and why it is wrong.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.directory.professions import is_known_profession
from gateway.errors import UserError

ENV_PREFIX = "GATEWAY_"


class ConfigError(UserError):
    """The configuration is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Port = int


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("a port is a number from 0 to 65535 (0 = chosen by the system)")
    return value


class DatabaseSettings(_Section):
    url: str = Field(
        "",
        description="SQLAlchemy async URL. Empty: SQLite file <data_dir>/gateway.db. "
        "PostgreSQL: postgresql+asyncpg://user:pass@host:port/db",
    )
    pool_size: int = Field(10, ge=1, le=200, description="connections kept open by the async engine (PostgreSQL; SQLite on a file: as many again may open beyond it under load)")
    echo: bool = Field(False, description="log every SQL statement (debugging only)")

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "use sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASS@HOST:PORT/DB"
            )
        return value


class DirectorySettings(_Section):
    patient_domain: str = Field(
        "patient.mssante.localhost",
        description="domain of patient mailboxes (<INS>@<patient_domain>); created as a local domain by init",
    )
    professional_domain: str = Field(
        "demo.mssante.localhost",
        description="first local domain for professional, organisation and application mailboxes",
    )
    default_quota_mb: int = Field(2048, ge=1, description="quota of a new mailbox, in MiB")
    accept_production_ins: bool = Field(
        True,
        description="accept INS under the production OIDs (.8 NIR, .9 NIA); test (.10) and demo (.11) are always accepted",
    )


class ListenerSettings(_Section):
    host: str = Field("127.0.0.1", description="address every listener binds to")
    smtp_relay_port: Port = Field(2525, description="inbound relay from other operators (port 25 style)")
    smtp_submission_port: Port = Field(2587, description="submission with STARTTLS (port 587 style)")
    smtp_submissions_port: Port = Field(2465, description="submission with implicit TLS (port 465 style)")
    imap_port: Port = Field(2143, description="IMAP with STARTTLS (port 143 style)")
    imaps_port: Port = Field(2993, description="IMAP with implicit TLS (port 993 style)")
    http_port: Port = Field(8443, description="HTTPS: patient webmail and FHIR API")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, le=600, description="on SIGTERM, time SMTP commands in flight (a DATA) and IMAP commands "
        "running are given to finish and get their reply before the connection is closed (421 / BYE)")
    proxy_protocol_from: list[str] = Field(
        default_factory=list,
        description="load balancers (HAProxy in TCP mode with send-proxy / send-proxy-v2) whose PROXY protocol "
        "header (v1 or v2) is believed, as addresses or networks (\"10.0.0.5\", \"10.0.1.0/24\"); on every SMTP, "
        "IMAP and HTTPS listener, limits, logs, audit entries and Received: then see the client the proxy saw. A "
        "connection from one of them without a valid header is closed and audited; from any other address the "
        "connection is its own client and a PROXY header is never believed. Empty: off")
    proxy_protocol_timeout_seconds: float = Field(
        5.0, ge=3, le=120, description="time a trusted proxy has to send the whole PROXY header before the "
        "connection is closed (HAProxy's spec: at least 3 seconds, one TCP retransmit)")

    @field_validator("proxy_protocol_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP address or network (CIDR)") from None
        return value

    @field_validator(
        "smtp_relay_port", "smtp_submission_port", "smtp_submissions_port",
        "imap_port", "imaps_port", "http_port",
    )
    @classmethod
    def _port(cls, value: int) -> int:
        return _check_port(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not value or any(c.isspace() for c in value):
                raise ValueError("an IP address or a host name") from None
        return value


class PkiSettings(_Section):
    dir: str = Field("", description="where the test PKI lives. Empty: <data_dir>/pki")
    organisation: str = Field("MSS-GATEWAY-TEST", description="O= of the test PKI's certificates")
    server_names: list[str] = Field(
        default_factory=lambda: ["localhost"],
        description="DNS names put in the gateway's TLS certificate (the hostname is always added)",
    )
    server_ips: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="IP addresses put in the gateway's TLS certificate",
    )
    trust_anchors: list[str] = Field(
        default_factory=list,
        description="further PEM files trusted for TLS peers besides this PKI's CAs: other operators' CA certificates "
        "(IGC-Santé in production) and their CRLs. Revocation is checked, so list each CA's CRL too",
    )
    key_type: Literal["rsa", "ec"] = Field("ec", description="key type of issued certificates: rsa (3072) or ec (P-256)")
    validity_days: int = Field(825, ge=1, le=3650, description="lifetime of issued end-entity certificates")

    @field_validator("server_ips")
    @classmethod
    def _ips(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_address(value)
        return values


class TlsSettings(_Section):
    """The listeners' server certificate when it is not the test PKI's: one issued by the IGC-Santé (or any CA)."""

    server_certificate_file: str = Field(
        "", description="PEM file of the gateway's TLS server certificate issued by the IGC-Santé (or any CA), leaf first "
        "(its intermediates may follow). Used by every listener (SMTP, IMAP, HTTPS) and as the client certificate of "
        "outbound SMTP instead of the test PKI's; it must be valid now and name `hostname`. Checked at start, by "
        "`gateway config check` and again on SIGHUP (a renewed file is served to new handshakes). Empty: the test PKI's")
    server_key_file: str = Field(
        "", description="PEM file of that certificate's private key, unencrypted; refused when others may read it "
        "(as sshd does): mode 0600, or 0640 with a group of the gateway's user")
    server_chain_file: str = Field(
        "", description="optional PEM file of the intermediate CA certificates sent after the leaf (e.g. the IGC-Santé's "
        "intermediate), when tls.server_certificate_file holds the leaf alone")

    @model_validator(mode="after")
    def _together(self) -> "TlsSettings":
        if bool(self.server_certificate_file) != bool(self.server_key_file):
            missing = "server_key_file" if self.server_certificate_file else "server_certificate_file"
            raise ValueError(f"tls.server_certificate_file and tls.server_key_file go together: tls.{missing} is empty")
        if self.server_chain_file and not self.server_certificate_file:
            raise ValueError("tls.server_chain_file without tls.server_certificate_file")
        return self


class AuthSettings(_Section):
    argon2_time_cost: int = Field(2, ge=1, le=10, description="argon2id iterations")
    argon2_memory_kib: int = Field(19456, ge=8192, description="argon2id memory per hash, KiB (OWASP: 19 MiB)")
    argon2_parallelism: int = Field(1, ge=1, le=8, description="argon2id lanes")
    min_password_length: int = Field(12, ge=8, description="shortest password accepted by set-password")
    # One limiter for every door (SMTP AUTH, IMAP, FHIR Basic, webmail): gateway/security/auth_limiter.py.
    failures_before_delay: int = Field(
        5, ge=1, le=100, description="failed sign-ins of one login from one source address before each further "
        "attempt from there waits (growing delays; other addresses are never held back by them)")
    source_failures_before_delay: int = Field(
        20, ge=1, le=10000, description="failed sign-ins from one source address (IPv6: one /64), all logins "
        "together, before everything it tries waits (logins that succeeded from there recently excepted)")
    first_delay_seconds: int = Field(1, ge=1, le=3600, description="the first wait; each further failure doubles it")
    max_delay_seconds: int = Field(300, ge=1, le=86400, description="the longest wait between two attempts")
    forget_failures_after_minutes: int = Field(
        60, ge=1, le=10080, description="failures are forgotten this long after the last one")

    @model_validator(mode="after")
    def _delays_ordered(self) -> "AuthSettings":
        if self.first_delay_seconds > self.max_delay_seconds:
            raise ValueError("first_delay_seconds must not exceed max_delay_seconds")
        return self


# RFC 7518 3.1: the asymmetric JWS algorithms a verifier may accept; never "none", never HMAC
# (a shared secret would let anyone holding it mint tokens, and invites alg confusion).
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def check_oidc_url(value: str) -> str:
    """https, or plain http on a loopback host only (a local identity provider, tests)."""
    if not value:
        return value
    scheme, _, rest = value.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if scheme == "https" and host:
        return value
    if scheme == "http" and (host == "localhost" or _is_loopback(host)):
        return value
    raise ValueError("expected an https:// URL (http:// only on a loopback address)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OidcSettings(_Section):
    """OpenID Connect bearer tokens for SASL OAUTHBEARER (RFC 7628) and XOAUTH2: the Pro Santé Connect pattern."""

    issuer: str = Field(
        "", description="issuer whose access tokens open a session: the exact iss claim (RFC 7519 4.1.1), e.g. "
        "https://auth.esante.gouv.fr/auth/realms/esante-wallet. Empty: token login disabled, OAUTHBEARER/XOAUTH2 not offered")
    audience: str = Field(
        "", description="what the aud claim must contain (RFC 7519 4.1.3): this gateway's client id at the issuer. "
        "Required with issuer")
    jwks_file: str = Field("", description="the issuer's signing keys as a JWK Set file (RFC 7517 5), re-read when it changes")
    jwks_url: str = Field(
        "", description="the issuer's JWK Set URL (https; http only on loopback). Both jwks_file and jwks_url empty: "
        "jwks_uri of the issuer's discovery document <issuer>/.well-known/openid-configuration (OIDC Discovery 4, RFC 8414 3)")
    jwks_cache_seconds: int = Field(
        3600, ge=60, le=86400, description="how long keys fetched from a URL are used before being fetched again "
        "(a token with an unknown kid has them fetched again at once, a few times a minute at most)")
    subject_claim: str = Field(
        "preferred_username", description="claim holding the practitioner's national id, IDNPS (8 + RPPS, 0 + ADELI) or bare "
        "RPPS; Pro Santé Connect: preferred_username or SubjectNameID. The mailbox named at login must be theirs or "
        "delegated to one of theirs")
    leeway_seconds: int = Field(60, ge=0, le=600, description="clock skew tolerated on exp, nbf and iat")
    allowed_algorithms: list[str] = Field(
        ["RS256", "ES256", "PS256"], description="JWS algorithms accepted in token headers (RFC 7518 3.1); asymmetric only: "
        + ", ".join(OIDC_ALGORITHMS))

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_oidc_url(value.strip())

    @field_validator("allowed_algorithms")
    @classmethod
    def _algorithms(cls, values: list[str]) -> list[str]:
        unknown = [v for v in values if v not in OIDC_ALGORITHMS]
        if unknown or not values:
            raise ValueError(f"choose among {', '.join(OIDC_ALGORITHMS)} (got {unknown or 'none'})")
        return values

    @model_validator(mode="after")
    def _complete(self) -> "OidcSettings":
        if self.issuer and not self.audience:
            raise ValueError("audience is required when issuer is set (RFC 7519 4.1.3: tokens for other clients are refused)")
        if self.jwks_file and self.jwks_url:
            raise ValueError("set jwks_file or jwks_url, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


class SmtpSettings(_Section):
    max_message_size: int = Field(
        25 * 1024 * 1024, ge=1024,
        description="largest message accepted, in octets; advertised in EHLO SIZE (RFC 1870), 552 5.3.4 beyond it",
    )
    max_recipients: int = Field(100, ge=1, description="recipients per message; more get 452 4.5.3 (RFC 5321 4.5.3.1.10)")
    max_line_length: int = Field(
        2048, ge=998,
        description="longest message line in octets without CRLF (RFC 5322 says 998; longer lines from old software are "
        "tolerated up to this, then 500 5.5.2)",
    )
    max_header_count: int = Field(500, ge=10, description="header fields per message; more get 554 5.6.0")
    max_header_bytes: int = Field(1024 * 1024, ge=8192, description="size of the header section, in octets; more get 554 5.6.0")
    max_mime_depth: int = Field(
        20, ge=2,
        description="nesting depth of MIME containers (multiparts and attached messages, message/rfc822); deeper gets 554 5.6.0")
    max_connections_per_ip: int = Field(
        50, ge=1, description="simultaneous SMTP connections from one IP address; more get 421 4.7.0 (a limit, not an auth error)")
    max_sessions_per_user: int = Field(
        20, ge=1,
        description="simultaneous authenticated SMTP sessions of one account (Thunderbird opens ~5); more get 421 4.7.0")
    messages_per_minute_per_user: int = Field(
        600, ge=0, description="messages one account may submit per minute; more get 450 4.7.1. 0: no limit")
    messages_per_minute_per_ip: int = Field(
        1200, ge=0, description="messages accepted from one IP address per minute; more get 450 4.7.1. 0: no limit")
    auth_failures_per_connection: int = Field(3, ge=1, description="failed AUTH attempts before the connection is closed (421)")
    timeout_seconds: int = Field(300, ge=30, description="idle time before a connection is closed (RFC 5321 4.5.3.2: at least 5 min)")
    x_mss_nil: str = Field(
        "MSS-GATEWAY-0.1",
        description="X-MSS-NIL header added to mail our users send (Ref#2 ECO.2.4.3: the product reference "
        "registered on convergence.esante.gouv.fr)",
    )
    patient_first_contact: list[str] = Field(
        default_factory=list,
        description="addresses (or @domain) a patient may write to without being written to first, e.g. pharmacies' "
        "organisational mailboxes (MSSanté exception of May 2023)",
    )
    disabled_extensions: list[str] = Field(
        default_factory=list, description="EHLO keywords not to offer (a workaround for a client quirk), e.g. [\"PIPELINING\"]",
    )
    spool_dir: str = Field("", description="where accepted messages wait for delivery. Empty: <data_dir>/spool")
    delivery_workers: int = Field(
        16, ge=1, le=64,
        description="concurrent local deliveries (on SQLite the deliveries in flight share one commit: more of them, fewer "
        "fsyncs per message)")
    local_retry_seconds: int = Field(60, ge=1, description="delay before a deferred local delivery is tried again")
    local_backlog_limit: int = Field(
        200, ge=0,
        description="back-pressure: when this many accepted messages wait for local delivery, a session's DATA waits "
        "for one to be delivered before its message is queued (acceptance then runs at the delivery rate and the time "
        "from DATA to the mailbox stays bounded); 0: never wait")
    local_backlog_wait_seconds: float = Field(
        60.0, gt=0, le=300,
        description="longest wait for room in the local delivery backlog before answering 451 4.3.2 (the client keeps "
        "its copy and retries); well under the client's 10-minute DATA timeout (RFC 5321 4.5.3.2.6)")
    postmaster: str = Field(
        "",
        description="hosted mailbox that receives mail for <Postmaster> and for postmaster@ every local domain without "
        "a mailbox of its own (RFC 5321 4.5.1), e.g. \"exploitation@demo.mssante.localhost\". Empty: such mail is "
        "refused with 550 5.1.1 naming this setting")
    acceptor_processes: int = Field(
        0, ge=0, le=32,
        description="SMTP acceptor processes: with N >= 1, `gateway serve` binds the SMTP ports itself and N child "
        "processes accept SMTP on them (the least busy one takes the next connection) while the main process "
        "delivers, serves IMAP and HTTPS and runs the workers; the connection and message-rate limits stay "
        "gateway-wide (docs/ARCHITECTURE.md, \"SMTP acceptor processes\"). 0: everything in one process")
    local_queue_lifetime_hours: float = Field(
        48.0, gt=0,
        description="a local recipient still undeliverable this long after arrival (e.g. over quota) fails: 5.2.2 for a "
        "full mailbox, else 5.4.7, with a failure DSN to the sender. A mailbox deleted, disabled or closed after "
        "acceptance fails at once")


    @field_validator("postmaster")
    @classmethod
    def _postmaster(cls, value: str) -> str:
        from gateway.directory.addresses import normalise_address
        try:
            return normalise_address(value) if value.strip() else ""
        except UserError as exc:
            raise ValueError(str(exc)) from None


class OutboundSettings(_Section):
    """Delivery to other operators (RFC 5321 5: MX routing; MSSanté: verified, mutual TLS on every hop)."""

    nameserver: str = Field("", description="DNS server for MX, A/AAAA and DKIM TXT lookups (an IP address). Empty: the system resolver")
    nameserver_port: Port = Field(53, description="port of that DNS server")
    dns_timeout_seconds: float = Field(10.0, gt=0, le=120, description="time allowed for one DNS lookup")
    smtp_port: Port = Field(25, description="port of other operators' MX hosts (RFC 5321 4.5.4.1: 25)")
    transport_map: list[str] = Field(
        default_factory=list,
        description="routes used instead of MX lookup, like Postfix's transport_maps, for operators reached without DNS: "
        "[\"domain=host:port\", \"other.domain=host\"]",
    )
    connect_timeout_seconds: float = Field(30.0, gt=0, description="time allowed to open a connection to an MX host")
    command_timeout_seconds: float = Field(
        300.0, gt=0, description="time allowed for each SMTP reply (RFC 5321 4.5.3.2 suggests 5 min for MAIL, RCPT, DATA)")
    max_concurrent_deliveries: int = Field(8, ge=1, le=256, description="SMTP transactions to other operators at once")
    poll_seconds: float = Field(5.0, gt=0, le=600, description="how often the worker looks for due recipients")
    retry_schedule_minutes: list[float] = Field(
        default_factory=lambda: [7.5, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0],
        description="wait after each failed attempt (mox's table): attempt 1 is immediate, attempt n+1 comes after entry n; "
        "a temporary failure after the last entry becomes permanent (failure DSN)",
    )
    delay_warning_minutes: float = Field(
        120.0, ge=0, description="a delay DSN (RFC 3464 Action: delayed) once a recipient has waited this long. 0: never")
    max_queue_lifetime_hours: float = Field(
        48.0, gt=0, description="a recipient still undelivered this long after arrival fails (5.4.7), whatever the table says")
    finished_listed_hours: float = Field(
        72.0, ge=0, description="`gateway queue list` keeps showing a message this long after its last recipient was delivered "
        "or failed (and its DSN sent), so `--state failed` finds it; 0: only messages still queued. Past it the purge "
        "(retention.purge_interval_minutes) deletes its rows")

    @field_validator("transport_map")
    @classmethod
    def _routes(cls, values: list[str]) -> list[str]:
        for value in values:
            domain, _, target = value.partition("=")
            host, _, port = target.rpartition(":") if ":" in target else (target, "", "25")
            if not domain.strip() or not host.strip() or not (port.isascii() and port.isdigit()):
                raise ValueError(f"{value!r}: expected \"domain=host:port\" or \"domain=host\"")
        return values

    tls_policy: Literal["verify-required"] = Field(
        "verify-required",
        description="fixed MSSanté policy, documented here: STARTTLS is mandatory, TLS 1.2+, the MX certificate must chain to the "
        "trust anchors and name the MX host, and we present our client certificate. No plaintext fallback exists",
    )


class DkimSettings(_Section):
    """DKIM (RFC 6376): signing what leaves for our domains, verifying what arrives."""

    selector: str = Field("mss1", description="selector of new keys (<selector>._domainkey.<domain> TXT record)")
    key_dir: str = Field("", description="private keys, one per domain: <key_dir>/<domain>/<selector>.key (0600). Empty: <data_dir>/dkim")
    sign: bool = Field(True, description="sign outgoing mail whose From domain has a key (relaxed/relaxed, rsa-sha256)")
    verify: bool = Field(True, description="verify inbound signatures and report dkim= in Authentication-Results (RFC 8601)")


class FhirSettings(_Section):
    """The record's FHIR R4 read API in the IHE MHD style (ITI-67 DocumentReference search, ITI-68 Binary)."""

    base_path: str = Field("/fhir", description="URL path the FHIR API is mounted under on the HTTPS listener")
    access_matrix: str = Field(
        "", description="CSV file of the profession x document type access matrix. Empty: the default shipped in the "
        "package (gateway/dmp_bridge/access_matrix.csv, seeded from the arrete du 26 octobre 2023)")
    page_size: int = Field(20, ge=1, le=500, description="DocumentReferences per searchset page when _count is not given")
    max_page_size: int = Field(100, ge=1, le=1000, description="largest _count honoured")
    emergency_access: bool = Field(
        True, description="allow emergency access (bris de glace, CSP L.1111-17) with the X-Emergency-Access-Reason header")
    emergency_access_professions: list[str] = Field(
        default_factory=lambda: ["10"],
        description="TRE_G15 profession codes allowed emergency access; any other profession is refused (403 "
        "emergency-access-not-allowed, audited). Default: 10 (Médecin) only. CSP L.1111-17 opens emergency access "
        "to the professional caring for a person who cannot express their will, and names the SAMU regulating "
        "doctor (médecin régulateur, a physician: code 10); the emergency-regulation assistants (ARM) have no "
        "TRE_G15 profession code and act under that doctor, so no other code stands for the regulation roles. "
        "Add 50 (sage-femme) or 60 (infirmier) if your emergency services need it")
    basic_auth: bool = Field(True, description="accept HTTP Basic with mailbox credentials over TLS besides client certificates")

    @field_validator("emergency_access_professions")
    @classmethod
    def _professions(cls, value: list[str]) -> list[str]:
        codes = [code.strip() for code in value]
        unknown = [code for code in codes if not is_known_profession(code)]
        if unknown:
            raise ValueError(f"not TRE_G15 profession codes: {', '.join(unknown)} (see gateway/directory/professions.py)")
        return codes

    @field_validator("base_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or " " in value:
            raise ValueError("an absolute URL path without a trailing slash, e.g. /fhir")
        return value


class SmimeSettings(_Section):
    """S/MIME (RFC 8551): defaults of the per-mailbox and per-domain policies (``gateway smime policy``)."""

    sign: Literal["always", "when-available", "never"] = Field(
        "when-available", description="sign outgoing mail with the sender's key when the gateway holds one")
    encrypt: Literal["always", "when-available", "never"] = Field(
        "when-available", description="encrypt outgoing mail to each recipient whose certificate the directory has")
    cipher: Literal["aes128_cbc", "aes256_cbc", "aes128_gcm", "aes256_gcm"] = Field(
        "aes256_cbc", description="content encryption of outgoing mail (CBC for the widest client support)")
    require_revocation: bool = Field(
        False, description="treat a certificate whose revocation status is unknown (no CRL) as invalid")
    expiry_warning_days: int = Field(30, ge=1, le=365, description="certificates expiring within this many days are flagged")


class ImapSettings(_Section):
    """The IMAP server's limits and timeouts."""

    max_connections_per_user: int = Field(
        20, ge=1, le=1000, description="simultaneous logged-in connections per user (Thunderbird opens about five); "
        "beyond it: NO [LIMIT], never an authentication error")
    max_connections: int = Field(2000, ge=1, description="simultaneous connections of all users")
    max_unauthenticated_connections_per_ip: int = Field(
        20, ge=1, description="simultaneous connections from one IP address that have not logged in; more get "
        "* BYE with the reason (logged-in ones count per user instead, so a hospital's NAT is not a limit)")
    max_literal_before_login: int = Field(
        8192, ge=1024, le=1024 * 1024, description="largest literal accepted before login, in octets (Dovecot: 8 KiB); "
        "a bigger one gets NO [TOOBIG] without continuation, or BYE when sent as LITERAL+")
    login_timeout_seconds: int = Field(60, ge=5, description="time a connection has to log in")
    autologout_minutes: int = Field(30, ge=30, description="inactivity before an authenticated session is closed "
                                    "(RFC 3501 5.4: at least 30 minutes)")
    idle_timeout_minutes: int = Field(30, ge=1, description="longest IDLE before the server ends it (RFC 2177: "
                                      "clients re-issue IDLE every 29 minutes)")
    max_auth_failures: int = Field(3, ge=1, description="failed logins on one connection before BYE")
    disabled_capabilities: list[str] = Field(
        default_factory=list, description="capabilities not to announce, to work around a client quirk (e.g. [\"CONDSTORE\"])")
    index_preload_messages: int = Field(
        2_000_000, ge=0, description="at start, the in-memory indexes (UIDs, flags) of the folders that were in use "
        "before the restart are loaded in the background, up to this many messages in all (about 16 octets each), "
        "so that their first SELECT finds them ready; 0: each folder is loaded at its first SELECT")


class RetentionSettings(_Section):
    """Retention and crypto-shredding of closed patient spaces."""

    closed_patient_days: int = Field(
        365, ge=0, description="days after a patient closes their space before their data keys are destroyed "
        "(mailbox and record): everything of theirs, backups included, becomes unreadable")
    shred_interval_minutes: int = Field(60, ge=1, description="how often `gateway serve` looks for spaces due for shredding")
    purge_interval_minutes: float = Field(
        15.0, gt=0, description="how often `gateway serve` purges finished work (one node at a time): queue rows of messages "
        "finished more than outbound.finished_listed_hours ago, filing jobs finished more than "
        "retention.filing_jobs_kept_hours ago (`gateway queue purge` runs the same pass by hand)")
    purge_batch_size: int = Field(
        1000, ge=1, le=100000, description="rows of one kind deleted per transaction by the purge (short write "
        "transactions: other writers go in between)")
    filing_jobs_kept_hours: float = Field(
        168.0, ge=0, description="a filing job filed or not filed (refused documents, shown by `gateway record "
        "quarantine`, `gateway record refile` possible) is kept this long after it finished, then purged with its "
        "delivery row; a failed job (waiting for a refile) and one still running are never purged. The queued message "
        "stays as long as its filing jobs (the refile reads who deposited it)")
    blob_sweep_interval_hours: float = Field(
        24.0, gt=0, description="how often `gateway serve` removes blob files no row refers to (one node at a time): "
        "bodies left on disk by a crash between a write and its row's commit, or between a deletion's commit and the "
        "file's removal (`gateway blobs sweep` runs the same pass by hand)")
    blob_orphan_min_age_hours: float = Field(
        24.0, ge=1, description="a blob file is judged only once this old: a younger one may belong to a row not yet "
        "committed. Also the age after which a half-written file of blobs/tmp is removed")


class NoticeSettings(_Section):
    """Notices telling a patient that their record was read (content-free, grouped)."""

    access_period_hours: float = Field(
        24.0, gt=0, le=24 * 31, description="at most one notice of ordinary reads per patient in this period (the "
        "reads in between are counted in the next one); a patient may choose another frequency in the webmail. "
        "Emergency accesses are told at once")
    poll_seconds: float = Field(60.0, gt=0, le=3600, description="how often `gateway serve` looks for notices falling due")


class FilingSettings(_Section):
    """The DMP bridge's filing worker (gateway/dmp_bridge/worker.py)."""

    extract_processes: int = Field(
        0, ge=0, le=16, description="processes of their own that parse the delivered messages and extract their "
        "documents (a third of a filing's CPU), beside the server's process instead of under its one interpreter "
        "lock; 0 (the default): worker threads of the server's process. A process costs more CPU in all (the "
        "message goes over a pipe) and pays only where a core is free; measure before turning it on")


class WebmailSettings(_Section):
    """The patient webmail on the HTTPS listener: sessions, second factor, sign-in with OpenID Connect."""

    enabled: bool = Field(True, description="serve the patient webmail at the root of the HTTPS listener (beside the FHIR API)")
    session_idle_minutes: int = Field(
        15, ge=1, le=240, description="inactivity after which a webmail session ends (ANSSI: short on a shared device)")
    session_absolute_hours: float = Field(
        8.0, gt=0, le=72, description="longest life of a webmail session, however active, before signing in again")
    sign_in_pending_minutes: int = Field(
        5, ge=1, le=30, description="time allowed between the password and the second factor")
    totp_issuer: str = Field("MSSante patient", description="issuer shown by authenticator apps beside the account (RFC 6238 TOTP)")
    totp_valid_window: int = Field(
        1, ge=0, le=2, description="30-second TOTP steps accepted either side of now (RFC 6238 5.2: clock drift)")
    require_second_factor: bool = Field(
        True, description="a patient signing in with a password must enrol and then use TOTP (or a recovery code)")
    oidc_issuer: str = Field(
        "", description="OpenID Connect provider patients may sign in with (FranceConnect-style): its issuer URL. "
        "Empty: password sign-in only")
    oidc_client_id: str = Field("", description="this webmail's client id at that provider (the aud of its ID tokens)")
    oidc_client_secret: str = Field("", description="client secret for the token endpoint (client_secret_post); may be empty "
                                    "for a public client using PKCE only")
    oidc_scopes: list[str] = Field(["openid", "profile"], description="scopes asked for in the authorization request")
    oidc_ins_claim: str = Field(
        "ins", description="ID token claim holding the patient's INS (matched against the patient directory)")
    public_url: str = Field(
        "", description="the webmail's external base URL (redirect_uri for OpenID Connect is <public_url>/connexion/oidc/retour; "
        "access notices link to <public_url>/historique). Empty: https://<hostname>:<listen.http_port>")

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return check_oidc_url(value.strip())

    @model_validator(mode="after")
    def _oidc_complete(self) -> "WebmailSettings":
        if self.oidc_issuer and not self.oidc_client_id:
            raise ValueError("oidc_client_id is required when oidc_issuer is set")
        return self


class MetricsSettings(_Section):
    """Prometheus metrics, /health and /ready on a port of their own (plain HTTP: keep it on loopback
    or a management network)."""

    enabled: bool = Field(False, description="serve /metrics (Prometheus text format), /health and /ready")
    host: str = Field("127.0.0.1", description="address the metrics listener binds to (loopback unless a "
                      "management network is meant)")
    port: Port = Field(9464, description="port of the metrics listener")

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        return _check_port(value)


class ClusterSettings(_Section):
    """Several nodes on one PostgreSQL database (docs/DEPLOYMENT.md, "Several nodes"): every node shares the
    database, the spool (``smtp.spool_dir``) and the blob store; each names itself."""

    node_name: str = Field(
        "", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$|^$",
        description="this node's name, distinct on every node sharing a spool (its half-received messages live in "
        "<spool>/incoming/<node_name>, so no other node's start removes them). Empty: one node")
    claim_lease_seconds: int = Field(
        120, ge=5, le=3600, description="how long a node's claim on queued work (a local delivery) lasts: the "
        "work of a node that died is taken over by another once its claim is this old")
    blob_dir: str = Field(
        "", description="where message bodies and record documents are stored (encrypted): a directory every node "
        "shares. Empty: <data_dir>/blobs")


class Settings(_Section):
    data_dir: str = Field("./data", description="directory holding everything the gateway writes")
    hostname: str = Field("localhost", description="this gateway's host name: banners, Received headers, TLS certificate")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log verbosity")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one human-readable line per event; json: one JSON object per line (time, "
        "level, logger, event, fields), for a log collector")
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    directory: DirectorySettings = Field(default_factory=DirectorySettings)
    listen: ListenerSettings = Field(default_factory=ListenerSettings)
    pki: PkiSettings = Field(default_factory=PkiSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    dkim: DkimSettings = Field(default_factory=DkimSettings)
    smime: SmimeSettings = Field(default_factory=SmimeSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    webmail: WebmailSettings = Field(default_factory=WebmailSettings)
    notices: NoticeSettings = Field(default_factory=NoticeSettings)
    filing: FilingSettings = Field(default_factory=FilingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    # Derived paths: one place decides where each thing lives under data_dir.
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def blob_path(self) -> Path:
        return Path(self.cluster.blob_dir).expanduser().resolve() if self.cluster.blob_dir else self.data_path / "blobs"

    @property
    def pki_path(self) -> Path:
        return Path(self.pki.dir).expanduser().resolve() if self.pki.dir else self.data_path / "pki"

    @property
    def https_base_url(self) -> str:
        """Where users reach the webmail (the HTTPS listener's root), without a trailing slash."""
        return self.webmail.public_url.rstrip("/") or f"https://{self.hostname}:{self.listen.http_port}"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.data_path / 'gateway.db'}"


def _section_names() -> set[str]:
    return {
        name for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Turn GATEWAY_* variables into a nested dict; remember which variable set what."""
    sections = _section_names()
    top_level = set(Settings.model_fields) - sections
    values: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == "GATEWAY_CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if rest in top_level:
            path: tuple[str, ...] = (rest,)
        else:
            section, _, key = rest.partition("_")
            if section not in sections or not key:
                raise ConfigError(f"{var}: no such setting (sections: {', '.join(sorted(sections))})")
            path = (section, key)
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = _parse_env_value(raw, is_list=_is_list_setting(path))
        origins[path] = f"environment variable {var}"
    return values, origins


def _is_list_setting(path: tuple[str, ...]) -> bool:
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    field = model.model_fields.get(path[-1])
    return field is not None and get_origin(field.annotation) is list


def _parse_env_value(raw: str, *, is_list: bool = False) -> Any:
    """Environment values are TOML scalars or arrays when they parse as such, else strings.

    A list setting also takes what `gateway config describe` shows: comma-separated items
    (``GATEWAY_PKI_SERVER_NAMES=mx.example, imap.example``), or a JSON array; empty: no item.
    """
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not is_list or isinstance(value, list):
        return value
    if raw.strip().startswith("["):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw  # neither TOML nor JSON: validation names the key and shows the value
    return [item.strip() for item in raw.split(",") if item.strip()]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(
    config_file: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings from defaults, the TOML file, the environment and CLI overrides."""
    environ = os.environ if environ is None else environ
    file_path: Path | None = None
    if config_file is not None:
        file_path = Path(config_file)
    elif environ.get("GATEWAY_CONFIG"):
        file_path = Path(environ["GATEWAY_CONFIG"])
    else:
        guess_dir = data_dir or environ.get("GATEWAY_DATA_DIR")
        if guess_dir and (Path(guess_dir) / "gateway.toml").is_file():
            file_path = Path(guess_dir) / "gateway.toml"

    raw: dict[str, Any] = _read_toml(file_path) if file_path else {}
    env_values, origins = _env_overrides(environ)
    raw = _merge(raw, env_values)
    if overrides:
        raw = _merge(raw, dict(overrides))
    if data_dir is not None:
        raw["data_dir"] = str(data_dir)
        origins[("data_dir",)] = "--data-dir"
    if file_path and "data_dir" in raw and ("data_dir",) not in origins:
        # A relative data_dir in a file is relative to that file, not to the cwd.
        raw["data_dir"] = str((file_path.parent / raw["data_dir"]).resolve())

    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, file_path)) from None


# Keys that were replaced: refused with what to write instead (a silent fallback would hide the new semantics).
RETIRED_KEYS = {
    "smtp.auth_failures_before_lockout": "replaced by auth.failures_before_delay (per login and source address) and "
    "auth.source_failures_before_delay (per source address): one limiter for every door, which never locks a "
    "login for everyone",
    "smtp.auth_failure_window_seconds": "replaced by auth.forget_failures_after_minutes",
    "smtp.auth_lockout_seconds": "replaced by growing delays: auth.first_delay_seconds, doubling up to "
    "auth.max_delay_seconds",
}


def _describe(exc: ValidationError, origins: dict[tuple[str, ...], str], file_path: Path | None) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc)
        # An item of a list (loc ends with its index) comes from where the list was set.
        source = next((origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origins),
                      str(file_path) if file_path else "defaults")
        message = error["msg"]
        if error["type"] == "extra_forbidden" and key in RETIRED_KEYS:
            message = RETIRED_KEYS[key]
        elif error["type"] == "extra_forbidden":
            message = "unknown key (see config/gateway.toml for the documented keys)"
        given = error.get("input")
        shown = f" (got {given!r})" if given is not None and error["type"] != "extra_forbidden" and not isinstance(given, dict) else ""
        problems.append(f"{key}: {message}{shown} [from {source}]")
    return "invalid configuration: " + "; ".join(problems)


def describe_settings() -> list[tuple[str, Any, str]]:
    """(key, default, description) for every setting: the source of config/gateway.toml's comments."""
    rows: list[tuple[str, Any, str]] = []
    defaults = Settings()
    for name, field in Settings.model_fields.items():
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            for sub_name, sub_field in type(value).model_fields.items():
                rows.append((f"{name}.{sub_name}", getattr(value, sub_name), sub_field.description or ""))
        else:
            rows.append((name, value, field.description or ""))
    return rows


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_documented_toml() -> str:
    """config/gateway.toml: every key at its default, with its description above it.

    The committed file is this function's output (a test keeps them equal), so
    the documentation cannot drift from the code.
    """
    lines = [
        "# Secure health messaging gateway: configuration.",
        "# Every key, at its default, with what it does. Copy this file, keep the keys you change.",
        "# Environment overrides: GATEWAY_<KEY> for top-level keys, GATEWAY_<SECTION>_<KEY> in sections",
        "# (e.g. GATEWAY_DATABASE_URL). Generated by `gateway config describe --toml`.",
        "",
    ]
    current_section = ""
    for key, default, description in describe_settings():
        section, _, name = key.rpartition(".")
        if section != current_section:
            lines += ["", f"[{section}]"]
            current_section = section
        lines.append(f"# {description}")
        lines.append(f"{name} = {_toml_value(default)}")
    return "\n".join(lines).strip() + "\n"
