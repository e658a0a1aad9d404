"""The aggregator's API as an OpenAPI 3.1 document, served at `/openapi.json`.

Written by hand from docs/protocol.md, with every JSON message's schema taken from its pydantic
model, so the document cannot drift from what the aggregator validates. Schemathesis fuzzes the
API from it (tests/fuzz/). Two things OpenAPI says only in words: a model travels as a binary
safetensors body with its JSON message in the `x-fedloop-message` header, and `/v1/ws` is a
WebSocket (`x-fedloop-websocket: true`), which HTTP clients cannot call.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fedloop.protocol.messages import (
    ErrorResponse,
    GlobalModelInfo,
    MetricsReport,
    PushMessage,
    RegisterRequest,
    RegisterResponse,
    SecAggAccepted,
    SecAggAdvertise,
    SecAggJoined,
    SecAggKeyList,
    SecAggMaskedInput,
    SecAggRelayed,
    SecAggShares,
    SecAggSurvivors,
    SecAggUnmask,
    StatusResponse,
    UploadRequest,
    UploadResponse,
)
from fedloop.protocol.version import MESSAGE_HEADER, PROTOCOL_VERSION

_REF = "#/components/schemas/{model}"
# Requests are described as the aggregator validates them, responses as it writes them.
_REQUESTS: tuple[type[BaseModel], ...] = (
    RegisterRequest,
    UploadRequest,
    MetricsReport,
    SecAggAdvertise,
    SecAggShares,
    SecAggMaskedInput,
    SecAggUnmask,
)
_RESPONSES: tuple[type[BaseModel], ...] = (
    RegisterResponse,
    UploadResponse,
    GlobalModelInfo,
    StatusResponse,
    ErrorResponse,
    PushMessage,
    SecAggJoined,
    SecAggKeyList,
    SecAggRelayed,
    SecAggSurvivors,
    SecAggAccepted,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _schemas() -> dict[str, Any]:
    """Return the components' schemas: every message, with its nested definitions."""
    schemas: dict[str, Any] = {}
    for models, mode in ((_REQUESTS, "validation"), (_RESPONSES, "serialization")):
        for model in models:
            schema = model.model_json_schema(mode=mode, ref_template=_REF)  # type: ignore[arg-type]
            schemas.update(schema.pop("$defs", {}))
            if model in _REQUESTS:
                # Any other version is refused before the fields are read (unsupported_protocol).
                schema["properties"]["protocol"] = {
                    "const": PROTOCOL_VERSION,
                    "default": PROTOCOL_VERSION,
                }
            schemas[model.__name__] = schema
    schemas["Health"] = {
        "type": "object",
        "properties": {"ok": {"const": True}, "protocol": {"const": PROTOCOL_VERSION}},
        "required": ["ok", "protocol"],
    }
    schemas["Accepted"] = {
        "type": "object",
        "properties": {"protocol": {"const": PROTOCOL_VERSION}, "accepted": {"const": True}},
        "required": ["protocol", "accepted"],
    }
    schemas["History"] = {
        "type": "object",
        "properties": {
            "protocol": {"const": PROTOCOL_VERSION},
            "rounds": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "round": {"type": "integer"},
                        "agents": {"type": "integer"},
                        "samples": {"type": "integer"},
                        "global_metrics": {
                            "type": "object",
                            "additionalProperties": {"type": "number"},
                        },
                        "local_metrics_mean": {
                            "type": "object",
                            "additionalProperties": {"type": "number"},
                        },
                        "bytes_in": {"type": "integer"},
                        "seconds": {"type": "number"},
                        "created_at": {"type": "number"},
                    },
                    "required": ["round", "agents", "samples", "global_metrics"],
                },
            },
        },
        "required": ["protocol", "rounds"],
    }
    return schemas


def _message_header(model: type[BaseModel], required: bool, what: str) -> dict[str, Any]:
    return {
        "name": MESSAGE_HEADER,
        "in": "header",
        "required": required,
        "description": f"The {model.__name__} message as JSON (ASCII). {what}",
        "content": {"application/json": {"schema": _ref(model)}},
    }


