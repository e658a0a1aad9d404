"""Run the aggregator's ASGI app on uvicorn, with the user's mistakes turned into sentences."""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
import ssl

import uvicorn

from fedloop.aggregator import guard
from fedloop.aggregator.app import create_app
from fedloop.config import AggregatorConfig
from fedloop.errors import ConfigError


def check_port(host: str, port: int) -> None:
    """Raise a ConfigError if `host:port` cannot be bound (in use, or not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use; stop what runs there or pass --port"
                ) from exc
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pass --host"
            ) from exc


def event_loop_and_parser() -> tuple[str, str]:
    """Return uvicorn's `loop` and `http` settings: uvloop and httptools where installed.

    Both are C implementations (libuv sockets, llhttp parsing) of what asyncio and h11 do in
    Python; they are plain dependencies of fedloop, but a machine without a wheel for them
    still runs on asyncio and h11, only slower (docs/performance.md, third pass).
    """
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return loop, http


def connection_limits(config: AggregatorConfig) -> guard.ConnectionLimits:
    """Return the limits on each connection that `config` sets (docs/security.md)."""
    return guard.ConnectionLimits(
        max_head_bytes=config.max_header_bytes,
        head_timeout=config.header_timeout,
        body_idle_timeout=config.body_idle_timeout,
        max_connections=config.max_connections or guard.default_max_connections(),
    )


def serve(config: AggregatorConfig) -> None:
    """Serve until interrupted."""
    check_port(config.host, config.port)
    app = create_app(config)
    loop, http = event_loop_and_parser()
    limits = connection_limits(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop=loop,
            # With httptools, large request bodies are read straight into their buffers, and
            # each connection is held to `limits` (h11 only caps a head's size, below).
            http=guard.protocol_class(limits) if http == "httptools" else http,
            h11_max_incomplete_event_size=config.max_header_bytes,
            log_level=config.log_level,
            access_log=False,
            lifespan="on",
            timeout_keep_alive=30,
            ws_max_size=1024 * 1024,
            # Push messages are a few dozen bytes of JSON: compressing them saves nothing and
            # costs a zlib state pair (~40 KB) per connected agent, 20 MB for 500 agents.
            ws_per_message_deflate=False,
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
            ssl_ca_certs=str(config.tls_client_ca) if config.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
        )
    )
    logging.getLogger("fedloop").info(
        "aggregator listening on %s://%s:%d (data in %s)%s",
        "https" if config.tls_cert else "http",
        config.host,
        config.port,
        config.data_dir,
        " with mutual TLS" if config.tls_client_ca else "",
    )
    logging.getLogger("fedloop").debug("event loop %s, HTTP parser %s", loop, http)
    server.run()
