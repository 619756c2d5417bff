"""The link's command thread: ``<root>/cmd/<name>`` messages validated and applied one at a time.

paho's network thread only enqueues (:meth:`CommandQueue.offer`), so its keep-alive goes on during
a slow command (a model reload); the command thread applies commands in arrival order and hands
each :class:`~agent.schemas.CommandResponse` back to the link for publishing. At most
:data:`COMMAND_QUEUE_SIZE` commands wait; more are answered ``ok: false`` at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import Counter

from agent.commands import Command, CommandAuth, CommandError, parse_command
from agent.schemas import CommandResponse

log = logging.getLogger("agent.mqtt")

COMMAND_QUEUE_SIZE = 16
"""Commands waiting for the command thread; further ones are refused with ``ok: false``."""

_Item = tuple[str, str, bytes, bool]
"""``(topic, command name, payload, retain flag)``."""


class CommandQueue:
    """Bounded queue of commands and the thread that applies them.

    Args:
        root: topic root; commands arrive on ``<root>/cmd/<name>``, responses go to ``<root>/cmd/response``.
        on_command: called with each valid command in the command thread; returns the ``result``
            dict or raises :class:`~agent.commands.CommandError`. None = every command is refused.
        respond: publishes a response body: ``respond(body, client, command_topic)`` with the
            client of the message when answering from paho's thread, ``None`` from the command
            thread (the link then uses its live connection, if any).
        counter: ``fod_mqtt_commands_total{result}``.
        auth: Checks each command's signature (see :class:`agent.commands.CommandAuth`); None = no check
            (only for tests of the parser: the link always passes one when commands are on).
    """

    def __init__(
        self,
        root: str,
        *,
        on_command: Callable[[Command], dict[str, Any]] | None,
        respond: Callable[[bytes, mqtt.Client | None, str], None],
        counter: Counter,
        auth: CommandAuth | None = None,
    ) -> None:
        self._auth = auth
        self.prefix = f"{root}/cmd/"
        self.response_topic = f"{root}/cmd/response"
        self._on_command = on_command
        self._respond = respond
        self._m_commands = counter
        self._queue: queue.Queue[_Item | None] = queue.Queue(COMMAND_QUEUE_SIZE)
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        """Start the command thread (a fresh queue each time)."""
        self._queue = queue.Queue(COMMAND_QUEUE_SIZE)
        self._thread = threading.Thread(target=self._worker, args=(self._queue,), name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Discard commands still waiting (nobody can receive their response) and end the thread."""
        discarded = 0
        while True:
            try:
                if self._queue.get_nowait() is not None:
                    discarded += 1
            except queue.Empty:
                break
        if discarded:
            log.warning("%d command(s) received before stop were not applied", discarded)
        self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(1.0)  # a handler stuck in a slow command is abandoned (daemon)
            self._thread = None

    def offer(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        """In paho's thread: hand a command to the command thread, or refuse it at once when too many wait."""
        topic = message.topic
        if not topic.startswith(self.prefix) or topic == self.response_topic:
            return
        name = topic[len(self.prefix) :]
        try:
            self._queue.put_nowait((topic, name, bytes(message.payload), bool(message.retain)))
        except queue.Full:
            log.warning("command on %s refused: %d commands already waiting", topic, COMMAND_QUEUE_SIZE)
            self._m_commands.labels("error").inc()
            body = CommandResponse(
                command=name,
                ok=False,
                error=f"agent busy: {COMMAND_QUEUE_SIZE} commands are waiting; retry later",
            ).to_json()
            self._respond(body, client, topic)

    def _worker(self, commands: queue.Queue[_Item | None]) -> None:
        """Command thread: apply commands in arrival order and publish each response."""
        while True:
            item = commands.get()
            if item is None:
                return
            topic, name, payload, retain = item
            try:
                body = self.apply(topic, name, payload, retain)
            except Exception:  # the response itself failed to serialise; keep the thread alive
                log.exception("command on %s failed", topic)
                continue
            self._respond(body, None, topic)

    def apply(self, topic: str, name: str, payload: bytes, retain: bool) -> bytes:
        """Validate and apply one command; return the JSON of its :class:`CommandResponse`."""
        request_id: str | None = None
        try:
            if retain:
                raise CommandError(
                    f"retained command on {topic} ignored: commands act once, "
                    "publish them without the retain "
                    f"flag; clear it with: mosquitto_pub -r -n -t '{topic}'",
                    command=name,
                )
            command = parse_command(name, payload, auth=self._auth)
            request_id = command.request_id
            if self._on_command is None:
                raise CommandError("this agent does not accept commands (no command handler)", command=name)
            result = self._on_command(command)
            body = CommandResponse(
                request_id=request_id, command=name, ok=True, result=dict(result or {})
            ).to_json()
            log.info("command %s applied: %s", name, command)
            self._m_commands.labels("ok").inc()
        except CommandError as exc:
            log.warning("command on %s rejected: %s", topic, exc)
            rid = exc.request_id if exc.request_id is not None else request_id
            body = CommandResponse(request_id=rid, command=name, ok=False, error=str(exc)).to_json()
            self._m_commands.labels("error").inc()
        except Exception as exc:
            log.exception("command %s failed", name)
            body = CommandResponse(
                request_id=request_id,
                command=name,
                ok=False,
                error=f"internal error while applying {name}: {type(exc).__name__}: {exc}",
            ).to_json()
            self._m_commands.labels("error").inc()
        return body

