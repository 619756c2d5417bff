"""The demo model cache: a valid, calibrated package of the current recipe is reused, anything else is not."""

from __future__ import annotations

import json
import shutil

from fod.package import Calibration, ModelPackage
from fod_tools.demo.model import DEMO_RECIPE, DemoRecipe, cached_package, describe_quality


def _cached_copy(toy_package, root, *, calibrated=True, key=None):
    pkg = root / "pkg"
    shutil.copytree(toy_package, pkg)
    if calibrated:
        package = ModelPackage(pkg)
        package.manifest.calibration = Calibration(
            image_threshold=0.5, pixel_threshold=0.4, norm_min=0.1, norm_max=0.9,
            method="test", target_far=0.01, n_normal=30,
        )
        package.save()
    (pkg / "demo.json").write_text(json.dumps({"recipe_key": key or DEMO_RECIPE.key()}))
    return pkg


def test_a_valid_package_of_this_recipe_is_reused(toy_package, tmp_path):
    pkg = _cached_copy(toy_package, tmp_path)
    assert cached_package(DEMO_RECIPE, tmp_path) == pkg


def test_another_recipe_is_rebuilt(toy_package, tmp_path):
    _cached_copy(toy_package, tmp_path)
    other = DemoRecipe(epochs=DEMO_RECIPE.epochs + 1)
    assert other.key() != DEMO_RECIPE.key()
    assert cached_package(other, tmp_path) is None


def test_a_corrupt_or_uncalibrated_package_is_rebuilt(toy_package, tmp_path):
    pkg = _cached_copy(toy_package, tmp_path / "a")
    with open(pkg / "model.onnx", "ab") as handle:
        handle.write(b"\0")  # sha256 no longer matches the manifest
    assert cached_package(DEMO_RECIPE, tmp_path / "a") is None
    _cached_copy(toy_package, tmp_path / "b", calibrated=False)
    assert cached_package(DEMO_RECIPE, tmp_path / "b") is None


def test_describe_quality_names_auroc_and_recall():
    text = describe_quality(
        {"image_threshold": 0.83, "n_normal": 100,
         "labelled": {"n_defect": 40, "image_auroc": 0.976, "recall": 0.45, "far": 0.0}}
    )
    assert "threshold 0.83 on 100 good frames" in text
    assert "image AUROC 0.976, recall 0.45 at a false-alarm rate of 0.00" in text


def test_the_demo_model_catches_the_defects_it_shows(tmp_path):
    """Issue 15 item 2: the demo's recipe, built as a first run builds it, separates its own held-out
    conveyor parts. The goal (at least 90 % of defective parts NG, at most 2 % of good ones) is measured
    on the 2-minute tally in docs/benchmarks.md (recipe 4: 94.5 % / 1.3 % idle); here, on 40 defective parts and with
    another CPU's float rounding in mind, recall must be at least 0.8 (the previous recipe: 0.23)."""
    import json

    from fod_tools.demo.model import ensure_demo_package

    pkg = ensure_demo_package(DEMO_RECIPE, root=tmp_path, progress=False, say=lambda _: None)
    labelled = json.loads((pkg / "demo.json").read_text())["calibration"]["labelled"]
    assert labelled["n_defect"] == DEMO_RECIPE.calib_defect
    assert labelled["image_auroc"] >= 0.98, labelled
    assert labelled["recall"] >= 0.8, labelled
    assert labelled["far"] <= 0.03, labelled  # the recipe's target_far
    assert cached_package(DEMO_RECIPE, tmp_path) == pkg  # the next start finds it


def test_training_threads_leave_the_cores_other_programs_keep_busy():
    """Issue 15 item 1: beside a busy program the demo trains on fewer threads (an OpenMP thread sharing
    a core with it makes every operator wait); a real spinning process is measured (psutil)."""
    import os
    import subprocess
    import sys

    from fod_tools.demo.model import busy_cores, training_threads

    n = os.cpu_count() or 1
    assert training_threads(n, busy=0.0) == n
    assert training_threads(n, busy=0.5) == n  # start-up noise does not take a core
    assert training_threads(n, busy=1.0) == max(1, n - 1)
    assert training_threads(n, busy=n + 3.0) == 1
    assert training_threads(1, busy=0.0) == 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait(5)
    if busy is None:  # no psutil: nothing measured, the thread count is left alone
        assert training_threads(n) == n
    else:
        assert busy >= 0.6
