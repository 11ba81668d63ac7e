"""The container image, built from the Dockerfile and run for real with podman: non-root,
read-only root file system, state in a volume, a legacy IMAP client logging in through it, and
its HEALTHCHECK (``mailproxy health``) passing.

The image comes from ``.ci/build-image`` (mmdebstrap base + podman build); ``.ci/run`` builds it
once and passes its tag in ``CONTAINER_TEST_IMAGE``. Without podman the test is skipped locally
and fails when ``CI`` is set.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import _require
from tests.support.clirun import ROOT
from tests.support.dovecot import Dovecot, free_port
from tests.support.tokenserver import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TokenServer

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN = ["--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
CONTAINER_UID = 10001  # the image's mailproxy user


@pytest.fixture(scope="module")
def image() -> str:
    tag = os.environ.get("CONTAINER_TEST_IMAGE")
    if tag:
        return tag
    _require(shutil.which("podman") is not None and shutil.which("mmdebstrap") is not None,
             "podman and mmdebstrap are needed to build and run the image")
    done = subprocess.run([str(ROOT / ".ci" / "build-image"), "localhost/mailproxy:test"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    # Not under pytest's 0700 tmp dir alone: the container's user must own its state.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, CONTAINER_UID, CONTAINER_UID)
    yield state


def podman_run(image: str, config: Path, state: Path, dovecot: Dovecot, *args: str,
               stdin: str | None = None, detach: bool = False, name: str | None = None,
               ) -> subprocess.CompletedProcess[str]:
    cmd = [*PODMAN, "run", "--rm", *RUN, "--read-only",
           "-v", f"{state}:/var/lib/mailproxy",
           "-v", f"{config}:/etc/mailproxy/config.toml:ro",
           "-v", f"{dovecot.ca_file}:{dovecot.ca_file}:ro"]
    if stdin is not None:
        cmd.append("-i")
    if detach:
        cmd.append("-d")
    if name:
        cmd += ["--name", name]
    cmd += [image, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_image_serves_a_legacy_client_read_only_as_non_root(
        image: str, tmp_path: Path, volume: Path, token_server: TokenServer, dovecot: Dovecot,
        mail_user: str) -> None:
    imap_port = free_port()
    config = tmp_path / "config.toml"
    # Inside the container the listeners bind all addresses (the image's defaults); here, with
    # the host's network, each test picks free loopback ports instead.
    config.write_text(f"""
[imap]
listen = "127.0.0.1:{imap_port}"
[pop3]
listen = "127.0.0.1:{free_port()}"
[smtp]
listen = "127.0.0.1:{free_port()}"
[[accounts]]
address = "{mail_user}"
provider = "custom"
client_id = "{TEST_CLIENT_ID}"
client_secret = "{TEST_CLIENT_SECRET}"
token_url = "{token_server.token_url}"
scopes = ["mail"]
imap_server = "{dovecot.host}:{dovecot.imaps_port}"
imap_tls = "implicit"
ca_file = "{dovecot.ca_file}"
""")
    config.chmod(0o644)
    env_listen = {"MAILPROXY_IMAP__LISTEN": f"127.0.0.1:{imap_port}",
                  "MAILPROXY_POP3__LISTEN": f"127.0.0.1:{free_port()}",
                  "MAILPROXY_SMTP__LISTEN": f"127.0.0.1:{free_port()}",
                  **{f"MAILPROXY_{p}__TLS_LISTEN": f"127.0.0.1:{free_port()}"
                     for p in ("IMAP", "POP3", "SMTP")}}
    rt = token_server.authority.issue_refresh_token(mail_user, TEST_CLIENT_ID)

    who = podman_run(image, config, volume, dovecot, "--version")
    assert who.returncode == 0, who.stderr

    done = podman_run(image, config, volume, dovecot, "token", "import", mail_user,
                      stdin=f"{rt}\nlocal pw\n")
    assert done.returncode == 0, done.stderr
    files = [p for p in volume.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_uid == CONTAINER_UID for p in files), \
        "the state must belong to the image's non-root user"

    name = f"mailproxy-test-{imap_port}"
    cmd_env = [x for k, v in env_listen.items() for x in ("-e", f"{k}={v}")]
    started = subprocess.run(
        [*PODMAN, "run", "-d", "--rm", *RUN, "--read-only", "--name", name, *cmd_env,
         "-v", f"{volume}:/var/lib/mailproxy",
         "-v", f"{config}:/etc/mailproxy/config.toml:ro",
         "-v", f"{dovecot.ca_file}:{dovecot.ca_file}:ro", image, "run"],
        capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    logs = subprocess.run([*PODMAN, "logs", name], capture_output=True,
                                          text=True)
                    pytest.fail(f"the container never listened: {logs.stderr}")
                time.sleep(0.2)
        with imap:
            assert imap.login(mail_user, "local pw")[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"
        # The image's HEALTHCHECK (`mailproxy health`: the status socket, metrics being off).
        health = subprocess.run([*PODMAN, "healthcheck", "run", name], capture_output=True,
                                text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        health = subprocess.run([*PODMAN, "exec", name, "mailproxy", "health"],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0 and health.stdout == "ok\n", health.stderr
        user = subprocess.run([*PODMAN, "exec", name, "id", "-u"], capture_output=True,
                              text=True, timeout=30)
        assert user.stdout.strip() == str(CONTAINER_UID)
        touched = subprocess.run([*PODMAN, "exec", name, "touch", "/opt/x"],
                                 capture_output=True, text=True, timeout=30)
        assert touched.returncode != 0 and "Read-only" in touched.stderr
    finally:
        stopped = subprocess.run([*PODMAN, "stop", "-t", "20", name], capture_output=True,
                                 text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
