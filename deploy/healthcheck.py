#!/usr/bin/env python3
"""Probe fod-agent's ``/healthz`` (stdlib only): the systemd watchdog and the Docker HEALTHCHECK use it.

Modes:

* ``--mode alive`` (systemd watchdog): exit 0 when the agent's HTTP server answers at all, 200 or
  503; exit 1 when it refuses the connection or does not answer within ``--timeout`` s (a hung or
  dead process). A 503 only means a camera has no recent frames or the model is not loaded yet,
  which the agent handles itself (it reconnects, and publishes the camera state over MQTT).
* ``--mode ready`` (Docker HEALTHCHECK, load balancers): exit 0 only for 200 (model loaded and
  every camera delivering frames), else 1.

Usage::

    python3 healthcheck.py [--url http://127.0.0.1:8080/healthz] [--mode alive|ready] [--timeout 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Probe the URL and return the exit code (0 healthy for the mode, 1 not)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FOD_AGENT_HEALTHZ", "http://127.0.0.1:8080/healthz"))
    parser.add_argument("--mode", choices=("alive", "ready"), default="alive")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    args = parser.parse_args()
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:  # 503 and friends: the server answered
        status = exc.code
    except Exception as exc:  # refused, timed out, reset: the agent does not answer
        print(f"fod-agent does not answer on {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.mode == "alive" or status == 200:
        return 0
    print(f"fod-agent answers {status} on {args.url} (not ready: see the JSON there)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
