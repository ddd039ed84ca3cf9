"""Settings: defaults, file, environment, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, describe_settings, load_settings, render_documented_toml

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


def _describe(columns: int) -> str:
    from tests.harness import run_cli
    result = run_cli("config", "describe", env=os.environ | {"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_settings_accept_what_describe_shows_and_json() -> None:
    """Every list setting: the value `config describe` prints, given back in the environment, is that value."""
    text = _describe(100)
    defaults = Settings()
    lists = [(key, default) for key, default, _ in describe_settings() if isinstance(default, list)]
    assert lists, "no list setting to check"
    for key, default in lists:
        shown = next(line for line in text.splitlines() if line.startswith(f"{key} = ")).split(" = ", 1)[1]
        variable = "GATEWAY_" + key.replace(".", "_").upper()
        section, name = key.split(".")
        if default:  # an empty default is shown as (empty)
            parsed = load_settings(environ={variable: shown})
            assert getattr(getattr(parsed, section), name) == getattr(getattr(defaults, section), name), key
    environ = {"GATEWAY_PKI_SERVER_NAMES": "mx.example, imap.example",
               "GATEWAY_OUTBOUND_RETRY_SCHEDULE_MINUTES": "1, 2.5,10",
               "GATEWAY_SMTP_DISABLED_EXTENSIONS": "",
               "GATEWAY_OUTBOUND_TRANSPORT_MAP": '["a.example=mx.a.example:2525", "b.example=mx.b.example"]'}
    settings = load_settings(environ=environ)
    assert settings.pki.server_names == ["mx.example", "imap.example"]
    assert settings.outbound.retry_schedule_minutes == [1.0, 2.5, 10.0]
    assert settings.smtp.disabled_extensions == []
    assert settings.outbound.transport_map == ["a.example=mx.a.example:2525", "b.example=mx.b.example"]
    with pytest.raises(ConfigError, match=r"outbound\.retry_schedule_minutes.*GATEWAY_OUTBOUND_RETRY_SCHEDULE_MINUTES"):
        load_settings(environ={"GATEWAY_OUTBOUND_RETRY_SCHEDULE_MINUTES": "soon, later"})


def test_describe_fits_the_terminal_and_names_the_variables() -> None:
    text = _describe(60)
    described = [line for line in text.splitlines() if line.startswith("    ") and not line.startswith("    env: ")]
    assert described and all(len(line) <= 60 for line in described)
    assert "    env: GATEWAY_SMTP_MAX_MESSAGE_SIZE" in text
    assert "--toml" in text and "--json" in text


def test_config_check_masks_the_database_password_and_the_client_secret(tmp_path: Path) -> None:
    from tests.harness import run_cli
    env = {**os.environ, "GATEWAY_DATABASE_URL": "postgresql+asyncpg://gateway:s3cr3t-pw@db.example:5432/gateway",
           "GATEWAY_WEBMAIL_OIDC_CLIENT_SECRET": "client-s3cr3t"}
    for args in (("config", "check"), ("config", "check", "--json")):
        shown = run_cli(*args, data_dir=tmp_path, env=env, check=True).stdout
        assert "s3cr3t" not in shown and "db.example:5432/gateway" in shown and "***" in shown
