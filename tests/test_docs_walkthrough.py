"""docs/getting-started.md's hazelnut walkthrough, run verbatim on a fresh folder (slow: trains a model).

The commands are read from the fenced block after ``<!-- walkthrough: hazelnut -->`` and run one by
one with bash in an empty folder whose ``../shared/data`` is the real data (``FOD_DATA_DIR``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FOD_DATA_DIR", REPO.parent / "shared" / "data"))
HAZELNUT = DATA / "mvtec-ad-reduced" / "hazelnut"
MARKER = "<!-- walkthrough: hazelnut -->"

pytestmark = [pytest.mark.slow, pytest.mark.data]


def walkthrough_commands() -> list[str]:
    """The lines of the walkthrough's bash block."""
    text = (REPO / "docs" / "getting-started.md").read_text()
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_walkthrough_block_is_found() -> None:
    commands = walkthrough_commands()
    assert [c.split()[:2] for c in commands][:3] == [["fod", "train"], ["fod", "eval"], ["fod", "export"]]
    assert all("../shared/data/mvtec-ad-reduced/hazelnut" in c for c in commands if "--data" in c)


@pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"no hazelnut data under {DATA} (set FOD_DATA_DIR)")
def test_hazelnut_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    work = tmp_path / "fod-agent"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    outputs = []
    for command in walkthrough_commands():
        done = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=3600, check=False
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)
    manifest = json.loads((work / "pkg" / "hazelnut" / "manifest.json").read_text())
    assert manifest["calibration"]["n_normal"] == 15  # the run's held-out 30 % of 50
    assert (work / "pkg" / "hazelnut" / "model.fp16.onnx").is_file()
    assert "a small sample" in outputs[3]  # calibrate states what 15 images can show
    assert "summary: " in outputs[-1]  # the agent's end-of-replay summary
    assert "frames" in outputs[-1].split("summary: ", 1)[1]
