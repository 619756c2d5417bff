"""Per-frame intensity conditioning (fod/intensity.py): standardisation, flat field, training, graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fod.checkpoint import load_checkpoint, save_checkpoint
from fod.errors import CheckpointError
from fod.intensity import IntensityNorm, intensity_statistics, standardize_intensity
from fod.model import FODConfig, FODModel
from fod.train import TrainSettings, train_model
from tests.fod.conftest import synthetic_good_images


def _frame(seed: int = 0, size: int = 64) -> torch.Tensor:
    """``[1, 3, size, size]`` float32 grey levels 60..140: texture with a mid-grey level and contrast."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(60, 140, (1, 1, size, size)).repeat(3, 1).astype(np.float32))


def test_standardized_frame_has_the_target_mean_and_std():
    out = standardize_intensity(_frame(), 110.0, 20.0)
    assert out.mean().item() == pytest.approx(110.0, abs=0.01)
    assert out.std(unbiased=False).item() == pytest.approx(20.0, rel=0.01)  # the +1 floor is 0.1 % of var here


def test_exposure_and_gain_do_not_change_the_conditioned_frame():
    x = _frame()
    norm = IntensityNorm(110.0, 30.0)
    darker = x * 0.5 + 10.0  # half the gain, another offset, nothing clipped
    # equal up to the one-grey-level floor on the std (0.4 % of the darker frame's variance)
    torch.testing.assert_close(norm(darker), norm(x), atol=0.3, rtol=0)
    # without the conditioning the two frames are far apart
    assert (darker - x).abs().mean() > 20


def test_flat_field_removes_a_slow_illumination_gradient():
    x = _frame(size=96)
    ramp = torch.linspace(0.5, 1.5, 96).view(1, 1, 1, 96)  # light falls off by 3x across the frame
    lit = x * ramp
    flat = IntensityNorm(110.0, 30.0, flat_sigma=8.0)
    plain = IntensityNorm(110.0, 30.0)
    inner = (..., slice(16, 80), slice(16, 80))  # away from the mirror-padded border
    err_flat = (flat(lit) - flat(x))[inner].abs().mean().item()
    err_plain = (plain(lit) - plain(x))[inner].abs().mean().item()
    assert err_flat < 0.25 * err_plain


def test_flat_frame_is_not_amplified_into_noise():
    x = torch.full((1, 3, 32, 32), 50.0)
    x[..., 0, 0] = 50.5  # a flat frame with one half-grey-level speck
    out = standardize_intensity(x, 110.0, 30.0)
    assert out.max().item() - out.min().item() < 30.0  # not stretched to the target contrast


def test_intensity_statistics_are_the_average_image_mean_and_std():
    a = np.full((1, 4, 4, 3), 100, np.uint8)
    b = np.zeros((1, 4, 4, 3), np.uint8)
    b[:, :, :2] = 200  # mean 100, std 100
    mean, std = intensity_statistics(np.concatenate([a, b]))
    assert mean == pytest.approx(100.0)
    assert std == pytest.approx(50.0)


def test_model_scores_ignore_exposure_with_standardisation_and_not_without():
    images = synthetic_good_images(2, 64, seed=1)
    darker = np.clip(images.astype(np.float32) * 0.6 + 5, 0, 255).round().astype(np.uint8)

    def scores(intensity):
        torch.manual_seed(0)
        config = FODConfig(image_size=64, levels=((16,),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                           intensity=intensity)
        model = FODModel(config, pretrained=False).eval()
        with torch.no_grad():
            return model(torch.from_numpy(images))[1], model(torch.from_numpy(darker))[1]

    plain, plain_dark = scores(None)
    std, std_dark = scores((128.0, 30.0))
    # rounding to uint8 leaves a tiny difference with the standardisation; without it the scores move
    assert (std - std_dark).abs().max() < 0.1 * (plain - plain_dark).abs().max()


def test_training_measures_the_target_saves_it_and_the_graph_carries_it(tmp_path: Path):
    from fod.export import export_package
    from fod.runner import OnnxRuntimeRunner

    images = synthetic_good_images(8, 64, seed=2)
    config = FODConfig(image_size=64, levels=((16,),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       flat_sigma=64 / 12)
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=4, progress=False,
                                                              holdout=0.25, standardize=True))
    train_idx = sorted(set(range(8)) - set(record["holdout_indices"]))
    assert model.config.intensity == pytest.approx(intensity_statistics(images[train_idx]))
    record["data"] = {"count": 8, "sha256": "0" * 64, "root": "synthetic"}
    save_checkpoint(tmp_path / "run", model, record)
    loaded, _ = load_checkpoint(tmp_path / "run")
    assert loaded.config.intensity == model.config.intensity
    assert loaded.config.flat_sigma == pytest.approx(64 / 12)
    export_package(tmp_path / "run", tmp_path / "pkg")  # raises when ONNX Runtime disagrees with PyTorch
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["export"]["model_config"]["intensity"] == pytest.approx(list(model.config.intensity))
    with OnnxRuntimeRunner(tmp_path / "pkg" / "model.onnx", (64, 64)) as runner:
        out = runner.infer(images[:3])
    with torch.no_grad():
        _, torch_score = model(torch.from_numpy(images[:3]))
    np.testing.assert_allclose(out.score, torch_score.numpy(), rtol=1e-3)


def test_configs_without_intensity_load_as_the_raw_input():
    d = FODConfig(image_size=64, levels=((16,),), d_models=(16,)).to_dict()
    del d["intensity"], d["flat_sigma"]
    config = FODConfig.from_dict(d)
    assert config.intensity is None
    assert config.flat_sigma == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"intensity": (300.0, 20.0)}, "intensity"),
        ({"intensity": (100.0, 0.0)}, "intensity"),
        ({"intensity": (100.0, 20.0), "flat_sigma": 20.0}, "flat_sigma"),
        ({"flat_sigma": -1.0}, "flat_sigma"),
    ],
)
def test_invalid_intensity_configs_name_the_field(kwargs: dict, message: str):
    with pytest.raises(CheckpointError, match=message):
        FODConfig(image_size=64, levels=((16,),), d_models=(16,), **kwargs).validate()