_MODEL_BODY = {
    "description": "safetensors bytes (8-byte little-endian header length, JSON header, data)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _json(model_or_name: type[BaseModel] | str, description: str) -> dict[str, Any]:
    schema = (
        {"$ref": _REF.format(model=model_or_name)}
        if isinstance(model_or_name, str)
        else _ref(model_or_name)
    )
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: tuple[int, str]) -> dict[str, Any]:
    codes += ((401, "with auth on: a missing, unknown or revoked bearer token"),)
    return {str(status): _json(ErrorResponse, text) for status, text in codes}


_BAD_MESSAGE = (400, "missing_message, bad_json, unsupported_protocol or bad_model")
_INVALID = (
    422,
    "invalid_message, a model that does not match (bad_dtype, wrong_names, …), or "
    "missing_extras / wrong_extras: the strategy's extra tensors are absent or do not match",
)
_TOO_LARGE = (413, "too_large: the body is over max_model_bytes")


_SECAGG_REFUSALS = (
    (
        409,
        "secagg_off (secure aggregation is off), round_closed, round_not_open, run_finished, "
        "no_model, secagg_closed (not in the round's cohort, or too late), secagg_phase, "
        "secagg_restart (the round's protocol started over: advertise new keys)",
    ),
    (404, "unknown_agent: the agent id was never registered"),
    (403, "with auth on: the credential is not this agent's"),
)


# The `{round}` of a path: a global model's (or a secure-aggregation round's) number.
_ROUND_PARAM = {
    "name": "round",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}


