"""Kill -9 the aggregator in each phase of a round and restart it: the run finishes, every
committed global model is still there, no round is counted twice, no blob is orphaned."""

from __future__ import annotations

from pathlib import Path

import fault_scenarios as scenarios
import pytest
from faultkit import NoSmallDisk, violations


def test_killed_during_registration_keeps_every_acknowledged_agent(tmp_path: Path) -> None:
    report = scenarios.kill_during_registration(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 2 and report["kills"] == 1


def test_killed_mid_upload_keeps_the_round_and_collects_the_orphaned_blob(tmp_path: Path) -> None:
    report = scenarios.kill_mid_upload(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 2 and report["kills"] == 2


def test_killed_during_aggregation_aggregates_the_round_once_after_restart(
    tmp_path: Path,
) -> None:
    report = scenarios.kill_during_aggregation(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 3 and report["kills"] == 1


def test_killed_during_distribution_of_a_big_model_the_agent_fetches_it_again(
    tmp_path: Path,
) -> None:
    report = scenarios.kill_during_distribution(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 2 and report["kills"] == 1


def test_disk_full_refuses_uploads_then_retries_the_aggregation_and_finishes(
    tmp_path: Path,
) -> None:
    try:
        report = scenarios.disk_full(tmp_path)
    except NoSmallDisk as exc:
        pytest.skip(f"the disk-full scenario mounts a small tmpfs: {exc}")
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 3 and report["refused_storage_full"] >= 2
