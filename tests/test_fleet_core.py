"""The fleet's shared rules, pure: which records from etcd are trusted (anything malformed or of
another version is rejected, never used), who the canaries are, and whether a box may go."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.fleet import (
    BoxRecord,
    GroupView,
    Keys,
    SlotRecord,
    Verdict,
    canaries,
    go_for,
    parse_record,
    record_bytes,
    rollout_id,
)

A, B = "a" * 40, "b" * 40
KEYS = Keys("/tiny-supervisor", "web")


def box(name: str, commit: str = A, healthy: bool = True) -> bytes:
    return record_bytes({"box": name, "app": "web", "phase": "running", "commit": commit,
                         "healthy": healthy})


def view_of(*entries: tuple[str, bytes | None]) -> GroupView:
    view = GroupView.empty()
    for key, value in entries:
        view.apply(KEYS, key, value)
    return view


def test_records_round_trip_through_their_keys():
    view = view_of((KEYS.box("fra-1"), box("fra-1")),
                   (KEYS.slot(0), record_bytes({"box": "fra-1", "commit": B})),
                   (KEYS.proven(A), record_bytes({"box": "fra-1"})),
                   (KEYS.held(B), record_bytes({"box": "fra-2", "reason": "build failed"})))
    assert view.boxes == {"fra-1": BoxRecord("fra-1", "web", "running", A, True)}
    assert view.slots == {0: SlotRecord("fra-1", B)}
    assert view.proven == {A: Verdict("fra-1")}
    assert view.held == {B: Verdict("fra-2", "build failed")}
    assert view.rejected == []
    view.apply(KEYS, KEYS.slot(0), None)
    assert view.slots == {}


def test_anything_malformed_or_from_another_version_is_rejected_and_not_used():
    bad = [
        (KEYS.box("fra-1"), b"not json"),
        (KEYS.box("fra-2"), json.dumps({"v": 2, "box": "fra-2"}).encode()),
        (KEYS.box("fra-3"), box("someone-else")),  # a record under another box's key
        (KEYS.box("fra-4"), record_bytes({"box": "fra-4", "app": "web", "phase": "running",
                                          "commit": "; rm -rf /", "healthy": True})),
        (KEYS.slot(0), record_bytes({"box": "fra-1", "commit": 7})),
        (KEYS.root + "slots/x", record_bytes({"box": "fra-1", "commit": A})),
        (KEYS.proven("not-a-commit"), record_bytes({"box": "fra-1"})),
        (KEYS.held(A), b"\xff\xfe"),
        (KEYS.held(B), b"[" * 5000),
    ]
    view = view_of(*bad)
    assert (view.boxes, view.slots, view.proven, view.held) == ({}, {}, {}, {})
    assert len(view.rejected) == len(bad)


def test_a_record_spoiled_later_drops_the_good_one_it_replaced():
    view = view_of((KEYS.held(A), record_bytes({"box": "fra-2"})), (KEYS.held(A), b"{}"))
    assert view.held == {}


@given(st.binary(max_size=300), st.sampled_from(["boxes", "slots", "proven", "held", "x"]))
def test_no_bytes_from_etcd_make_the_parser_raise(value, kind):
    parse_record(kind, A, value)
    view_of((KEYS.root + f"{kind}/{A}", value))


def test_canaries_are_the_first_names_and_everyone_agrees():
    assert canaries({"fra-3", "fra-1", "fra-2"}, 1) == ["fra-1"]
    assert canaries(["fra-3", "fra-1", "fra-2"], 2) == ["fra-1", "fra-2"]
    assert canaries({"fra-1"}, 3) == ["fra-1"]


def test_the_canary_goes_first_the_others_wait_for_its_proof():
    view = view_of(*((KEYS.box(n), box(n)) for n in ("fra-1", "fra-2", "fra-3")))
    assert go_for(view, "fra-1", B, canary=1).why == "canary"
    waiting = go_for(view, "fra-2", B, canary=1)
    assert not waiting.cleared and "fra-1" in waiting.waiting
    view.apply(KEYS, KEYS.proven(B), record_bytes({"box": "fra-1"}))
    assert go_for(view, "fra-2", B, canary=1).why == "proven"


def test_a_held_commit_is_held_even_on_the_canary_and_after_a_proof():
    view = view_of((KEYS.held(B), record_bytes({"box": "fra-3", "reason": "unhealthy"})),
                   (KEYS.proven(B), record_bytes({"box": "fra-1"})))
    go = go_for(view, "fra-1", B, canary=1)
    assert go.held and not go.cleared and (go.by, go.reason) == ("fra-3", "unhealthy")


def test_without_canaries_everyone_goes_and_a_lone_box_is_its_own_canary():
    assert go_for(GroupView.empty(), "fra-9", B, canary=0).cleared
    assert go_for(GroupView.empty(), "fra-9", B, canary=1).why == "canary"


def test_the_rollout_id_is_the_same_on_every_box():
    assert rollout_id("web", B) == "web@" + "b" * 12
