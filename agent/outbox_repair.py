"""Reading a damaged alarm outbox: row validation, sqlite error causes, salvage of the readable rows.

Used by :mod:`agent.outbox`: :func:`entry_from_row` decides whether a stored row can be delivered,
:func:`copy_readable` copies every readable row of a database that failed its integrity check into
a fresh one (same numbering and epoch) and returns the sequence numbers it could not read.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")


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
