"""The container's entry command and config, run as a plain process (no Docker engine here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from harness import env

from fedloop.agent.client import tls_context
from fedloop.demo import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]


def _instruction(dockerfile: str, name: str) -> list[str]:
    match = re.search(rf"^{name}\s+(\[.*\])\s*$", dockerfile, re.MULTILINE)
    assert match, f"no {name} in Dockerfile"
    value: list[str] = json.loads(match.group(1))
    return value


def test_image_entry_command_serves_mutual_tls(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint, cmd = _instruction(dockerfile, "ENTRYPOINT"), _instruction(dockerfile, "CMD")
    assert entrypoint[0] == "fedloop"
    baked = "/etc/fedloop/aggregator.toml"
    assert f"COPY deploy/aggregator.toml {baked}" in dockerfile
    command = [sys.executable, "-m", "fedloop", *entrypoint[1:]]
    command += [str(ROOT / "deploy" / "aggregator.toml") if a == baked else a for a in cmd]

    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, "-m", "fedloop", "certs", "--out", str(certs), "--agent", "site-a"],
        check=True, capture_output=True, timeout=60, env=env(),
    )  # fmt: skip
    port = free_port()
    overrides = {  # what compose.yaml and the volume mounts provide in the container
        "FEDLOOP_HOST": "127.0.0.1",
        "FEDLOOP_PORT": str(port),
        "FEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "FEDLOOP_TLS_CERT": str(certs / "server.crt"),
        "FEDLOOP_TLS_KEY": str(certs / "server.key"),
        "FEDLOOP_TLS_CLIENT_CA": str(certs / "ca.crt"),
    }
    with open(tmp_path / "aggregator.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env(**overrides))
    url = f"https://127.0.0.1:{port}"
    client = tls_context(certs / "ca.crt", certs / "agent-site-a.crt", certs / "agent-site-a.key")
    try:
        wait_until_up(url, process, verify=client)
        status = httpx.get(f"{url}/v1/status", verify=client, timeout=10).json()
        assert status["strategy"] == "fedavg" and status["registered_agents"] == 0
        with pytest.raises(httpx.HTTPError):  # no client certificate: refused
            httpx.get(f"{url}/v1/status", verify=tls_context(certs / "ca.crt"), timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=10)
    lines = (tmp_path / "aggregator.log").read_text().splitlines()
    assert any(
        json.loads(line).get("logger") == "fedloop" for line in lines if line.startswith("{")
    )
