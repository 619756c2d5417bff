"""Credentials never leave the agent: redaction of URLs and key=value secrets in every text it writes.

Camera sources are often ``rtsp://user:password@host/stream`` URLs; OpenCV and the capture code
repeat them in error messages. :func:`redact` replaces the password of any ``scheme://user:pass@``
URL and the value of ``password=``, ``passwd=``, ``pwd=``, ``token=``, ``secret=`` and ``key=``
query or key-value pairs with ``***``. It is applied where the agent writes or serves text: every
log record (:class:`RedactingFilter`, installed by :func:`agent.cli.setup_logging`), the retained
camera state, ``/healthz``, the status page and the MQTT status problems.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_KEY_VALUE = re.compile(r"(?P<key>\b(?:password|passwd|pwd|token|secret|api_key|key)=)(?P<value>[^&\s;,'\"]+)", re.I)


def redact(text: str) -> str:
    """``text`` with URL passwords and secret key=value pairs replaced by ``***``.

    Example:
        >>> redact("cannot open rtsp://admin:hunter2@10.0.0.5/live?token=abc")
        'cannot open rtsp://admin:***@10.0.0.5/live?token=***'
    """
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_any(value: Any) -> Any:
    """:func:`redact` applied to every string inside dicts, lists and tuples (a new structure)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_any(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_any(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that redacts the message and the traceback text of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place (message formatted once, then redacted); always keep it."""
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
