"""Identity with `auth = true`: enrollment tokens, per-agent credentials, admin tokens.

Real aggregator and agent processes; every refusal is a 401 or 403 with a clear code and
leaves the store (agents, local models, evaluations, blobs, tokens) exactly as it was.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from checks import assert_globals_are_weighted_means
from harness import Server, env, start_agent

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.protocol import codec
from fedloop.security import tokens
from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store, database_url

GOOD = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
MODEL = codec.encode(GOOD)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedloop", *args],
        capture_output=True, text=True, timeout=60, env=env(),
    )  # fmt: skip


def _token(
    server: Server, name: str, kind: str = tokens.ENROLLMENT, expires_at: float | None = None
) -> str:
    """Make a token straight in the aggregator's database (what `fedloop token` does)."""
    prefix = tokens.ADMIN_PREFIX if kind == tokens.ADMIN else tokens.ENROLLMENT_PREFIX
    secret = tokens.new_secret(prefix)
    store = Store(database_url(server.data_dir, None))
    try:
        store.add_token(kind, name, tokens.hash_secret(secret), expires_at=expires_at)
    finally:
        store.close()
    return secret


def _snapshot(server: Server) -> tuple[Any, ...]:
    store = Store(database_url(server.data_dir, None))
    try:
        return (
            store.count_local_models(),
            [(a.id, a.name) for a in store.agents()],
            len(store.evaluations()),
            [(t.id, t.kind, t.agent_id, t.used_at, t.revoked_at) for t in store.tokens()],
            BlobStore(server.data_dir / "blobs").keys(),
        )
    finally:
        store.close()


