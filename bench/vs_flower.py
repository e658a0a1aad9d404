"""fedloop vs Flower: seconds per round and server peak memory on the same no-training workload.

    python bench/vs_flower.py --quick                       # N ∈ {2, 10}, 4 MB, sim + deploy
    python bench/vs_flower.py                               # every case that fits
    python bench/vs_flower.py --cases 'deploy:100:*,sim:*:100' --rounds 5
    python bench/vs_flower.py --flower-venv /tmp/fedloop-bench-flower   # (the default)
    python bench/vs_flower.py --cases 'deploy:*:4' --distinct            # local models differ
    python bench/vs_flower.py --cases 'deploy:2:4' --rounds 30 --repeat 6  # 6 runs, ABBA
    python bench/vs_flower.py --cases 'deploy:*:4' --flower-runtime deployment  # SuperLink

Cases are MODE:AGENTS:MODEL_MB with MODE ∈ {sim, deploy}, AGENTS ∈ {2, 10, 100}, MODEL_MB ∈
{4, 100}; `*` matches anything. Every case runs both systems, one after the other, each in fresh
processes, and prints one JSON line: both systems' seconds per round (median over rounds 2..R;
round 1 includes start-up and registration), the server's peak RSS (VmHWM from
/proc/PID/status), `ratio` = flower_seconds / fedloop_seconds and `memory_ratio` =
flower_mb / fedloop_mb. A case that cannot run here is printed with `skipped` and the reason;
a run that fails is printed with `error` (also as soon as an agent or client process dies, rather
than when the case times out); no figure is ever estimated. With `--repeat K` each case runs K
times, the system that goes first alternating (fedloop first in odd runs, Flower in even ones),
so that a machine whose speed drifts through the runs favours neither: each run is printed as
it ends (`vs_flower_run`), then the case's line with each system's median seconds per round,
the ratio of those medians, every run's own ratio (`run_ratios`) and their median.

The workload: a model of MODEL_MB MB of float32 in four tensors (fedloop.ml.noop.NoopEngine),
FedAvg over all agents every round, "training" that returns the received weights unchanged,
no evaluation. What is timed is therefore each system's own cost: transport, (de)serialisation,
storage, aggregation, scheduling. Those local models are all alike, and fedloop's store keeps
each distinct model once (by content address): after round 1 it writes no model file. With
`--distinct` every local model differs (both systems copy the first tensor and change two
values: `NoopEngine(vary=True)`, `flower_bench.py --distinct`), so fedloop stores each one.

fedloop
  deploy  a real `python -m fedloop aggregator` (SQLite + blob store in a temp dir) and N real
          `python -m fedloop agent fedloop.ml.noop:NoopEngine --set model_mb=S` processes (push
          mode) on loopback: one process per agent, as in bench/round_overhead.py, whose helpers
          this script imports. Round times come from the store's global-model timestamps.
  sim     `fedloop.sim` when it exists (see `fedloop_sim_driver` in the output); otherwise an
          in-process driver of `fedloop.aggregator.service.Aggregator` (asyncio, no HTTP): each
          virtual agent decodes the global model's safetensors bytes, "trains", encodes and
          calls `Aggregator.upload`, at most os.cpu_count() at a time (as many as Flower's Ray
          actors). Server memory = that one process's VmHWM (agents included).
Flower (flwr, installed into its own venv on first use; helpers in bench/flower_side/)
  deploy  legacy `flwr.server.start_server` + N `flwr.client.start_client` processes
          (gRPC "grpc-bidi", max message 1 GiB), a NumPyClient whose fit returns its input.
          The clients start once the server's port accepts connections: a grpc-bidi client
          that finds nothing listening exits at once, whatever its max_retries.
  sim     legacy `flwr.simulation.start_simulation` (Ray, one actor per core, num_cpus=1 per
          client). Server memory = the driver process's VmHWM; Ray's own processes not counted.
  deploy with `--flower-runtime deployment`: the Deployment Runtime that Flower's docs deploy
          with since 1.13: `flower-superlink`, N `flower-supernode` processes and `flwr run`
          of the Flower App in bench/flower_side/runtime_app (ServerApp and ClientApps in
          subprocesses, the default isolation). Server memory = the SuperLink's VmHWM plus the
          ServerApp's. The legacy path stays the default: it is Flower's fastest, and the
          target is measured against it.
  Both use FedAvg(fraction_fit=1, fraction_evaluate=0, min_fit_clients=N,
  min_available_clients=N, initial_parameters=the same arrays); round end = end of
  aggregate_fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FLOWER_HELPER = HERE / "flower_side" / "flower_bench.py"
FLOWER_RUNTIME_APP = HERE / "flower_side" / "runtime_app"
DEFAULT_FLOWER_VENV = Path(tempfile.gettempdir()) / "fedloop-bench-flower"
FLOWER_REQUIREMENT = "flwr[simulation]"

MODES = ("sim", "deploy")
SYSTEMS = ("fedloop", "flower")
AGENTS = (2, 10, 100)
SIZES = (4, 100)
QUICK = [f"{m}:{n}:4" for m in MODES for n in (2, 10)]

sys.path.insert(0, str(HERE))
from round_overhead import peak_rss_mb  # noqa: E402

# --- memory planning ----------------------------------------------------------------------
# Rough per-process figures measured on the reference machine (MB): an idle Python process
# with the system imported, and how many copies of the model each side holds at its peak.
# Only used to refuse cases that cannot fit, never reported as a measurement.
IDLE_MB = {
    ("fedloop", "agent"): 60, ("fedloop", "server"): 90, ("fedloop", "sim"): 120,
    ("flower", "agent"): 110, ("flower", "server"): 240, ("flower", "sim"): 300,
}  # fmt: skip


def estimated_mb(system: str, mode: str, agents: int, model_mb: float) -> float:
    """Peak memory of the whole run (all processes), pessimistic; for skipping only."""
    cpus = os.cpu_count() or 1
    if mode == "deploy":
        # Measured at 10 agents × 100 MB: Flower's server ≈ 7.5 GB (≈ 7 copies per client) and
        # each Flower client ≈ 1.1-1.4 GB (≈ 11 copies); fedloop ≈ 1 copy per agent.
        if system == "flower":
            server = IDLE_MB[(system, "server")] + model_mb * (3 + 8 * agents)
            return server + agents * (IDLE_MB[(system, "agent")] + 12 * model_mb)
        # fedloop's aggregator folds uploads as they come, but all N bodies may be in flight.
        server = IDLE_MB[(system, "server")] + model_mb * (3 + agents)
        return server + agents * (IDLE_MB[(system, "agent")] + 3 * model_mb)
    if system == "fedloop":
        # Driver: global + sums + the uploads in flight (8); workers: the mapped global and
        # a result each; results waiting in /dev/shm. Nothing grows with the agents.
        return IDLE_MB[(system, "sim")] + cpus * 100 + model_mb * (13 + 8 + 4 * cpus)
    # Flower's driver keeps every result as bytes and as arrays; Ray actors and object store.
    return IDLE_MB[(system, "sim")] + model_mb * (3 + 2 * agents) + cpus * (300 + 3 * model_mb)


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


# --- helpers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Block until something accepts TCP connections on 127.0.0.1:`port`; return None then, or
    why not (`process` exited first, or `timeout` seconds passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited {process.returncode} before listening on port {port}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return None
        except OSError:
            time.sleep(0.1)
    return f"did not listen on port {port} within {timeout:.0f} s"


def wait_for_server(
    server: subprocess.Popen[bytes],
    helpers: list[tuple[str, subprocess.Popen[bytes], Path]],
    timeout: float,
) -> str | None:
    """Wait for `server` to exit; return None then, or an error as soon as a helper process
    (agent or client) dies with a non-zero status (the server would wait for it until
    `timeout`). Raises subprocess.TimeoutExpired after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while server.poll() is None:
        for name, process, log in helpers:
            if process.poll() not in (None, 0):
                return f"{name} exited {process.returncode}: {log_tail(log)}"
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(server.args, timeout)
        time.sleep(0.2)
    return None


