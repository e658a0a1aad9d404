"""The fault scenarios, shared by tests/faults and bench/faults.py.

Each scenario starts real processes under `root`, breaks one thing at one moment, lets the run
finish, restarts the aggregator one last time (start-up is when orphaned blobs are collected)
and returns `audit()`'s counters plus what it did. It raises AssertionError when the run does
not recover (an agent that does not finish, a round that never closes) or when the fault did
not land in the phase it aims at.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fault_engines import initial
from faultkit import (
    AgentProcess,
    Server,
    SlowUpload,
    audit,
    blob_sha,
    small_disk,
    snapshot,
    upload_in_thread,
    wait_until,
)
from proxy import Proxy

from fedloop.agent.client import AggregatorClient
from fedloop.errors import ConnectionFailed
from fedloop.protocol import codec
from fedloop.store.blobs import blob_id

MB = 1024 * 1024


class Run:
    """The processes and proxies of one scenario; all are stopped when it ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self.agents: list[AgentProcess] = []
        self.proxies: list[Proxy] = []
        self.clients: list[AggregatorClient] = []

    def server(self, **settings: Any) -> Server:
        server = Server(self.root, settings)
        self.servers.append(server)
        return server.start()

    def agent(self, name: str, url: str, *args: str, **sets: Any) -> AgentProcess:
        agent = AgentProcess(self.root, name, url, sets, args)
        self.agents.append(agent)
        return agent.start()

    def proxy(self, server: Server) -> Proxy:
        proxy = Proxy(server.port).start()
        self.proxies.append(proxy)
        return proxy

    def client(self, url: str, timeout: float = 30.0) -> AggregatorClient:
        client = AggregatorClient(url, timeout=timeout)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for client in self.clients:
            client.close()
        for proxy in self.proxies:
            proxy.stop()
        for server in self.servers:
            server.stop()


@contextmanager
def run_in(root: Path) -> Iterator[Run]:
    root.mkdir(parents=True, exist_ok=True)
    run = Run(root)
    try:
        yield run
    finally:
        run.close()


def finish(
    server: Server, agents: list[AgentProcess], before: dict[int, str], rounds: int
) -> dict[str, Any]:
    """Wait for the run's end and every agent's exit, restart once more, and audit."""

    def done(status: dict[str, Any]) -> bool:
        for agent in agents:  # an agent that gave up will not finish the run: fail now
            code = agent.process.poll() if agent.process else None
            assert code in (None, 0), (
                f"agent {agent.name} exited with {code}:\n{agent.log()[-3000:]}"
            )
        return bool(status["finished"])

    server.wait_for(done, timeout=120)
    for agent in agents:
        code = agent.wait(timeout=60)
        assert code == 0, f"agent {agent.name} exited with {code}:\n{agent.log()[-3000:]}"
    server.restart()
    history = [row["round"] for row in server.history()]
    report = audit(server.data_dir, before)
    server.stop()
    assert history == report["rounds"], (history, report["rounds"])
    assert report["rounds"] == list(range(rounds + 1)), report["rounds"]
    return {**report, "kills": server.kills, "history_rounds": len(history)}


def _model(value: float, size_mb: float = 0.0) -> dict[str, np.ndarray]:
    return {k: v + np.float32(value) for k, v in initial(size_mb).items()}


def wait_global(server: Server, round_number: int) -> None:
    server.wait_for(lambda s: s["global_round"] >= round_number, 30)


def _upload_all(client: AggregatorClient, ids: dict[str, str], round_number: int) -> None:
    data = codec.encode(_model(float(round_number)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.upload(i, round_number, data, 10), ids.values()))


# --- the aggregator killed in each phase ----------------------------------------------------