def _secagg_paths() -> dict[str, Any]:
    """Return the `/v1/secagg/{round}/…` operations (secure aggregation, docs/privacy.md)."""
    poll_params = [
        _ROUND_PARAM,
        {"name": "agent_id", "in": "query", "required": True, "schema": {"type": "string"}},
        {
            "name": "attempt",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "default": 0},
        },
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
            "description": "Seconds to wait for the phase to close (at most 60).",
        },
    ]
    not_yet = {
        "description": "the phase is still open after `wait` seconds",
        "headers": {"x-fedloop-status": {"schema": {"const": "not-yet"}}},
    }

    def post(
        operation: str, summary: str, model: type[BaseModel], reply: type[BaseModel]
    ) -> dict[str, Any]:
        return {
            "operationId": operation,
            "summary": summary,
            "parameters": [_ROUND_PARAM],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(model)}},
            },
            "responses": {
                "200": _json(reply, "taken"),
                **_errors(
                    (400, "missing_message, bad_json or unsupported_protocol"),
                    *_SECAGG_REFUSALS,
                    (413, "too_large"),
                    (422, "invalid_message or secagg_invalid: a field or key is wrong"),
                ),
            },
        }

    def get(operation: str, summary: str, reply: type[BaseModel]) -> dict[str, Any]:
        return {
            "operationId": operation,
            "summary": summary,
            "parameters": poll_params,
            "responses": {
                "200": _json(reply, "the closed phase's answer for this agent"),
                "204": not_yet,
                **_errors(
                    (400, "bad_request: `agent_id` missing, `attempt` or `wait` not a number"),
                    *_SECAGG_REFUSALS,
                ),
            },
        }

    base = "/v1/secagg/{round}"
    return {
        f"{base}/keys": {
            "post": post(
                "secaggAdvertise",
                "Secure aggregation, round 0: join the round's cohort with two public keys.",
                SecAggAdvertise,
                SecAggJoined,
            ),
            "get": get(
                "secaggKeyList",
                "The cohort's public keys and the round's parameters (long poll).",
                SecAggKeyList,
            ),
        },
        f"{base}/shares": {
            "post": post(
                "secaggShares",
                "Round 1: the agent's encrypted key shares, one per other client.",
                SecAggShares,
                SecAggAccepted,
            ),
            "get": get(
                "secaggRelayed",
                "The encrypted shares addressed to this agent (long poll).",
                SecAggRelayed,
            ),
        },
        f"{base}/masked": {
            "post": {
                "operationId": "secaggMaskedInput",
                "summary": "Round 2: the masked input vector.",
                "parameters": [
                    _ROUND_PARAM,
                    _message_header(SecAggMaskedInput, True, "Required."),
                ],
                "requestBody": {
                    "required": True,
                    "description": "the masked vector: `dimension` little-endian unsigned "
                    "integers of `num_bits` bits",
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
                "responses": {
                    "200": _json(SecAggAccepted, "taken"),
                    **_errors(
                        (400, "missing_message, bad_json or unsupported_protocol"),
                        *_SECAGG_REFUSALS,
                        (413, "too_large: longer than a masked vector"),
                        (422, "invalid_message or secagg_invalid: wrong length"),
                    ),
                },
            },
            "get": get(
                "secaggSurvivors",
                "U3, the clients whose masked input arrived (long poll).",
                SecAggSurvivors,
            ),
        },
        f"{base}/unmask": {
            "post": post(
                "secaggUnmask",
                "Round 3: shares of surviving clients' seeds and dropped clients' keys.",
                SecAggUnmask,
                SecAggAccepted,
            ),
            "get": get(
                "secaggOutcome",
                "Acknowledged once the round's global model is committed (long poll); "
                "409 round_closed means the same.",
                SecAggAccepted,
            ),
        },
    }


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness and the protocol version the aggregator speaks.",
                "responses": {"200": _json("Health", "the aggregator is up")},
            }
        },
        "/v1/register": {
            "post": {
                "operationId": "register",
                "summary": "An agent's participate → welcome; the same name gets the same id.",
                "parameters": [_message_header(RegisterRequest, True, "Required.")],
                "requestBody": {
                    **_MODEL_BODY,
                    "required": False,
                    "description": "The agent's initial model: required from the first agent "
                    "(it fixes names, shapes and dtypes), optional later.",
                },
                "responses": {
                    "200": _json(RegisterResponse, "registered (or already registered)"),
                    **_errors(
                        _BAD_MESSAGE,
                        (403, "too_many_agents: max_agents reached"),
                        _TOO_LARGE,
                        (422, "invalid_message, initial_model_required, or a model mismatch"),
                    ),
                },
            }
        },
        "/v1/updates": {
            "post": {
                "operationId": "upload",
                "summary": "Upload a local model for a round.",
                "parameters": [_message_header(UploadRequest, True, "Required.")],
                "requestBody": {
                    **_MODEL_BODY,
                    "required": True,
                    "description": "The local model; with a strategy that has side tensors "
                    "(SCAFFOLD, FedCurv) also its extra tensors, named <prefix><tensor>, "
                    "in the same safetensors body.",
                },
                "responses": {
                    "200": _json(UploadResponse, "the local model was accepted"),
                    **_errors(
                        _BAD_MESSAGE,
                        (404, "unknown_agent: the agent id was never registered"),
                        (409, "round_closed, round_not_open, duplicate_upload or run_finished"),
                        _TOO_LARGE,
                        _INVALID,
                    ),
                },
            }
        },
        "/v1/models/global/latest": {
            "get": {
                "operationId": "latestGlobalModel",
                "summary": "The newest global model if its round is above `after` (long poll).",
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "default": -1},
                        "description": "Answer only with a global model of a later round.",
                    },
                    {
                        "name": "wait",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
                        "description": "Seconds to wait for one (at most 60).",
                    },
                    {
                        "name": "agent_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The agent waiting (its own id): the WebSocket "
                        "announcement of the model this request gets is not sent to it.",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the global model as safetensors bytes",
                        "headers": {
                            MESSAGE_HEADER: {
                                "description": "The GlobalModelInfo message as JSON.",
                                "required": True,
                                "content": {"application/json": {"schema": _ref(GlobalModelInfo)}},
                            }
                        },
                        "content": _MODEL_BODY["content"],
                    },
                    "204": {
                        "description": "no newer global model within `wait` seconds",
                        "headers": {"x-fedloop-status": {"schema": {"const": "not-yet"}}},
                    },
                    **_errors(
                        (400, "bad_request: `after` or `wait` is not a number"),
                        (
                            403,
                            "wrong_token_type (an enrollment token), or wrong_agent: "
                            "`agent_id` is not the credential's agent",
                        ),
                        (404, "unknown_agent: `agent_id` is not registered"),
                    ),
                },
            }
        },
        "/v1/models/global/{round}": {
            "get": {
                "operationId": "globalModel",
                "summary": "The stored global model of a round (immutable, cacheable).",
                "parameters": [_ROUND_PARAM],
                "responses": {
                    "200": {
                        "description": "the global model (safetensors); ETag: its BLAKE3 hash",
                        "headers": {"etag": {"schema": {"type": "string"}}},
                        "content": _MODEL_BODY["content"],
                    },
                    **_errors((404, "no_such_round: no global model for that round")),
                },
            }
        },
        "/v1/models/global/{round}/state": {
            "get": {
                "operationId": "strategyState",
                "summary": "The tensors the strategy ships with a global model (SCAFFOLD's "
                "control variate, FedCurv's sums), when GlobalModelInfo.side.state says so.",
                "parameters": [_ROUND_PARAM],
                "responses": {
                    "200": {
                        "description": "the shipped tensors (safetensors, float64)",
                        "content": _MODEL_BODY["content"],
                    },
                    **_errors(
                        (403, "wrong_token_type: an enrollment token"),
                        (
                            404,
                            "no_such_round: no global model for that round; no_state: the "
                            "strategy ships no tensors with it",
                        ),
                    ),
                },
            }
        },
        "/v1/evaluations": {
            "post": {
                "operationId": "evaluation",
                "summary": "An agent's evaluation of a global model on its own data.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(MetricsReport)}},
                },
                "responses": {
                    "200": _json("Accepted", "the report was stored"),
                    **_errors(
                        (400, "missing_message, bad_json or unsupported_protocol"),
                        (404, "unknown_agent: the agent id was never registered"),
                        (413, "too_large: the body is over 1 MiB"),
                        (422, "invalid_message: a field is wrong"),
                    ),
                },
            }
        },
        "/v1/status": {
            "get": {
                "operationId": "status",
                "summary": "Where the run stands.",
                "responses": {"200": _json(StatusResponse, "the run's state")},
            }
        },
        "/v1/history": {
            "get": {
                "operationId": "history",
                "summary": "One summary per global model.",
                "responses": {"200": _json("History", "every round so far")},
            }
        },
        "/v1/ws": {
            "get": {
                "operationId": "push",
                "summary": "WebSocket: PushMessage on each new global model (and on connect).",
                "description": "Open with a WebSocket handshake. The server sends PushMessage "
                "JSON text frames; an unknown agent is closed with code 4404.",
                "x-fedloop-websocket": True,
                "x-fedloop-push-message": _ref(PushMessage),
                "parameters": [
                    {
                        "name": "agent_id",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"101": {"description": "switching to the WebSocket protocol"}},
            }
        },
        "/v1/dashboard": {
            "get": {
                "operationId": "dashboard",
                "summary": "The dashboard's data: rounds after `since`, agents, status.",
                "parameters": [
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "default": -1},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "dashboard data",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors((400, "bad_request: `since` is not an integer")),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
    paths.update(_secagg_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fedloop aggregator",
            "version": f"protocol {PROTOCOL_VERSION}",
            "description": "The wire protocol of docs/protocol.md. A model travels as "
            f"safetensors bytes with its JSON message in the `{MESSAGE_HEADER}` header; every "
            "refusal is an ErrorResponse with a 4xx status and changes nothing.",
        },
        "paths": paths,
        # With auth on (docs/security.md) agents send `Authorization: Bearer`; off, nothing.
        "security": [{}, {"bearer": []}],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def document() -> dict[str, Any]:
    """Return the OpenAPI document of the aggregator's API (a fresh copy)."""
    return copy.deepcopy(_document())


async def endpoint(request: Request) -> Response:
    """Serve the OpenAPI document."""
    return JSONResponse(_document())
