"""The embedded demo: ``fod-agent --demo`` runs the whole agent with no camera, broker or data set.

- :class:`SyntheticConveyor` (:mod:`agent.demo.conveyor`): a procedural, deterministic conveyor
  camera with defective parts and exact ground truth;
- :func:`ensure_broker` (:mod:`agent.demo.broker`): the MQTT broker already listening, or an
  embedded one (amqtt, else mosquitto);
- :func:`ensure_demo_package` (:mod:`agent.demo.model`): the demo's model package, trained on
  synthetic good parts the first time and cached;
- :func:`run_demo` (:mod:`agent.demo.run`): the demo itself, called by ``fod-agent --demo``.

Only the conveyor and the broker are imported here; :func:`run_demo` imports the agent when called.
"""

from __future__ import annotations

import argparse

from agent.demo.broker import BrokerInfo, ensure_broker
from agent.demo.conveyor import DefectTruth, FrameTruth, PartTruth, SyntheticConveyor

__all__ = [
    "BrokerInfo",
    "DefectTruth",
    "FrameTruth",
    "PartTruth",
    "SyntheticConveyor",
    "ensure_broker",
    "run_demo",
]


def run_demo(args: argparse.Namespace) -> int:
    """Run ``fod-agent --demo`` (see :func:`agent.demo.run.run_demo`); returns the exit code."""
    from agent.demo.run import run_demo as _run_demo

    return _run_demo(args)