def kill_during_registration(root: Path, agents: int = 150, threads: int = 12) -> dict[str, Any]:
    """SIGKILL while `agents` registrations are in flight; every acknowledged one survives."""
    rounds = 2
    with run_in(root) as run:
        server = run.server(rounds=rounds)
        client = run.client(server.url, timeout=10)
        names = [f"site-{i:03d}" for i in range(agents)]
        acked: dict[str, str] = {names[0]: client.register(names[0], initial()).agent_id}
        failed: list[str] = []

        def register(name: str) -> None:
            try:
                acked[name] = client.register(name).agent_id
            except ConnectionFailed:
                failed.append(name)

        pool = ThreadPoolExecutor(threads)
        for name in names[1:]:  # all queued at once, `threads` in flight
            pool.submit(register, name)
        wait_until(lambda: len(acked) >= agents // 5, 30, "registrations")
        server.kill()
        pool.shutdown(wait=True)
        assert failed, "every registration finished before the kill: the kill came too late"
        before = snapshot(server.data_dir)

        server.start()
        client = run.client(server.url)  # the old pool's connections died with the process
        status = server.status()
        assert status["registered_agents"] >= len(acked), (status, len(acked))
        assert status["round"] == 1 and status["uploads"] == 0, status
        again = {name: client.register(name).agent_id for name in names}
        assert all(again[n] == i for n, i in acked.items()), "an acknowledged agent got a new id"
        assert len(set(again.values())) == agents
        assert server.status()["registered_agents"] == agents
        for r in range(1, rounds + 1):
            _upload_all(client, again, r)
            wait_global(server, r)
        client.close()
        report = finish(server, [], before, rounds)
        assert all(len(c) == agents for r, c in report["contributors"].items() if r)
        return {**report, "acknowledged_before_kill": len(acked)}


def kill_mid_upload(root: Path) -> dict[str, Any]:
    """SIGKILL while a local model's body is half sent, then again after its blob is written
    but before its row commits (the database's write lock held by the test meanwhile)."""
    rounds = 2
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=3)
        client = run.client(server.url)
        ids = [client.register(f"site-{i}", initial()).agent_id for i in range(3)]
        client.upload(ids[0], 1, codec.encode(_model(1.0)), 10)
        client.upload(ids[1], 1, codec.encode(_model(2.0)), 20)
        late = codec.encode(_model(3.0))

        # 1. Mid-body: the aggregator holds half a model in memory, nothing on disk.
        slow = SlowUpload(server.url, ids[2], 1, late, 30)
        slow.send_part(0.5)
        before = snapshot(server.data_dir)
        server.kill()
        assert slow.connection_died(), "the half-sent upload's connection outlived the kill"
        slow.close()
        server.start()
        status = server.status()
        assert (status["round"], status["uploads"]) == (1, 2), status
        assert blob_id(late) not in _blob_keys(server)

        # 2. Blob written, row not committed: the blob is an orphan, deleted at start-up.
        with server.write_locked():
            thread, outcome = upload_in_thread(client, ids[2], 1, late, 30)
            wait_until(lambda: blob_id(late) in _blob_keys(server), 20, "the local model's blob")
            server.kill()
        thread.join(timeout=30)
        assert outcome and isinstance(outcome[0], ConnectionFailed), outcome
        server.start()
        status = server.status()
        assert (status["round"], status["uploads"]) == (1, 2), status
        assert blob_id(late) not in _blob_keys(server), "the orphaned blob was not collected"

        client.upload(ids[2], 1, late, 30)
        server.wait_for(lambda s: s["global_round"] == 1, 30)
        for i, agent_id in enumerate(ids):
            client.upload(agent_id, 2, codec.encode(_model(float(i))), 10 * (i + 1))
        report = finish(server, [], before, rounds)
        assert [len(c) for c in report["contributors"].values()] == [0, 3, 3]
        return report


def kill_during_aggregation(root: Path) -> dict[str, Any]:
    """SIGKILL while a user strategy's aggregate() runs (it sleeps); the round re-aggregates."""
    rounds = 3
    with run_in(root) as run:
        server = run.server(
            rounds=rounds,
            min_agents=3,
            strategy={
                "name": "fault_strategies:SlowFedAvg",
                "marker_dir": str(root),
                "slow_rounds": [2],
                "delay": 60,
            },
        )
        agents = [
            run.agent(f"a{i}", server.url, offset=i + 1, samples=10 * (i + 1)) for i in range(3)
        ]
        wait_until((root / "aggregating-2").exists, 60, "aggregation of round 2")
        before = snapshot(server.data_dir)
        assert sorted(before) == [0, 1], before
        server.kill()
        server.start()
        report = finish(server, agents, before, rounds)
        assert [len(c) for c in report["contributors"].values()] == [0, 3, 3, 3]
        assert all(a.trained() == [1, 2, 3] for a in agents), [a.trained() for a in agents]
        return report


