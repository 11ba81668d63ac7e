"""Configuration loading: presets, custom providers, environment overrides, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import ConfigError, load_config
from proxy.providers import Server

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_loads_with_presets() -> None:
    settings, path = load_config(ROOT / "config.example.toml")
    assert path == ROOT / "config.example.toml"
    gmail, o365 = settings.accounts
    assert gmail.server("imap") == Server("imap.gmail.com", 993, "implicit")
    assert gmail.token_url == "https://oauth2.googleapis.com/token"
    assert gmail.scopes == ["https://mail.google.com/"]
    assert o365.server("imap") == Server("outlook.office365.com", 993, "implicit")
    assert o365.server("smtp") == Server("smtp.office365.com", 587, "starttls")
    assert o365.token_url == "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    assert "offline_access" in (o365.scopes or [])


def test_custom_provider_and_case_insensitive_lookup(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
state_dir = "~/mp-state"
[[accounts]]
address = "Me@Example.org"
provider = "custom"
client_id = "c"
token_url = "http://127.0.0.1:8080/token"
scopes = []
imap_server = "mail.example.org:143"
imap_tls = "starttls"
""",
    )
    settings, _ = load_config(path)
    account = settings.account("me@EXAMPLE.org")
    assert account is not None and account.server("imap") == Server(
        "mail.example.org", 143, "starttls"
    )
    assert settings.state_dir == Path("~/mp-state").expanduser()


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[imap]\nlisten = "127.0.0.1:1143"\n')
    monkeypatch.setenv("MAILPROXY_IMAP__LISTEN", "127.0.0.1:2143")
    monkeypatch.setenv("MAILPROXY_LOG_LEVEL", "debug")
    settings, _ = load_config(path)
    assert settings.imap.listen == "127.0.0.1:2143"
    assert settings.log_level == "debug"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'log_level = "error"\n')
    monkeypatch.setenv("MAILPROXY_CONFIG", str(path))
    settings, used = load_config()
    assert used == path and settings.log_level == "error"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[imap]\nlisten = "nope"\n', "imap.listen: expected 'host:port', got 'nope'"),
        ('[imap]\nlisten = "127.0.0.1:99999"\n', "imap.listen: port 99999 is out of range"),
        ("lisen = 1\n", "lisen: unknown key (misspelt?)"),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "yahoo"\nclient_id = "x"\n',
            "accounts[0].provider (account 'a@b.c'): Input should be 'gmail', 'outlook', "
            "'office365' or 'custom'",
        ),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "custom"\nclient_id = "x"\n',
            "provider 'custom' needs token_url",
        ),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "custom"\nclient_id = "x"\nscopes = []\n'
            'token_url = "https://auth.example.com/token"\n',
            "provider 'custom' needs at least one of imap_server, pop3_server, smtp_server",
        ),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "custom"\nclient_id = "x"\nscopes = []\n'
            'imap_server = "h:993"\ntoken_url = "http://auth.example.com/token"\n',
            "must be an https:// URL (http:// only on loopback)",
        ),
        ('[[accounts]]\naddress = "a@b.c"\nprovider = "gmail"\n', "client_id is required"),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "office365"\nclient_id = "x"\n'
            'flow = "client_credentials"\n',
            "flow 'client_credentials' needs `tenant`",
        ),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "gmail"\nclient_id = "x"\n'
            'ca_file = "/nonexistent.pem"\n',
            "file '/nonexistent.pem' does not exist",
        ),
        (
            '[[accounts]]\naddress = "a@b.c"\nprovider = "gmail"\nclient_id = "x"\n'
            '[[accounts]]\naddress = "A@b.c"\nprovider = "gmail"\nclient_id = "x"\n',
            "account 'A@b.c' is listed twice",
        ),
        ("[imap\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message


def test_cli_exits_2_with_message_not_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[imap]\nlisten = "nope"\n')
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: invalid configuration" in err and "imap.listen" in err
    assert "Traceback" not in err and "pydantic" not in err


def test_named_config_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such file" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and "mailproxy 0.1.0" in capsys.readouterr().out
    for argv in (
        ["--help"],
        ["run", "--help"],
        ["password", "set", "--help"],
        ["token", "import", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_admin_listen_and_its_tls(tmp_path: Path) -> None:
    settings, _ = load_config(write(tmp_path, ""))
    assert settings.admin.listen == "127.0.0.1:8025" and settings.admin.tls == "auto"
    assert not settings.admin.use_tls  # loopback http stays the default
    settings, _ = load_config(write(tmp_path, '[admin]\nlisten = ""\n'))
    assert settings.admin.listen == "" and not settings.admin.use_tls
    for ok in ("localhost:8025", "[::1]:9000", "127.0.0.2:0"):
        settings, _ = load_config(write(tmp_path, f'[admin]\nlisten = "{ok}"\n'))
        assert settings.admin.listen == ok and not settings.admin.use_tls
        settings, _ = load_config(write(tmp_path, f'[admin]\nlisten = "{ok}"\ntls = true\n'))
        assert settings.admin.use_tls
    for lan in ("0.0.0.0:8025", "192.0.2.1:8025", "admin.example.org:443", "[::]:8025"):
        for tls in ("", "tls = true\n", 'tls = "auto"\n'):
            settings, _ = load_config(write(tmp_path, f'[admin]\nlisten = "{lan}"\n{tls}'))
            assert settings.admin.use_tls, (lan, tls)
        with pytest.raises(ConfigError, match=r"admin: listen = '.*' is not a loopback address "
                                              r"and tls = false: .* served over TLS only"):
            load_config(write(tmp_path, f'[admin]\nlisten = "{lan}"\ntls = false\n'))
    with pytest.raises(ConfigError, match=r"admin\.listen: expected 'host:port'"):
        load_config(write(tmp_path, '[admin]\nlisten = "8025"\n'))
    with pytest.raises(ConfigError, match=r"admin\.tls"):
        load_config(write(tmp_path, '[admin]\ntls = "sometimes"\n'))


def test_tls_keys_defaults_and_overrides(tmp_path: Path) -> None:
    settings, _ = load_config(write(tmp_path, ""))
    assert (settings.imap.tls_listen, settings.pop3.tls_listen, settings.smtp.tls_listen) == (
        "127.0.0.1:1993", "127.0.0.1:1995", "127.0.0.1:1465")
    for listener in (settings.imap, settings.pop3, settings.smtp):
        assert listener.require_tls == "auto" and listener.tls_min_version == "1.2"
        assert not listener.plain_requires_tls  # loopback
    assert settings.tls.cert_file is None and settings.tls.names == []
    ca = tmp_path / "c.pem"
    ca.write_text("x")
    settings, _ = load_config(write(tmp_path, f"""
[tls]
cert_file = "{ca}"
names = ["Printer.LAN", "192.168.1.5" , "fe80::1"]
[imap]
listen = "0.0.0.0:143"
tls_listen = ""
[pop3]
listen = "[::1]:110"
require_tls = true
tls_min_version = "1.0"
[smtp]
listen = "192.168.1.2:587"
require_tls = false
"""))
    assert settings.tls.cert_file == ca and settings.tls.key_file is None
    assert settings.tls.names == ["printer.lan", "192.168.1.5", "fe80::1"]
    assert settings.imap.tls_listen == "" and settings.imap.plain_requires_tls  # auto, off loopback
    assert settings.pop3.plain_requires_tls and settings.pop3.tls_min_version == "1.0"
    assert not settings.smtp.plain_requires_tls


@pytest.mark.parametrize("text, expected", [
    ('[imap]\ntls_listen = "nope"\n', "imap.tls_listen: expected 'host:port'"),
    ('[pop3]\nrequire_tls = "maybe"\n', "pop3.require_tls"),
    ('[smtp]\ntls_min_version = "1.4"\n', "smtp.tls_min_version: Input should be '1.0'"),
    ('[tls]\nnames = ["bad name"]\n', "tls.names[0]: expected a host name or an IP address"),
    ('[tls]\nnames = ["a.lan", "10.0.0.256"]\n', "tls.names[1]: expected a host name"),
    ('[tls]\ncert_file = "/nonexistent.pem"\n', "file '/nonexistent.pem' does not exist"),
])
def test_bad_tls_keys(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)


def test_tls_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILPROXY_IMAP__REQUIRE_TLS", "true")
    monkeypatch.setenv("MAILPROXY_SMTP__TLS_LISTEN", "")
    settings, _ = load_config(write(tmp_path, ""))
    assert settings.imap.require_tls is True and settings.smtp.tls_listen == ""
