"""An MQTT broker for the demo: the one already listening, or an embedded one for the length of a run.

:func:`ensure_broker` is a context manager. When an MQTT broker already answers on ``host:port`` it
is used as it is. Otherwise an embedded broker is started and stopped on exit:

1. the pure-Python ``amqtt`` broker (``pip install -e '.[demo]'`` in the clone), in a background thread
   with its own asyncio event loop, anonymous access, listening on ``host:port`` only;
2. if ``amqtt`` cannot be imported, ``mosquitto`` (on ``PATH`` or ``/usr/sbin/mosquitto``) as a
   child process with a throw-away configuration;
3. else a :class:`~agent.errors.BrokerError` that says what to install.

Either way the context manager returns only once the broker accepts MQTT connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.errors import BrokerError

log = logging.getLogger(__name__)

BrokerKind = Literal["existing", "amqtt", "mosquitto"]
MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
#: hosts an embedded broker can listen on (anything else must already run a broker)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})


@dataclass(frozen=True)
class BrokerInfo:
    """The broker a demo run talks to.

    Attributes:
        host: address it listens on.
        port: TCP port.
        kind: ``existing`` (it was already there), ``amqtt`` or ``mosquitto`` (started here).
    """

    host: str
    port: int
    kind: BrokerKind

    @property
    def url(self) -> str:
        """``mqtt://host:port``, as ``fod-agent --broker`` takes it."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def embedded(self) -> bool:
        """True when this process started the broker (it stops when the ``with`` block ends)."""
        return self.kind != "existing"