def per_round(stamps: list[float]) -> list[float]:
    """Seconds of rounds 2..R from the instants rounds 1..R ended."""
    return sorted(b - a for a, b in itertools.pairwise(stamps))


def summary(durations: list[float]) -> dict[str, Any]:
    if not durations:
        return {"seconds_per_round": None, "rounds_timed": 0}
    return {
        "seconds_per_round": round(statistics.median(durations), 4),
        "seconds_per_round_p90": round(durations[int(0.9 * (len(durations) - 1))], 4),
        "seconds_per_round_max": round(durations[-1], 4),
        "rounds_timed": len(durations),
    }


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _busy_ticks() -> tuple[int, int]:
    """Return (busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def settle(limit: float = 30.0, busy_below: float = 0.1) -> float:
    """Wait until the machine's CPUs are idle (the last run's processes, e.g. Ray's raylet and
    GCS after a Flower simulation, take seconds to exit); return the seconds waited."""
    started = time.monotonic()
    if not Path("/proc/stat").exists():
        return 0.0
    while time.monotonic() - started < limit:
        busy0, total0 = _busy_ticks()
        time.sleep(0.5)
        busy1, total1 = _busy_ticks()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return round(time.monotonic() - started, 1)


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --- Flower -------------------------------------------------------------------------------
def ensure_flower(venv: Path) -> str:
    """Return the Flower venv's python, creating the venv and installing flwr if needed."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import flwr, ray; print(flwr.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"# installing {FLOWER_REQUIREMENT} into {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", FLOWER_REQUIREMENT], check=True)
    subprocess.run(probe, check=True, capture_output=True)
    return str(python)


