"""The on-disk alarm outbox: order, numbering across restarts, bound, locking, corruption."""

from __future__ import annotations

import logging

import pytest

from agent.outbox import DB_NAME, Outbox, OutboxEntry, OutboxError


def payload(seq: int) -> bytes:
    return f'{{"alarm_seq": {seq}}}'.encode()


def test_entries_come_back_in_order_and_leave_when_removed(tmp_path):
    with Outbox(tmp_path) as box:
        entries = [box.add(f"t/{i}", payload) for i in range(5)]
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
        assert entries[2].payload == b'{"alarm_seq": 3}'  # the payload is built from the assigned number
        assert len(box) == 5
        assert [e.seq for e in box.peek()] == [1, 2, 3, 4, 5]
        assert [e.seq for e in box.peek(after_seq=2, limit=2)] == [3, 4]
        assert box.peek()[0] == OutboxEntry(1, "t/0", payload(1), entries[0].created_ts)
        assert box.remove([2, 4, 99]) == 2  # unknown numbers are ignored
        assert [e.seq for e in box.peek()] == [1, 3, 5]
        assert len(box) == 3
        assert box.remove([]) == 0


def test_numbering_and_entries_survive_reopen(tmp_path):
    box = Outbox(tmp_path)
    for _ in range(3):
        box.add("t", payload)
    box.remove([1, 2, 3])
    box.add("t", payload)  # seq 4 stays undelivered
    box.close()
    assert box.closed

    again = Outbox(tmp_path)
    try:
        assert len(again) == 1
        assert again.peek()[0].seq == 4
        assert again.last_seq == 4
        # numbers are never reused, even after every row was deleted
        again.remove([4])
        assert again.add("t", payload).seq == 5
    finally:
        again.close()


def test_full_outbox_drops_the_oldest(tmp_path, caplog):
    dropped: list[OutboxEntry] = []
    with Outbox(tmp_path, max_messages=3, on_drop=dropped.append) as box:
        with caplog.at_level(logging.ERROR, logger="agent.outbox"):
            for i in range(5):
                box.add(f"t/{i}", payload)
        assert [e.seq for e in box.peek()] == [3, 4, 5]  # the newest alarms (current state) are kept
        assert len(box) == 3
        assert [e.seq for e in dropped] == [1, 2]
        assert "alarm outbox" in caplog.text
        assert "alarm_seq=1" in caplog.text
        assert "alarm_seq=2" in caplog.text


def test_capacity_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_messages"):
        Outbox(tmp_path, max_messages=0)


def test_second_outbox_on_same_folder_is_refused(tmp_path):
    with Outbox(tmp_path):
        with pytest.raises(OutboxError, match="in use by another process"):
            Outbox(tmp_path)
    with Outbox(tmp_path) as box:  # released on close
        assert len(box) == 0


def test_unusable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutboxError, match=r"mqtt\.outbox_dir"):
        Outbox(blocker / "outbox")


def test_corrupt_database_is_moved_aside(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"this is not a sqlite database" * 100)
    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        box = Outbox(tmp_path)
    try:
        assert len(box) == 0
        assert box.add("t", payload).seq == 1
        assert "unreadable" in caplog.text
        assert list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
    finally:
        box.close()


def test_closed_outbox_refuses_writes(tmp_path):
    box = Outbox(tmp_path)
    box.close()
    box.close()  # idempotent
    with pytest.raises(OutboxError):
        box.add("t", payload)
