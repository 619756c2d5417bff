"""A procedural conveyor belt: the camera of the embedded demo, and a source of synthetic test images.

:class:`SyntheticConveyor` behaves like a ``cv2.VideoCapture`` (``read() -> (True, frame)``,
``release()``, ``isOpened()``, ``get(prop)``), so the agent's capture layer takes it as a source.
It draws a moving rubber belt with side rails and seams, and parts sliding through the frame from
left to right: brushed metal discs, brushed metal plates and textured tiles, each with its own
normal variation (size, rotation, brightness, tint, texture). A configurable fraction of parts
carries defects: scratches, through-holes, stains and missing pieces (chipped edges or corners).

Everything is drawn with numpy and OpenCV and is deterministic for a given seed: the same seed
gives the same frames, byte for byte. Parts are rendered once, as sprites, when they enter; a frame
is a slice of a pre-rendered belt plus a masked copy of at most two sprites, a shared vignette and
a pre-computed sensor-noise pattern, so hundreds of 640x480 frames per second come from one core.

Ground truth is exact by construction: a defect's box is the bounding box of the pixels its drawing
changed. :attr:`SyntheticConveyor.truth` describes the last frame; :meth:`SyntheticConveyor.truth_at`
looks up a recent frame by index (the agent scores frames a little after they were read).

The same generator gives centred crops of single parts (:meth:`SyntheticConveyor.good_part_images`,
:meth:`SyntheticConveyor.defect_part_images`) and full good frames (:meth:`SyntheticConveyor.good_frames`)
for training and checking a model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

DefectKind = Literal["scratch", "hole", "stain", "missing"]
PartShape = Literal["disc", "plate", "tile"]

DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "hole", "stain", "missing")
PART_SHAPES: tuple[PartShape, ...] = ("disc", "plate", "tile")

#: a box in pixels, ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive
Box = tuple[int, int, int, int]

_SEAM_PERIOD_PX = 192
_NOISE_PATTERNS = 8
_TRUTH_HISTORY = 2048


@dataclass(frozen=True)
class DefectTruth:
    """One defect in a frame.

    Attributes:
        kind: ``scratch``, ``hole``, ``stain`` or ``missing``.
        box: ``(x0, y0, x1, y1)`` in frame px, clipped to the frame, of every pixel the defect changed.
        visible_fraction: share of the defect's pixels box area inside the frame, in [0, 1].
    """

    kind: DefectKind
    box: Box
    visible_fraction: float


@dataclass(frozen=True)
class PartTruth:
    """One part in a frame.

    Attributes:
        part_id: running number of the part since the conveyor started (0, 1, 2, ...).
        shape: ``disc``, ``plate`` or ``tile``.
        box: ``(x0, y0, x1, y1)`` of the part in frame px, clipped to the frame.
        defects: every defect of the part that is at least partly in the frame.
    """

    part_id: int
    shape: PartShape
    box: Box
    defects: tuple[DefectTruth, ...]


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one frame.

    Attributes:
        index: frame index (0 for the first frame read).
        parts: the parts at least partly in view.
        defective_in_view: True when at least half of some defect's box is inside the frame.
    """

    index: int
    parts: tuple[PartTruth, ...]
    defective_in_view: bool

    @property
    def defect_boxes(self) -> list[Box]:
        """Boxes (frame px, clipped) of every defect at least partly in view."""
        return [d.box for p in self.parts for d in p.defects]

    def defective_in(self, box: Box, min_fraction: float = 0.5) -> bool:
        """True when at least ``min_fraction`` of some defect's box lies inside ``box``.

        Args:
            box: ``(x0, y0, x1, y1)`` in frame px, e.g. a region of interest.
            min_fraction: share of the defect box area that must be inside, in (0, 1].
        """
        bx0, by0, bx1, by1 = box
        for part in self.parts:
            for defect in part.defects:
                x0, y0, x1, y1 = defect.box
                area = (x1 - x0) * (y1 - y0) / max(defect.visible_fraction, 1e-9)
                inside = max(0, min(x1, bx1) - max(x0, bx0)) * max(0, min(y1, by1) - max(y0, by0))
                if area > 0 and inside / area >= min_fraction:
                    return True
        return False


@dataclass
class _Sprite:
    """A rendered part: image, coverage mask and shadow on a square canvas."""

    shape: PartShape
    image: np.ndarray  # [c, c, 3] uint8 BGR
    mask: np.ndarray  # [c, c] uint8, 255 where the part covers the belt
    shadow: np.ndarray  # [c, c, 3] uint8, darkening subtracted from the belt
    defects: list[tuple[DefectKind, Box]] = field(default_factory=list)  # boxes in canvas px
    defect_pixels: np.ndarray | None = None  # [c, c] uint8, 255 where a defect changed the part
    box: Box = (0, 0, 0, 0)  # bounding box of the mask in canvas px