def flower_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import flwr, ray, grpc; print(flwr.__version__, ray.__version__, "
         "grpc.__version__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    flwr, ray, grpc = out.stdout.split()
    return f"flwr {flwr}, ray {ray}, grpcio {grpc}"


def run_flower(python: str, mode: str, agents: int, model_mb: float, rounds: int,
               timeout: float, distinct: bool = False) -> dict[str, Any]:  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="fedloop-vs-flower-"))
    out = root / "result.json"
    common = ["--agents", str(agents), "--model-mb", str(model_mb), "--rounds", str(rounds)]
    vary = ["--distinct"] if distinct else []
    common += vary
    processes: list[subprocess.Popen[bytes]] = []
    try:
        if mode == "sim":
            with open(root / "sim.log", "wb") as log:
                server = subprocess.Popen(
                    [python, str(FLOWER_HELPER), "sim", *common, "--out", str(out)],
                    stdout=log, stderr=log, env=env(), cwd=root,
                )  # fmt: skip
            processes.append(server)
            server.wait(timeout=timeout)
            log_path = root / "sim.log"
        else:
            port = free_port()
            with open(root / "server.log", "wb") as log:
                server = subprocess.Popen(
                    [python, str(FLOWER_HELPER), "server", *common, "--port", str(port),
                     "--out", str(out)],
                    stdout=log, stderr=log, env=env(), cwd=root,
                )  # fmt: skip
            processes.append(server)
            log_path = root / "server.log"
            # A grpc-bidi client that finds nothing listening fails at once (its retries do not
            # cover the first connection): start the clients only once the server listens.
            not_up = wait_for_port(port, server, timeout=min(timeout, 300.0))
            if not_up is not None:
                return {"error": f"Flower server {not_up}: {log_tail(log_path)}"}
            clients: list[tuple[str, subprocess.Popen[bytes], Path]] = []
            for i in range(agents):
                client = [python, str(FLOWER_HELPER), "client", "--model-mb", str(model_mb),
                          "--port", str(port), *vary]  # fmt: skip
                with open(root / f"c{i}.log", "wb") as log:
                    process = subprocess.Popen(client, stdout=log, stderr=log, env=env(), cwd=root)
                processes.append(process)
                clients.append((f"Flower client {i}", process, root / f"c{i}.log"))
            failed = wait_for_server(server, clients, timeout)
            if failed is not None:
                return {"error": f"{failed}; logs {root}"}
        if not out.exists():
            return {"error": f"Flower exited {server.returncode}: {log_tail(log_path)}"}
        result = json.loads(out.read_text())
        stamps = result["round_ends"]
        if len(stamps) < rounds:
            return {"error": f"Flower finished only {len(stamps)} of {rounds} rounds"}
        shutil.rmtree(root, ignore_errors=True)
        return {
            **summary(per_round(stamps)),
            "server_peak_rss_mb": result["server_peak_rss_mb"],
            "first_round_s": round(stamps[0] - result["start"], 2),
        }
    except subprocess.TimeoutExpired:
        return {"error": f"Flower did not finish {rounds} rounds in {timeout:.0f} s; logs {root}"}
    finally:
        stop(processes)


