"""A real headless browser for the admin page tests: Debian's chromium and chromium-driver
driven by Selenium (browsers cannot be downloaded here, so Selenium Manager is never asked)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1440,900",
                  "--lang=en-US")


def chromium_paths() -> tuple[str | None, str | None]:
    return (shutil.which("chromium") or shutil.which("chromium-browser"),
            shutil.which("chromedriver"))


def browser_available() -> tuple[bool, str]:
    chromium, driver = chromium_paths()
    if chromium is None or driver is None:
        return False, "chromium and chromium-driver are not installed (apt-get install them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False, "selenium is not installed (pip install -e '.[test]')"
    return True, ""


def start_chromium(profile: Path | None = None,  # type: ignore[no-untyped-def]
                   flags: tuple[str, ...] = ()):
    """A fresh headless Chromium with its own profile directory (and ``flags`` besides the
    usual ones); the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = chromium_paths()
    assert chromium and driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, *flags):
        options.add_argument(flag)
    directory = profile or Path(tempfile.mkdtemp(prefix="mailproxy-chromium-"))
    options.add_argument(f"--user-data-dir={directory}")
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.set_page_load_timeout(30)
    return browser