def probe_mqtt(host: str, port: int, *, timeout_s: float = 1.0) -> Literal["mqtt", "other", "closed"]:
    """Tell whether an MQTT broker listens on ``host:port``.

    Sends an MQTT 3.1.1 CONNECT and waits for a CONNACK (any return code: a broker that refuses
    anonymous clients is still a broker), then disconnects.

    Args:
        host: address to try.
        port: TCP port.
        timeout_s: connect and answer timeout in s.

    Returns:
        ``mqtt`` (a broker answered), ``other`` (something listens but does not speak MQTT),
        ``closed`` (nothing accepts connections there).
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return "closed"
    with sock:
        client_id = f"fod-demo-probe-{os.getpid()}".encode()
        variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 10)
        payload = struct.pack("!H", len(client_id)) + client_id
        body = variable + payload
        try:
            sock.sendall(b"\x10" + bytes([len(body)]) + body)
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    break
                answer += chunk
            if len(answer) == 4 and answer[0] == 0x20 and answer[1] == 0x02:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")  # DISCONNECT
                return "mqtt"
        except OSError:
            pass
    return "other"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ensure_broker(
    host: str = "127.0.0.1",
    port: int = 1883,
    *,
    start_timeout_s: float = 10.0,
    prefer: Literal["amqtt", "mosquitto"] | None = None,
    quiet: bool = True,
) -> Iterator[BrokerInfo]:
    """Use the MQTT broker on ``host:port``, or run an embedded one for the ``with`` block.

    Args:
        host: address to use or listen on (``127.0.0.1`` keeps the embedded broker local).
        port: TCP port; 0 starts an embedded broker on a free port.
        start_timeout_s: how long to wait for an embedded broker to accept connections, in s.
        prefer: ``amqtt`` or ``mosquitto`` to choose the embedded broker; None tries amqtt first.
        quiet: lower amqtt's log level to WARNING (its INFO lines would drown the demo's view).

    Yields:
        :class:`BrokerInfo` of the broker to connect to.

    Raises:
        BrokerError: the port is taken by something that is not an MQTT broker, ``host`` is not
            this machine and no broker answers there, no embedded broker is installed, or it did
            not start within ``start_timeout_s``.
    """
    if port == 0:
        port = free_port(host)
    else:
        state = probe_mqtt(host, port)
        if state == "mqtt":
            log.info("using the MQTT broker already listening on %s:%d", host, port)
            yield BrokerInfo(host, port, "existing")
            return
        if state == "other":
            raise BrokerError(
                f"{host}:{port} is in use by something that does not answer as an MQTT broker; "
                "stop it, or pick another port (fod-agent --demo --broker mqtt://127.0.0.1:PORT)"
            )
        if host not in LOCAL_HOSTS:
            raise BrokerError(
                f"no MQTT broker answers on {host}:{port}, and an embedded broker can only run on this "
                "machine; start the broker there, or use --broker mqtt://127.0.0.1:PORT"
            )
    order: list[str] = [prefer] if prefer else ["amqtt", "mosquitto"]
    problems: list[str] = []
    for kind in order:
        if kind == "amqtt":
            try:
                import amqtt.broker  # noqa: F401 - only to see whether it is installed
            except ImportError as exc:
                problems.append(f"amqtt is not installed ({exc}; pip install -e '.[demo]' in the fod-agent clone)")
                continue
            with _amqtt_broker(host, port, start_timeout_s=start_timeout_s, quiet=quiet):
                yield BrokerInfo(host, port, "amqtt")
            return
        executable = _find_mosquitto()
        if executable is None:
            problems.append("mosquitto is not installed (apt-get install -y mosquitto)")
            continue
        with _mosquitto_broker(executable, host, port, start_timeout_s=start_timeout_s):
            yield BrokerInfo(host, port, "mosquitto")
        return
    raise BrokerError(
        f"no MQTT broker listens on {host}:{port} and none can be started here: {'; '.join(problems)}. "
        "Install one of them, or point the demo at a running broker with --broker mqtt://HOST:PORT"
    )


def _find_mosquitto() -> str | None:
    for candidate in MOSQUITTO_PATHS:
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found and os.access(found, os.X_OK):
            return found
    return None


def _wait_until_mqtt(host: str, port: int, deadline: float, alive: Any = None) -> bool:
    """Poll until an MQTT broker answers on ``host:port``, the deadline passes or ``alive()`` is False."""
    while time.monotonic() < deadline:
        if probe_mqtt(host, port, timeout_s=0.5) == "mqtt":
            return True
        if alive is not None and not alive():
            return False
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def _amqtt_broker(host: str, port: int, *, start_timeout_s: float, quiet: bool) -> Iterator[None]:
    """Run an amqtt broker in a daemon thread with its own event loop."""
    from amqtt.broker import Broker

    amqtt_logger = logging.getLogger("amqtt")
    if quiet:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="fod-demo-broker", daemon=True)
    thread.start()

    async def start() -> Any:
        broker = Broker(config, loop=asyncio.get_running_loop())
        await broker.start()
        return broker

    broker: Any = None
    try:
        try:
            broker = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=start_timeout_s)
        except Exception as exc:
            raise BrokerError(
                f"the embedded amqtt broker could not start on {host}:{port} ({type(exc).__name__}: {exc}); "
                "is the port free? pick another with --broker mqtt://127.0.0.1:PORT"
            ) from exc
        if not _wait_until_mqtt(host, port, time.monotonic() + start_timeout_s):
            raise BrokerError(
                f"the embedded amqtt broker on {host}:{port} is not accepting connections "
                f"after {start_timeout_s} s"
            )
        log.info("embedded MQTT broker (amqtt) listening on %s:%d", host, port)
        yield
    finally:
        if broker is not None:
            if quiet:  # amqtt logs cancelled in-flight deliveries as errors while it shuts down
                amqtt_logger.setLevel(logging.CRITICAL)
            try:
                asyncio.run_coroutine_threadsafe(_stop_amqtt(broker), loop).result(timeout=5.0)
            except Exception as exc:  # shutting down: report, then stop the loop anyway
                log.warning("embedded amqtt broker did not shut down cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if quiet:
            amqtt_logger.setLevel(logging.WARNING)
        log.info("embedded MQTT broker on %s:%d stopped", host, port)


async def _stop_amqtt(broker: Any, timeout_s: float = 1.5) -> None:
    """Shut amqtt down; if a QoS 1/2 delivery to a vanished client holds it up, close its listeners."""
    try:
        await asyncio.wait_for(broker.shutdown(), timeout_s)
    except (asyncio.TimeoutError, Exception) as exc:
        log.debug("amqtt shutdown did not finish (%r); closing its listening sockets", exc)
        # amqtt 0.12 keeps its listeners in Broker._servers (Server.instance is an asyncio.Server)
        for server in list(getattr(broker, "_servers", {}).values()):
            instance = getattr(server, "instance", None)
            if instance is not None:
                instance.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Body of the broker thread: run the loop, then cancel what is left and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class MosquittoProcess:
    """mosquitto as a child process on ``host:port``, configured in ``workdir``; stop and restart on the same port.

    The one mosquitto launcher: the demo's fallback broker and the tests' broker fixtures use it.

    Args:
        workdir: folder of ``mosquitto.conf`` and ``mosquitto.log`` (and the persistence file).
        host: address to listen on.
        port: TCP port; None = a free one.
        persistence: keep sessions and retained messages across :meth:`stop` / :meth:`start`.
        listener_options: configuration lines of the listener (TLS, ``password_file``...).
        options: further configuration lines (log types...).
        executable: the mosquitto binary; None = found on ``PATH`` or in ``/usr/sbin``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        persistence: bool = False,
        listener_options: Sequence[str] = (),
        options: Sequence[str] = (),
        executable: str | None = None,
    ) -> None:
        self.executable = executable or _find_mosquitto() or "/usr/sbin/mosquitto"
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host) if port is None else port
        self.log = workdir / "mosquitto.log"
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {host}",
            *listener_options,  # per-listener settings (TLS, password_file) follow the listener line
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"log_dest file {self.log}",
            *options,
        ]
        if persistence:
            lines += [f"persistence_location {workdir}/", "autosave_interval 1"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the child process runs."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart) the broker on the same port and wait until it accepts connections.

        Raises:
            BrokerError: it exited, or did not listen within ``timeout_s`` (with its log).
        """
        if self.running:
            return
        self.proc = subprocess.Popen(
            [self.executable, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(
                    f"mosquitto ({self.executable}) exited with {self.proc.returncode} instead of listening on "
                    f"{self.host}:{self.port}: {err.strip()} {self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"mosquitto ({self.executable}) did not accept connections on {self.host}:{self.port} within "
            f"{timeout_s} s; {self._log_tail()}"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``kill=True``) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def _log_tail(self) -> str:
        tail = self.log.read_text(errors="replace")[-500:].strip() if self.log.exists() else ""
        return f"its log: {tail or '(empty)'}"


@contextlib.contextmanager
def _mosquitto_broker(executable: str, host: str, port: int, *, start_timeout_s: float) -> Iterator[None]:
    """Run mosquitto as a child process with a throw-away configuration."""
    with tempfile.TemporaryDirectory(prefix="fod-demo-mosquitto-") as tmp:
        broker = MosquittoProcess(Path(tmp), host=host, port=port, executable=executable)
        try:
            broker.start(start_timeout_s)
            log.info("embedded MQTT broker (mosquitto) listening on %s:%d", host, port)
            yield
        finally:
            broker.stop()
            log.info("embedded MQTT broker (mosquitto) on %s:%d stopped", host, port)
