#!/usr/bin/env python3
"""Probe fod-agent's ``/healthz`` (stdlib only): the systemd watchdog and the Docker HEALTHCHECK use it.

Modes:

* ``--mode alive`` (systemd watchdog): exit 0 when the agent's HTTP server answers at all, 200 or
  503; exit 1 when it refuses the connection or does not answer within ``--timeout`` s (a hung or
  dead process). A 503 only means a camera has no recent frames or the model is not loaded yet,
  which the agent handles itself (it reconnects, and publishes the camera state over MQTT).
* ``--mode ready`` (Docker HEALTHCHECK, load balancers): exit 0 only for 200 (health derived
  from work done: frames scored per camera and ROI, alarms stored, no worker dead), else 1.
* ``--mode healthy`` (systemd watchdog): like ``alive``, and also exit 1 when ``/healthz`` has said
  503 without a break for more than ``--max-unhealthy-s`` seconds (the time of the first 503 is
  kept in ``--state``): an agent that is up but blind (every inference failing, the outbox stuck)
  is restarted, a short outage is not.

Usage::

    python3 healthcheck.py [--url http://127.0.0.1:8080/healthz] [--mode alive|ready|healthy]
        [--timeout 10] [--max-unhealthy-s 300] [--state /run/fod-agent-watchdog.state]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    """Probe the URL and return the exit code (0 healthy for the mode, 1 not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FOD_AGENT_HEALTHZ", "http://127.0.0.1:8080/healthz"))
    parser.add_argument("--mode", choices=("alive", "ready", "healthy"), default="alive")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    parser.add_argument("--max-unhealthy-s", type=float, default=300.0, help="healthy mode: 503 for longer fails")
    parser.add_argument("--state", default="/run/fod-agent-watchdog.state", help="healthy mode: first-503 time")
    args = parser.parse_args()
    body = b""
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:  # 503 and friends: the server answered
        status = exc.code
        body = exc.read()
    except Exception as exc:  # refused, timed out, reset: the agent does not answer
        print(f"fod-agent does not answer on {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.mode == "healthy":
        return _sustained(status, body, args.state, args.max_unhealthy_s)
    if args.mode == "alive" or status == 200:
        return 0
    print(f"fod-agent answers {status} on {args.url} (not ready: see the JSON there)", file=sys.stderr)
    return 1


def _sustained(status: int, body: bytes, state_file: str, max_unhealthy_s: float) -> int:
    """Exit code of ``--mode healthy``: 1 once 503 has lasted longer than ``max_unhealthy_s`` seconds."""
    now = time.time()
    state = Path(state_file)
    if status == 200:
        state.unlink(missing_ok=True)
        return 0
    try:
        since = float(state.read_text().strip())
    except (OSError, ValueError):
        since = now
        state.write_text(f"{now}\n")
    if now - since <= max_unhealthy_s:
        return 0
    try:
        problems = json.loads(body or b"{}").get("problems", [])
    except ValueError:
        problems = []
    print(f"fod-agent unhealthy for {now - since:.0f} s: {'; '.join(problems) or status}", file=sys.stderr)
    state.unlink(missing_ok=True)  # the restart starts a new grace period
    return 1


if __name__ == "__main__":
    sys.exit(main())
