"""Table tests of the alarm decision: threshold, N-of-M debounce, hysteresis."""

from __future__ import annotations

import math

import pytest

from agent.decision import DecisionRule, RoiDecision, summary_line


def run(rule: DecisionRule, scores: list[float]) -> str:
    """Alarm state after each score, as a string of 'O'/'N' (one char per frame)."""
    decision = RoiDecision(rule)
    out = []
    for score in scores:
        decision.update(score)
        out.append("N" if decision.state == "NG" else "O")
    return "".join(out)


@pytest.mark.parametrize(
    ("rule", "scores", "expected"),
    [
        # no debounce, no hysteresis: the alarm follows the verdict
        (DecisionRule(1.0), [0.5, 1.0, 0.99, 1.5, 0.2], "ONONO"),
        # at exactly the threshold a frame is NG (>=)
        (DecisionRule(1.0), [1.0], "N"),
        # 2-of-3: one NG frame alone never raises the alarm
        (DecisionRule(1.0, n=2, m=3), [2.0, 0.0, 0.0, 2.0, 0.0, 0.0], "OOOOOO"),
        # 2-of-3: two NG frames within a window of three raise it, on the second
        (DecisionRule(1.0, n=2, m=3), [2.0, 0.0, 2.0, 0.0], "OONN"),
        # 2-of-3 on the way back too: two clear frames within three clear it, an NG frame between or not
        (DecisionRule(1.0, n=2, m=3), [2.0, 2.0, 0.0, 2.0, 0.0, 0.0], "ONNNOO"),
        # 3-of-3 needs three in a row
        (DecisionRule(1.0, n=3, m=3), [2.0, 2.0, 0.0, 2.0, 2.0, 2.0], "OOOOON"),
        # hysteresis 0.2: off threshold 0.8; scores in [0.8, 1.0) keep NG
        (DecisionRule(1.0, hysteresis=0.2), [1.2, 0.9, 0.85, 0.8, 0.79], "NNNNO"),
        # hysteresis band does not raise the alarm either (0.9 < on threshold)
        (DecisionRule(1.0, hysteresis=0.2), [0.9, 0.95, 0.99], "OOO"),
        # hysteresis with debounce: clear frames must be below the off threshold
        (DecisionRule(1.0, hysteresis=0.5, n=2, m=2), [1.0, 1.0, 0.6, 0.4, 0.6, 0.4, 0.4], "ONNNNNO"),
        # the window restarts after a transition: old NG votes do not count towards clearing
        (DecisionRule(1.0, n=2, m=4), [2.0, 2.0, 0.0], "ONN"),
        # NaN scores count for neither transition
        (DecisionRule(1.0), [math.nan, 2.0, math.nan, 0.0], "ONNO"),
    ],
)
def test_alarm_state_table(rule: DecisionRule, scores: list[float], expected: str) -> None:
    assert run(rule, scores) == expected


def test_transitions_are_reported_once_with_previous_state() -> None:
    decision = RoiDecision(DecisionRule(1.0, n=2, m=3))
    transitions = [decision.update(s) for s in [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]
    reported = [(t.previous, t.state) for t in transitions if t is not None]
    assert reported == [("OK", "NG"), ("NG", "OK")]
    assert transitions[1] is not None
    assert transitions[4] is not None


@pytest.mark.parametrize(
    ("threshold", "hysteresis", "off"),
    [
        (1.0, 0.1, 0.9),  # positive threshold: threshold * (1 - h)
        (2.5, 0.0, 2.5),  # no hysteresis: same threshold both ways
        (-1.0, 0.5, -1.5),  # negative raw scores: still below the on threshold
    ],
)
def test_off_threshold(threshold: float, hysteresis: float, off: float) -> None:
    assert DecisionRule(threshold, hysteresis).off_threshold == pytest.approx(off)


def test_verdict_is_instantaneous() -> None:
    rule = DecisionRule(1.0, hysteresis=0.5, n=3, m=3)
    assert [rule.verdict(s) for s in (0.99, 1.0, 5.0)] == ["OK", "NG", "NG"]


def test_threshold_change_applies_from_next_frame() -> None:
    decision = RoiDecision(DecisionRule(1.0))
    assert decision.update(0.5) is None
    decision.set_rule(DecisionRule(0.4))
    transition = decision.update(0.5)
    assert transition is not None
    assert transition.state == "NG"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": math.inf}, "finite"),
        ({"threshold": 1.0, "hysteresis": 1.0}, "hysteresis"),
        ({"threshold": 1.0, "n": 3, "m": 2}, "n <= m"),
        ({"threshold": 1.0, "n": 0, "m": 2}, "n <= m"),
    ],
)
def test_invalid_rules_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecisionRule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "scores", "expected"),
    [
        # 2-of-3, single NG frames: two NG verdicts, both held back, no alarm
        (DecisionRule(1.0, n=2, m=3), [2.0, 0.0, 0.0, 2.0, 0.0], (5, 2, 0, 2)),
        # 2-of-3, two NG in a row: the first is held, the second raises the alarm
        (DecisionRule(1.0, n=2, m=3), [2.0, 2.0, 0.0], (3, 2, 1, 1)),
        # 1/1: every NG frame raises an alarm, nothing is held
        (DecisionRule(1.0), [2.0, 0.0, 2.0], (3, 2, 2, 0)),
        # NaN counts as no frame at all
        (DecisionRule(1.0), [math.nan, 2.0], (1, 1, 1, 0)),
    ],
)
def test_tally_counts_frames_ng_alarms_and_held(
    rule: DecisionRule, scores: list[float], expected: tuple[int, int, int, int]
) -> None:
    decision = RoiDecision(rule)
    for score in scores:
        decision.update(score)
    t = decision.tally
    assert (t.frames, t.ng_frames, t.alarms, t.held) == expected


def test_summary_line_says_why_no_alarm() -> None:
    rule = DecisionRule(1.0, n=2, m=3)
    decision = RoiDecision(rule)
    for score in (2.0, 0.0, 0.0, 2.0):
        decision.update(score)
    line = summary_line("cam0/roi0", decision.tally, rule)
    assert line.startswith("cam0/roi0: 4 frames, 2 NG verdicts, 0 alarms")
    assert "debounce 2/3 held back 2 NG frame(s)" in line
    assert "--debounce 1/1" in line
    assert "held back" not in summary_line("c/r", RoiDecision(DecisionRule(1.0)).tally, DecisionRule(1.0))


def test_copy_carries_the_tally_on() -> None:
    # the pipeline tries each update on a copy and commits the copy: the tally must travel with it
    decision = RoiDecision(DecisionRule(1.0, n=2, m=3))
    decision.update(2.0)
    twin = decision.copy()
    twin.update(2.0)
    assert (twin.tally.frames, twin.tally.ng_frames, twin.tally.alarms, twin.tally.held) == (2, 2, 1, 1)
    assert (decision.tally.frames, decision.tally.alarms) == (1, 0)  # the original is untouched
