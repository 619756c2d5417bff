"""The engine build, as small lazy steps (Polygraphy's loader pattern).

Each step stores its inputs when constructed and does its work when called, so the steps can be read,
tested and chained one by one::

    progress = BuildProgress()
    network = NetworkFromOnnx(pkg.onnx_path("fp16"))
    config = CreateConfig(settings, pkg.image_size, progress=progress)
    plan = EngineBytesFromNetwork(network, config, progress=progress)
    SaveEngine(plan, "model.fp16.engine")()        # parse -> configure -> build -> save

Precision comes from the ONNX variant (FP32, FP16 mixed, INT8 Q/DQ) and the network is strongly typed:
no FP16 / INT8 builder flags, which TensorRT 11 removed. Written against the TensorRT 10 Python API
(``tensorrt-stubs`` type-checks it) using only calls that TensorRT 11 keeps. Engine builds on a Jetson
take minutes: :class:`BuildProgress` logs TensorRT's build phases (``IProgressMonitor``, TensorRT >= 10)
and a heartbeat with the elapsed time every few seconds, so a build never sits silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from engine_build.errors import EngineBuildError
from engine_build.util import dims_to_tuple, require_tensorrt, trt_logger

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger("engine_build.build")

PRECISIONS = ("fp32", "fp16", "int8")
#: name of the graph input whose batch axis the optimisation profile covers
INPUT_NAME = "image"


@dataclass(frozen=True)
class BuildSettings:
    """What ``fod build`` asks of TensorRT; recorded in the engine manifest.

    Attributes:
        precision: ONNX variant the engine is built from (``fp32``, ``fp16``, ``int8``).
        max_batch: largest batch the engine accepts (optimisation profile max), >= 1.
        opt_batch: batch size TensorRT tunes for (profile opt), 1..max_batch; None means 1 (one camera).
        workspace_mib: limit of TensorRT's workspace memory pool in MiB; None keeps TensorRT's default
            (the device's memory).
        opt_level: builder optimisation level 0..5 (TensorRT's default is 3; higher builds slower and
            may run faster); None keeps the default.
        timing_cache: file with TensorRT's timing cache, read before and written after the build (makes
            rebuilds on the same GPU much faster); None uses no persistent cache.

    Raises:
        EngineBuildError: a value out of range, naming the ``fod build`` option.
    """

    precision: str
    max_batch: int = 4
    opt_batch: int | None = None
    workspace_mib: int | None = None
    opt_level: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineBuildError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.max_batch < 1:
            raise EngineBuildError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise EngineBuildError(
                f"opt_batch {self.opt_batch}: must be between 1 and --max-batch {self.max_batch}"
            )
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise EngineBuildError(f"--workspace-mib {self.workspace_mib}: must be a positive number of MiB")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise EngineBuildError(f"--opt-level {self.opt_level}: TensorRT accepts 0..5 (default 3)")

    @property
    def profile_opt_batch(self) -> int:
        """Batch size of the profile's opt shape (``opt_batch`` or 1)."""
        return self.opt_batch if self.opt_batch is not None else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings) for the engine manifest."""
        out = asdict(self)
        out["opt_batch"] = self.profile_opt_batch
        out["timing_cache"] = str(self.timing_cache) if self.timing_cache is not None else None
        out["strongly_typed"] = True
        return out


def profile_shapes(
    settings: BuildSettings, image_size: tuple[int, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Min / opt / max shapes of the ``image`` input, ``[N, H, W, 3]``, for the optimisation profile."""
    h, w = image_size
    return (1, h, w, 3), (settings.profile_opt_batch, h, w, 3), (settings.max_batch, h, w, 3)


def network_flags(trt_module: Any, *, strongly_typed: bool = True) -> int:
    """``create_network`` flags: STRONGLY_TYPED where the installed TensorRT has the flag.

    TensorRT 10 needs the flag for a strongly typed network; TensorRT 11 builds every network strongly
    typed (the flag is accepted and ignored there), so a missing flag means 0 is right too.
    """
    flag = getattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