def kill_during_distribution(
    root: Path, size_mb: float = 32, rate_mb: float = 24
) -> dict[str, Any]:
    """SIGKILL while an agent behind a slow link downloads a big global model."""
    rounds = 2
    size = size_mb * MB
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=3)
        proxy = run.proxy(server)
        agents = [run.agent("a0", server.url, offset=1, size_mb=size_mb)]
        server.wait_for(lambda s: s["registered_agents"] == 1)
        agents += [
            run.agent("a1", server.url, offset=2, size_mb=size_mb),
            run.agent("slow-link", proxy.url, offset=3, size_mb=size_mb),
        ]
        # Global 0 and the first upload at full speed; then the downlink slows.
        wait_until(lambda: proxy.bytes_up > 2 * size, 60, "the slow-link agent's round-1 upload")
        proxy.throttle(down=rate_mb * MB)
        server.wait_for(lambda s: s["global_round"] >= 1, 60)
        start = proxy.bytes_down
        wait_until(lambda: proxy.bytes_down - start > 4 * MB, 30, "the download of global 1")
        before = snapshot(server.data_dir)
        in_flight = proxy.bytes_down - start
        assert in_flight < size, "the download finished before the kill"
        server.kill()
        assert agents[2].state()["global_round"] == 0, "the agent saved a half-fetched model"
        proxy.throttle()
        server.start()
        report = finish(server, agents, before, rounds)
        final = report["rounds"][-1]
        store_blob = before.get(final) or snapshot(server.data_dir)[final]
        assert blob_sha(agents[2].workdir / "global.safetensors") == store_blob
        return {**report, "bytes_in_flight_at_kill": in_flight}


# --- agents killed, cut off, late ------------------------------------------------------------


def agent_killed_mid_upload(
    root: Path, size_mb: float = 32, rate_mb: float = 24, saved: bool = True
) -> dict[str, Any]:
    """SIGKILL an agent while its local model streams up a slow link. `saved`: its model was
    on disk (`--keep-local-after 0`); restarted, it resumes from its working directory and
    uploads the same model again. Otherwise the upload had not yet lasted `--keep-local-after`:
    restarted in `training`, it trains the round again and uploads that."""
    rounds = 2
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=3)
        proxy = run.proxy(server)
        agents = [run.agent("a0", server.url, offset=1, size_mb=size_mb)]
        server.wait_for(lambda s: s["registered_agents"] == 1)
        agents.append(run.agent("a1", server.url, offset=2, size_mb=size_mb))
        keep = ("--keep-local-after", "0" if saved else "60")
        # Slow before the victim starts: the third registration opens round 1, and its upload
        # at full speed could be in before a throttle set after that (then round 2's is cut).
        proxy.throttle(up=rate_mb * MB)
        victim = run.agent("victim", proxy.url, *keep, offset=3, size_mb=size_mb)
        server.wait_for(lambda s: s["registered_agents"] == 3)
        start = proxy.bytes_up
        wait_until(lambda: proxy.bytes_up - start > 4 * MB, 60, "the victim's upload")
        if saved:
            wait_until(lambda: victim.state().get("phase") == "sending", 30, "the local model")
        assert proxy.bytes_up - start < size_mb * MB, "the upload finished before the kill"
        phase = victim.state()["phase"]
        assert phase == ("sending" if saved else "training"), victim.state()
        victim.kill()
        before = snapshot(server.data_dir)
        # The aggregator sees the body end early: one log line, no traceback, nothing stored.
        wait_until(lambda: "disconnected mid-request" in server.log(), 30, "the disconnect")
        assert "Traceback" not in server.log(), server.log()[-3000:]
        status = server.wait_for(lambda s: s["uploads"] == 2, 30)
        assert status["round"] == 1, status
        proxy.throttle()
        victim.start()
        agents.append(victim)
        report = finish(server, agents, before, rounds)
        assert [len(c) for c in report["contributors"].values()] == [0, 3, 3]
        # Resumed (the model from disk), or trained again.
        expected = [1, 2] if saved else [1, 1, 2]
        assert victim.trained() == expected, victim.trained()
        return {**report, "agent_kills": 1}


