"""Random and mutated requests to a running aggregator, and the rules every answer must keep.

Rules: no 5xx (and no hang); a refused request (4xx) answers an ErrorResponse and leaves the
store (agents, local and global models, evaluations, blobs) and the round state unchanged; the
aggregator process stays up.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fuzzgen import (
    REFERENCE,
    REFERENCE_BYTES,
    json_values,
    message_dict,
    message_raw,
    model_bytes,
)
from harness import Server  # the integration tests' aggregator process
from hypothesis import strategies as st

from fedloop.agent.client import AggregatorClient
from fedloop.protocol.messages import MetricsReport, RegisterRequest, UploadRequest
from fedloop.protocol.version import MESSAGE_HEADER

TABLES = ("agents", "rounds", "local_models", "global_models", "evaluations")
STATE_KEYS = ("round", "global_round", "registered_agents", "uploads", "finished")
ROUTES = ("register", "updates", "evaluations", "latest", "global", "get", "wrong_method")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, bytes] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None

    def __repr__(self) -> str:
        body = None if self.content is None else self.content[:200]
        return f"Request({self.method} {self.path} {self.params} {self.headers} body={body!r})"


def _header_value(raw: str | bytes | None) -> bytes | None:
    """Make `raw` sendable as a header value (h11 refuses control bytes and edge whitespace)."""
    if raw is None:
        return None
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    data = bytes(32 if (b < 32 and b != 9) or b == 127 else b for b in data).strip(b" \t")
    return data or None


@st.composite
def near_valid(draw: st.DrawFn, cls: Any, agent_id: str, valid: dict[str, Any]) -> bytes:
    """A message that is valid, or valid with one or two fields replaced by odd values."""
    message = dict(valid)
    if draw(st.booleans()):
        message.update(draw(message_dict(cls)))
    if draw(st.integers(0, 3)) == 0:
        message["agent_id"] = agent_id
    return json.dumps(message, allow_nan=True).encode()


@st.composite
def api_request(draw: st.DrawFn, agent_id: str, round_number: int) -> Request:
    """One request to one of the API's routes, near-valid or random."""
    route = draw(st.sampled_from(ROUTES))
    if route in ("register", "updates"):
        cls = RegisterRequest if route == "register" else UploadRequest
        valid: dict[str, Any] = (
            {"protocol": 1, "agent_name": draw(st.sampled_from(["site-a", "fuzz-b"]))}
            if route == "register"
            else {"protocol": 1, "agent_id": agent_id, "round": round_number, "num_samples": 5}
        )
        header = draw(
            st.one_of(
                st.just(json.dumps(valid).encode()),
                near_valid(cls, agent_id, valid),
                message_raw(cls),
            )
        )
        body = draw(st.one_of(st.just(b""), model_bytes(REFERENCE_BYTES)))
        value = _header_value(header)
        headers = {MESSAGE_HEADER: value} if value is not None else {}
        if draw(st.integers(0, 5)) == 0:
            headers["content-type"] = draw(st.sampled_from([b"application/json", b"text/x"]))
        return Request("POST", f"/v1/{route}", headers, content=body)
    if route == "evaluations":
        valid = {"protocol": 1, "agent_id": agent_id, "round": 0, "metrics": {"accuracy": 0.5}}
        text = draw(
            st.one_of(
                near_valid(MetricsReport, agent_id, valid),
                message_raw(MetricsReport),
            )
        )
        content = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        return Request("POST", "/v1/evaluations", content=content or b"")
    if route == "latest":
        params = {}
        if draw(st.booleans()):
            params["after"] = draw(
                st.one_of(st.integers().map(str), st.text(max_size=8), st.just("9" * 5000))
            )
        if draw(st.booleans()):
            # Long polls are real waits: keep them under 50 ms.
            params["wait"] = draw(
                st.one_of(
                    st.sampled_from(["nan", "-inf", "-1", "0", "0.01", "1e-300", "-1e309", "x"]),
                    st.floats(-1e9, 0.05).map(repr),
                    st.text(max_size=6).filter(_short_wait),
                )
            )
        return Request("GET", "/v1/models/global/latest", params=params)
    if route == "global":
        number = draw(
            st.one_of(
                st.integers(0, 5),
                st.integers(0, 2**70),
                st.sampled_from([2**63 - 1, 2**63, 2**64, 10**40]),
            )
        )
        return Request("GET", f"/v1/models/global/{number}")
    if route == "get":
        path = draw(
            st.sampled_from(
                ["/v1/health", "/v1/status", "/v1/history", "/v1/dashboard", "/metrics", "/"]
            )
        )
        params = draw(
            st.dictionaries(
                st.sampled_from(["since", "after", "x"]),
                st.one_of(st.integers().map(str), st.text(max_size=8)),
                max_size=2,
            )
        )
        return Request("GET", path, params=params)
    method, path = draw(
        st.sampled_from(
            [
                ("GET", "/v1/register"),
                ("PUT", "/v1/updates"),
                ("DELETE", "/v1/models/global/0"),
                ("POST", "/v1/status"),
                ("POST", "/v1/models/global/latest"),
                ("GET", "/v1/ws"),
            ]
        )
    )
    return Request(method, path, content=_dumps_any(draw(json_values)))


