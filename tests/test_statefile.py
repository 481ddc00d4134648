"""The persisted state survives restarts and damage: a bad file means "nothing known"."""

from __future__ import annotations

import json

from supervisor.drivers.statefile import ChildRecord, StateStore


def test_state_round_trips_through_the_file(tmp_path):
    store = StateStore(tmp_path / "state")
    store.save(built="a" * 40)
    store.save(child=ChildRecord(pid=123, start_ticks=456, boot_id="boot", commit="a" * 40))
    loaded = StateStore(tmp_path / "state").load()
    assert loaded.built == "a" * 40
    assert loaded.child == ChildRecord(123, 456, "boot", "a" * 40)
    # The state and its spare copy (room for the next save, allocated while there is room).
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        ".state.json.spare", "state.json"]


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


def test_the_state_still_reaches_a_full_disk(full_disk):
    """The app's identity must be on disk even then: a supervisor killed now must recognise the
    app it leaves (found by the chaos soak: with [[socket]], the next one could not bind)."""
    store = StateStore(full_disk.directory, report=lambda event, facts: reports.append(event))
    reports: list[str] = []
    store.save(built="a" * 40)
    full_disk.fill()
    for pid in range(100, 110):
        store.save(child=ChildRecord(pid, pid * 10, "boot", "b" * 40), failed="c" * 40)
    assert reports == []
    loaded = StateStore(full_disk.directory).load()
    assert loaded.child == ChildRecord(109, 1090, "boot", "b" * 40)
    assert loaded.built == "a" * 40 and loaded.failed == "c" * 40


def test_a_state_that_does_not_fit_is_reported_not_raised_and_the_next_save_catches_up(
        full_disk):
    reports = []
    store = StateStore(full_disk.directory,
                       report=lambda event, facts: reports.append((event, facts)))
    store.save(built="a" * 40)
    full_disk.fill()
    many = tuple(f"{n:040x}" for n in range(300))  # more than the room kept for it
    store.save(held=many)
    store.save(held=many, failed="c" * 40)  # the same error again: reported once
    assert [event for event, _ in reports] == ["state.save_failed"]
    assert reports[0][1]["error"] == "No space left on device"
    assert store.current.failed == "c" * 40, "what it knows in memory is kept"
    assert StateStore(full_disk.directory).load().built == "a" * 40, "the old state survives"
    full_disk.free()
    store.save(built="d" * 40)
    assert reports[-1][0] == "state.saved_again"
    loaded = StateStore(full_disk.directory).load()
    assert loaded.failed == "c" * 40 and loaded.held == many and loaded.built == "d" * 40
