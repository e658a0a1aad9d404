# The aggregator as a container image. Agents run next to their data, not here.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/fedloop fedloop \
    && mkdir -p /var/lib/fedloop /etc/fedloop/certs && chown fedloop /var/lib/fedloop

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[postgres]' && rm -rf /src

COPY deploy/aggregator.toml /etc/fedloop/aggregator.toml

USER fedloop
VOLUME ["/var/lib/fedloop"]
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s \
    CMD python -c "import ssl,urllib.request as u; u.urlopen('https://127.0.0.1:8765/v1/health', context=ssl._create_unverified_context())"
ENTRYPOINT ["fedloop", "aggregator"]
CMD ["--config", "/etc/fedloop/aggregator.toml", "--log-format", "json"]
