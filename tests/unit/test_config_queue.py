"""Configuration of devices, delivery modes, the queue and sending limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.queue.service import limits_of

ACCOUNTS = """
[[accounts]]
address = "Office@Example.com"
provider = "office365"
client_id = "x"

[[accounts]]
address = "me@gmail.com"
provider = "gmail"
client_id = "y"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings, _ = load_config(write(tmp_path, f'state_dir = "{tmp_path}"\n' + ACCOUNTS))
    assert settings.smtp.delivery == "relay"
    assert settings.queue_dir == tmp_path / "queue"
    assert settings.queue.lifetime == 5 * 86400 and settings.queue.max_backoff == 3600
    assert settings.queue.max_size == 1024**3
    assert settings.devices == []
    office, gmail = settings.accounts
    assert (office.max_messages_per_minute, office.max_messages_per_day,
            office.max_recipients_per_day) == (30, None, 10000)
    assert (gmail.max_messages_per_minute, gmail.max_messages_per_day,
            gmail.max_recipients_per_day) == (None, 2000, None)


def test_outlook_preset_limits(tmp_path: Path) -> None:
    text = f'state_dir = "{tmp_path}"\n' + """
[[accounts]]
address = "me@outlook.com"
provider = "outlook"
client_id = "x"

[[accounts]]
address = "free@hotmail.com"
provider = "outlook"
client_id = "x"
max_recipients_per_day = 300
"""
    subscriber, free = load_config(write(tmp_path, text))[0].accounts
    # Outlook.com's published daily recipients; no per-minute or message count published.
    assert (subscriber.max_messages_per_minute, subscriber.max_messages_per_day,
            subscriber.max_recipients_per_day) == (None, None, 5000)
    assert subscriber.smtp_max_recipients == 100
    assert free.max_recipients_per_day == 300  # a free account's lower limit, set by hand
    assert limits_of(free).recipients_per_day == 300
    assert limits_of(subscriber).messages_per_minute is None


def test_devices_queue_and_units(tmp_path: Path) -> None:
    text = ACCOUNTS + """
max_messages_per_minute = 0

[smtp]
delivery = "queue"

[queue]
dir = "~/spool"
lifetime = "2d"
max_backoff = "30m"
max_size = "500M"
min_free = 0

[[devices]]
name = "scanner"
networks = ["192.168.1.20", "10.0.0.0/8", "fd00::/8"]
account = "office@example.com"

[[devices]]
name = "erp"
networks = ["192.168.2.0/24"]
account = "me@gmail.com"
senders = ["erp@gmail.com", "me@gmail.com"]
delivery = "relay"
"""
    settings, _ = load_config(write(tmp_path, text))
    assert settings.smtp.delivery == "queue"
    assert settings.queue_dir == Path("~/spool").expanduser()
    assert (settings.queue.lifetime, settings.queue.max_backoff) == (2 * 86400, 1800)
    assert settings.queue.max_size == 500 * 1024**2 and settings.queue.min_free == 0
    assert settings.accounts[1].max_messages_per_minute == 0  # 0 turns the preset off
    scanner, erp = settings.devices
    assert scanner.networks == ["192.168.1.20/32", "10.0.0.0/8", "fd00::/8"]
    assert scanner.senders == ["Office@Example.com"]  # default: the account's address
    assert scanner.delivery == "queue" and erp.delivery == "relay"
    assert scanner.allows_sender("office@example.COM")
    assert not scanner.allows_sender("someone@example.com")
    assert settings.device_for("10.1.2.3") is scanner
    assert settings.device_for("::ffff:192.168.1.20") is scanner  # IPv4 on a dual stack
    assert settings.device_for("fd00::5") is scanner
    assert settings.device_for("192.168.2.7") is erp
    assert settings.device_for("192.168.1.21") is None
    assert settings.device_for("not an address") is None


@pytest.mark.parametrize("text, expected", [
    ('[[devices]]\nname = "p"\nnetworks = ["10.0.0.0/33"]\naccount = "me@gmail.com"\n',
     "devices[0].networks (device 'p'): '10.0.0.0/33' is not an IP address or network"),
    ('[[devices]]\nname = "p"\nnetworks = []\naccount = "me@gmail.com"\n',
     "list at least one address or network"),
    ('[[devices]]\nname = "p"\nnetworks = ["10.0.0.1"]\naccount = "other@gmail.com"\n',
     "device 'p': account 'other@gmail.com' is not one of the [[accounts]] addresses"),
    ('[[devices]]\nname = "p"\nnetworks = ["10.0.0.1"]\naccount = "me@gmail.com"\n'
     'senders = ["not-an-address"]\n', "expected an e-mail address, got 'not-an-address'"),
    ('[[devices]]\nname = "p"\nnetworks = ["10.0.0.1"]\naccount = "me@gmail.com"\n'
     'delivery = "store"\n', "devices[0].delivery (device 'p'): Input should be 'relay' or"),
    ('[[devices]]\nname = "p"\nnetworks = ["10.0.0.1"]\naccount = "me@gmail.com"\n'
     '[[devices]]\nname = "P"\nnetworks = ["10.0.0.2"]\naccount = "me@gmail.com"\n',
     "device 'P' is listed twice"),
    ('[smtp]\ndelivery = "later"\n', "smtp.delivery: Input should be 'relay' or 'queue'"),
    ('[queue]\nlifetime = "5 weeks"\n', "queue.lifetime: expected seconds or a duration"),
    ('[queue]\nmax_backoff = 0\n', "queue.max_backoff: Input should be greater than 0"),
    ('[queue]\nmax_size = "lots"\n', "queue.max_size: expected bytes or a size"),
    ('[queue]\nmax_size = -1\n', "queue.max_size: Input should be greater than or equal to 0"),
])
def test_bad_queue_and_device_config(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, ACCOUNTS + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_example_config_documents_the_keys() -> None:
    root = Path(__file__).resolve().parents[2]
    example = (root / "config.example.toml").read_text()
    for key in ("[queue]", "lifetime", "max_backoff", "max_size", "[[devices]]", "networks",
                "senders", "delivery", "max_messages_per_minute", "max_recipients_per_day"):
        assert key in example
    settings, _ = load_config(root / "config.example.toml")
    assert settings.smtp.delivery == "relay"
