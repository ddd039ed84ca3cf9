"""Settings: defaults, file, environment, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings, render_documented_toml

REPO = Path(__file__).resolve().parents[1]


def test_committed_config_file_documents_every_key() -> None:
    committed = (REPO / "config" / "gateway.toml").read_text()
    assert committed == render_documented_toml(), "regenerate: gateway config describe --toml > config/gateway.toml"


def test_committed_config_file_loads(tmp_path: Path) -> None:
    settings = load_settings(REPO / "config" / "gateway.toml", environ={})
    assert settings.listen.smtp_submission_port > 1024
    assert settings.data_path == (REPO / "config" / "data").resolve()  # relative to the file


def test_defaults_use_unprivileged_ports() -> None:
    settings = load_settings(environ={})
    listen = settings.listen
    assert min(listen.smtp_relay_port, listen.smtp_submission_port, listen.smtp_submissions_port,
               listen.imap_port, listen.imaps_port, listen.http_port) > 1024
    assert settings.database_url.startswith("sqlite+aiosqlite:///")


def test_environment_overrides(tmp_path: Path) -> None:
    settings = load_settings(environ={"GATEWAY_DATABASE_URL": "postgresql+asyncpg://u@h/db",
                                      "GATEWAY_LISTEN_IMAP_PORT": "3143", "GATEWAY_DATA_DIR": str(tmp_path),
                                      "GATEWAY_PKI_SERVER_NAMES": '["a.example", "b.example"]'})
    assert settings.database.url == "postgresql+asyncpg://u@h/db"
    assert settings.listen.imap_port == 3143
    assert settings.data_path == tmp_path.resolve()
    assert settings.pki.server_names == ["a.example", "b.example"]


def test_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('hostname = "mx.example"\n[listen]\nimap_port = 4143\n')
    settings = load_settings(config, environ={"GATEWAY_LISTEN_IMAP_PORT": "5143"})
    assert settings.hostname == "mx.example"
    assert settings.listen.imap_port == 5143


@pytest.mark.parametrize("toml, environ, message", [
    ("[listen]\nimap_port = 70000\n", {}, r"listen\.imap_port: .*65535.*\(got 70000\).*gateway\.toml"),
    ("[listen]\nimap_prot = 1\n", {}, r"listen\.imap_prot: unknown key"),
    ("[database]\nurl = \"mysql://x\"\n", {}, r"database\.url: .*sqlite\+aiosqlite"),
    ("", {"GATEWAY_LISTEN_IMAP_PORT": "abc"}, r"listen\.imap_port: .*environment variable GATEWAY_LISTEN_IMAP_PORT"),
    ("", {"GATEWAY_NOPE_X": "1"}, r"GATEWAY_NOPE_X: no such setting"),
    ("log_level = \"LOUD\"\n", {}, r"log_level: "),
    ("[listen\n", {}, r"not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path: Path, toml: str, environ: dict[str, str], message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ=environ)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
