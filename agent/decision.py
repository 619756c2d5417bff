"""From raw scores to verdicts and alarms: threshold, N-of-M debounce and hysteresis, per ROI.

Two things are decided for every scored ROI:

* the **verdict** of the frame: ``NG`` when the raw score is at or above the threshold, else ``OK``.
  It is instantaneous and goes into every result message;
* the **alarm state**, which changes only by these rules (one :class:`RoiDecision` per ROI):

  - ``OK -> NG`` when at least ``N`` of the last ``M`` frames scored at or above the *on*
    threshold (the threshold itself);
  - ``NG -> OK`` when at least ``N`` of the last ``M`` frames scored below the *off* threshold,
    ``threshold - hysteresis * |threshold|`` (``threshold * (1 - hysteresis)`` for positive scores);
  - the window restarts after each transition, so a new state must earn its own ``N`` frames.

A frame whose score lies between the off and on thresholds counts for neither transition: the
alarm holds its state (that gap is the hysteresis band). The threshold can change at run time
(MQTT command); the window is kept, the new value applies from the next frame on.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

State = Literal["OK", "NG"]


@dataclass(frozen=True)
class DecisionRule:
    """How a raw score becomes an alarm state.

    Attributes:
        threshold: raw score at or above which a frame is NG (the *on* threshold).
        hysteresis: fraction of ``|threshold|`` below it where the *off* threshold lies, in [0, 1).
        n: frames (out of the last ``m``) that must agree before the alarm changes state, ``1 <= n <= m``.
        m: length of the debounce window in frames.
    """

    threshold: float
    hysteresis: float = 0.0
    n: int = 1
    m: int = 1

    def __post_init__(self) -> None:
        """Validate the rule.

        Raises:
            ValueError: non-finite threshold, hysteresis outside [0, 1), or not ``1 <= n <= m``.
        """
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis}")
        if not 1 <= self.n <= self.m:
            raise ValueError(f"debounce needs 1 <= n <= m, got n={self.n}, m={self.m}")

    @property
    def off_threshold(self) -> float:
        """Raw score below which a frame counts towards ``NG -> OK``."""
        return self.threshold - self.hysteresis * abs(self.threshold)

    def verdict(self, score: float) -> State:
        """Instantaneous verdict of one frame: ``NG`` when ``score >= threshold``."""
        return "NG" if score >= self.threshold else "OK"


@dataclass(frozen=True)
class Transition:
    """An alarm state change.

    Attributes:
        previous: state before the frame.
        state: state after the frame.
    """

    previous: State
    state: State


@dataclass
class Tally:
    """What one ROI's decision saw: the numbers of the end-of-run summary.

    Attributes:
        frames: frames with a finite score.
        ng_frames: frames whose verdict was NG.
        alarms: ``OK -> NG`` transitions.
        held: NG frames after which the alarm stayed OK, because the debounce (``n`` of ``m``) had
            not collected enough NG frames yet.
    """

    frames: int = 0
    ng_frames: int = 0
    alarms: int = 0
    held: int = 0


class RoiDecision:
    """Debounced, hysteretic alarm state of one ROI, with a :class:`Tally` of what it decided.

    Args:
        rule: the initial :class:`DecisionRule`.
        state: the initial alarm state (``OK``).
    """

    def __init__(self, rule: DecisionRule, *, state: State = "OK") -> None:
        self.rule = rule
        self.state: State = state
        self._window: deque[bool] = deque(maxlen=rule.m)
        self.tally = Tally()

    def set_rule(self, rule: DecisionRule) -> None:
        """Replace the rule (new threshold at run time); the window keeps its votes."""
        if rule.m != self.rule.m:
            self._window = deque(self._window, maxlen=rule.m)
        self.rule = rule

    def copy(self) -> RoiDecision:
        """An independent copy (state, rule, window and tally), to try an update before committing it."""
        twin = RoiDecision(self.rule, state=self.state)
        twin._window = deque(self._window, maxlen=self.rule.m)
        twin.tally = dataclasses.replace(self.tally)
        return twin

    def update(self, score: float) -> Transition | None:
        """Feed the raw score of one frame.

        Args:
            score: raw image score of this ROI. NaN counts for neither transition.

        Returns:
            The :class:`Transition` when the alarm changed state on this frame, else None.
        """
        rule = self.rule
        ng = score >= rule.threshold
        if math.isfinite(score):
            self.tally.frames += 1
            self.tally.ng_frames += ng
        if self.state == "OK":
            vote = ng
        else:
            vote = score < rule.off_threshold
        self._window.append(bool(vote))
        if sum(self._window) >= rule.n:
            previous = self.state
            self.state = "NG" if previous == "OK" else "OK"
            self._window.clear()
            self.tally.alarms += self.state == "NG"
            return Transition(previous=previous, state=self.state)
        if ng and self.state == "OK":
            self.tally.held += 1
        return None


def summary_line(name: str, tally: Tally, rule: DecisionRule) -> str:
    """One line of the end-of-run summary for the ROI ``name`` (``camera/roi``).

    Says how many frames were scored, how many were NG, how many alarms were raised, and, when
    the debounce kept NG frames from raising an alarm, how many and which setting to change.
    """
    text = f"{name}: {tally.frames} frames, {tally.ng_frames} NG verdicts, {tally.alarms} alarms"
    if tally.held:
        text += (
            f"; debounce {rule.n}/{rule.m} held back {tally.held} NG frame(s) (an alarm needs {rule.n} NG among the "
            f"last {rule.m} frames; --debounce 1/1 raises one on every NG frame)"
        )
    return text
