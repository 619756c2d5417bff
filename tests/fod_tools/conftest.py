"""Fixtures of the tooling tests: the broker fixtures of tests/agent and the tiny FOD run of tests/fod."""

from tests.agent.conftest import Mosquitto, mosquitto, subscriber, topic_root  # noqa: F401
from tests.fod.conftest import tiny_fod_package, tiny_run  # noqa: F401
