"""The Prometheus page of a real Aggregator (in-process, real SQLite file) after real rounds."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedloop.aggregator import metrics
from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig
from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest

# Text exposition format 0.0.4, strictly: comments are HELP or TYPE, samples are
# name{label="value",...} value, with the escapes the format allows in label values.
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf)"
SAMPLE = re.compile(rf"^({NAME})(\{{{LABEL}(?:,{LABEL})*\}})? ({VALUE})$")
HELP = re.compile(rf"^# HELP ({NAME}) .+$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")


def weights(value: float) -> bytes:
    return codec.encode({"w": np.full((2, 2), value, np.float32)})


async def run_rounds(config: AggregatorConfig, rounds: int) -> Aggregator:
    """Two agents, `rounds` synchronous rounds, and one refused upload."""
    agg = Aggregator(config)
    await agg.start()
    ids = []
    for name in ("a", "b"):
        reply = await agg.register(RegisterRequest(agent_name=name), weights(0.0))
        ids.append(reply.agent_id)
    for number in range(1, rounds + 1):
        for agent_id in ids:
            await agg.upload(
                UploadRequest(agent_id=agent_id, round=number, num_samples=5, metrics={}),
                weights(float(number)),
            )
        for _ in range(200):
            if agg.global_round == number:
                break
            await asyncio.sleep(0.01)
    with pytest.raises(ProtocolError):
        await agg.upload(
            UploadRequest(agent_id=ids[0], round=1, num_samples=5, metrics={}), weights(1.0)
        )
    agg.stats["rejected"] += 1  # what the app's error handler counts
    return agg


def parse(text: str) -> dict[str, float]:
    """Check every line against the format; return {sample with labels: value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            help_line, type_line = HELP.match(line), TYPE.match(line)
            assert help_line or type_line, line
            if type_line:
                assert type_line.group(1) not in typed, f"TYPE twice: {line}"
                typed[type_line.group(1)] = type_line.group(2)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
        assert match.group(1) in typed or family in typed, f"sample before its TYPE: {line}"
        key = match.group(1) + (match.group(2) or "")
        assert key not in samples, f"sample twice: {line}"
        samples[key] = float(match.group(3))
    return samples


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    config = AggregatorConfig(data_dir=tmp_path, min_agents=2, round_timeout=600)
    agg = asyncio.run(run_rounds(config, rounds=3))
    yield agg
    agg.store.close()


def test_render_reports_rounds_agents_traffic_and_durations(aggregator: Aggregator) -> None:
    values = parse(metrics.render(aggregator))
    assert values["fedloop_round"] == 4
    assert values["fedloop_global_round"] == 3
    assert values["fedloop_rounds_completed_total"] == 3
    assert values["fedloop_round_uploads"] == 0
    assert values["fedloop_round_uploads_needed"] == 2
    assert 0 < values["fedloop_round_deadline_seconds"] <= 600
    assert values["fedloop_finished"] == 0
    assert values["fedloop_agents_registered"] == 2
    assert values["fedloop_agents_connected"] == 0
    assert values["fedloop_uploads_total"] == 6
    assert values['fedloop_rejected_requests_total{reason="unclassified"}'] == 1
    assert values["fedloop_received_bytes_total"] == aggregator.stats["bytes_in"] > 0
    assert values["fedloop_sent_bytes_total"] == 0
    # One observation per aggregated round (round 0, the initial model, is not one).
    assert values["fedloop_round_duration_seconds_count"] == 3
    assert values['fedloop_round_duration_seconds_bucket{le="+Inf"}'] == 3
    assert values['fedloop_round_duration_seconds_bucket{le="0.5"}'] <= 3
    assert values["fedloop_round_duration_seconds_sum"] >= 0
    # The aggregator times each of its three aggregations.
    assert values["fedloop_aggregation_duration_seconds_count"] == 3


def test_reasons_aggregation_times_and_model_metrics(aggregator: Aggregator) -> None:
    """Refusals by reason, aggregation times and global-model metrics all show."""
    aggregator.rejected_by_reason = {"round_closed": 1, 'odd "reason"\n': 2}
    aggregator.stats["rejected"] = 3
    aggregator.aggregation_seconds = [0.002, 0.2, 7.0]
    assert aggregator.global_model is not None
    aggregator.global_model.metrics = {"accuracy": 0.75, "loss": float("nan")}
    text = metrics.render(aggregator)
    values = parse(text)
    assert values['fedloop_rejected_requests_total{reason="round_closed"}'] == 1
    assert values['fedloop_rejected_requests_total{reason="odd \\"reason\\"\\n"}'] == 2
    assert not any("unclassified" in key for key in values)
    assert values['fedloop_aggregation_duration_seconds_bucket{le="0.005"}'] == 1
    assert values['fedloop_aggregation_duration_seconds_bucket{le="1"}'] == 2
    assert values['fedloop_aggregation_duration_seconds_bucket{le="+Inf"}'] == 3
    assert values["fedloop_aggregation_duration_seconds_sum"] == pytest.approx(7.202)
    assert values['fedloop_global_model_metric{metric="accuracy"}'] == 0.75
    assert 'fedloop_global_model_metric{metric="loss"} NaN' in text


def test_prometheus_client_parses_the_page(aggregator: Aggregator) -> None:
    parser = pytest.importorskip(
        "prometheus_client.parser", reason="prometheus-client is not installed"
    )
    aggregator.rejected_by_reason = {"too_large": 4}
    families = {
        f.name: f for f in parser.text_string_to_metric_families(metrics.render(aggregator))
    }
    # The parser drops a counter's _total suffix from the family name.
    assert families["fedloop_rounds_completed"].type == "counter"
    assert families["fedloop_round"].samples[0].value == 4
    rejected = {s.labels["reason"]: s.value for s in families["fedloop_rejected_requests"].samples}
    assert rejected == {"too_large": 4}
    histogram = families["fedloop_round_duration_seconds"]
    assert histogram.type == "histogram"
    buckets = [s.value for s in histogram.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 3


def test_round_durations_are_read_once_per_global_model(aggregator: Aggregator) -> None:
    first = metrics.round_seconds(aggregator)
    reads = []
    original = aggregator.store.global_models
    aggregator.store.global_models = lambda: reads.append(1) or original()  # type: ignore[method-assign]
    assert metrics.round_seconds(aggregator) is first
    assert reads == []
