"""The HTTP API against fuzzed requests: from its OpenAPI schema, and mutated by hand."""

from __future__ import annotations

import schemathesis
from fuzzgen import deep, examples
from httpfuzz import Api, ApiFuzzer, api_request, short_polls
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

FUZZ = settings(
    deadline=None,
    derandomize=not deep(),
    database=None,
    suppress_health_check=list(HealthCheck),
)


def test_openapi_describes_every_route(api: Api) -> None:
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    paths = {op.ok().path for op in schema.get_all_operations()}
    for path in [
        "/v1/health",
        "/v1/register",
        "/v1/updates",
        "/v1/models/global/latest",
        "/v1/models/global/{round}",
        "/v1/models/global/{round}/state",
        "/v1/evaluations",
        "/v1/status",
        "/v1/history",
        "/v1/ws",
    ]:
        assert path in paths


def test_schemathesis(api: Api) -> None:
    """Every operation, positive and negative cases: no 5xx, answers match the schema, and a
    refused request changes nothing."""
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    fuzzer = ApiFuzzer(api.url, api.data_dir, api.agent_id)
    checks = [not_a_server_error, response_schema_conformance]
    tried = 0
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.definition.raw.get("x-fedloop-websocket"):
                continue
            for mode in GenerationMode:

                @settings(FUZZ, max_examples=examples(8))
                @given(case=operation.as_strategy(generation_mode=mode).map(short_polls))
                def run(case: schemathesis.Case) -> None:
                    nonlocal tried
                    tried += 1
                    before = fuzzer.snapshot()
                    response = case.call(base_url=api.url, timeout=15)
                    case.validate_response(response, checks=checks)
                    if response.status_code >= 400:
                        assert fuzzer.snapshot() == before, f"{case!r} changed the store"
                    elif case.method.upper() == "POST":
                        fuzzer.settled()

                try:
                    run()
                except Unsatisfiable:
                    # Nothing to make invalid (no parameters, no body): no negative cases.
                    assert mode is GenerationMode.NEGATIVE
    finally:
        fuzzer.close()
    assert tried > 0


def test_mutated_requests(api: Api) -> None:
    """Random and near-valid requests to every route: no 5xx, refusals change nothing."""
    fuzzer = ApiFuzzer(api.url, api.data_dir, api.agent_id)
    round_number = fuzzer.round()

    @settings(FUZZ, max_examples=examples(150))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        fuzzer.check(data.draw(api_request(api.agent_id, round_number)))

    try:
        run()
    finally:
        fuzzer.close()