def connection_dropped(root: Path, deadline: float = 3.0) -> dict[str, Any]:
    """Cut an agent's connections (resets, new ones refused) for longer than the round's
    deadline: the round closes without it; restored, it reconnects and takes part again."""
    rounds = 4
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=2, round_timeout=deadline)
        proxy = run.proxy(server)
        cut = run.agent("cut", proxy.url, offset=3, delay=0.3)
        # Registered first, so that rounds need all three and not only the direct two.
        server.wait_for(lambda s: s["registered_agents"] == 1)
        agents = [run.agent(f"a{i}", server.url, offset=i + 1, delay=0.3) for i in range(2)]
        agents.append(cut)
        wait_until(lambda: 2 in cut.trained(), 60, "the cut agent training round 2")
        proxy.drop()
        server.wait_for(lambda s: s["global_round"] >= 2, 30)
        proxy.resume()
        report = finish(server, agents, {}, rounds)
        cut_id = cut.state()["agent_id"]
        assert cut_id not in report["contributors"][2], report["contributors"]
        assert any(cut_id in report["contributors"][r] for r in range(3, rounds + 1)), (
            "the agent never took part again after its connection came back",
            report["contributors"],
        )
        return report


def connection_paused(root: Path, deadline: float = 3.0) -> dict[str, Any]:
    """Black-hole an agent's traffic (connections stay open) while it uploads, past the
    deadline: the round closes without it, its upload arrives late and is refused with
    round_closed, and it carries on with the next round."""
    rounds = 3
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=2, round_timeout=deadline)
        proxy = run.proxy(server)
        late = run.agent("late", proxy.url, offset=3, delay=0.5, slow_rounds="2")
        server.wait_for(lambda s: s["registered_agents"] == 1)  # rounds need all three
        agents = [run.agent(f"a{i}", server.url, offset=i + 1) for i in range(2)]
        agents.append(late)
        wait_until(lambda: 2 in late.trained(), 60, "the late agent training round 2")
        proxy.pause()
        server.wait_for(lambda s: s["global_round"] >= 2, 30)
        proxy.resume()
        report = finish(server, agents, {}, rounds)
        late_id = late.state()["agent_id"]
        assert late_id not in report["contributors"][2], report["contributors"]
        assert "discarded: round 2 is closed" in late.log(), late.log()[-3000:]
        assert late.trained()[-1] == rounds, late.trained()
        return report


def straggler(root: Path, deadline: float = 2.0) -> dict[str, Any]:
    """An agent slower than the round deadline (round 1 only, polling): round 1 closes with
    min_agents at its deadline, the late upload is refused with round_closed, the agent
    moves on to the next global model and takes part again."""
    rounds = 4
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=2, round_timeout=deadline)
        slow = run.agent(
            "straggler", server.url, "--mode", "poll", offset=3, delay=deadline + 3, slow_rounds="1"
        )
        # Registered first, so that round 1 needs three local models, not the fast two.
        server.wait_for(lambda s: s["registered_agents"] == 1)
        agents = [run.agent(f"a{i}", server.url, offset=i + 1) for i in range(2)]
        agents.append(slow)
        report = finish(server, agents, {}, rounds)
        slow_id = slow.state()["agent_id"]
        assert slow_id not in report["contributors"][1], report["contributors"]
        assert "discarded: round 1 is closed" in slow.log(), slow.log()[-3000:]
        assert any(slow_id in report["contributors"][r] for r in range(2, rounds + 1)), report
        return report


def restart_behind_a_balancer(root: Path, outage: float = 1.5) -> dict[str, Any]:
    """The aggregator behind a load balancer is killed mid-round; while it is down the balancer
    answers 503 (as nginx or a cloud balancer does), then it comes back: the agents wait the
    outage out and finish the run."""
    rounds = 3
    with run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=2)
        balancer = run.proxy(server)
        agents = [run.agent(f"a{i}", balancer.url, offset=i + 1, delay=0.3) for i in range(2)]
        server.wait_for(lambda s: s["global_round"] >= 1, 60)
        before = snapshot(server.data_dir)
        server.kill()
        balancer.answer(503)
        time.sleep(outage)
        server.start()
        balancer.resume()
        return finish(server, agents, before, rounds)


