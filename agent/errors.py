"""Exception hierarchy of the agent: every message names the key, file, camera or port and the fix.

``fod-agent`` prints the message of an :class:`AgentError` on one line and exits non-zero
(2 for :class:`ConfigError`, 1 for the others); it never prints a traceback for them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration (``config.toml`` or a CLI flag) is invalid: the message names the key and the fix."""


class CameraError(AgentError):
    """A frame source cannot be described or opened (unknown kind, missing folder, bad source object)."""


class BackendError(AgentError):
    """No inference backend can run the model (TensorRT requested but unavailable, bad package or engine)."""


class BrokerError(AgentError):
    """The MQTT broker settings cannot work (bad URL, TLS files missing)."""


class HttpError(AgentError):
    """The HTTP server cannot start (port in use, address not available)."""
