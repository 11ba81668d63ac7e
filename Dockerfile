FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/mailproxy --create-home mailproxy \
    && chmod 0700 /var/lib/mailproxy
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && rm -rf /src

USER mailproxy
ENV MAILPROXY_STATE_DIR=/var/lib/mailproxy \
    MAILPROXY_CONFIG=/etc/mailproxy/config.toml \
    MAILPROXY_IMAP__LISTEN=0.0.0.0:1143 \
    MAILPROXY_POP3__LISTEN=0.0.0.0:1110 \
    MAILPROXY_SMTP__LISTEN=0.0.0.0:1587
VOLUME ["/var/lib/mailproxy"]
EXPOSE 1143 1110 1587
# Publish the ports on the host's loopback only: docker run -p 127.0.0.1:1143:1143 ...
ENTRYPOINT ["mailproxy"]
CMD ["run"]