def _dumps_any(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def short_polls(case: Any) -> Any:
    """Return a schemathesis case whose long poll (`wait`) lasts at most 50 ms."""
    query = case.query or {}
    if "wait" in query and not _short_wait(str(query["wait"])):
        query["wait"] = 0.05
    return case


def _short_wait(text: str) -> bool:
    try:
        return not float(text) > 0.05
    except ValueError:
        return True


class ApiFuzzer:
    """Sends requests to one aggregator and checks each answer against the rules."""

    def __init__(self, url: str, data_dir: Path, agent_id: str, timeout: float = 15.0) -> None:
        self.url = url
        self.data_dir = data_dir
        self.agent_id = agent_id
        # A request that takes this long has hung the aggregator (the long polls fuzzed wait
        # under 50 ms): a failure, reported as a timeout.
        self.http = httpx.Client(base_url=url, timeout=timeout)
        self.db = sqlite3.connect(f"file:{data_dir / 'fedloop.db'}?mode=ro", uri=True)

    def close(self) -> None:
        self.http.close()
        self.db.close()

    def round(self) -> int:
        return int(self.http.get("/v1/status").json()["round"])

    def snapshot(self) -> tuple[Any, ...]:
        """The store's row counts, its blobs, and the round state."""
        counts = tuple(self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES)
        blobs = frozenset(p.stem for p in (self.data_dir / "blobs").glob("*/*/*.safetensors"))
        status = self.http.get("/v1/status").json()
        return counts, blobs, tuple(status[k] for k in STATE_KEYS)

    def settled(self) -> tuple[Any, ...]:
        """A snapshot once an accepted request's effects (an aggregation) have landed."""
        last = self.snapshot()
        for _ in range(100):
            time.sleep(0.02)
            now = self.snapshot()
            if now == last:
                return now
            last = now
        return last

    def check(self, request: Request) -> None:
        """Send `request`; raise AssertionError if the answer breaks a rule."""
        before = self.snapshot()
        response = self.http.request(
            request.method,
            request.path,
            headers=request.headers,
            params=request.params,
            content=request.content,
        )
        status = response.status_code
        assert status < 500, f"{status} for {request!r}: {response.text[:500]}"
        if status >= 400:
            if response.headers.get("content-type", "").startswith("application/json"):
                payload = response.json()
                assert payload["error"] and payload["detail"], payload
            after = self.snapshot()
            assert after == before, f"refused ({status}) but changed {before} -> {after}"
        elif request.method == "POST":
            self.settled()


@dataclass
class Api:
    """A running aggregator and the id of the agent that fixed its model."""

    server: Any
    agent_id: str

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)


def start_api(root: Path) -> Api:
    """Start an aggregator in `root` and register one agent with the reference model."""
    server = Server(root, {"min_agents": 2, "max_model_bytes": 4096}).start()
    client = AggregatorClient(server.url)
    try:
        agent_id = client.register("site-a", REFERENCE).agent_id
    finally:
        client.close()
    return Api(server, agent_id)
