"""The persisted state survives restarts and damage: a bad file means "nothing known"."""

from __future__ import annotations

import json

from supervisor.statefile import ChildRecord, StateStore


def test_state_round_trips_through_the_file(tmp_path):
    store = StateStore(tmp_path / "state")
    store.save(built="a" * 40)
    store.save(child=ChildRecord(pid=123, start_ticks=456, boot_id="boot", commit="a" * 40))
    loaded = StateStore(tmp_path / "state").load()
    assert loaded.built == "a" * 40
    assert loaded.child == ChildRecord(123, 456, "boot", "a" * 40)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["state.json"]  # no temp left


def test_a_damaged_or_foreign_state_file_means_nothing_is_known(tmp_path):
    record = '"start_ticks": 5, "boot_id": "b"'
    for content in (b"", b"{not json", b"[1, 2]", b"\xff\xfe", b'{"built": 5}',
                    b'{"child": {"pid": "7", %s}}' % record.encode(),
                    b'{"child": {"pid": 1, %s}}' % record.encode(),  # never init
                    b'{"child": {"pid": true, %s}}' % record.encode(),
                    b'{"child": {"pid": 7, "start_ticks": 5.5, "boot_id": "b"}}',
                    b'{"child": {"pid": 7, "start_ticks": 5}}'):
        (tmp_path / "state.json").write_bytes(content)
        loaded = StateStore(tmp_path).load()
        assert loaded.child is None and loaded.built is None, content
    (tmp_path / "state.json").write_text('{"child": {"pid": 7, ' + record + '}}')
    assert StateStore(tmp_path).load().child == ChildRecord(7, 5, "b", None)


def test_saving_replaces_the_file_whole(tmp_path):
    store = StateStore(tmp_path)
    store.save(built="b" * 40)
    inode = (tmp_path / "state.json").stat().st_ino
    store.save(built="c" * 40)
    assert (tmp_path / "state.json").stat().st_ino != inode  # renamed over, never rewritten
    assert json.loads((tmp_path / "state.json").read_text())["built"] == "c" * 40


def test_a_full_disk_is_reported_not_raised_and_the_next_save_catches_up(full_disk):
    reports = []
    store = StateStore(full_disk.directory,
                       report=lambda event, facts: reports.append((event, facts)))
    store.save(built="a" * 40)
    full_disk.fill()
    store.save(failed="b" * 40)
    store.save(failed="c" * 40)  # the same error again: reported once
    assert [event for event, _ in reports] == ["state.save_failed"]
    assert reports[0][1]["error"] == "No space left on device"
    assert store.current.failed == "c" * 40, "what it knows in memory is kept"
    assert sorted(p.name for p in full_disk.directory.iterdir()) == ["filler", "state.json"], \
        "a half-written temporary file was left behind"
    full_disk.free()
    store.save(held=("b" * 40,))
    assert reports[-1][0] == "state.saved_again"
    assert StateStore(full_disk.directory).load().failed == "c" * 40