# ----------------------------------------------------------------------------------------- progress


class BuildProgress:
    """Thread-safe record of TensorRT's build phases, with elapsed time, for logs and the heartbeat.

    Fed by TensorRT's ``IProgressMonitor`` callbacks (:func:`make_progress_monitor`) from TensorRT's
    threads; read by :class:`Heartbeat`. Top-level phases are logged when they start and finish.

    Args:
        logger: where to log (default ``engine_build.build``).
        clock: monotonic clock in s (tests pass a fake one).
    """

    def __init__(
        self, logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log = logger or log
        self._clock = clock
        self._lock = threading.Lock()
        self._t0 = clock()
        # phase name -> (parent, num_steps, steps done, start time); insertion order = nesting order
        self._phases: dict[str, tuple[str | None, int, int, float]] = {}

    def restart(self) -> None:
        """Reset the clock and forget every phase (called when the build starts)."""
        with self._lock:
            self._t0 = self._clock()
            self._phases.clear()

    @property
    def elapsed_s(self) -> float:
        """Seconds since the build started."""
        return self._clock() - self._t0

    def phase_start(self, phase: str, parent: str | None, num_steps: int) -> None:
        """A phase began (``parent`` None for a top-level phase) with ``num_steps`` steps."""
        with self._lock:
            self._phases[phase] = (parent, int(num_steps), 0, self._clock())
        if parent is None:
            self.log.info("TensorRT: %s (%d steps) started at %.0f s", phase, num_steps, self.elapsed_s)

    def step_complete(self, phase: str, step: int) -> None:
        """Step ``step`` (0-based) of ``phase`` finished."""
        with self._lock:
            if phase in self._phases:
                parent, total, _, start = self._phases[phase]
                self._phases[phase] = (parent, total, int(step) + 1, start)

    def phase_finish(self, phase: str) -> None:
        """A phase ended."""
        with self._lock:
            info = self._phases.pop(phase, None)
        if info is not None and info[0] is None:
            took = self._clock() - info[3]
            self.log.info("TensorRT: %s done in %.1f s (%.0f s elapsed)", phase, took, self.elapsed_s)

    def describe(self) -> str:
        """One line: elapsed time and the open phases, outermost first (``a > b (3/10)``)."""
        with self._lock:
            phases = [f"{name} ({done}/{total})" for name, (_, total, done, _) in self._phases.items()]
        where = " > ".join(phases) if phases else "working"
        return f"building the engine: {self.elapsed_s:.0f} s elapsed; {where}"


class Heartbeat:
    """Log :meth:`BuildProgress.describe` every ``interval_s`` from a daemon thread while in a ``with`` block.

    Args:
        progress: the build's progress record.
        interval_s: seconds between two lines (> 0).
    """

    def __init__(self, progress: BuildProgress, interval_s: float = 10.0) -> None:
        if interval_s <= 0:
            raise EngineBuildError(f"heartbeat interval {interval_s} s: must be > 0")
        self.progress = progress
        self.interval_s = interval_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Log one progress line now."""
        self.beats += 1
        self.progress.log.info("%s", self.progress.describe())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="engine-build-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def make_progress_monitor(progress: BuildProgress) -> trt.IProgressMonitor:
    """A ``tensorrt.IProgressMonitor`` that feeds ``progress`` (TensorRT >= 10).

    Callbacks come from TensorRT's threads; they never raise into TensorRT and never cancel the build.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed.
    """
    require_tensorrt("the build progress monitor")
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            try:
                progress.phase_start(phase_name, parent_phase or None, num_steps)
            except Exception:  # never propagate into TensorRT's threads
                log.debug("progress callback failed", exc_info=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                progress.step_complete(phase_name, step)
            except Exception:
                log.debug("progress callback failed", exc_info=True)
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                progress.phase_finish(phase_name)
            except Exception:
                log.debug("progress callback failed", exc_info=True)

    return _Monitor()


# -------------------------------------------------------------------------------------------- steps


class ParsedNetwork(NamedTuple):
    """What :class:`NetworkFromOnnx` returns: the parser must live as long as the network."""

    builder: trt.Builder
    network: trt.INetworkDefinition
    parser: trt.OnnxParser


class NetworkFromOnnx:
    """Parse an ONNX file into a strongly typed TensorRT network.

    Args:
        onnx_path: the ``.onnx`` file (``model.onnx``, ``model.fp16.onnx`` or ``model.int8.onnx``).
        strongly_typed: build a strongly typed network (precision from the graph's types); keep True.

    Calling it returns a :class:`ParsedNetwork`.

    Raises (when called):
        EngineBuildError: the file is missing or TensorRT cannot parse it (the failing nodes are named).
        TensorRTUnavailableError: TensorRT is not installed.
    """

    def __init__(self, onnx_path: str | Path, *, strongly_typed: bool = True) -> None:
        self.onnx_path = Path(onnx_path)
        self.strongly_typed = strongly_typed

    def __call__(self) -> ParsedNetwork:
        """Parse the file; see the class docstring."""
        version = require_tensorrt("parsing ONNX for TensorRT")
        import tensorrt as trt

        if not self.onnx_path.is_file():
            raise EngineBuildError(f"{self.onnx_path}: ONNX file not found; check --model")
        logger = trt_logger()
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, strongly_typed=self.strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            details = "; ".join(f"node {err.node()}: {err.desc()}" for err in errors[:5]) or "no details"
            raise EngineBuildError(
                f"{self.onnx_path}: TensorRT {version} cannot parse the ONNX graph ({details}); "
                "re-export the package with a supported opset, or upgrade TensorRT"
            )
        log.info(
            "parsed %s: %d inputs, %d outputs, %d layers",
            self.onnx_path.name,
            network.num_inputs,
            network.num_outputs,
            network.num_layers,
        )
        return ParsedNetwork(builder, network, parser)


class CreateConfig:
    """Make the builder config: workspace limit, optimisation profile, level, timing cache, progress.

    Args:
        settings: the build settings.
        image_size: ``(height, width)`` of the model input in px (from the package manifest).
        input_name: the graph input whose shape the profile sets (``image``, ``[N, H, W, 3]`` uint8).
        progress: feeds TensorRT's progress monitor into this record when TensorRT has one (>= 10).

    Calling it with ``(builder, network)`` returns the ``IBuilderConfig``.

    Raises (when called):
        EngineBuildError: the network has no such input, or its fixed dimensions disagree with ``image_size``.
    """

    def __init__(
        self,
        settings: BuildSettings,
        image_size: tuple[int, int],
        *,
        input_name: str = INPUT_NAME,
        progress: BuildProgress | None = None,
    ) -> None:
        self.settings = settings
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.input_name = input_name
        self.progress = progress
        self.monitor: Any = None  # kept alive as long as the config: TensorRT holds a raw pointer

    def __call__(self, builder: trt.Builder, network: trt.INetworkDefinition) -> trt.IBuilderConfig:
        """Create and fill the config; see the class docstring."""
        require_tensorrt("configuring the TensorRT build")
        import tensorrt as trt

        s = self.settings
        config = builder.create_builder_config()
        if s.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
        if s.opt_level is not None:
            config.builder_optimization_level = s.opt_level

        self._check_input(network)
        low, opt, high = profile_shapes(s, self.image_size)
        profile = builder.create_optimization_profile()
        profile.set_shape(self.input_name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(profile)

        if s.timing_cache is not None:
            data = s.timing_cache.read_bytes() if s.timing_cache.is_file() else b""
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, ignore_mismatch=False)
            log.info("timing cache %s: %s", s.timing_cache, f"{len(data)} bytes loaded" if data else "new")

        if self.progress is not None and hasattr(trt, "IProgressMonitor"):
            self.monitor = make_progress_monitor(self.progress)
            config.progress_monitor = self.monitor
        return config

    def _check_input(self, network: trt.INetworkDefinition) -> None:
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        names = [t.name for t in inputs]
        if self.input_name not in names:
            raise EngineBuildError(
                f"the ONNX graph has inputs {names}, not {self.input_name!r}; "
                "export the package with `fod export`"
            )
        shape = list(dims_to_tuple(inputs[names.index(self.input_name)].shape))
        expected = [-1, self.image_size[0], self.image_size[1], 3]
        bad = len(shape) != 4 or any(d not in (-1, e) for d, e in zip(shape[1:], expected[1:]))
        if bad:
            raise EngineBuildError(
                f"graph input {self.input_name!r} has shape {shape}, expected "
                f"[N, {expected[1]}, {expected[2]}, 3] (the package manifest's image_size); "
                "re-export the package"
            )


class EngineBytesFromNetwork:
    """Build and serialise the engine: returns the plan as ``bytes``.

    Args:
        network: a step returning a :class:`ParsedNetwork` (e.g. :class:`NetworkFromOnnx`).
        config: a step ``(builder, network) -> IBuilderConfig`` (e.g. :class:`CreateConfig`).
        progress: progress record for the heartbeat (the same one given to :class:`CreateConfig`);
            None makes a fresh one (heartbeat without phase names).
        heartbeat_s: seconds between two progress lines while TensorRT builds.
        timing_cache: where to write the timing cache after the build (usually ``settings.timing_cache``).

    Raises (when called):
        EngineBuildError: TensorRT returned no engine (its log above says why).
    """

    def __init__(
        self,
        network: Callable[[], ParsedNetwork],
        config: Callable[[trt.Builder, trt.INetworkDefinition], trt.IBuilderConfig],
        *,
        progress: BuildProgress | None = None,
        heartbeat_s: float = 10.0,
        timing_cache: Path | None = None,
    ) -> None:
        self.network = network
        self.config = config
        self.progress = progress
        self.heartbeat_s = heartbeat_s
        self.timing_cache = timing_cache

    def __call__(self) -> bytes:
        """Parse, configure and build; see the class docstring."""
        version = require_tensorrt("building a TensorRT engine")
        parsed = self.network()
        config = self.config(parsed.builder, parsed.network)
        progress = self.progress or BuildProgress()
        progress.restart()
        log.info("TensorRT %s is building the engine; this takes minutes on a Jetson", version)
        with Heartbeat(progress, self.heartbeat_s):
            plan = parsed.builder.build_serialized_network(parsed.network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT {version} could not build the engine after {progress.elapsed_s:.0f} s (see its "
                "errors above); if it ran out of memory, lower --max-batch or --workspace-mib and close "
                "other GPU programs"
            )
        data = bytes(plan)
        log.info("engine built in %.1f s (%.1f MiB)", progress.elapsed_s, len(data) / 2**20)
        if self.timing_cache is not None:
            cache = bytes(config.get_timing_cache().serialize())
            _atomic_write(self.timing_cache, cache)
            log.info("timing cache saved to %s (%d bytes)", self.timing_cache, len(cache))
        return data


class SaveEngine:
    """Write an engine plan to a file atomically (temporary file, then rename).

    Args:
        engine: the plan bytes, or a step returning them (e.g. :class:`EngineBytesFromNetwork`).
        path: destination file; its folder is created.

    Calling it returns ``path``.
    """

    def __init__(self, engine: bytes | Callable[[], bytes], path: str | Path) -> None:
        self.engine = engine
        self.path = Path(path)

    def __call__(self) -> Path:
        """Build (if a step was given) and write; see the class docstring."""
        data = self.engine if isinstance(self.engine, bytes) else self.engine()
        _atomic_write(self.path, data)
        log.info("engine written to %s", self.path)
        return self.path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