@dataclass
class _Placed:
    part_id: int
    sprite: _Sprite
    x: float  # left edge of the canvas in frame px
    y: int  # top edge of the canvas in frame px


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise with zero mean and unit std, ``[h, w]`` float32."""
    noise: np.ndarray = rng.standard_normal(shape).astype(np.float32)
    if sigma > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    std = float(noise.std())
    return (noise - float(noise.mean())) / (std if std > 1e-6 else 1.0)


def _box_of(mask: np.ndarray) -> Box | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the non-zero pixels of a 2-D mask, None when empty."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    if points is None:
        return None
    x, y, w, h = cv2.boundingRect(points)
    return (int(x), int(y), int(x + w), int(y + h))


class SyntheticConveyor:
    """A deterministic procedural conveyor that reads like a ``cv2.VideoCapture``.

    Args:
        width: frame width in px.
        height: frame height in px.
        seed: the random seed; equal seeds give equal frames.
        defect_rate: probability that a part carries one defect (or two, one time in five), in [0, 1].
        defect_kinds: kinds to draw from; None means all of :data:`DEFECT_KINDS`.
        part_shapes: shapes to draw from; None means all of :data:`PART_SHAPES`.
        speed_px: belt travel per frame in px.
        part_size: nominal part size as a fraction of the frame height (0.15 to 0.8).
        gap: free belt between two parts, as a fraction of the frame width, ``(min, max)``.
        fps: the camera's frame rate in frames per second, exposed as :attr:`fps` (the agent's
            capture thread paces live object sources at it); None means as fast as the caller reads.
        pace: when ``fps`` is set, :meth:`read` itself sleeps to keep that rate, like a camera
            (default True); False leaves the pacing to the caller.
        trigger: emulate a camera triggered by a light barrier: every frame shows the next part
            centred (within 1 % of the width), the belt travelling on between frames; else the
            camera runs freely and parts slide through the frame at ``speed_px`` per frame.
        draw_defects: False renders defective parts without their defects (same random stream,
            same ground truth), so a test can see which pixels the defects change.
        noise: std of the sensor noise in grey levels (0 turns it off).
        variation: spread of the normal part-to-part variation, 0 to 1: size (up to +-8 %),
            brightness (+-30 grey levels), tint, rotation (+-25 degrees) and the vertical
            position on the belt (+-1/16 of the height) are scaled by it. 1 is a loosely
            controlled process; a machined part under a trigger and guide rails is nearer 0.3.

    Raises:
        ValueError: a size, rate or kind out of range.
    """

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        *,
        seed: int = 0,
        defect_rate: float = 0.3,
        defect_kinds: Sequence[DefectKind] | None = None,
        part_shapes: Sequence[PartShape] | None = None,
        speed_px: float = 8.0,
        part_size: float = 0.55,
        gap: tuple[float, float] = (0.15, 0.45),
        fps: float | None = None,
        pace: bool = True,
        trigger: bool = False,
        draw_defects: bool = True,
        noise: float = 2.0,
        variation: float = 1.0,
    ) -> None:
        if width < 64 or height < 64:
            raise ValueError(f"SyntheticConveyor: frame {width}x{height} px is too small; use at least 64x64")
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"SyntheticConveyor: defect_rate={defect_rate} must be in [0, 1]")
        if not 0.15 <= part_size <= 0.8:
            raise ValueError(f"SyntheticConveyor: part_size={part_size} must be in [0.15, 0.8] of the height")
        if not 0.0 <= variation <= 1.0:
            raise ValueError(f"SyntheticConveyor: variation={variation} must be in [0, 1]")
        if speed_px <= 0:
            raise ValueError(f"SyntheticConveyor: speed_px={speed_px} must be > 0")
        if fps is not None and fps <= 0:
            raise ValueError(f"SyntheticConveyor: fps={fps} must be > 0 or None")
        kinds = tuple(defect_kinds) if defect_kinds is not None else DEFECT_KINDS
        shapes = tuple(part_shapes) if part_shapes is not None else PART_SHAPES
        bad = [k for k in kinds if k not in DEFECT_KINDS] + [s for s in shapes if s not in PART_SHAPES]
        if bad or not kinds or not shapes:
            raise ValueError(
                f"SyntheticConveyor: unknown or empty kinds/shapes {bad or '(empty)'}; "
                f"choose defects from {DEFECT_KINDS} and shapes from {PART_SHAPES}"
            )
        self.width = int(width)
        self.height = int(height)
        self.seed = int(seed)
        self.defect_rate = float(defect_rate)
        self.defect_kinds: tuple[DefectKind, ...] = kinds
        self.part_shapes: tuple[PartShape, ...] = shapes
        self.speed_px = float(speed_px)
        self.part_size_px = max(24, round(part_size * height))
        self.gap = (float(gap[0]), float(gap[1]))
        self.fps = fps
        self.pace = pace
        self.trigger = trigger
        #: a camera-like live source (the agent applies its newest-frame policy)
        self.is_live = True
        #: index of the frame just read (the agent reports it as the result's ``source_frame``)
        self.last_id: int | None = None
        self.draw_defects = draw_defects
        self.noise = float(noise)
        self.variation = float(variation)

        self._lock = threading.Lock()
        self._rng = np.random.default_rng([self.seed, 0])
        self._noise_rng = np.random.default_rng([self.seed, 1])
        self._belt, self._rail_px = self._render_belt(np.random.default_rng([self.seed, 2]))
        self._vignette = self._render_vignette()
        self._noise_up, self._noise_down = self._render_noise(np.random.default_rng([self.seed, 3]))
        self._parts: list[_Placed] = []
        self._next_part_id = 0
        self._travel_to_spawn = 0.0
        self._travel = 0.0
        self._next_trigger_id = 0
        self._trigger_rng = np.random.default_rng([self.seed, 4])
        self._frame_index = -1
        self._opened = True
        self._next_due: float | None = None
        self._history: OrderedDict[int, FrameTruth] = OrderedDict()
        self.truth: FrameTruth | None = None
        # the first part starts already in view, so the first frames show something
        first = self._spawn(x=0.12 * self.width)
        self._travel_to_spawn = first.sprite.image.shape[1] * 0.5 + self._draw_gap()

    # ------------------------------------------------------------------ cv2.VideoCapture-like API
    def read(self) -> tuple[bool, np.ndarray]:
        """Advance the belt by one frame and return it.

        Returns:
            ``(True, frame)`` with ``frame`` ``[height, width, 3]`` uint8 BGR; ``(False, empty)``
            after :meth:`release`. :attr:`truth` then describes this frame.
        """
        with self._lock:
            if not self._opened:
                return False, np.empty((0, 0, 3), np.uint8)
            frame, truth = self._next_frame()
            self.truth = truth
            self.last_id = truth.index
            self._history[truth.index] = truth
            while len(self._history) > _TRUTH_HISTORY:
                self._history.popitem(last=False)
        self._pace()
        return True, frame

    def release(self) -> None:
        """Stop the source; later :meth:`read` calls return ``(False, empty)``. Idempotent."""
        with self._lock:
            self._opened = False

    def isOpened(self) -> bool:
        """True until :meth:`release` is called."""
        return self._opened

    def get(self, prop_id: int) -> float:
        """Return a ``cv2.CAP_PROP_*`` value: frame width/height (px), fps, position (frames); else 0."""
        values = {
            cv2.CAP_PROP_FRAME_WIDTH: float(self.width),
            cv2.CAP_PROP_FRAME_HEIGHT: float(self.height),
            cv2.CAP_PROP_FPS: float(self.fps or 0.0),
            cv2.CAP_PROP_POS_FRAMES: float(self._frame_index + 1),
        }
        return values.get(prop_id, 0.0)

    def set(self, prop_id: int, value: float) -> bool:
        """Properties of the synthetic source are fixed: always False, as cv2 answers for unsupported ones."""
        return False

    def __enter__(self) -> SyntheticConveyor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ ground truth
    @property
    def frames_read(self) -> int:
        """Number of frames returned by :meth:`read` so far."""
        return self._frame_index + 1

    def truth_at(self, index: int) -> FrameTruth | None:
        """Ground truth of frame ``index`` if it is among the last 2048 frames read, else None."""
        with self._lock:
            return self._history.get(index)

    # ------------------------------------------------------------------ image sets for models
    def good_part_images(self, n: int, size: tuple[int, int] = (256, 256), *, seed: int | None = None) -> np.ndarray:
        """Centred crops of ``n`` good parts on the belt, as a camera triggered on each part sees them.

        Args:
            n: number of images.
            size: ``(height, width)`` of each image in px.
            seed: random seed of this set; None derives one from the conveyor's seed.

        Returns:
            ``[n, height, width, 3]`` uint8 BGR.
        """
        images, _, _ = self._part_crops(n, size, defective=False, kinds=None, seed=seed, stream=10)
        return images

    def defect_part_images(
        self,
        n: int,
        size: tuple[int, int] = (256, 256),
        *,
        kinds: Sequence[DefectKind] | None = None,
        seed: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[DefectKind]]:
        """Centred crops of ``n`` parts with exactly one defect each, with pixel masks.

        Args:
            n: number of images.
            size: ``(height, width)`` of each image in px.
            kinds: defect kinds to cycle through (image ``i`` gets ``kinds[i % len(kinds)]``);
                None means the conveyor's kinds.
            seed: random seed of this set; None derives one from the conveyor's seed.

        Returns:
            ``(images [n, h, w, 3] uint8 BGR, masks [n, h, w] bool (pixels the defect changed), kinds)``.
        """
        return self._part_crops(n, size, defective=True, kinds=kinds, seed=seed, stream=11)

    def good_frames(self, n: int, *, stride: int = 7, seed: int | None = None) -> np.ndarray:
        """Full frames of a conveyor like this one that carries only good parts.

        Args:
            n: number of frames.
            stride: keep every ``stride``-th frame, so that parts appear at varied positions
                (with ``trigger``, every frame already shows a new part: use 1).
            seed: random seed of this set; None derives one from the conveyor's seed.

        Returns:
            ``[n, height, width, 3]`` uint8 BGR.
        """
        source = SyntheticConveyor(
            self.width,
            self.height,
            seed=self.seed + 7919 if seed is None else seed,
            defect_rate=0.0,
            part_shapes=self.part_shapes,
            speed_px=self.speed_px,
            part_size=self.part_size_px / self.height,
            gap=self.gap,
            noise=self.noise,
            trigger=self.trigger,
            variation=self.variation,
        )
        out = np.empty((n, self.height, self.width, 3), np.uint8)
        for i in range(n * max(1, stride)):
            _, frame = source.read()
            if i % max(1, stride) == 0:
                out[i // max(1, stride)] = frame
        return out

    # ------------------------------------------------------------------ internals: stream
    def _pace(self) -> None:
        if self.fps is None or not self.pace:
            return
        now = time.monotonic()
        period = 1.0 / self.fps
        if self._next_due is None or now - self._next_due > 5 * period:  # first frame, or caller was slow
            self._next_due = now
        elif self._next_due > now:
            time.sleep(self._next_due - now)
        self._next_due += period

    def _draw_gap(self) -> float:
        return float(self._rng.uniform(*self.gap)) * self.width

    def _spawn(self, x: float) -> _Placed:
        rng = self._rng
        shape = self.part_shapes[int(rng.integers(len(self.part_shapes)))]
        part_seed = int(rng.integers(2**62))
        kinds: list[DefectKind] = []
        if rng.random() < self.defect_rate:
            count = 2 if rng.random() < 0.2 else 1
            kinds = [self.defect_kinds[int(rng.integers(len(self.defect_kinds)))] for _ in range(count)]
        sprite = _render_part(np.random.default_rng(part_seed), shape, self.part_size_px, kinds, self.draw_defects)
        canvas = sprite.image.shape[0]
        jitter = round(int(rng.integers(-self.height // 16, self.height // 16 + 1)) * self.variation)
        y = (self.height - canvas) // 2 + jitter
        placed = _Placed(self._next_part_id, sprite, x, y)
        self._next_part_id += 1
        self._parts.append(placed)
        return placed

    def _advance(self, dx: float) -> None:
        """Move the belt and every part by ``dx`` px, bringing in new parts at the left edge."""
        for part in self._parts:
            part.x += dx
        self._travel += dx
        self._travel_to_spawn -= dx
        while self._travel_to_spawn <= 0:
            placed = self._spawn(x=0.0)
            placed.x = -placed.sprite.image.shape[1] - self._travel_to_spawn
            self._travel_to_spawn += placed.sprite.image.shape[1] * 0.7 + self._draw_gap()
        self._parts = [p for p in self._parts if p.x < self.width]

    def _advance_to_next_trigger(self) -> None:
        """Move the belt until the next part not yet shown has its centre at the frame's centre."""
        jitter = float(self._trigger_rng.normal(0.0, self.width * 0.01))
        target = self.width / 2.0 + jitter
        while True:
            waiting = [p for p in self._parts if p.part_id >= self._next_trigger_id]
            if not waiting:
                self._advance(self.speed_px * 4)
                continue
            part = min(waiting, key=lambda p: p.part_id)
            centre = part.x + part.sprite.image.shape[1] / 2.0
            self._next_trigger_id = part.part_id + 1
            if centre <= target:  # a part already past the centre (the first one) is skipped
                self._advance(target - centre)
                return

    def _next_frame(self) -> tuple[np.ndarray, FrameTruth]:
        self._frame_index += 1
        if self.trigger:
            self._advance_to_next_trigger()
        elif self._frame_index > 0:
            self._advance(self.speed_px)

        offset = round(self._travel) % _SEAM_PERIOD_PX
        start = _SEAM_PERIOD_PX - offset
        frame = self._belt[:, start : start + self.width].copy()

        parts: list[PartTruth] = []
        defective = False
        for part in self._parts:
            truth = self._composite(frame, part)
            if truth is not None:
                parts.append(truth)
                defective = defective or any(d.visible_fraction >= 0.5 for d in truth.defects)

        cv2.multiply(frame, self._vignette, dst=frame, scale=1.0 / 255.0)
        if self.noise > 0:
            pattern = int(self._noise_rng.integers(_NOISE_PATTERNS))
            cv2.add(frame, self._noise_up[pattern], dst=frame)
            cv2.subtract(frame, self._noise_down[pattern], dst=frame)
        return frame, FrameTruth(self._frame_index, tuple(parts), defective)

    def _composite(self, frame: np.ndarray, part: _Placed) -> PartTruth | None:
        sprite = part.sprite
        size = sprite.image.shape[0]
        x0, y0 = round(part.x), part.y
        fx0, fy0 = max(x0, 0), max(y0, 0)
        fx1, fy1 = min(x0 + size, self.width), min(y0 + size, self.height)
        if fx1 <= fx0 or fy1 <= fy0:
            return None
        sx0, sy0 = fx0 - x0, fy0 - y0
        sx1, sy1 = sx0 + (fx1 - fx0), sy0 + (fy1 - fy0)
        roi = frame[fy0:fy1, fx0:fx1]
        cv2.subtract(roi, sprite.shadow[sy0:sy1, sx0:sx1], dst=roi)
        cv2.copyTo(sprite.image[sy0:sy1, sx0:sx1], sprite.mask[sy0:sy1, sx0:sx1], roi)
        px0, py0, px1, py1 = sprite.box
        box = (max(px0 + x0, 0), max(py0 + y0, 0), min(px1 + x0, self.width), min(py1 + y0, self.height))
        if box[2] <= box[0] or box[3] <= box[1]:
            return None
        defects: list[DefectTruth] = []
        for kind, (bx0, by0, bx1, by1) in sprite.defects:
            full = (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)
            clipped = (max(full[0], 0), max(full[1], 0), min(full[2], self.width), min(full[3], self.height))
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                continue
            area = (full[2] - full[0]) * (full[3] - full[1])
            inside = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
            defects.append(DefectTruth(kind, clipped, inside / max(area, 1)))
        return PartTruth(part.part_id, sprite.shape, box, tuple(defects))

    # ------------------------------------------------------------------ internals: static layers
    def _render_belt(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A belt strip ``[H, W + period, 3]`` that repeats every :data:`_SEAM_PERIOD_PX` along x."""
        h, period = self.height, _SEAM_PERIOD_PX
        # noise made periodic along x: blur three copies side by side and keep the middle one
        grain: np.ndarray = rng.standard_normal((h, period)).astype(np.float32)
        streaks: np.ndarray = rng.standard_normal((h, period)).astype(np.float32)
        grain = cv2.GaussianBlur(np.tile(grain, (1, 3)), (0, 0), 0.8)[:, period : 2 * period]
        streaks = cv2.GaussianBlur(np.tile(streaks, (1, 3)), (0, 0), sigmaX=12.0, sigmaY=0.7)[:, period : 2 * period]
        tile = 58.0 + 5.0 * grain / max(float(grain.std()), 1e-6) + 4.0 * streaks / max(float(streaks.std()), 1e-6)
        tile[:, :3] -= 18.0  # the seam between belt segments
        tile[:, 3:5] += 6.0
        rail = max(4, h // 12)
        rail_profile = 112.0 + 18.0 * np.sin(np.linspace(0.0, np.pi, rail, dtype=np.float32))
        tile[:rail] = rail_profile[:, None]
        tile[h - rail :] = rail_profile[::-1, None]
        tile[rail : rail + 3] -= 25.0
        tile[h - rail - 3 : h - rail] -= 25.0
        bgr = np.stack([tile * 1.02, tile, tile * 0.97], axis=-1)
        tile8 = np.clip(bgr, 0, 255).astype(np.uint8)
        repeats = (self.width + period) // period + 2
        return np.ascontiguousarray(np.tile(tile8, (1, repeats, 1))), rail

    def _render_vignette(self) -> np.ndarray:
        """Illumination falloff as a ``[H, W, 3]`` uint8 multiplier (255 = 1.0)."""
        ys = np.linspace(-1.0, 1.0, self.height, dtype=np.float32)[:, None]
        xs = np.linspace(-1.0, 1.0, self.width, dtype=np.float32)[None, :]
        gain = 1.0 - 0.16 * (xs**2 * 0.8 + ys**2) + 0.03 * xs
        return np.repeat((np.clip(gain, 0, 1) * 255.0).astype(np.uint8)[:, :, None], 3, axis=2)

    def _render_noise(self, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Pre-computed sensor noise: per pattern, the positive and negative parts as uint8 frames."""
        ups: list[np.ndarray] = []
        downs: list[np.ndarray] = []
        for _ in range(_NOISE_PATTERNS):
            noise = np.rint(rng.standard_normal((self.height, self.width, 3)) * self.noise)
            ups.append(np.clip(noise, 0, 255).astype(np.uint8))
            downs.append(np.clip(-noise, 0, 255).astype(np.uint8))
        return ups, downs

    def _part_crops(
        self,
        n: int,
        size: tuple[int, int],
        *,
        defective: bool,
        kinds: Sequence[DefectKind] | None,
        seed: int | None,
        stream: int,
    ) -> tuple[np.ndarray, np.ndarray, list[DefectKind]]:
        rng = np.random.default_rng([self.seed if seed is None else seed, stream])
        cycle = tuple(kinds) if kinds is not None else self.defect_kinds
        out_h, out_w = size
        images = np.empty((n, out_h, out_w, 3), np.uint8)
        masks = np.zeros((n, out_h, out_w), bool)
        used: list[DefectKind] = []
        canvas = int(self.part_size_px * 1.5) | 1
        side = min(canvas, self.height)
        for i in range(n):
            shape = self.part_shapes[int(rng.integers(len(self.part_shapes)))]
            part_kinds: list[DefectKind] = [cycle[i % len(cycle)]] if defective else []
            part_seed = int(rng.integers(2**62))
            sprite = _render_part(np.random.default_rng(part_seed), shape, self.part_size_px, part_kinds, True)
            # the belt under the part, at a random place along the belt
            start = int(rng.integers(_SEAM_PERIOD_PX))
            y0 = (self.height - side) // 2 + int(rng.integers(-4, 5))
            x0 = start + (self.width - side) // 2
            crop = self._belt[y0 : y0 + side, x0 : x0 + side].copy()
            c = sprite.image.shape[0]
            off = (c - side) // 2
            sl = np.s_[off : off + side, off : off + side]
            img, msk, shd = sprite.image[sl], sprite.mask[sl], sprite.shadow[sl]
            cv2.subtract(crop, shd, dst=crop)
            cv2.copyTo(img, msk, crop)
            vign = cv2.resize(self._vignette, (side, side), interpolation=cv2.INTER_AREA)
            cv2.multiply(crop, vign, dst=crop, scale=1.0 / 255.0)
            if self.noise > 0:
                noise = np.rint(rng.standard_normal(crop.shape) * self.noise)
                crop = np.clip(crop.astype(np.float32) + noise, 0, 255).astype(np.uint8)
            images[i] = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
            if defective:
                defect_mask = np.zeros((c, c), np.uint8)
                for _, (bx0, by0, bx1, by1) in sprite.defects:
                    defect_mask[by0:by1, bx0:bx1] = 255
                # the exact changed pixels, not just the box
                defect_mask &= sprite.defect_pixels if sprite.defect_pixels is not None else defect_mask
                small = cv2.resize(defect_mask[sl], (out_w, out_h), interpolation=cv2.INTER_NEAREST)
                masks[i] = small > 0
                used.append(part_kinds[0])
        return images, masks, used


# ---------------------------------------------------------------------- part rendering
def _render_part(
    rng: np.random.Generator,
    shape: PartShape,
    size_px: int,
    kinds: Sequence[DefectKind],
    draw_defects: bool,
    variation: float = 1.0,
) -> _Sprite:
    """Render one part (and its defects) on a square canvas 1.5 times its nominal size.

    ``variation`` scales the part-to-part spread of size, brightness, tint and rotation (the
    texture itself always differs).
    """
    canvas = int(size_px * 1.5) | 1
    spread = variation
    scale = 1.0 + float(rng.uniform(-0.08, 0.08)) * spread
    s = size_px * scale
    c = canvas / 2.0
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    dx, dy = xs - c, ys - c

    if shape == "disc":
        radius = s / 2.0
        r = np.sqrt(dx * dx + dy * dy)
        mask = (r <= radius).astype(np.uint8) * 255
        base = 165.0 + float(rng.uniform(-30, 30)) * spread
        rings = np.sin(2 * np.pi * r / float(rng.uniform(2.5, 5.0)) + float(rng.uniform(0, 6.3)))
        swirl = _unit_noise(rng, (canvas, canvas), 2.0)
        texture = 6.0 * rings + 3.0 * swirl
        tint = rng.uniform(-6, 6, 3) * spread
    else:
        aspect = float(rng.uniform(0.62, 0.9)) if shape == "plate" else float(rng.uniform(0.9, 1.0))
        half_w, half_h = s / 2.0, s * aspect / 2.0
        corner = float(rng.uniform(0.05, 0.18)) * s
        angle = float(rng.uniform(-25, 25)) * spread
        theta = np.deg2rad(angle)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        qx = np.maximum(np.abs(u) - (half_w - corner), 0)
        qy = np.maximum(np.abs(v) - (half_h - corner), 0)
        mask = ((qx * qx + qy * qy) <= corner * corner).astype(np.uint8) * 255
        if shape == "plate":
            base = 170.0 + float(rng.uniform(-30, 30)) * spread
            brushed: np.ndarray = rng.standard_normal((canvas, canvas)).astype(np.float32)
            brushed = cv2.GaussianBlur(brushed, (0, 0), sigmaX=9.0, sigmaY=0.6)
            matrix = cv2.getRotationMatrix2D((c, c), -angle, 1.0)
            brushed = cv2.warpAffine(brushed, matrix, (canvas, canvas), borderMode=cv2.BORDER_REFLECT)
            texture = 10.0 * brushed / max(float(brushed.std()), 1e-6) + 2.0 * _unit_noise(rng, (canvas, canvas), 1.0)
            tint = rng.uniform(-6, 6, 3) * spread
        else:  # tile: a textured (cast, sand-blasted or stone-like) part
            base = 127.5 + float(rng.uniform(-32.5, 32.5)) * spread
            coarse = _unit_noise(rng, (canvas, canvas), float(rng.uniform(6, 12)))
            fine = _unit_noise(rng, (canvas, canvas), 1.0)
            speckle = (_unit_noise(rng, (canvas, canvas), 1.2) > 2.0).astype(np.float32)
            texture = 9.0 * coarse + 7.0 * fine - 25.0 * speckle
            palette = np.array([[10, 25, 45], [20, 20, 20], [35, 20, 5], [5, 30, 15]], np.float32)
            tint = palette[int(rng.integers(len(palette)))] - 20.0 + rng.uniform(-6, 6, 3) * spread

    # lighting: a soft gradient from a random direction, darker bevelled rim
    light = float(rng.uniform(0, 2 * np.pi))
    gradient = 18.0 * (dx * np.cos(light) + dy * np.sin(light)) / max(s, 1.0)
    rim = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    bevel = np.clip(rim / max(3.0, s * 0.04), 0.0, 1.0)
    gray = (base + texture + gradient) * (0.7 + 0.3 * bevel)
    image = np.clip(gray[:, :, None] + tint[None, None, :].astype(np.float32), 0, 255).astype(np.uint8)

    # a drop shadow from the intact outline (defects do not change it)
    shadow_mask = np.roll(mask, (max(2, int(s * 0.03)), max(2, int(s * 0.02))), axis=(0, 1))
    shadow = cv2.GaussianBlur(shadow_mask.astype(np.float32) * (28.0 / 255.0), (0, 0), max(2.0, s * 0.02))
    shadow8 = np.repeat(np.clip(shadow, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)

    sprite = _Sprite(shape, image, mask, shadow8, defect_pixels=np.zeros((canvas, canvas), np.uint8))
    for kind in kinds:
        before_img, before_mask = sprite.image.copy(), sprite.mask.copy()
        _draw_defect(rng, sprite, kind, s)  # always drawn, so the random stream is the same either way
        changed = np.any(sprite.image != before_img, axis=2) | (sprite.mask != before_mask)
        box = _box_of(changed)
        if not draw_defects:
            sprite.image, sprite.mask = before_img, before_mask
        if box is not None:
            sprite.defects.append((kind, box))
            if sprite.defect_pixels is not None:
                sprite.defect_pixels |= changed.astype(np.uint8) * 255
    sprite.box = _box_of(sprite.mask) or (0, 0, 0, 0)
    return sprite


def _inside_point(rng: np.random.Generator, mask: np.ndarray, margin: float) -> tuple[int, int]:
    """A random ``(x, y)`` inside ``mask``, ``margin`` px or more from its edge (else the deepest point)."""
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    ys, xs = np.nonzero(depth >= margin)
    if len(xs) == 0:
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return int(x), int(y)
    i = int(rng.integers(len(xs)))
    return int(xs[i]), int(ys[i])


def _draw_defect(rng: np.random.Generator, sprite: _Sprite, kind: DefectKind, s: float) -> None:
    """Draw one defect onto the sprite in place (image and coverage mask)."""
    image, mask = sprite.image, sprite.mask
    canvas = mask.shape[0]
    if kind == "scratch":
        x, y = _inside_point(rng, mask, s * 0.15)
        angle = float(rng.uniform(0, np.pi))
        length = s * float(rng.uniform(0.35, 0.6))
        steps = 6
        points = []
        for k in range(steps + 1):
            t = (k / steps - 0.5) * length
            wobble = float(rng.normal(0, s * 0.012))
            points.append(
                [
                    x + t * np.cos(angle) - wobble * np.sin(angle),
                    y + t * np.sin(angle) + wobble * np.cos(angle),
                ]
            )
        poly = np.array(points, np.int32).reshape(-1, 1, 2)
        thick = max(3, int(s * 0.024))
        layer = image.copy()
        cv2.polylines(layer, [poly], False, (25, 25, 25), thick + 4, cv2.LINE_AA)
        bright = int(rng.uniform(215, 250))
        cv2.polylines(layer, [poly], False, (bright, bright, bright), thick, cv2.LINE_AA)
        inside = mask > 0
        image[inside] = layer[inside]
    elif kind == "hole":
        radius = s * float(rng.uniform(0.065, 0.1))
        x, y = _inside_point(rng, mask, radius + 6)
        r = max(3, int(radius))
        cv2.circle(image, (x, y), r + 3, (40, 40, 40), -1, cv2.LINE_AA)
        cv2.circle(mask, (x, y), r, 0, -1, cv2.LINE_8)
    elif kind == "stain":
        x, y = _inside_point(rng, mask, s * 0.12)
        alpha = np.zeros((canvas, canvas), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = rng.normal(0, s * 0.05, 2)
            axes = (max(3, int(s * rng.uniform(0.06, 0.13))), max(3, int(s * rng.uniform(0.045, 0.1))))
            cv2.ellipse(alpha, (int(x + ox), int(y + oy)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.5, s * 0.015)) * float(rng.uniform(0.7, 0.9))
        alpha *= (mask > 0).astype(np.float32)
        colour = np.array([[20, 40, 60], [15, 15, 15], [10, 50, 45]], np.float32)[int(rng.integers(3))]
        mixed = image.astype(np.float32) * (1 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]
        image[:] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    else:  # missing: a jagged piece broken off the edge
        angle = float(rng.uniform(0, 2 * np.pi))
        cx = cy = canvas / 2.0
        edge_r = 0.0
        for r in np.arange(0, canvas / 2.0, 1.0):
            px, py = int(cx + r * np.cos(angle)), int(cy + r * np.sin(angle))
            if not (0 <= px < canvas and 0 <= py < canvas) or mask[py, px] == 0:
                break
            edge_r = float(r)
        radius = s * float(rng.uniform(0.16, 0.22))
        # centre the break a little inside the edge, so a good bite is missing
        bx, by = cx + (edge_r - 0.3 * radius) * np.cos(angle), cy + (edge_r - 0.3 * radius) * np.sin(angle)
        corners = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.6, 1.2, corners)
        poly = np.stack([bx + radii * np.cos(angles), by + radii * np.sin(angles)], axis=1).astype(np.int32)
        cv2.fillPoly(mask, [poly.reshape(-1, 1, 2)], 0)
        # the fresh fracture is darker just inside the break
        piece = np.zeros_like(mask)
        cv2.fillPoly(piece, [poly.reshape(-1, 1, 2)], 255)
        edge = (cv2.dilate(piece, np.ones((7, 7), np.uint8)) > 0) & (mask > 0)
        image[edge] = (image[edge].astype(np.float32) * 0.5).astype(np.uint8)
