"""The status board records deploys from the actions and events the loop hands it: which starts
count as a deploy is the machine's vocabulary (StartReason), not a list of strings here."""

from __future__ import annotations

import pytest

from supervisor.core.events import (
    ChildStarted,
    FetchFailed,
    Note,
    NoteName,
    StartChild,
    StartReason,
)
from supervisor.loop.status import StatusBoard

A, B = "a" * 40, "b" * 40


def started(board: StatusBoard, commit: str, reason: StartReason, now: float) -> None:
    board.observe(FetchFailed(error="x"), [StartChild(commit, reason)], now)
    board.observe(ChildStarted(pid=100, commit=commit), [], now)


@pytest.mark.parametrize("reason", [StartReason.DEPLOY, StartReason.DEPLOY_OVERLAP])
def test_a_deploy_with_or_without_overlap_becomes_the_last_deploy_once_healthy(reason):
    board = StatusBoard("app", 60.0, health_gate=True)
    started(board, A, StartReason.STARTUP, 1.0)
    board.observe(FetchFailed(error="x"), [Note(NoteName.HEALTH_PASSED, {})], 2.0)
    started(board, B, reason, 3.0)
    assert board.last_deploy is not None
    assert board.last_deploy["commit"] == B and board.last_deploy["result"] == "proving healthy"
    board.observe(FetchFailed(error="x"), [Note(NoteName.HEALTH_PASSED, {})], 4.0)
    assert board.last_deploy["commit"] == B and board.last_deploy["result"] == "succeeded"


@pytest.mark.parametrize("reason", [StartReason.CRASH, StartReason.START_REQUESTED,
                                    StartReason.RESTART, StartReason.RESTART_OVERLAP])
def test_a_start_of_the_same_release_is_not_a_deploy(reason):
    board = StatusBoard("app", 60.0)
    started(board, A, StartReason.STARTUP, 1.0)
    started(board, A, reason, 2.0)
    assert board.last_deploy is not None
    assert board.last_deploy["at"].startswith("1970-01-01T00:00:01"), "still the start-up"
