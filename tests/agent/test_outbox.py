"""The on-disk alarm outbox: order, numbering across restarts, bound, locking, corruption."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
from pathlib import Path

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


# ---------------------------------------------------------------- issue 14: damaged rows, failed writes, identity
def big(seq: int) -> bytes:
    """A payload of about 3 kB, so that each row lives on its own database page."""
    return (f'{{"alarm_seq": {seq}}}' + " " * 3000).encode()


def test_damaged_row_is_dead_lettered_and_delivery_goes_on(tmp_path, caplog):
    seen: list[tuple[int, str]] = []
    with Outbox(tmp_path, on_dead_letter=lambda seq, why: seen.append((seq, why))) as box:
        for i in range(5):
            box.add(f"t/{i}", payload)
        # garbage written into two rows by another process: a topic that is not UTF-8, a payload of the wrong type
        other = sqlite3.connect(tmp_path / DB_NAME)
        other.execute("UPDATE outbox SET topic = CAST(X'FFFE00' AS TEXT) WHERE seq = 2")
        other.execute("UPDATE outbox SET payload = 12345 WHERE seq = 4")
        other.commit()
        other.close()
        with caplog.at_level(logging.ERROR, logger="agent.outbox"):
            assert [e.seq for e in box.peek()] == [1, 3, 5]
        assert [s for s, _ in seen] == [2, 4]
        assert box.dead_letter_seqs() == [2, 4]
        assert box.dead_letters == 2
        assert len(box) == 3
        assert "alarm_seq=2" in caplog.text
        assert "alarm_seq=4" in caplog.text
        assert box.add("t", payload).seq == 6  # numbering goes on


def test_caller_can_dead_letter_a_row_it_cannot_send(tmp_path):
    with Outbox(tmp_path) as box:
        box.add("t", payload)
        box.add("t", payload)
        box.dead_letter(1, "broker refused it")
        assert [e.seq for e in box.peek()] == [2]
        assert box.dead_letter_seqs() == [1]


def test_damaged_page_at_start_keeps_the_readable_rows(tmp_path, caplog):
    with Outbox(tmp_path) as box:
        for _ in range(10):
            box.add("t/a", big)
        epoch = box.epoch
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    page = 9  # a leaf page holding one alarm (pages 1-6: header, tables and index)
    data[(page - 1) * 4096 : page * 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="agent.outbox"), Outbox(tmp_path) as box:
        kept = [e.seq for e in box.peek()]
        lost = box.dead_letter_seqs()
        assert len(lost) == 1
        assert sorted(kept + lost) == list(range(1, 11))  # every alarm is either deliverable or dead-lettered
        assert box.epoch == epoch  # same identity: numbering goes on
        assert box.add("t", payload).seq == 11
    assert "integrity check" in caplog.text
    assert list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))


def test_epoch_survives_restart_and_changes_with_a_new_database(tmp_path):
    with Outbox(tmp_path) as box:
        epoch = box.epoch
        box.add("t", payload)
    with Outbox(tmp_path) as box:
        assert box.epoch == epoch
    (tmp_path / DB_NAME).unlink()  # lost or deleted outbox: numbering restarts, the epoch does not repeat
    with Outbox(tmp_path) as box:
        assert box.add("t", payload).seq == 1
        assert box.epoch != epoch


def add_many(box: Outbox, n: int) -> None:
    for _ in range(n):
        box.add("t", big)


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 512 kB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_reported_with_its_cause_and_nothing_is_stored(tiny_fs):
    with Outbox(tiny_fs / "outbox") as box:
        box.add("t", payload)
        filler = tiny_fs / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(OutboxError, match="full") as err:
            add_many(box, 200)  # the WAL may absorb a few pages
        assert "no transaction is active" not in str(err.value)
        assert "not stored" in str(err.value)
        depth = len(box)
        filler.unlink()  # space comes back: the next write works and the numbering has no gap
        entry = box.add("t", payload)
        assert entry.seq == box.last_seq
        assert [e.seq for e in box.peek(limit=1000)] == list(range(1, depth + 2))


def test_read_only_file_system_is_a_clear_error_at_start(tiny_fs):
    with Outbox(tiny_fs / "outbox") as box:
        box.add("t", payload)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    try:
        with pytest.raises(OutboxError, match=r"outbox.*(read.only|readonly|unable to open)"):
            Outbox(tiny_fs / "outbox")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
    with Outbox(tiny_fs / "outbox") as box:
        assert box.add("t", payload).seq == 2
