"""A longer fuzz run of the codec, every message parser and the HTTP API (docs/fuzzing.md).

The same generators and checks as tests/fuzz/, but every input runs to the end: a failing input
is counted (with its first line, deduplicated) instead of stopping the run, and an aggregator
that hangs or dies is replaced by a fresh one. Prints one JSON line: inputs tried and failures
per target, distinct failures, seconds. Failures must be 0.

    python bench/fuzz.py                       # 20 000 inputs per in-process target, 3 000 HTTP
    python bench/fuzz.py --examples 2000 --http-examples 300   # a quick run
    python bench/fuzz.py --no-http             # codec and messages only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# tests/procs.py and tests/integration (the aggregator the HTTP fuzz target starts), tests/fuzz.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fuzz"))

import fuzzgen
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def signature(exc: BaseException) -> str:
    """One line naming a failure: where in fedloop it was raised, its type and message."""
    if isinstance(exc, BaseExceptionGroup):  # schemathesis: the checks that failed
        return "; ".join(signature(e) for e in exc.exceptions)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/fedloop/" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} " if frames else ""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{where}{type(exc).__name__}: {text}"


class Target:
    """Counts the inputs a check saw and the distinct ways it failed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = 0
        self.failures = 0
        self.distinct: Counter[str] = Counter()
        self.example: dict[str, str] = {}

    def run(self, check: Callable[[], None], shown: Callable[[], str]) -> None:
        self.inputs += 1
        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # counted; the run goes on
            self.failures += 1
            key = signature(exc)
            self.distinct[key] += 1
            self.example.setdefault(key, shown()[:300])


def run_hypothesis(
    target: Target, strategy: st.SearchStrategy[Any], check: Callable[[Any], None], count: int
) -> None:
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def body(value: Any) -> None:
        target.run(lambda: check(value), lambda: repr(value))

    body()


def fuzz_in_process(count: int) -> list[Target]:
    targets = []
    for name, strategy in [
        ("codec_any_model", fuzzgen.model_bytes()),
        ("codec_mutated_reference", fuzzgen.model_bytes(fuzzgen.REFERENCE_BYTES)),
        ("codec_random_bytes", st.binary(max_size=256)),
    ]:
        target = Target(name)
        run_hypothesis(target, strategy, fuzzgen.check_codec, count)
        targets.append(target)
    for cls in fuzzgen.MESSAGE_CLASSES:
        target = Target(f"message_{cls.__name__}")
        run_hypothesis(
            target,
            fuzzgen.message_raw(cls),
            lambda raw, cls=cls: fuzzgen.check_message(cls, raw),
            max(1, count // 4),
        )
        targets.append(target)
    return targets


class Aggregator:
    """A fresh aggregator process, replaced when one hangs or dies."""

    def __init__(self, root: Path) -> None:
        import httpfuzz

        self.httpfuzz = httpfuzz
        self.root = root
        self.starts = 0
        self.api: Any = None
        self.fuzzer: Any = None
        self.restart()

    def restart(self) -> None:
        self.stop()
        self.starts += 1
        root = self.root / f"run{self.starts}"
        root.mkdir(parents=True)
        self.api = self.httpfuzz.start_api(root)
        self.fuzzer = self.httpfuzz.ApiFuzzer(self.api.url, self.api.data_dir, self.api.agent_id)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.api.url + "/v1/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.api is not None:
            self.fuzzer.close()
            self.api.server.stop()


def fuzz_http(count: int, root: Path) -> tuple[list[Target], int]:
    import schemathesis
    from httpfuzz import api_request, short_polls
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    server = Aggregator(root)
    mutated = Target("http_mutated_requests")
    openapi = Target("http_schemathesis")
    try:

        def send(request: Any) -> None:
            try:
                server.fuzzer.check(request)
            finally:
                if not server.healthy():
                    server.restart()

        run_hypothesis(
            mutated,
            st.data(),
            lambda data: send(data.draw(api_request(server.api.agent_id, 1))),
            count,
        )

        schema = schemathesis.openapi.from_url(server.api.url + "/openapi.json")
        operations = [
            op.ok()
            for op in schema.get_all_operations()
            if not op.ok().definition.raw.get("x-fedloop-websocket")
        ]
        checks = [not_a_server_error, response_schema_conformance]

        def call(case: Any) -> None:
            try:
                before = server.fuzzer.snapshot()
                response = case.call(base_url=server.api.url, timeout=15)
                case.validate_response(response, checks=checks)
                if response.status_code >= 400:
                    assert server.fuzzer.snapshot() == before, "a refused request changed state"
            finally:
                if not server.healthy():
                    server.restart()

        per_operation = max(1, count // (2 * len(operations)))
        for operation in operations:
            for mode in GenerationMode:
                try:
                    run_hypothesis(
                        openapi,
                        operation.as_strategy(generation_mode=mode).map(short_polls),
                        call,
                        per_operation,
                    )
                except Exception as exc:  # Unsatisfiable: nothing to make invalid
                    if "Unsatisfiable" not in type(exc).__name__:
                        raise
    finally:
        log = server.api.server.log()
        server.stop()
    if "Traceback" in log:
        mutated.failures += 1
        mutated.distinct["the aggregator logged a traceback"] += 1
    return [mutated, openapi], server.starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="per in-process target")
    parser.add_argument("--http-examples", type=int, default=3_000, help="per HTTP target")
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    starts = 0
    # hypothesis prints replay hints; stdout carries only the result line
    with contextlib.redirect_stdout(sys.stderr):
        targets = fuzz_in_process(args.examples)
        if not args.no_http:
            with tempfile.TemporaryDirectory(prefix="fedloop-fuzz-") as root:
                http_targets, starts = fuzz_http(args.http_examples, Path(root))
                targets += http_targets
    result = {
        "bench": "fuzz",
        "targets": {t.name: {"inputs": t.inputs, "failures": t.failures} for t in targets},
        "inputs": sum(t.inputs for t in targets),
        "failures": sum(t.failures for t in targets),
        "distinct_failures": [
            {"target": t.name, "failure": key, "count": n, "example": t.example[key]}
            for t in targets
            for key, n in t.distinct.most_common()
        ],
        "aggregator_starts": starts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
