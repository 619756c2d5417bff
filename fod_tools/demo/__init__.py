"""The embedded demo: ``fod-agent --demo`` runs the whole agent with no camera, broker or data set.

- :class:`SyntheticConveyor` (:mod:`fod_tools.demo.conveyor`): a procedural, deterministic conveyor
  camera with defective parts and exact ground truth;
- :func:`ensure_broker` (:mod:`fod_tools.demo.broker`): the MQTT broker already listening, or an
  embedded one (amqtt, else mosquitto);
- :func:`ensure_demo_package` (:mod:`fod_tools.demo.model`): the demo's model package, trained on
  synthetic good parts the first time and cached;
- :func:`run_demo` (:mod:`fod_tools.demo.run`): the demo itself, called by ``fod-agent --demo``.

Only the conveyor and the broker are imported here; :func:`run_demo` imports the agent when called.
"""

from __future__ import annotations

import argparse

from fod_tools.demo.broker import BrokerInfo, ensure_broker
from fod_tools.demo.conveyor import DefectTruth, FrameTruth, PartTruth, SyntheticConveyor

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
    """Run ``fod-agent --demo`` (see :func:`fod_tools.demo.run.run_demo`); returns the exit code."""
    from fod_tools.demo.run import run_demo as _run_demo

    return _run_demo(args)