def _auth(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _register(server: Server, name: str, token: str | None, body: bytes = b"") -> httpx.Response:
    return httpx.post(
        server.url + "/v1/register",
        content=body,
        headers={
            "x-fedloop-message": json.dumps({"protocol": 1, "agent_name": name}),
            **_auth(token),
        },
        timeout=30,
    )


def _upload(
    server: Server, agent_id: str, token: str | None, body: bytes = MODEL
) -> httpx.Response:
    message = {"protocol": 1, "agent_id": agent_id, "round": 1, "num_samples": 5}
    return httpx.post(
        server.url + "/v1/updates",
        content=body,
        headers={"x-fedloop-message": json.dumps(message), **_auth(token)},
        timeout=30,
    )


def _report(server: Server, agent_id: str, token: str | None) -> httpx.Response:
    message = {"protocol": 1, "agent_id": agent_id, "round": 0, "metrics": {"accuracy": 0.5}}
    return httpx.post(
        server.url + "/v1/evaluations",
        content=json.dumps(message),
        headers=_auth(token),
        timeout=30,
    )


def _get(server: Server, path: str, token: str | None) -> httpx.Response:
    return server.get(path, headers=_auth(token))


def _ws_status(server: Server, agent_id: str, token: str | None) -> int:
    """Return the HTTP status the WebSocket handshake is answered with (101: accepted)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + f"/v1/ws?agent_id={agent_id}"
    try:
        with connect(url, additional_headers=_auth(token), open_timeout=10) as ws:
            ws.recv(timeout=5)
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def _enroll(server: Server, name: str, body: bytes = b"") -> tuple[str, str]:
    """Register `name` with a fresh enrollment token; return (agent id, credential)."""
    client = AggregatorClient(server.url, token=_token(server, name))
    try:
        reply = client.register(name, codec.decode(body) if body else None)
    finally:
        client.close()
    assert reply.credential and reply.credential.startswith(tokens.CREDENTIAL_PREFIX)
    return reply.agent_id, reply.credential


@pytest.fixture
def server(make_server: Any) -> Server:
    server: Server = make_server(auth=True, min_agents=2, max_model_bytes=4096, max_agents=3)
    return server


def test_each_auth_failure_is_refused_and_changes_nothing(server: Server) -> None:
    a, cred_a = _enroll(server, "site-a", MODEL)
    b, cred_b = _enroll(server, "site-b")
    admin = _token(server, "ops", tokens.ADMIN)
    for_c = _token(server, "site-c")
    for_d = _token(server, "site-d")
    expired = _token(server, "site-c", expires_at=time.time() - 1)
    revoked = _token(server, "site-r")
    store = Store(database_url(server.data_dir, None))
    store.revoke_tokens("site-r")
    used = tokens.new_secret(tokens.ENROLLMENT_PREFIX)
    store.close()
    spent = _token(server, "site-a")
    AggregatorClient(server.url, token=spent).register("site-a")  # re-enrolls site-a
    cred_a = _enroll(server, "site-a")[1]  # and once more: `spent` and the old cred are dead
    before = _snapshot(server)

    reg, up, rep, get = (partial(f, server) for f in (_register, _upload, _report, _get))
    anon, other, kind = "unauthenticated", "wrong_agent", "wrong_token_type"
    register_url, basic = server.url + "/v1/register", {"authorization": f"Basic {for_c}"}
    latest = "/v1/models/global/latest"
    cases: list[tuple[str, Callable[[], httpx.Response], int, str]] = [
        ("register, no token", lambda: reg("site-c", None, MODEL), 401, anon),
        ("register, unknown token", lambda: reg("site-c", used), 401, anon),
        ("register, not bearer", lambda: httpx.post(register_url, headers=basic), 401, anon),
        ("register, expired", lambda: reg("site-c", expired), 401, "token_expired"),
        ("register, revoked", lambda: reg("site-r", revoked), 401, "token_revoked"),
        ("register, used token", lambda: reg("site-a", spent), 401, "token_used"),
        ("register, other name's token", lambda: reg("site-c", for_d), 403, other),
        ("register, admin token", lambda: reg("site-c", admin), 403, kind),
        ("register as b, a's credential", lambda: reg("site-b", cred_a), 403, other),
        ("register new name, a credential", lambda: reg("site-c", cred_a), 403, other),
        ("upload, no token", lambda: up(a, None), 401, anon),
        ("upload, unknown credential", lambda: up(b, cred_b + "x"), 401, anon),
        ("upload as b, a's credential", lambda: up(b, cred_a), 403, other),
        ("upload, enrollment token", lambda: up(a, for_c), 403, kind),
        ("upload, admin token", lambda: up(a, admin), 403, kind),
        ("upload as unknown id", lambda: up("nobody", cred_a), 403, other),
        ("report as b, a's credential", lambda: rep(b, cred_a), 403, other),
        ("report, no token", lambda: rep(a, None), 401, anon),
        ("latest global, no token", lambda: get(latest, None), 401, anon),
        ("latest global, enrollment token", lambda: get(latest, for_c), 403, kind),
        # Naming an agent in a long poll holds back its announcement: only its own may.
        ("latest global waited as b, a's credential",
         lambda: get(f"{latest}?agent_id={b}", cred_a), 403, other),
        ("latest global waited as an agent, admin token",
         lambda: get(f"{latest}?agent_id={a}", admin), 403, kind),
        ("global 0, no token", lambda: get("/v1/models/global/0", None), 401, anon),
        ("history, no token", lambda: get("/v1/history", None), 401, anon),
        ("history, agent credential", lambda: get("/v1/history", cred_a), 403, kind),
        ("dashboard data, no token", lambda: get("/v1/dashboard", None), 401, anon),
        ("dashboard data, agent credential", lambda: get("/v1/dashboard", cred_b), 403, kind),
        ("metrics, no token", lambda: get("/metrics", None), 401, anon),
        ("metrics, agent credential", lambda: get("/metrics", cred_a), 403, kind),
    ]  # fmt: skip
    for label, request, status, code in cases:
        response = request()
        assert response.status_code == status, (label, response.text)
        payload = response.json()
        assert payload["error"] == code, (label, payload)
        assert len(payload["detail"]) > 20, (label, payload)
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer"), label
        assert _snapshot(server) == before, f"{label} changed the store"

    assert _ws_status(server, a, None) == 401
    assert _ws_status(server, b, cred_a) == 403
    assert _ws_status(server, a, for_c) == 403
    assert _snapshot(server) == before

    # What stays open, and what the right tokens may do.
    assert _get(server, "/v1/health", None).status_code == 200
    assert _get(server, "/v1/status", None).json()["registered_agents"] == 2
    assert _get(server, "/", None).status_code == 200
    for path in ("/v1/history", "/v1/dashboard", "/metrics", "/v1/models/global/0"):
        assert _get(server, path, admin).status_code == 200, path
    assert codec.decode(_get(server, "/v1/models/global/0", cred_b).content).keys() == GOOD.keys()
    assert _get(server, f"{latest}?agent_id={a}", cred_a).status_code == 200
    assert _ws_status(server, a, cred_a) == 101
    assert _report(server, a, cred_a).status_code == 200
    assert _upload(server, a, cred_a).json()["accepted"] is True
    assert server.status()["uploads"] == 1


def test_limits_refuse_without_changing_anything(server: Server) -> None:
    a, cred_a = _enroll(server, "site-a", MODEL)
    _enroll(server, "site-b")
    _enroll(server, "site-c")  # max_agents = 3
    late = _token(server, "site-d")
    before = _snapshot(server)
    response = _register(server, "site-d", late)
    assert (response.status_code, response.json()["error"]) == (403, "too_many_agents")
    big = codec.encode({**GOOD, "w": np.ones((40, 30), np.float32)})
    response = _upload(server, a, cred_a, big)
    assert (response.status_code, response.json()["error"]) == (413, "too_large")
    assert _snapshot(server) == before  # the refused registration did not spend its token
    assert _upload(server, a, cred_a).json()["accepted"] is True
    response = _upload(server, a, cred_a)  # one upload per agent per round
    assert (response.status_code, response.json()["error"]) == (409, "duplicate_upload")


def test_token_is_used_once_and_credentials_are_stored_hashed(server: Server) -> None:
    token = _token(server, "site-a")
    client = AggregatorClient(server.url, token=token)
    reply = client.register("site-a", GOOD)
    credential = reply.credential
    assert credential and credential != token
    with pytest.raises(Refused) as info:
        client.register("site-a")  # the same token again
    assert (info.value.status, info.value.code) == (401, "token_used")
    # The credential re-registers the agent (same id) and is not issued again.
    client.token = credential
    again = client.register("site-a")
    assert again.agent_id == reply.agent_id and again.credential is None

    store = Store(database_url(server.data_dir, None))
    rows = {t.kind: t for t in store.tokens()}
    store.close()
    assert rows["enrollment"].used_at is not None and rows["enrollment"].agent_id == reply.agent_id
    assert rows["credential"].agent_id == reply.agent_id
    assert rows["credential"].secret_hash == tokens.hash_secret(credential)
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("fedloop.db*"))
    assert credential.encode() not in raw and token.encode() not in raw

    # Lost its credential: a new enrollment token for the same name issues a new one and
    # revokes the old.
    client.token = _token(server, "site-a")
    renewed = client.register("site-a")
    assert renewed.agent_id == reply.agent_id and renewed.credential not in (None, credential)
    client.token = credential
    with pytest.raises(Refused) as info:
        client.global_model(0)
    assert (info.value.status, info.value.code) == (401, "token_revoked")
    client.close()


def test_run_with_tokens_completes(make_server: Any, agents: list[subprocess.Popen[bytes]]) -> None:
    server: Server = make_server(auth=True, min_agents=3, rounds=3)
    config = str(server.root / "aggregator.toml")
    secrets = {}
    for name in ("a0", "a1", "a2"):
        made = _cli("token", "create", "--name", name, "--config", config)
        assert made.returncode == 0, made.stderr
        secrets[name] = made.stdout.strip()
        assert secrets[name].startswith(tokens.ENROLLMENT_PREFIX)
    agents.append(start_agent(server, "a0", "engines:ShiftEngine", "--token", secrets["a0"]))
    agents.append(
        start_agent(server, "a1", "engines:ShiftEngine", "--mode", "poll", "--token", secrets["a1"])
    )
    agents.append(
        start_agent(
            server, "a2", "engines:ShiftEngine", "--set", "offset=3",
            extra_env={"FEDLOOP_TOKEN": secrets["a2"]},
        )
    )  # fmt: skip
    server.wait_for(lambda s: s["finished"], timeout=90)
    for i, process in enumerate(agents):
        assert process.wait(timeout=30) == 0, (server.root / f"a{i}.log").read_text()[-2000:]
    assert_globals_are_weighted_means(server.data_dir, 3)
    for name in secrets:
        file = server.root / name / "credential.json"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert json.loads(file.read_text())["credential"].startswith(tokens.CREDENTIAL_PREFIX)
    assert "refused" not in server.log()  # the WebSockets and every request were let in
    listed = _cli("token", "list", "--json", "--config", config)
    states = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted((s["kind"], s["state"]) for s in states) == [
        ("credential", "active")] * 3 + [("enrollment", "used")] * 3  # fmt: skip


def test_restarted_agent_uses_its_stored_credential(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(auth=True, min_agents=1, rounds=2)
    token = _token(server, "a0")
    first = start_agent(server, "a0", "engines:ShiftEngine", "--rounds", "1", "--token", token)
    agents.append(first)
    assert first.wait(timeout=60) == 0, (server.root / "a0.log").read_text()[-2000:]
    assert server.status()["global_round"] == 1
    # No token now: the credential in the workdir is what lets it back in.
    again = start_agent(server, "a0", "engines:ShiftEngine", extra_env={"FEDLOOP_TOKEN": ""})
    agents.append(again)
    server.wait_for(lambda s: s["finished"], timeout=60)
    assert again.wait(timeout=30) == 0, (server.root / "a0.log").read_text()[-2000:]
    assert server.status()["registered_agents"] == 1
    assert_globals_are_weighted_means(server.data_dir, 2)
    # Without the credential file and without a token, it is refused with a clear sentence.
    (server.root / "a0" / "credential.json").unlink()
    stranger = start_agent(server, "a0", "engines:ShiftEngine", extra_env={"FEDLOOP_TOKEN": ""})
    agents.append(stranger)
    assert stranger.wait(timeout=30) == 2
    assert "Authorization: Bearer" in (server.root / "a0.log").read_text()


def test_token_commands(make_server: Any, tmp_path: Path) -> None:
    data = str(tmp_path / "aggregator")  # made before the aggregator's first start
    made = _cli(
        "token", "create", "--name", "hospital-a", "--data-dir", data, "--expires-in", "3600"
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith(tokens.ENROLLMENT_PREFIX) and "shown once" in made.stderr
    admin = _cli("token", "admin", "--data-dir", data).stdout.strip()
    assert admin.startswith(tokens.ADMIN_PREFIX)
    listed = _cli("token", "list", "--data-dir", data)
    assert listed.returncode == 0 and "hospital-a" in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout and admin not in listed.stdout
    bad = _cli("token", "create", "--name", "no spaces", "--data-dir", data)
    assert (
        bad.returncode == 2 and "not an agent name" in bad.stderr and "Traceback" not in bad.stderr
    )

    server: Server = make_server(auth=True)
    client = AggregatorClient(server.url, token=token)
    client.token = client.register("hospital-a", GOOD).credential
    assert client.token
    assert _get(server, "/v1/history", admin).status_code == 200
    revoked = _cli("token", "revoke", "--name", "hospital-a", "--data-dir", data)
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout  # the credential
    with pytest.raises(Refused) as info:
        client.register("hospital-a")
    assert (info.value.status, info.value.code) == (401, "token_revoked")
    client.close()
    states = [
        json.loads(line)
        for line in _cli("token", "list", "--json", "--data-dir", data).stdout.splitlines()
    ]
    assert {(s["kind"], s["state"]) for s in states} == {
        ("enrollment", "used"), ("admin", "active"), ("credential", "revoked")
    }  # fmt: skip


def test_a_revoked_agent_is_out_of_the_run(make_server: Any) -> None:
    """docs/security.md: `fedloop token revoke` takes an agent out of the run. The running
    aggregator learns of it from the database, the threshold stops counting the agent, and a
    round whose other agents are all in closes; a restart keeps it out. Before, the round
    waited for the revoked agent for ever (threshold 1.0, no deadline)."""
    server: Server = make_server(auth=True)
    config = str(server.root / "aggregator.toml")
    ids, credentials = {}, {}
    for name in ("a", "b", "c"):
        ids[name], credentials[name] = _enroll(server, name, MODEL if name == "a" else b"")

    def send(name: str, round_number: int) -> None:
        client = AggregatorClient(server.url, token=credentials[name])
        try:
            client.upload(ids[name], round_number, MODEL, 10)
        finally:
            client.close()

    send("a", 1)
    send("b", 1)
    assert _cli("token", "revoke", "--name", "c", "--config", config).returncode == 0
    server.wait_for(lambda s: s["round"] == 2, timeout=30)
    assert server.status()["needed"] == 2
    with pytest.raises(Refused) as info:
        send("c", 2)
    assert info.value.code == "token_revoked"

    # Revoked after its upload: the upload stays in the round, but no longer counts.
    send("b", 2)
    assert _cli("token", "revoke", "--name", "b", "--config", config).returncode == 0
    status = server.wait_for(lambda s: s["needed"] == 1, timeout=30)
    assert (status["round"], status["uploads"]) == (2, 0)
    server.kill()
    server.start()
    status = server.status()
    assert (status["round"], status["uploads"], status["needed"]) == (2, 0, 1)
    send("a", 2)
    server.wait_for(lambda s: s["round"] == 3)
    rounds = _get(server, "/v1/history", _token(server, "x", tokens.ADMIN)).json()["rounds"]
    assert [h["agents"] for h in rounds] == [0, 2, 2]
    assert_globals_are_weighted_means(server.data_dir, 2)

    # A new enrollment token lets a revoked agent back in, at once.
    client = AggregatorClient(server.url, token=_token(server, "c"))
    client.register("c")
    client.close()
    assert server.status()["needed"] == 2


def test_deploy_config_turns_auth_on() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    assert tomllib.loads((root / "deploy" / "aggregator.toml").read_text())["auth"] is True
