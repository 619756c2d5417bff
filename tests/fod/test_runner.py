"""OnnxRuntimeRunner's session settings: no spinning thread pools unless asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fod.runner import OnnxRuntimeRunner
from tests.toy_package import make_toy_package


@pytest.mark.parametrize(
    ("spin", "expected"),
    [
        (False, "0"),  # the default: pool threads sleep between operators (shared CPUs)
        (True, "1"),  # opt-in for boxes whose cores do nothing else
    ],
)
def test_spinning_follows_the_spin_flag(spin: bool, expected: str, tmp_path: Path) -> None:
    pkg = make_toy_package(tmp_path / "pkg")
    runner = OnnxRuntimeRunner(pkg / "model.onnx", (64, 64), intra_op_threads=2, spin=spin)
    options = runner.session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == expected
    assert options.intra_op_num_threads == 2


def test_runner_without_spinning_still_scores(tmp_path: Path) -> None:
    pkg = make_toy_package(tmp_path / "pkg")
    frame = np.full((1, 64, 64, 3), 128, np.uint8)
    frame[0, 10:20, 10:20] = 255
    with OnnxRuntimeRunner(pkg / "model.onnx", (64, 64)) as runner:
        out = runner.infer(frame)
    assert out.score.shape == (1,)
    assert out.score[0] == pytest.approx(127 / 128, abs=1e-6)
