"""The first registration fixes the model and stores global model 0: a crash part-way through
it must not leave an aggregator that can never start round 1.

A SQLite trigger makes one of the first registration's writes fail, which leaves on disk
exactly what a SIGKILL between two of its commits would leave; then the aggregator is killed
and restarted on those files.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fault_engines import initial
from faultkit import Server, audit, violations

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.errors import ConnectionFailed
from fedloop.protocol import codec


@pytest.mark.parametrize("fail_table", ["agents", "global_models"])
def test_crash_inside_the_first_registration_still_lets_the_run_start(
    tmp_path: Path, fail_table: str
) -> None:
    server = Server(tmp_path, {"rounds": 1}).start()
    try:
        with sqlite3.connect(server.db_file) as db:
            db.execute(
                f"CREATE TRIGGER fault BEFORE INSERT ON {fail_table} "
                "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
        client = AggregatorClient(server.url, timeout=10)
        with pytest.raises(ConnectionFailed):  # a 500 (the trigger's error): retryable
            client.register("site-0", initial())
        client.close()
        server.kill()  # the process dies with the first registration half committed
        with sqlite3.connect(server.db_file) as db:
            db.execute("DROP TRIGGER fault")
        server.start()

        client = AggregatorClient(server.url, timeout=10)
        try:
            agent_id = client.register("site-0", initial()).agent_id
            status = server.status()
            assert (status["round"], status["global_round"]) == (1, 0), status
            try:
                client.upload(agent_id, 1, codec.encode(initial()), 10)
            except Refused as exc:
                raise AssertionError(f"round 1 never opens: {exc.code}: {exc}") from exc
            server.wait_for(lambda s: s["finished"], 30)
        finally:
            client.close()
        server.restart()
    finally:
        server.stop()
    assert violations(audit(server.data_dir)) == {}
