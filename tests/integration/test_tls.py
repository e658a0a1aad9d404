"""TLS and mutual TLS with certificates from `fedloop certs`, with real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from checks import assert_globals_are_weighted_means
from harness import Server, env, start_agent

from fedloop.agent.client import tls_context


def test_mutual_tls_run(tmp_path: Path, agents: list[subprocess.Popen[bytes]]) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [sys.executable, "-m", "fedloop", "certs", "--out", str(certs), "--agent", "a0",
         "--agent", "a1"],
        capture_output=True, text=True, timeout=60, env=env(),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    server = Server(
        tmp_path,
        {
            "min_agents": 2,
            "rounds": 2,
            "tls_cert": str(certs / "server.crt"),
            "tls_key": str(certs / "server.key"),
            "tls_client_ca": str(certs / "ca.crt"),
        },
        tls=tls_context(certs / "ca.crt", certs / "agent-a0.crt", certs / "agent-a0.key"),
    )
    try:
        server.start()
        for name in ("a0", "a1"):
            agents.append(
                start_agent(
                    server,
                    name,
                    "engines:ShiftEngine",
                    "--ca-file",
                    str(certs / "ca.crt"),
                    "--cert",
                    str(certs / f"agent-{name}.crt"),
                    "--key",
                    str(certs / f"agent-{name}.key"),
                )
            )
        server.wait_for(lambda s: s["finished"], timeout=60)
        for process in agents:
            assert process.wait(timeout=30) == 0
        assert_globals_are_weighted_means(server.data_dir, 2)

        # Plain HTTP on the TLS port, a client that does not trust the CA, and a client
        # without a certificate are all turned away.
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + "/v1/status", timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/v1/status", timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/v1/status", timeout=5, verify=tls_context(certs / "ca.crt"))
    finally:
        server.stop()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from fedloop.config import load_config
    from fedloop.errors import ConfigError

    with pytest.raises(ConfigError, match="together"):
        load_config(None, tls_cert=str(tmp_path / "x.crt"))