def _stop_groups(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes started with `start_new_session`, with everything they started."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_flower_runtime(
    python: str, agents: int, model_mb: float, rounds: int, timeout: float
) -> dict[str, Any]:
    """Flower's Deployment Runtime, as its docs deploy it: a SuperLink, N SuperNodes and
    `flwr run` of the Flower App in flower_side/runtime_app. Server memory: the SuperLink's
    VmHWM plus the ServerApp process's (both are the server side)."""
    bindir = Path(python).parent
    root = Path(tempfile.mkdtemp(prefix="fedloop-vs-flower-runtime-"))
    out = root / "result.json"
    port = free_port()
    run_env = {**env(), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str], home: Path) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        with open(root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=log, cwd=root, start_new_session=True,
                env={**run_env, "FLWR_HOME": str(home)},
            )  # fmt: skip
        processes.append(process)
        return process

    try:
        superlink = start(
            "superlink",
            [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
             "--port", str(port)],
            root / "superlink",
        )  # fmt: skip
        not_up = wait_for_port(port, superlink, timeout=min(timeout, 120.0))
        if not_up is not None:
            return {"error": f"SuperLink {not_up}: {log_tail(root / 'superlink.log')}"}
        for i in range(agents):
            start(
                f"supernode{i}",
                [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{port}", "--port", str(free_port())],
                root / f"supernode{i}",
            )  # fmt: skip
        cli_home = root / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        run_config = (
            f"num-server-rounds={rounds} model-mb={model_mb} agents={agents} "
            f"out={json.dumps(str(out))}"
        )
        submitted = subprocess.run(
            [str(bindir / "flwr"), "run", str(FLOWER_RUNTIME_APP), "bench",
             "--run-config", run_config],
            env={**run_env, "FLWR_HOME": str(cli_home)}, capture_output=True, cwd=root,
            timeout=120,
        )  # fmt: skip
        if submitted.returncode != 0:
            return {"error": f"flwr run exited {submitted.returncode}: {submitted.stdout[-500:]!r}"}
        deadline = time.monotonic() + timeout
        while not out.exists():
            for process in processes:
                if process.poll() is not None:
                    return {"error": f"a Flower process exited {process.returncode}; logs {root}"}
            if time.monotonic() > deadline:
                late = f"Flower did not finish {rounds} rounds in {timeout:.0f} s; logs {root}"
                return {"error": late}
            time.sleep(0.2)
        result = json.loads(out.read_text())  # renamed into place whole by the ServerApp
        superlink_mb = peak_rss_mb(superlink.pid)  # still running: checked just above
        stamps = result["round_ends"]
        if len(stamps) < rounds:
            return {"error": f"Flower finished only {len(stamps)} of {rounds} rounds"}
        shutil.rmtree(root, ignore_errors=True)
        serverapp_mb = result["serverapp_peak_rss_mb"]
        return {
            **summary(per_round(stamps)),
            "server_peak_rss_mb": round(serverapp_mb + superlink_mb, 1),
            "superlink_peak_rss_mb": round(superlink_mb, 1),
            "serverapp_peak_rss_mb": round(serverapp_mb, 1),
            "first_round_s": round(stamps[0] - result["start"], 2),
        }
    except subprocess.TimeoutExpired:
        return {"error": f"flwr run did not return in 120 s; logs {root}"}
    finally:
        _stop_groups(processes)


# --- fedloop ------------------------------------------------------------------------------
def run_fedloop_deploy(
    agents: int, model_mb: float, rounds: int, timeout: float, distinct: bool = False
) -> dict[str, Any]:
    import httpx

    from fedloop.demo import wait_until_up, write_config
    from fedloop.store.db import Store, database_url

    root = Path(tempfile.mkdtemp(prefix="fedloop-vs-flower-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(
        root / "aggregator.toml", port, root / "data", rounds=rounds, min_agents=agents,
        log_level="warning",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "fedloop"]
    with open(root / "aggregator.log", "wb") as log:
        server = subprocess.Popen(
            [*cmd, "aggregator", "--config", str(config)], stdout=log, stderr=log, env=env()
        )
    processes: list[subprocess.Popen[bytes]] = [server]
    started = time.time()
    try:
        wait_until_up(url, server)
        for i in range(agents):
            command = [
                *cmd, "agent", "fedloop.ml.noop:NoopEngine", "--url", url, "--name", f"b{i}",
                "--workdir", str(root / f"b{i}"), "--mode", "push",
                "--set", f"model_mb={model_mb}", *(["--set", "vary=1"] if distinct else []),
            ]  # fmt: skip
            with open(root / f"b{i}.log", "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=log, env=env()))
        # One client for all polls (httpx.get builds a TLS context per call, ≈ 10 ms of CPU
        # taken from the processes being measured); the time stamps come from the store.
        poller = httpx.Client(timeout=30)
        while True:
            if server.poll() is not None:
                return {"error": f"aggregator exited: {log_tail(root / 'aggregator.log')}"}
            for i, agent in enumerate(processes[1:]):
                if agent.poll() not in (None, 0):  # the round would wait for it until timeout
                    return {"error": f"agent b{i} exited {agent.returncode}: "
                            f"{log_tail(root / f'b{i}.log')}; logs {root}"}  # fmt: skip
            try:
                if poller.get(f"{url}/v1/status").json()["finished"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):  # busy, restarting, not JSON
                pass
            if time.time() - started > timeout:
                return {"error": f"fedloop did not finish {rounds} rounds in {timeout:.0f} s; "
                        f"logs {root}"}  # fmt: skip
            time.sleep(0.1)
        peak = peak_rss_mb(server.pid)
    finally:
        stop([*processes[1:], server])
    store = Store(database_url(root / "data", None))
    created = sorted(g.created_at for g in store.global_models() if g.round >= 1)
    store.close()
    if len(created) < rounds:
        return {"error": f"fedloop stored only {len(created)} of {rounds} rounds; logs {root}"}
    shutil.rmtree(root, ignore_errors=True)
    return {
        **summary(per_round(created)),
        "server_peak_rss_mb": round(peak, 1),
        "first_round_s": round(created[0] - started, 2),
    }


def fedloop_sim_driver() -> str:
    if importlib.util.find_spec("fedloop.sim") is not None:
        return "fedloop.sim.run + LocalBackend"
    return "Aggregator in-process, own driver (fedloop.sim not importable)"


async def _sim(
    agents: int, model_mb: float, rounds: int, data_dir: Path, distinct: bool = False
) -> list[float]:
    """Drive an in-process Aggregator with `agents` virtual no-op agents; return round ends."""
    from fedloop.aggregator.service import Aggregator
    from fedloop.config import AggregatorConfig
    from fedloop.ml.noop import NoopEngine
    from fedloop.protocol import codec
    from fedloop.protocol.messages import RegisterRequest, UploadRequest

    engine = NoopEngine(model_mb=model_mb, vary=distinct)
    config = AggregatorConfig(
        data_dir=data_dir, min_agents=agents, rounds=rounds, log_level="warning"
    )
    agg = Aggregator(config)
    await agg.start()
    ids = []
    for i in range(agents):
        body = codec.encode(engine.initial_weights()) if i == 0 else b""
        ids.append((await agg.register(RegisterRequest(agent_name=f"v{i}"), body)).agent_id)
    slots = asyncio.Semaphore(os.cpu_count() or 1)

    def train(data: bytes) -> tuple[bytes, int, dict[str, float]]:
        weights, n, metrics = engine.train(codec.decode(data), {})
        return codec.encode(weights), n, dict(metrics)

    async def agent(agent_id: str, round_number: int, data: bytes) -> None:
        async with slots:
            body, n, metrics = await asyncio.to_thread(train, data)
            await agg.upload(UploadRequest(agent_id=agent_id, round=round_number,
                                           num_samples=n, metrics=metrics), body)  # fmt: skip

    ends: list[float] = []
    for r in range(1, rounds + 1):
        model = agg.global_model
        assert model is not None and model.round == r - 1
        await asyncio.gather(*(agent(a, r, model.data) for a in ids))
        if await agg.wait_for_global(r - 1, timeout=600) is None:
            raise RuntimeError(f"round {r} did not close")
        ends.append(time.time())
    await agg.stop()
    return ends


def _sim_fedloop_sim(
    agents: int, model_mb: float, rounds: int, data_dir: Path, distinct: bool = False
) -> dict[str, Any]:
    """Run `fedloop.sim` (LocalBackend: its default process pool) and return round ends."""
    from fedloop.sim import LocalBackend, Observer, SimSettings, run

    class Stamps(Observer):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_round_end(self, summary: Any) -> None:
            self.ends.append(time.time())

    stamps = Stamps()
    backend = LocalBackend()
    result = run(
        SimSettings("fedloop.ml.noop:NoopEngine", num_agents=agents, rounds=rounds,
                    params={"model_mb": model_mb, "vary": distinct}, data_dir=data_dir,
                    evaluate=False),
        backend, stamps,
    )  # fmt: skip
    return {
        "round_ends": stamps.ends,
        "worker_peak_rss_mb": round(result.worker_peak_rss_mb, 1),
        "backend": backend.describe(),
    }


def sim_child(agents: int, model_mb: float, rounds: int, distinct: bool = False) -> None:
    """Run one fedloop simulation in this (fresh) process and print its JSON result."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="fedloop-vs-flower-sim-"))
    started = time.time()
    try:
        if importlib.util.find_spec("fedloop.sim") is not None:
            out = _sim_fedloop_sim(agents, model_mb, rounds, root / "data", distinct)
        else:
            ends = asyncio.run(_sim(agents, model_mb, rounds, root / "data", distinct))
            out = {"round_ends": ends}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.update(start=started, server_peak_rss_mb=round(peak_rss_mb(os.getpid()), 1))
    print(json.dumps(out))


def run_fedloop_sim(
    agents: int, model_mb: float, rounds: int, timeout: float, distinct: bool = False
) -> dict[str, Any]:
    child = f"{agents}:{model_mb}:{rounds}:{int(distinct)}"
    command = [sys.executable, __file__, "--_sim-child", child]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env())
    except subprocess.TimeoutExpired:
        return {"error": f"fedloop sim did not finish {rounds} rounds in {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": f"fedloop sim exited {done.returncode}: "
                + " | ".join(done.stderr.strip().splitlines()[-3:])}  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stamps = result["round_ends"]
    out = {
        **summary(per_round(stamps)),
        "server_peak_rss_mb": result["server_peak_rss_mb"],
        "first_round_s": round(stamps[0] - result["start"], 2),
    }
    for key in ("worker_peak_rss_mb", "backend"):
        if key in result:
            out[key] = result[key]
    return out


# --- the run ------------------------------------------------------------------------------
def selected(patterns: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for mode, n, s in itertools.product(MODES, AGENTS, SIZES):
        name = f"{mode}:{n}:{s}"
        if any(fnmatch.fnmatchcase(name, p.strip()) for p in patterns):
            out.append((mode, n, s))
    return out


def rounds_for(agents: int, model_mb: float, requested: int | None) -> int:
    if requested:
        return requested
    return 10 if agents * model_mb <= 100 else 5


def run_case(
    order: list[str],
    mode: str,
    agents: int,
    model_mb: float,
    rounds: int,
    args: argparse.Namespace,
    flower_python: str | None,
) -> dict[str, Any]:
    """Run one case on the systems of `order`, in that order; return both sides and the ratios."""
    fedloop: dict[str, Any] = {"skipped": "--only flower"}
    flower: dict[str, Any] = {"skipped": "--only fedloop"}
    for system in order:
        waited = settle()
        if system == "fedloop" and mode == "sim":
            fedloop = run_fedloop_sim(agents, model_mb, rounds, args.case_timeout, args.distinct)
            fedloop["driver"] = fedloop_sim_driver()
            fedloop["settled_s"] = waited
        elif system == "fedloop":
            fedloop = run_fedloop_deploy(agents, model_mb, rounds, args.case_timeout, args.distinct)
            fedloop["driver"] = f"{agents} agent processes + aggregator process"
            fedloop["settled_s"] = waited
        else:
            assert flower_python is not None
            if args.flower_runtime == "legacy":
                flower = run_flower(
                    flower_python, mode, agents, model_mb, rounds, args.case_timeout, args.distinct
                )
                flower["driver"] = (
                    "legacy start_simulation (Ray)" if mode == "sim"
                    else f"legacy start_server + {agents} start_client processes (grpc-bidi)"
                )  # fmt: skip
            elif mode == "sim" or args.distinct:
                flower = {"skipped": "--flower-runtime deployment: deploy cases, alike models only"}
            else:
                flower = run_flower_runtime(
                    flower_python, agents, model_mb, rounds, args.case_timeout
                )
                flower["driver"] = (
                    f"Deployment Runtime: SuperLink + {agents} SuperNodes, flwr run (subprocess "
                    "isolation)"
                )
            flower["settled_s"] = waited
    return {"fedloop": fedloop, "flower": flower, **ratios(fedloop, flower)}


def ratios(fedloop: dict[str, Any], flower: dict[str, Any]) -> dict[str, Any]:
    """`ratio` (Flower's seconds / fedloop's), `memory_ratio` and whether the targets are met."""
    f_s, w_s = fedloop.get("seconds_per_round"), flower.get("seconds_per_round")
    f_m, w_m = fedloop.get("server_peak_rss_mb"), flower.get("server_peak_rss_mb")
    ratio = round(w_s / f_s, 2) if f_s and w_s else None
    memory_ratio = round(w_m / f_m, 2) if f_m and w_m else None
    return {
        "ratio": ratio,
        "memory_ratio": memory_ratio,
        "meets_speed_target": None if ratio is None else ratio >= 5,
        "meets_memory_target": None if memory_ratio is None else f_m <= w_m,
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's line from its runs: the run itself when there is one; else each system's
    median seconds per round and its highest peak memory over the runs, their ratios, and
    every run's ratio (`run_ratios`) with their median (`median_run_ratio`)."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {"repeat": len(runs)}
    for system in SYSTEMS:
        sides = [run[system] for run in runs]
        failed = [side for side in sides if "seconds_per_round" not in side]
        if failed:  # a side that was skipped or failed in any run is reported as it was
            out[system] = failed[0]
            continue
        out[system] = {
            "seconds_per_round": round(
                statistics.median(side["seconds_per_round"] for side in sides), 4
            ),
            "seconds_per_round_runs": [side["seconds_per_round"] for side in sides],
            "server_peak_rss_mb": max(side["server_peak_rss_mb"] for side in sides),
            "driver": sides[0].get("driver"),
        }
    out.update(ratios(out["fedloop"], out["flower"]))
    run_ratios = [run["ratio"] for run in runs]
    out["run_ratios"] = run_ratios
    known = [r for r in run_ratios if r is not None]
    complete = len(known) == len(runs)
    out["median_run_ratio"] = round(statistics.median(known), 2) if complete else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", default="", help="comma-separated MODE:AGENTS:MB, * allowed")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per run (default 10, or 5 where agents × MB > 100)",
    )
    parser.add_argument("--flower-venv", type=Path, default=DEFAULT_FLOWER_VENV)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=3600.0,
        help="seconds; cases that would start after it are skipped",
    )
    parser.add_argument(
        "--case-timeout", type=float, default=900.0, help="seconds per system per case"
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="skip a case whose estimated peak exceeds this × MemAvailable",
    )
    parser.add_argument(
        "--only",
        choices=SYSTEMS,
        default=None,
        help="run one system only (e.g. a case too large for the other on this machine)",
    )
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="every local model differs (no-training still), so fedloop stores each one",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each case, alternating which system goes first (ABBA); the line gives "
        "the medians and every run's ratio",
    )
    parser.add_argument(
        "--flower-runtime",
        choices=("legacy", "deployment"),
        default="legacy",
        help="Flower's side of deploy cases: the legacy start_server/start_client over gRPC "
        "(its fastest path, the default) or the Deployment Runtime its docs now deploy with "
        "(SuperLink, SuperNodes, flwr run)",
    )
    parser.add_argument("--_sim-child", dest="sim_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()  # fmt: skip

    if args.sim_child:
        n, mb, r, d = args.sim_child.split(":")
        sim_child(int(n), float(mb), int(r), d == "1")
        return

    patterns = QUICK if args.quick else (args.cases.split(",") if args.cases else ["*"])
    cases = selected(patterns)
    if not cases:
        raise SystemExit(f"no case matches {patterns}")
    flower_python = None if args.only == "fedloop" else ensure_flower(args.flower_venv)
    versions = flower_version(flower_python) if flower_python else None
    began = time.monotonic()
    for mode, agents, model_mb in cases:
        rounds = rounds_for(agents, model_mb, args.rounds)
        line: dict[str, Any] = {
            "bench": "vs_flower", "case": f"{mode}:{agents}:{model_mb}", "mode": mode,
            "agents": agents, "model_mb": model_mb, "rounds": rounds, "distinct": args.distinct,
        }  # fmt: skip
        systems = [args.only] if args.only else list(SYSTEMS)
        need = max(estimated_mb(s, mode, agents, model_mb) for s in systems)
        budget = args.memory_fraction * available_mb()
        if need > budget:
            line["skipped"] = (
                f"estimated peak memory of the run ≈ {need / 1024:.1f} GiB exceeds "
                f"{args.memory_fraction:.0%} of MemAvailable ({budget / 1024:.1f} GiB)"
            )
        elif time.monotonic() - began > args.time_budget:
            line["skipped"] = f"time budget of {args.time_budget:.0f} s used up"
        else:
            runs = []
            for i in range(args.repeat):
                # ABBA: a pair's second system runs first in the next pair, so that a machine
                # slowing down (or speeding up) through the session favours neither system.
                order = systems if i % 2 == 0 else systems[::-1]
                run = run_case(order, mode, agents, model_mb, rounds, args, flower_python)
                runs.append(run)
                if args.repeat > 1:  # each run as it ends; the case's line follows them
                    each = {"bench": "vs_flower_run", "case": line["case"], "run": i + 1}
                    print(json.dumps({**each, "first": order[0], **run}), flush=True)
            line.update(combine(runs))
        line["flower_versions"] = versions
        line["cpu_count"] = os.cpu_count()
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
