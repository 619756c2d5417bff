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

One process per outbox directory: a second :class:`Outbox` on the same directory (another agent
with the same ``mqtt.outbox_dir``) raises :class:`OutboxError` instead of interleaving sequence numbers.
A database file that sqlite cannot read is moved aside (``*.corrupt-<unix time>``) with an error in
the log, and a new, empty outbox starts (its numbering restarts at 1).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.errors import AgentError

try:  # POSIX only; the agent targets Linux (Jetson, x86)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_NAME = "alarms.sqlite3"
LOCK_NAME = "alarms.lock"
DEFAULT_MAX_MESSAGES = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ts REAL NOT NULL
)
"""


class OutboxError(AgentError):
    """The outbox directory cannot be used (not writable, or in use by another process)."""


@dataclass(frozen=True)
class OutboxEntry:
    """One stored alarm.

    Attributes:
        seq: Sequence number (``alarm_seq``), monotonic per outbox directory, starting at 1.
        topic: MQTT topic to publish on.
        payload: Message bytes (JSON of :class:`agent.schemas.AlarmPayload`).
        created_ts: Unix time (s) at which the entry was added.
    """

    seq: int
    topic: str
    payload: bytes
    created_ts: float


class Outbox:
    """Ordered on-disk queue of messages that must reach the broker. Thread-safe.

    Args:
        directory: Folder for ``alarms.sqlite3`` (created if missing).
        max_messages: Capacity (>= 1); when full, the oldest entry is dropped (see module doc).
        on_drop: Called (under the outbox lock, keep it short) with each entry dropped for room.

    Raises:
        OutboxError: The folder cannot be created or written, or another process holds it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        on_drop: Callable[[OutboxEntry], None] | None = None,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.max_messages = max_messages
        self._on_drop = on_drop
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
            self._db = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._depth:
            log.info("alarm outbox %s holds %d undelivered alarm(s)", self.path, self._depth)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_SCHEMA)
        db.execute("PRAGMA quick_check").fetchone()
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error(
                "alarm outbox %s is unreadable (%s): moved it to %s and started an empty outbox; "
                "undelivered alarms in it are lost",
                self.path,
                exc,
                aside,
            )
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.replace(Path(f"{aside}{suffix}"))
            try:
                return self._connect()
            except sqlite3.Error as exc2:
                raise OutboxError(f"cannot create alarm outbox {self.path}: {exc2}") from exc2

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
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(
                    f"cannot write alarm outbox {self.path}: {exc}; check free disk space and permissions"
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

        Args:
            after_seq: Only entries after this sequence number.
            limit: Maximum number of entries returned.

        Returns:
            Up to ``limit`` entries ordered by ``seq``.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, created_ts FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [OutboxEntry(int(s), t, bytes(p), float(c)) for s, t, p, c in rows]

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
                    self._db.execute("ROLLBACK")
                    raise
                removed = self._db.total_changes - before
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot update alarm outbox {self.path}: {exc}") from exc
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
