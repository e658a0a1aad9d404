"""Agents killed mid-upload, cut off, black-holed and late: rounds close by threshold or
deadline, late uploads are refused with round_closed, and the agents carry on."""

from __future__ import annotations

from pathlib import Path

import fault_scenarios as scenarios
from faultkit import violations


def test_agent_killed_mid_upload_resumes_and_uploads_again(tmp_path: Path) -> None:
    report = scenarios.agent_killed_mid_upload(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 2


def test_agent_killed_mid_upload_before_its_model_is_on_disk_trains_again(
    tmp_path: Path,
) -> None:
    report = scenarios.agent_killed_mid_upload(tmp_path, saved=False)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 2


def test_agent_cut_off_past_the_deadline_reconnects_and_takes_part_again(
    tmp_path: Path,
) -> None:
    report = scenarios.connection_dropped(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 4


def test_agent_black_holed_mid_upload_is_refused_round_closed_and_moves_on(
    tmp_path: Path,
) -> None:
    report = scenarios.connection_paused(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 3


def test_straggler_slower_than_the_deadline_is_refused_and_moves_on(tmp_path: Path) -> None:
    report = scenarios.straggler(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 4


def test_agents_behind_a_balancer_wait_out_an_aggregator_restart(tmp_path: Path) -> None:
    report = scenarios.restart_behind_a_balancer(tmp_path)
    assert violations(report) == {}, report
    assert report["rounds_completed"] == 3
