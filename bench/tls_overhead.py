"""Seconds per round with and without TLS, mutual TLS and bearer tokens: real processes.

    python bench/tls_overhead.py --agents 10 --model-mb 4 --rounds 10

For each mode, starts a real `fedloop aggregator` and N real `fedloop agent
fedloop.ml.noop:NoopEngine --set model_mb=M` processes on loopback (training returns the global
model unchanged, so what is measured is transport, storage and scheduling), runs R timed rounds
and prints one JSON line: seconds per round (median, p90, max; round 1, which includes start-up
and registration, is left out), the aggregator's CPU seconds per timed round, and the overhead
ratio of the median against plain HTTP. Modes:

    plain      HTTP, no tokens
    auth       HTTP, auth = true (enrollment tokens, then per-agent credentials)
    tls        HTTPS (certificates from fedloop.security.certs, as `fedloop certs` makes)
    mtls       HTTPS with client certificates (tls_client_ca)
    mtls_auth  mutual TLS and tokens: the deploy configuration

`--repeat K` runs the whole list of modes K times, interleaved, and pools the rounds of each
mode, so that a load change on a shared machine hits every mode alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedloop.agent.client import tls_context
from fedloop.demo import free_port, wait_until_up, write_config
from fedloop.security import tokens
from fedloop.security.certs import make_dev_pki
from fedloop.store.db import Store, database_url

MODES = ("plain", "auth", "tls", "mtls", "mtls_auth")


@dataclass(frozen=True)
class Mode:
    name: str
    tls: bool
    mutual: bool
    auth: bool


def mode(name: str) -> Mode:
    """Return what mode ``name`` turns on."""
    if name not in MODES:
        raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    return Mode(name, tls=name != "plain" and name != "auth", mutual="mtls" in name,
                auth="auth" in name)  # fmt: skip


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


@dataclass
class Result:
    per_round: list[float] = field(default_factory=list)
    aggregator_cpu_s: float = 0.0
    all_cpu_s: float = 0.0
    wall_s: float = 0.0
    cipher: str | None = None


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def negotiated_cipher(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        name, version, _ = tls.cipher() or ("?", "?", 0)
        return f"{version} {name}"


def run_mode(m: Mode, root: Path, certs: Path, args: argparse.Namespace) -> Result:
    """Run one aggregator and args.agents agents in mode ``m``; return the timed rounds."""
    root.mkdir(parents=True)
    (root / "data").mkdir()
    port = free_port()
    data = root / "data"
    names = [f"b{i}" for i in range(args.agents)]
    settings: dict[str, Any] = {
        "rounds": args.rounds + 1,
        "min_agents": args.agents,
        "log_level": "warning",
    }
    client: ssl.SSLContext | None = None
    agent_args: dict[str, list[str]] = {name: [] for name in names}
    if m.tls:
        settings["tls_cert"] = str(certs / "server.crt")
        settings["tls_key"] = str(certs / "server.key")
        client = tls_context(certs / "ca.crt")
        for name in names:
            agent_args[name] += ["--ca-file", str(certs / "ca.crt")]
    if m.mutual:
        settings["tls_client_ca"] = str(certs / "ca.crt")
        client = tls_context(certs / "ca.crt", certs / "agent-b0.crt", certs / "agent-b0.key")
        for name in names:
            agent_args[name] += [
                *("--cert", str(certs / f"agent-{name}.crt")),
                *("--key", str(certs / f"agent-{name}.key")),
            ]
    if m.auth:
        settings["auth"] = True
        store = Store(database_url(data, None))  # creates and migrates the database
        try:
            for name in names:
                secret = tokens.new_secret(tokens.ENROLLMENT_PREFIX)
                store.add_token(tokens.ENROLLMENT, name, tokens.hash_secret(secret))
                agent_args[name] += ["--token", secret]
        finally:
            store.close()
    url = f"{'https' if m.tls else 'http'}://127.0.0.1:{port}"
    config = write_config(root / "aggregator.toml", port, data, **settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedloop"]
    result = Result()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(root / "aggregator.log", "wb") as log:
        server = subprocess.Popen(
            [*cmd, "aggregator", "--config", str(config)], stdout=log, stderr=log, env=env
        )
    agents: list[subprocess.Popen[bytes]] = []
    try:
        wait_until_up(url, server, verify=client or True)
        if client is not None:
            result.cipher = negotiated_cipher(port, client)
        for name in names:
            command = [
                *cmd, "agent", "fedloop.ml.noop:NoopEngine", "--url", url, "--name", name,
                "--workdir", str(root / name), "--set", f"model_mb={args.model_mb}",
                *agent_args[name],
            ]  # fmt: skip
            with open(root / f"{name}.log", "wb") as log:
                agents.append(subprocess.Popen(command, stdout=log, stderr=log, env=env))
        cpu_at_round_2: float | None = None
        with httpx.Client(verify=client or True, timeout=30) as http:
            while True:
                status = http.get(f"{url}/v1/status").json()
                if cpu_at_round_2 is None and status["round"] >= 2:
                    cpu_at_round_2 = cpu_seconds(server.pid)
                if status["finished"]:
                    cpu_end = cpu_seconds(server.pid)
                    break
                if time.monotonic() - started > args.timeout:
                    raise SystemExit(f"{m.name}: timed out; logs in {root}")
                if server.poll() is not None:
                    raise SystemExit(f"{m.name}: the aggregator exited; logs in {root}")
                time.sleep(0.25)  # each poll costs the aggregator a request (a TLS one here)
        for agent in agents:
            if agent.wait(timeout=60) != 0:
                raise SystemExit(f"{m.name}: an agent failed; logs in {root}")
    finally:
        for process in [*agents, server]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
    result.wall_s = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.all_cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (
        cpu_before.ru_utime + cpu_before.ru_stime
    )
    store = Store(database_url(data, None))
    created = [g.created_at for g in store.global_models()]
    store.close()
    # Round 1 includes start-up and registration: time rounds 2.. only.
    result.per_round = [b - a for a, b in itertools.pairwise(created[1:])]
    result.aggregator_cpu_s = cpu_end - (cpu_at_round_2 or cpu_end)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--model-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per mode and repeat")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {MODES}")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mode run")
    args = parser.parse_args()
    modes = [mode(name) for name in args.modes.split(",") if name]

    top = Path(tempfile.mkdtemp(prefix="fedloop-tls-bench-"))
    certs = top / "certs"
    make_dev_pki(certs, ["127.0.0.1", "localhost"], [f"b{i}" for i in range(args.agents)])
    results: dict[str, list[Result]] = {m.name: [] for m in modes}
    for k, m in itertools.product(range(args.repeat), modes):
        results[m.name].append(run_mode(m, top / f"{m.name}-{k}", certs, args))

    pooled = {name: sorted(x for r in runs for x in r.per_round) for name, runs in results.items()}
    medians = {name: statistics.median(per_round) for name, per_round in pooled.items()}
    plain = medians.get("plain")
    for m in modes:
        runs, per_round = results[m.name], pooled[m.name]
        timed = len(per_round)
        overhead = None if plain is None else round(medians[m.name] / plain, 3)
        print(
            json.dumps(
                {
                    "bench": "tls_overhead",
                    "mode": m.name,
                    "tls": m.tls,
                    "mutual_tls": m.mutual,
                    "auth": m.auth,
                    "cipher": runs[0].cipher,
                    "agents": args.agents,
                    "model_mb": args.model_mb,
                    "repeats": len(runs),
                    "rounds_timed": timed,
                    "seconds_per_round_median": round(medians[m.name], 4),
                    "seconds_per_round_p90": round(percentile(per_round, 0.9), 4),
                    "seconds_per_round_max": round(per_round[-1], 4),
                    "overhead_vs_plain": overhead,
                    "aggregator_cpu_s_per_round": round(
                        sum(r.aggregator_cpu_s for r in runs) / timed, 4
                    ),
                    "all_processes_cpu_s": round(sum(r.all_cpu_s for r in runs), 2),
                    "wall_s": round(sum(r.wall_s for r in runs), 1),
                    "cpu_count": os.cpu_count(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
