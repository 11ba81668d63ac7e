# mailproxy in a container: non-root, state in a volume, read-only root file system.
# The base is a build argument so the image also builds from a locally made Debian base
# (CI: mmdebstrap + podman import, no registry needed).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# A virtual environment: Debian's python3 refuses a system-wide pip install (PEP 668).
RUN python3 -m venv /opt/mailproxy \
    && useradd --system --uid 10001 --home-dir /var/lib/mailproxy --create-home mailproxy \
    && chmod 0700 /var/lib/mailproxy
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN /opt/mailproxy/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && rm -rf /src

USER mailproxy
WORKDIR /var/lib/mailproxy
ENV PATH=/opt/mailproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    MAILPROXY_STATE_DIR=/var/lib/mailproxy \
    MAILPROXY_CONFIG=/etc/mailproxy/config.toml \
    MAILPROXY_IMAP__LISTEN=0.0.0.0:1143 \
    MAILPROXY_POP3__LISTEN=0.0.0.0:1110 \
    MAILPROXY_SMTP__LISTEN=0.0.0.0:1587 \
    MAILPROXY_IMAP__TLS_LISTEN=0.0.0.0:1993 \
    MAILPROXY_POP3__TLS_LISTEN=0.0.0.0:1995 \
    MAILPROXY_SMTP__TLS_LISTEN=0.0.0.0:1465 \
    MAILPROXY_IMAP__REQUIRE_TLS=false \
    MAILPROXY_POP3__REQUIRE_TLS=false \
    MAILPROXY_SMTP__REQUIRE_TLS=false
VOLUME ["/var/lib/mailproxy"]
EXPOSE 1143 1110 1587 1993 1995 1465
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s CMD ["mailproxy", "health"]
# The plain listeners are not on loopback inside the container, so they take passwords only
# after STARTTLS (require_tls = "auto"); the CA to trust: docker exec ... mailproxy tls export-ca
ENTRYPOINT ["mailproxy"]
CMD ["run"]
