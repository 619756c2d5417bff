"""The agent's state directory: where the alarm outbox and the snapshots live by default.

Resolution, first match wins (nothing is ever written into the current directory by default):

1. ``state_dir`` in ``config.toml`` (or ``--state-dir``);
2. ``$STATE_DIRECTORY``, set by systemd for a unit with ``StateDirectory=fod-agent``
   (``/var/lib/fod-agent``; the first entry when it lists several);
3. ``$XDG_STATE_HOME/fod-agent`` for a user (``XDG_STATE_HOME`` must be an absolute path);
4. ``~/.local/state/fod-agent`` (the XDG default).

Inside it: ``outbox/`` (``mqtt.outbox_dir`` when unset) and ``snapshots/`` (``snapshots.dir`` when unset).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

APP_NAME = "fod-agent"
OUTBOX_SUBDIR = "outbox"
SNAPSHOTS_SUBDIR = "snapshots"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory when ``state_dir`` is not configured (see the module docstring).

    Args:
        environ: environment variables; None = ``os.environ``.

    Returns:
        An absolute path (not created here; the outbox and the snapshot store create their folders).
    """
    env = os.environ if environ is None else environ
    systemd = env.get("STATE_DIRECTORY", "").split(":")[0].strip()
    if systemd:
        return Path(systemd)
    xdg = env.get("XDG_STATE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_NAME
    home = env.get("HOME", "").strip()
    base = Path(home) if home else Path.home()
    return base / ".local" / "state" / APP_NAME


def outbox_dir(configured: Path | None, state_dir: Path | None = None) -> Path:
    """The outbox folder: ``configured``, else ``<state dir>/outbox``."""
    if configured is not None:
        return configured
    return (state_dir or default_state_dir()) / OUTBOX_SUBDIR
