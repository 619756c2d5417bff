"""Bounded, ordered, crash-safe on-disk outbox for alarms (sqlite3 from the standard library).

Every alarm is written here *before* it is handed to MQTT and removed only when the broker has
acknowledged it (PUBACK), so alarms survive broker outages, agent crashes and restarts. Each entry
gets a sequence number (``alarm_seq``) that is monotonic per outbox directory and survives restarts
(sqlite ``AUTOINCREMENT`` never reuses a number, even after the rows are deleted).

Durability: WAL journal with ``synchronous=FULL``: when :meth:`Outbox.add` returns, the alarm is on
disk (one fsync, about a millisecond on an SSD, more on an SD card).

Bound and overflow policy: at most ``max_messages`` entries (default 10,000). An alarm is never
refused. When the outbox is full (the broker has been away for a long time), the OLDEST entry is
dropped to make room, the ``on_drop`` callback runs (the MQTT link counts it in
``fod_alarm_outbox_dropped_total``) and an error is logged naming the dropped ``alarm_seq``. The
newest alarms carry the current state, so they are the ones worth keeping.

Identity: each database gets an ``epoch`` when it is created (UTC creation time + random suffix,
stored in the ``meta`` table). ``(agent_id, epoch, seq)`` never repeats, even when the outbox is
deleted, lost or replaced (its numbering then restarts at 1 under a new epoch).

Failed writes: :meth:`Outbox.add` either stores the entry or raises :class:`OutboxError` naming the
cause (disk full, read-only file system, I/O error); nothing is half-written and the caller keeps
its state so it can retry.

Damaged rows: a row that cannot be read (invalid text, wrong type, unreadable page) is moved to the
``dead_letter`` table (raw bytes kept for forensics), counted through ``on_dead_letter`` and logged
with its sequence number; delivery goes on with the next row. The caller can dead-letter a row it
cannot send (:meth:`Outbox.dead_letter`). At start, a failed ``PRAGMA quick_check`` moves the file
aside (``*.corrupt-<unix time>``) and copies every readable row into a new database that keeps the
epoch and the numbering; unreadable rows are counted as dead letters.

One process per outbox directory: a second :class:`Outbox` on the same directory (another agent
with the same ``mqtt.outbox_dir``) raises :class:`OutboxError` instead of interleaving sequence numbers.
A database file that sqlite cannot open at all is moved aside the same way and a new, empty outbox
starts under a new epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from agent.outbox_repair import (
    OutboxEntry,
    OutboxError,
    describe_row,
    entry_from_row,
    open_database,
    read_epoch,
    sqlite_cause,
)

__all__ = ["DB_NAME", "DEFAULT_MAX_MESSAGES", "LOCK_NAME", "Outbox", "OutboxEntry", "OutboxError", "new_epoch"]

try:  # POSIX only; the agent targets Linux (Jetson, x86)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_NAME = "alarms.sqlite3"
LOCK_NAME = "alarms.lock"
DEFAULT_MAX_MESSAGES = 10_000


def new_epoch(now: float | None = None) -> str:
    """A fresh outbox epoch: ``YYYYmmddTHHMMSSZ-<8 hex>`` (UTC creation time, sorts by age)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(4)}"