# --- the aggregator's disk full -------------------------------------------------------------


def refused(server: Server, reason: str) -> int:
    """How many requests the aggregator refused for `reason` (its /metrics)."""
    prefix = f'fedloop_rejected_requests_total{{reason="{reason}"}} '
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix) :]))
    return 0


def disk_full(root: Path, size_mb: float = 1.0) -> dict[str, Any]:
    """The aggregator's disk fills up, twice: its data directory is a small tmpfs, and a filler
    file takes the free space.

    1. While round 1's local models arrive: each is refused with 507 storage_full, nothing of
       it stays on the disk, and the agents send the same models again (without training
       again) after the 10 s the refusal asks for (`Retry-After`), once the filler is gone.
    2. While round 2 closes, with room for its two local models but not for the global model:
       the aggregation fails, the round stays open with its uploads, and the aggregator tries
       it again until the filler goes.
    Needs root (the mount); NoSmallDisk otherwise.
    """
    rounds = 3
    # An agent trains 2 s a round: the test fills the disk in between (the first agent starts
    # training when it registers, before the second one does).
    sets = {"size_mb": size_mb, "delay": 2.0}
    with small_disk(root / "aggregator", 32) as disk, run_in(root) as run:
        server = run.server(rounds=rounds, min_agents=2)
        agents = [
            run.agent(f"a{i}", server.url, offset=i + 1, samples=10 * (i + 1), **sets)
            for i in range(2)
        ]
        server.wait_for(lambda s: s["registered_agents"] == 2 and s["round"] == 1, 60)
        before = snapshot(server.data_dir)

        # 1. Full while round 1's local models arrive.
        disk.fill()
        wait_until(lambda: refused(server, "storage_full") >= 2, 60, "uploads refused (507)")
        wait_until(
            lambda: all("retrying in 10.0 s" in a.log() for a in agents), 30, "agents waiting"
        )
        status = server.status()
        assert (status["global_round"], status["uploads"]) == (0, 0), status
        assert not list((disk.path / "blobs").glob("*/*/.tmp-*")), "a refused upload left a file"
        assert "Traceback" not in server.log(), server.log()[-3000:]
        disk.empty()
        wait_global(server, 1)

        # 2. Room for round 2's two local models, not for its global model.
        page = os.sysconf("SC_PAGE_SIZE")
        model = -(-len(codec.encode(_model(0.0, size_mb))) // page) * page
        disk.fill(leave=2 * model + model // 2)
        wait_until(
            lambda: "aggregation of round 2 failed" in server.log(), 60, "the failed aggregation"
        )
        status = server.status()
        assert (status["global_round"], status["uploads"]) == (1, 2), status
        time.sleep(1.5)  # a retry or two, still on a full disk
        assert server.status()["global_round"] == 1
        assert "Traceback" not in server.log(), server.log()[-3000:]  # said in one line
        refused_total = refused(server, "storage_full")
        disk.empty()
        report = finish(server, agents, before, rounds)
        assert [len(c) for c in report["contributors"].values()] == [0, 2, 2, 2]
        # A refused upload is sent again as it was: every round trained once.
        assert all(a.trained() == [1, 2, 3] for a in agents), [a.trained() for a in agents]
        return {**report, "refused_storage_full": refused_total}


def _blob_keys(server: Server) -> set[str]:
    from fedloop.store.blobs import BlobStore

    return BlobStore(server.data_dir / "blobs").keys()


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "kill_during_registration": kill_during_registration,
    "kill_mid_upload": kill_mid_upload,
    "kill_during_aggregation": kill_during_aggregation,
    "kill_during_distribution": kill_during_distribution,
    "agent_killed_mid_upload": agent_killed_mid_upload,
    "connection_dropped": connection_dropped,
    "connection_paused": connection_paused,
    "straggler": straggler,
    "restart_behind_a_balancer": restart_behind_a_balancer,
    "disk_full": disk_full,
}
