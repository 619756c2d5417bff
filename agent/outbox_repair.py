"""Opening the alarm outbox database and reading a damaged one: row validation, sqlite error causes,
salvage of the readable rows.

Used by :mod:`agent.outbox`: :func:`open_database` opens (or creates) the database, moving an
unreadable file aside and salvaging one that fails its integrity check; :func:`entry_from_row`
decides whether a stored row can be delivered,
:func:`copy_readable` copies every readable row of a database that failed its integrity check into
a fresh one (same numbering and epoch) and returns the sequence numbers it could not read.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent.errors import AgentError

_T = TypeVar("_T")

log = logging.getLogger("agent.outbox")  # the outbox's own logger, as before the split

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    topic BLOB,
    payload BLOB,
    reason TEXT NOT NULL,
    moved_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""
BUSY_TIMEOUT_S = 30.0
"""How long a write waits for a sqlite lock held by someone else before it fails (s)."""


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


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the outbox database at ``path``: WAL journal, ``synchronous=FULL``, schema."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def read_epoch(db: sqlite3.Connection, new_epoch: Callable[[], str]) -> str:
    """The database's epoch; a new database gets ``new_epoch()``, stored in ``meta``."""
    row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    if row is not None:
        return str(row[0])
    epoch = new_epoch()
    db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
    return epoch


def move_aside(path: Path) -> Path:
    """Rename the database and its WAL files to ``<name>.corrupt-<unix time>``; return the new path."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.replace(Path(f"{aside}{suffix}"))
    return aside


def open_database(path: Path, *, probe: int) -> tuple[sqlite3.Connection, list[int]]:
    """Open the outbox database, replacing an unreadable file and salvaging a damaged one.

    Args:
        path: The database file (``alarms.sqlite3``).
        probe: See :func:`copy_readable` (the outbox passes ten times its capacity).

    Returns:
        The connection, and the sequence numbers of rows a salvage could not read (dead-lettered;
        empty when the database was sound).

    Raises:
        OutboxError: the file was unreadable and a new one cannot be created.
    """
    try:
        db = connect(path)
    except sqlite3.DatabaseError as exc:
        aside = move_aside(path)
        log.error(
            "alarm outbox %s is unreadable (%s): moved it to %s and started an empty outbox under a new "
            "epoch; undelivered alarms in it are lost",
            path,
            exc,
            aside,
        )
        try:
            return connect(path), []
        except sqlite3.Error as exc2:
            raise OutboxError(f"cannot create alarm outbox {path}: {exc2}") from exc2
    try:
        check = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        check = [str(exc)]
    if check == ["ok"]:
        return db, []
    db.close()
    return _salvage(path, "; ".join(check[:3]), probe=probe)


def _salvage(path: Path, problem: str, *, probe: int) -> tuple[sqlite3.Connection, list[int]]:
    """Copy every readable row of a damaged database into a new one (same epoch and numbering)."""
    aside = move_aside(path)
    old = sqlite3.connect(aside, check_same_thread=False, isolation_level=None)
    db = connect(path)
    try:
        lost = copy_readable(old, db, aside.name, probe=probe)
    finally:
        old.close()
    log.error(
        "alarm outbox %s failed its integrity check (%s): moved it to %s and copied the readable rows into a "
        "new database; %d unreadable row(s) dead-lettered (alarm_seq %s)",
        path,
        problem,
        aside,
        len(lost),
        lost[:20],
    )
    return db, lost


def copy_readable(old: sqlite3.Connection, db: sqlite3.Connection, source_name: str, *, probe: int) -> list[int]:
    """Copy meta, numbering and every readable row of ``old`` into ``db``; dead-letter the unreadable ones.

    Args:
        old: The damaged database.
        db: The new, empty outbox database (schema created).
        source_name: File name of ``old`` (in the dead-letter reason).
        probe: When the row index itself is unreadable, how many numbers below the last one to try.

    Returns:
        Sequence numbers that could not be read (now in ``db``'s ``dead_letter`` table).
    """
    lost: list[int] = []
    no_rows: list[tuple[str, str]] = []
    meta = _try(lambda: [(str(k), str(v)) for k, v in old.execute("SELECT key, value FROM meta")], no_rows)
    db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta)
    sql_last = "SELECT seq FROM sqlite_sequence WHERE name='outbox'"
    last = _try(lambda: int(old.execute(sql_last).fetchone()[0]), 0)
    no_seqs: list[int] = []
    seqs = _try(lambda: [int(r[0]) for r in old.execute("SELECT seq FROM outbox ORDER BY seq")], no_seqs)
    if not seqs:  # the index may be damaged: probe the numbers that can still be waiting
        seqs = list(range(max(1, last - probe), last + 1))
    for seq in seqs:
        try:
            row = old.execute("SELECT topic, payload, created_ts FROM outbox WHERE seq=?", (seq,)).fetchone()
        except sqlite3.Error:
            lost.append(seq)
            continue
        if row is None:
            continue
        entry = entry_from_row(seq, row)
        if entry is None:
            lost.append(seq)
            continue
        db.execute(
            "INSERT INTO outbox (seq, topic, payload, created_ts) VALUES (?, ?, ?, ?)",
            (seq, entry.topic, entry.payload, entry.created_ts),
        )
    top = max([last, *seqs])
    if top:
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (top,))
    for seq in lost:
        db.execute(
            "INSERT OR REPLACE INTO dead_letter (seq, topic, payload, reason, moved_ts) VALUES (?, NULL, NULL, ?, ?)",
            (seq, f"unreadable in damaged database {source_name}", time.time()),
        )
    return lost


def entry_from_row(seq: int, row: tuple[object, ...]) -> OutboxEntry | None:
    """An entry from raw column values, or None when a value has the wrong type or is empty."""
    topic, payload, created = row
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        return None
    if not isinstance(payload, bytes | bytearray) or not payload:
        return None
    if not isinstance(created, int | float):
        return None
    return OutboxEntry(seq, topic, bytes(payload), float(created))


def describe_row(row: tuple[object, ...]) -> str:
    return "(" + ", ".join(f"{type(v).__name__}" for v in row) + ")"


def sqlite_cause(exc: sqlite3.Error) -> str:
    """The sqlite error with its error name (SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY...) when known."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


def _try(fn: Callable[[], _T], default: _T) -> _T:
    try:
        return fn()
    except (sqlite3.Error, TypeError, IndexError):
        return default