class Outbox:
    """Ordered on-disk queue of messages that must reach the broker. Thread-safe.

    Args:
        directory: Folder for ``alarms.sqlite3`` (created if missing).
        max_messages: Capacity (>= 1); when full, the oldest entry is dropped (see module doc).
        on_drop: Called (under the outbox lock, keep it short) with each entry dropped for room.
        on_dead_letter: Called (under the outbox lock) with ``(seq, reason)`` of each row moved to
            the dead-letter table.

    Raises:
        OutboxError: The folder cannot be created or written, or another process holds it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        on_drop: Callable[[OutboxEntry], None] | None = None,
        on_dead_letter: Callable[[int, str], None] | None = None,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.max_messages = max_messages
        self._on_drop = on_drop
        self._on_dead_letter = on_dead_letter
        self.dead_letters = 0
        """Rows moved to the dead-letter table by this process."""
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutboxError(
                f"cannot use alarm outbox folder {self.directory}: {exc}; "
                "set mqtt.outbox_dir to a writable folder"
            ) from exc
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(self._lock_fd)
                raise OutboxError(
                    f"alarm outbox {self.directory} is in use by another process (another fod-agent with the "
                    "same mqtt.outbox_dir?); give each agent its own mqtt.outbox_dir"
                ) from exc
        try:
            self._db, lost = open_database(self.path, probe=10 * self.max_messages)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.dead_letters += len(lost)  # rows of a damaged database that could not be salvaged
        if self._on_dead_letter is not None:
            for seq in lost:
                self._on_dead_letter(seq, "unreadable in damaged database")
        self.epoch = read_epoch(self._db, new_epoch)
        """Identity of this database (see module doc); a new file gets a new epoch."""
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._depth:
            log.info("alarm outbox %s holds %d undelivered alarm(s)", self.path, self._depth)

    def __len__(self) -> int:
        """Number of entries waiting (the outbox depth)."""
        return self._depth

    def add(self, topic: str, make_payload: Callable[[int], bytes]) -> OutboxEntry:
        """Append one entry durably and return it.

        Args:
            topic: MQTT topic.
            make_payload: Builds the payload from the assigned sequence number (so the payload can
                carry its own ``alarm_seq``).

        Returns:
            The stored entry (its ``seq`` is the next number, > every earlier one).

        Raises:
            OutboxError: The database cannot be written (disk full, folder removed).
        """
        now = time.time()
        dropped: list[OutboxEntry] = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
                    seq = (int(row[0]) if row else 0) + 1
                    payload = make_payload(seq)
                    excess = self._depth + 1 - self.max_messages
                    if excess > 0:
                        rows = self._db.execute(
                            "SELECT seq, topic, payload, created_ts FROM outbox ORDER BY seq LIMIT ?",
                            (excess,),
                        ).fetchall()
                        dropped = [OutboxEntry(int(s), t, bytes(p), float(c)) for s, t, p, c in rows]
                        self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(e.seq,) for e in dropped])
                    self._db.execute(
                        "INSERT INTO outbox (seq, topic, payload, created_ts) VALUES (?, ?, ?, ?)",
                        (seq, topic, payload, now),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(
                    f"cannot write alarm outbox {self.path}: {sqlite_cause(exc)}; the alarm was not stored and is "
                    "retried (check free disk space, permissions and the disk holding mqtt.outbox_dir)"
                ) from exc
            self._depth += 1 - len(dropped)
            for entry in dropped:
                log.error(
                    "alarm outbox %s is full (%d entries): dropped the oldest undelivered alarm_seq=%d (%s)",
                    self.path,
                    self.max_messages,
                    entry.seq,
                    entry.topic,
                )
                if self._on_drop is not None:
                    self._on_drop(entry)
        return OutboxEntry(seq, topic, payload, now)

    def peek(self, after_seq: int = 0, limit: int = 100) -> list[OutboxEntry]:
        """Oldest entries with ``seq > after_seq``, in order (they stay in the outbox).

        A row that cannot be read is moved to the dead-letter table (see module doc) and skipped.

        Args:
            after_seq: Only entries after this sequence number.
            limit: Maximum number of entries returned.

        Returns:
            Up to ``limit`` entries ordered by ``seq``.

        Raises:
            OutboxError: The database cannot be read at all.
        """
        out: list[OutboxEntry] = []
        with self._lock:
            try:
                seqs = [
                    int(r[0])
                    for r in self._db.execute(
                        "SELECT seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
                    ).fetchall()
                ]
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read alarm outbox {self.path}: {sqlite_cause(exc)}") from exc
            for seq in seqs:
                try:
                    row = self._db.execute(
                        "SELECT topic, payload, created_ts FROM outbox WHERE seq = ?", (seq,)
                    ).fetchone()
                except sqlite3.Error as exc:
                    self._dead_letter_locked(seq, f"unreadable: {sqlite_cause(exc)}")
                    continue
                if row is None:
                    continue
                entry = entry_from_row(seq, row)
                if entry is None:
                    self._dead_letter_locked(seq, f"row has invalid fields {describe_row(row)}")
                    continue
                out.append(entry)
        return out

    def dead_letter(self, seq: int, reason: str) -> None:
        """Move one row to the dead-letter table (it is never delivered), count and log it.

        Args:
            seq: Sequence number of the row.
            reason: Why (logged and stored with the row).
        """
        with self._lock:
            self._dead_letter_locked(seq, reason)

    def _dead_letter_locked(self, seq: int, reason: str) -> None:
        now = time.time()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                with contextlib.suppress(sqlite3.Error):  # keep the raw bytes when they can be read
                    self._db.execute(
                        "INSERT OR REPLACE INTO dead_letter (seq, topic, payload, reason, moved_ts) "
                        "SELECT seq, CAST(topic AS BLOB), CAST(payload AS BLOB), ?, ? FROM outbox WHERE seq = ?",
                        (reason, now, seq),
                    )
                gone = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            raise OutboxError(
                f"cannot move damaged alarm_seq={seq} out of {self.path}: {sqlite_cause(exc)}; stop the agent and move "
                f"{self.path} aside (the agent salvages the readable rows at the next start)"
            ) from exc
        self._depth -= max(0, gone)
        self.dead_letters += 1
        log.error("alarm outbox %s: alarm_seq=%d moved to the dead-letter table: %s", self.path, seq, reason)
        if self._on_dead_letter is not None:
            self._on_dead_letter(seq, reason)

    def dead_letter_seqs(self) -> list[int]:
        """Sequence numbers in the dead-letter table, in order."""
        with self._lock:
            return [int(r[0]) for r in self._db.execute("SELECT seq FROM dead_letter ORDER BY seq")]

    def _rollback(self) -> None:
        """Roll back if a transaction is still open (sqlite may already have rolled back on I/O errors)."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete delivered entries (unknown sequence numbers are ignored).

        Args:
            seqs: Sequence numbers to delete.

        Returns:
            Number of entries actually deleted.

        Raises:
            OutboxError: The database cannot be written.
        """
        keys = [(int(s),) for s in seqs]
        if not keys:
            return 0
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
                removed = self._db.total_changes - before
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot update alarm outbox {self.path}: {sqlite_cause(exc)}") from exc
            self._depth -= removed
        return removed

    @property
    def last_seq(self) -> int:
        """Highest sequence number ever assigned in this directory (0 when none)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._lock_fd < 0

    def close(self) -> None:
        """Close the database and release the directory lock (idempotent)."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Outbox:
        """Return self (the outbox is open from construction)."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the outbox."""
        self.close()

