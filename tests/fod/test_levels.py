"""Configurable levels (which backbone strides feed each FOD level) and the normalised level fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fod.checkpoint import load_checkpoint, save_checkpoint
from fod.errors import CheckpointError, DataError
from fod.model import REGIONAL_TAU, FODConfig, FODModel, GlobalLevel, RegionalLevel, parse_levels
from fod.train import (
    POSITION_SHARE_MAX,
    TrainSettings,
    auto_regional,
    centre_of_contrast,
    global_statistics,
    image_position_share,
    level_statistics,
    peak_floor_statistic,
    position_share,
    regional_statistics,
    split_holdout,
    train_model,
)
from tests.fod.conftest import synthetic_good_images


def _model(levels: tuple[tuple[int, ...], ...], size: int, norm=None) -> FODModel:
    torch.manual_seed(0)
    config = FODConfig(image_size=size, levels=levels, d_models=(16,) * len(levels), heads=2, layers=1,
                       ffn_mult=2, level_norm=norm)
    model = FODModel(config, pretrained=False).eval()
    for level in model.levels:
        level.reference.normal_()
    return model


@pytest.mark.parametrize("levels", [((8,), (16,)), ((16,), (32,)), ((16, 32),), ((8, 16, 32),)])
@pytest.mark.parametrize("size", [64, 96])
def test_level_shapes_for_each_configuration(levels: tuple[tuple[int, ...], ...], size: int):
    model = _model(levels, size)
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        features = model.backbone(images)
        inputs = model.level_inputs(features)
        amap, score = model(images)
    assert [f.shape[-1] for f in features] == [size // s for s in model.config.strides]
    channels = dict(zip(model.config.strides, model.backbone.channels))
    for level_strides, x, level in zip(levels, inputs, model.levels):
        grid = size // min(level_strides)
        assert x.shape == (2, sum(channels[s] for s in level_strides), grid, grid)
        assert level.grid == (grid, grid)
    assert amap.shape == (2, 1, size, size)
    assert score.shape == (2,)


@pytest.mark.parametrize("levels", [((16,), (32,)), ((16, 32),)])
def test_each_configuration_exports_with_parity(levels: tuple[tuple[int, ...], ...], tmp_path: Path):
    from fod.export import export_package

    model = _model(levels, 64, norm=((0.1, 0.05),) * len(levels))
    save_checkpoint(tmp_path / "run", model, {"data": {"count": 2, "sha256": "0" * 64, "root": "synthetic"}})
    export_package(tmp_path / "run", tmp_path / "pkg")  # raises when ONNX Runtime disagrees with PyTorch
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert "64" in json.dumps(manifest["input"])


def test_parse_levels_forms_and_errors():
    assert parse_levels("8,16") == ((8,), (16,))
    assert parse_levels("16+32") == ((16, 32),)
    assert parse_levels("8,32+16") == ((8,), (16, 32))
    with pytest.raises(ValueError, match=r"choose from \[4, 8, 16, 32\]"):
        parse_levels("8,64")
    with pytest.raises(ValueError, match=r"e\.g\. 8,16"):
        parse_levels("eight")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": ((16,), (32,)), "image_size": 80}, "multiple of the coarsest stride 32"),
        ({"levels": ((8,), (64,))}, "not backbone stages"),
        ({"levels": ((8,), (16,)), "d_models": (32,)}, "one width per level"),
        ({"level_norm": ((0.1, 0.0), (0.2, 0.1))}, "std > 0"),
        ({"regional": 4, "regional_bank_size": 8}, "odd number of grid cells >= 3"),
        ({"regional": 3}, "needs a memory bank of at least 1 patch"),
        ({"regional_bank_size": 8}, "without a regional level"),
        ({"regional": 3, "regional_bank_size": 8, "regional_norm": (1.0, 0.5)}, "needs the levels' held-out"),
        ({"global_bank_size": -1}, "global_bank_size -1"),
        ({"global_norm": (1.0, 0.5)}, "and a global level"),
        ({"global_bank_size": 4, "global_norm": (1.0, 0.0)}, r"finite \(mean, std > 0\)"),
    ],
)
def test_invalid_configs_name_the_option(kwargs: dict, message: str):
    with pytest.raises(CheckpointError, match=message):
        FODConfig(**kwargs).validate()


def test_fusion_scale_invariant_no_level_decides_by_size():
    # two levels: level 1 sees a defect, level 0 does not. Scaling level 0's map 10x (as a level with
    # larger values would) changes the plain average's decision but not the normalised fusion's.
    model = _model(((16,), (32,)), 64)
    rng = np.random.default_rng(0)
    quiet = torch.from_numpy(rng.uniform(0.9, 1.1, (1, 1, 64, 64)).astype(np.float32))
    defect = quiet.clone()
    defect[..., 20:30, 20:30] += 2.0
    stats = ((1.0, 0.06), (1.0, 0.06))
    scaled_stats = ((10.0, 0.6), (1.0, 0.06))
    model.config.level_norm = stats
    fused = model.fuse([quiet, defect])
    model.config.level_norm = scaled_stats
    fused_scaled = model.fuse([10 * quiet, defect])
    torch.testing.assert_close(fused, fused_scaled, rtol=1e-5, atol=1e-5)
    assert int(fused.flatten().argmax()) // 64 in range(18, 32)  # the defect decides
    model.config.level_norm = None
    plain = model.fuse([10 * quiet, defect])
    # under the plain average the scaled quiet level dominates: the defect barely stands out
    contrast_plain = float(plain[0, 0, 25, 25] / plain.median())
    contrast_norm = float(fused_scaled[0, 0, 25, 25] / fused_scaled.median().clamp_min(1e-6))
    assert contrast_norm > 3 * contrast_plain


def test_holdout_split_and_its_errors():
    train, held = split_holdout(50, 0.1, seed=1)
    assert len(held) == 5
    assert len(train) == 45
    assert not set(train) & set(held)
    assert np.array_equal(split_holdout(50, 0.1, seed=1)[1], held)  # seeded
    assert len(split_holdout(10, 0.0, seed=1)[1]) == 0
    with pytest.raises(DataError, match=r"--holdout 0\.1 of 8 good images holds out 1.*raise it to 0\.25 or more"):
        split_holdout(8, 0.1, seed=1)
    # too few images for any allowed share: the advice is more images, not a share above 0.5
    with pytest.raises(DataError, match=r"holds out 0.*add good images \(a hold-out of 2 needs at least 4; 3 given\)"):
        split_holdout(3, 0.1, seed=1)
    with pytest.raises(DataError, match=r"between 0 and 0\.5"):
        split_holdout(8, 0.9, seed=1)


def _saved_reloaded_exported(model: FODModel, record: dict, images: np.ndarray, tmp_path: Path) -> FODModel:
    """Save ``model``, reload it and export it; assert the reloaded checkpoint and ONNX Runtime give the same
    maps and scores as ``model`` on three of ``images`` (the statistics travel as graph constants)."""
    from fod.export import export_package
    from fod.runner import OnnxRuntimeRunner

    record["data"] = {"count": len(images), "sha256": "0" * 64, "root": "synthetic"}
    save_checkpoint(tmp_path / "run", model, record)
    loaded, _ = load_checkpoint(tmp_path / "run")
    x = torch.from_numpy(images[:3])
    with torch.no_grad():
        torch_map, torch_score = model(x)
        torch.testing.assert_close(loaded(x)[0], torch_map)
    export_package(tmp_path / "run", tmp_path / "pkg")  # raises when ONNX Runtime disagrees with PyTorch
    with OnnxRuntimeRunner(tmp_path / "pkg" / "model.onnx", (images.shape[1], images.shape[2])) as runner:
        out = runner.infer(images[:3])
    np.testing.assert_allclose(out.score, torch_score.numpy(), rtol=1e-3)
    np.testing.assert_allclose(out.anomaly_map, torch_map.numpy(), rtol=1e-3, atol=1e-4)
    return loaded


def test_statistics_measured_saved_reloaded_and_exported(tmp_path: Path):
    images = synthetic_good_images(12, 64, seed=3)
    config = FODConfig(image_size=64, levels=((16,), (32,)), d_models=(16, 16), heads=2, layers=1, ffn_mult=2)
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25))
    norm = model.config.level_norm
    assert norm is not None
    assert len(norm) == 2
    assert len(record["holdout_indices"]) == 3
    assert all(std > 0 for _, std in norm)
    # the statistics are those of the held-out images' level maps
    from fod.train import extract_features

    held = torch.from_numpy(np.array(record["holdout_indices"]))
    again = level_statistics(model, [f[held] for f in extract_features(model, images)])
    np.testing.assert_allclose(np.array(again), np.array(norm), rtol=1e-6)
    loaded = _saved_reloaded_exported(model, record, images, tmp_path)
    assert loaded.config.level_norm == norm


def test_peak_relative_map_floor_measured_saved_reloaded_and_exported(tmp_path: Path):
    images = synthetic_good_images(12, 64, seed=5)
    config = FODConfig(image_size=64, levels=((16,), (32,)), d_models=(16, 16), heads=2, layers=1, ffn_mult=2,
                       map_power=2.0)
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25))
    floor = model.config.peak_floor
    assert record["map_power"] == 2.0
    assert record["peak_floor"] == floor > 0
    # the floor is the largest held-out peak of the map before the peak-relative step
    from fod.train import extract_features

    held = torch.from_numpy(np.array(record["holdout_indices"]))
    inputs = [f[held] for f in extract_features(model, images)]
    with torch.no_grad():
        peaks = model.fused_map(inputs).amax(dim=(1, 2, 3))
    assert floor == pytest.approx(float(peaks.max()), rel=1e-6)
    assert peak_floor_statistic(model, inputs) == pytest.approx(floor, rel=1e-6)
    loaded = _saved_reloaded_exported(model, record, images, tmp_path)
    assert (loaded.config.map_power, loaded.config.peak_floor) == (2.0, floor)


def test_peak_floor_is_zero_without_held_out_images():
    images = synthetic_good_images(6, 64, seed=6)
    config = FODConfig(image_size=64, levels=((16,),), d_models=(16,), heads=2, layers=1, ffn_mult=2, map_power=2.0)
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=3, progress=False, holdout=0.0))
    assert model.config.peak_floor == record["peak_floor"] == 0.0
    with pytest.raises(ValueError, match="at least 1 held-out image"):
        peak_floor_statistic(model, [torch.zeros(0, 1, 1, 1)])


def test_memory_bank_mode_scores_the_distance_to_the_nearest_bank_patch(tmp_path: Path):
    """``epochs`` 0: no correction trained; each patch's score is its reconstruction error against its nearest
    bank patch (squared distance per channel plus cosine distance), and the statistics are measured on it."""
    from fod.train import extract_features

    images = synthetic_good_images(12, 64, seed=7)
    config = FODConfig(image_size=64, levels=((16,),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       reference="nearest", bank_size=32, anchor=True, score="rec", map_power=2.0)
    model, record = train_model(images, config, TrainSettings(epochs=0, batch_size=4, progress=False, holdout=0.25))
    assert (record["epochs"], record["steps"], record["history"], record["compiled"]) == (0, 0, [], False)
    level = model.levels[0]
    assert float(level.head.weight.abs().max()) == 0.0
    tokens = FODModel.tokens(extract_features(model, images[:3])[0])  # [3, L, C]
    bank = level.bank.T  # [M, C]
    nearest = bank[torch.cdist(tokens, bank[None].expand(len(tokens), -1, -1)).argmin(-1)]  # [3, L, C]
    by_hand = (tokens - nearest).square().mean(-1) + 1.0 - F.cosine_similarity(tokens, nearest, dim=-1)
    with torch.no_grad():
        scores = level.patch_scores(tokens, "rec").flatten(1)
    torch.testing.assert_close(scores, by_hand, rtol=1e-4, atol=1e-5)
    assert model.config.level_norm is not None
    assert model.config.peak_floor > 0
    _saved_reloaded_exported(model, record, images, tmp_path)  # parity of the graph with the eager model
    # the exported graph reads the nearest patch straight from the bank: no transformer in it
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph.node}
    assert "Softmax" not in ops
    assert "LayerNormalization" not in ops
    assert level.skip_correction is False  # only while the exporter traces
    for bad in ({"anchor": False}, {"score": "rec*inter"}):
        wrong = FODConfig.from_dict({**config.to_dict(), "level_norm": None, "peak_floor": 0.0, **bad})
        with pytest.raises(ValueError, match=r"epochs 0 \(memory-bank mode\) needs anchor"):
            train_model(images, wrong, TrainSettings(epochs=0, progress=False, holdout=0.25))


def test_checkpoint_of_the_previous_format_still_loads(tmp_path: Path):
    # a checkpoint written before levels/level_norm: config without them, backbone keys to8/to16,
    # [L, L] distance buffers in the state dict
    model = _model(((8,), (16,)), 64)
    state = model.state_dict()
    old_state = {}
    for key, value in state.items():
        key = key.replace("backbone.stages.0.", "backbone.to8.").replace("backbone.stages.1.", "backbone.to16.")
        old_state[key] = value
    for i, level in enumerate(model.levels):
        length = level.grid[0] * level.grid[1]
        old_state[f"levels.{i}.dist_y"] = torch.zeros(length, length)
        old_state[f"levels.{i}.dist_x"] = torch.zeros(length, length)
    config = model.config.to_dict()
    del config["levels"], config["level_norm"]
    (tmp_path / "run").mkdir()
    torch.save({"format": "fod-checkpoint", "version": 1, "config": config, "state_dict": old_state,
                "record": {}}, tmp_path / "run" / "checkpoint.pt")
    loaded, _ = load_checkpoint(tmp_path / "run")
    assert loaded.config.levels == ((8,), (16,))
    assert loaded.config.level_norm is None
    assert loaded.config.regional == 0
    assert loaded.regional is None
    x = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_feature_jitter_perturbs_the_input_not_the_target():
    """``TrainSettings.jitter``: the level sees noisy tokens, the loss compares with the clean ones."""
    from fod.model import FODLevel
    from fod.train import _step_loss

    torch.manual_seed(0)
    level = FODLevel(16, (4, 4), 32, 8, 1, 2)
    x = torch.randn(2, 16, 16)
    seen: list[torch.Tensor] = []
    level.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    clean, _ = _step_loss([level], [x], 0.5, 0.5, 0.0)
    noisy, _ = _step_loss([level], [x], 0.5, 0.5, 20.0)
    assert torch.equal(seen[0], x)
    noise = seen[1] - x
    expected_std = float((x.norm(dim=-1) * 20.0 / 16).mean())
    assert 0.7 * expected_std < float(noise.std()) < 1.3 * expected_std
    assert not torch.equal(clean, noisy)
    again, _ = _step_loss([level], [x], 0.5, 0.5, 0.0)
    assert torch.equal(clean, again)  # no jitter: deterministic, the input untouched


def test_the_default_configuration_builds_with_its_pretrained_weights():
    """`fod train`'s defaults (docs/results.md, rounds four to six) name weights the train extra installs."""
    from fod.train_cli import DEFAULTS

    size = DEFAULTS["image_size"]
    levels = parse_levels(DEFAULTS["levels"])
    config = FODConfig(backbone=DEFAULTS["backbone"], image_size=size,
                       levels=levels, d_models=(16,) * len(levels), layers=1,
                       intensity=(110.0, 30.0), flat_sigma=size / 12 if DEFAULTS["intensity"] == "flat" else 0.0)
    config.validate()  # the flat-field sigma fod train derives fits the default size
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        pretrained, untrained = (FODModel(config, pretrained=p).eval() for p in (True, False))
        features = pretrained.level_inputs(pretrained.backbone(image))
        random_init = untrained.level_inputs(untrained.backbone(image))
    # each level on the grid of its finest stride (the default: one level, strides 16 and 32 concatenated)
    assert [tuple(f.shape[-2:]) for f in features] == [(size // min(lv), size // min(lv)) for lv in levels]
    assert [f.shape[1] for f in features] == [sum({16: 112, 32: 320}[s] for s in lv) for lv in levels]
    assert not torch.allclose(features[0], random_init[0])  # the ImageNet weights were loaded, not a random init


def test_regional_level_averages_the_window_and_finds_the_nearest_bank_patch():
    level = RegionalLevel(channels=2, context=3, bank_size=2)
    feature = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    pooled = level.pool(feature)
    # corner (0, 0): the 2 x 2 cells inside the grid, not 9 with zeros
    torch.testing.assert_close(pooled[0, :, 0, 0], feature[0, :, :2, :2].mean((1, 2)))
    torch.testing.assert_close(pooled[0, :, 1, 1], feature[0, :, :3, :3].mean((1, 2)))
    bank = torch.stack([pooled[0, :, 1, 1], torch.tensor([100.0, 100.0])])  # [M, C]
    level.set_bank(bank)
    dist = level(feature)
    assert dist.shape == (1, 1, 4, 4)
    assert float(dist[0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-3)
    expected = torch.cdist(pooled.flatten(2).transpose(1, 2), bank[None]).amin(-1).reshape(1, 1, 4, 4)
    torch.testing.assert_close(dist, expected, rtol=1e-4, atol=1e-3)


def test_regional_map_adds_only_where_the_local_map_is_flat():
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       level_norm=((0.5, 0.1),), regional=3, regional_bank_size=4)
    torch.manual_seed(0)
    model = FODModel(config, pretrained=False).eval()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        inputs = model.level_inputs(model.backbone(images))
        model.regional.set_bank(torch.randn(4, inputs[0].shape[1]))
        local = model.fuse(model.level_maps(inputs))
        without, _ = model.maps_from_features(inputs)  # regional_norm None: not measured, no part
        torch.testing.assert_close(without, local)
        config.regional_norm = (1.0, 0.5)
        amap, score = model.maps_from_features(inputs)
        regional = model.smoothing(torch.relu((model.regional_map(inputs) - 1.0) / 0.5))
    torch.testing.assert_close(amap, local + regional * torch.exp(-local / REGIONAL_TAU))
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    # the gate: where the local map is high, the regional map adds at most exp(-local / tau) of itself
    lift = amap - local
    assert bool((lift <= regional * torch.exp(-local / REGIONAL_TAU) + 1e-6).all())
    assert float(lift.max()) > 0


def test_regional_level_trained_saved_reloaded_and_exported(tmp_path: Path):
    images = synthetic_good_images(12, 64, seed=3)
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       reference="nearest", bank_size=64, anchor=True, score="rec", regional=3,
                       regional_bank_size=32)
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25))
    norm = model.config.regional_norm
    assert norm is not None
    assert record["regional_norm"] == list(norm)
    assert model.regional is not None
    assert float(model.regional.bank_norm.min()) > 0  # filled from the training images
    from fod.train import extract_features

    held = torch.from_numpy(np.array(record["holdout_indices"]))
    again = regional_statistics(model, [f[held] for f in extract_features(model, images)])
    np.testing.assert_allclose(np.array(again), np.array(norm), rtol=1e-6)
    loaded = _saved_reloaded_exported(model, record, images, tmp_path)
    assert loaded.config.regional_norm == norm


def test_regional_level_needs_held_out_images():
    images = synthetic_good_images(4, 64, seed=3)
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       regional=3, regional_bank_size=8)
    with pytest.raises(DataError, match=r"--regional 3 needs held-out good images.*--holdout > 0"):
        train_model(images, config, TrainSettings(epochs=1, progress=False, holdout=0.0))


def _aligned_objects(n: int, size: int, seed: int, shift: float = 0.0, radius: float = 0.25) -> np.ndarray:
    """``[n, size, size, 3]`` uint8: a bright disc of ``radius`` x ``size`` on a dark ground, in the middle of
    every frame, or moved at random by up to ``shift`` of the frame in x and y."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for _ in range(n):
        cy, cx = size / 2 + rng.uniform(-shift, shift, 2) * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (radius * size) ** 2) * 160.0
        frames.append(np.clip(40 + disc + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)[..., None]
                      .repeat(3, -1))
    return np.stack(frames)


def test_centre_of_contrast_moves_the_salient_content_to_the_middle():
    frame = torch.zeros(1, 1, 8, 8)
    frame[0, 0, 1, 6] = 5.0
    out = centre_of_contrast(frame)
    y, x = divmod(int(out.flatten().argmax()), 8)
    assert abs(y - 3.5) <= 0.5  # the frame's centre, to the pixel
    assert abs(x - 3.5) <= 0.5
    assert torch.equal(out.flatten().sort().values, frame.flatten().sort().values)  # a roll: nothing lost
    flat = torch.full((2, 1, 6, 6), 7.0)
    assert torch.equal(centre_of_contrast(flat), flat)  # no contrast: left as it is
    # the same content lands on the same pixel wherever it started (an even-sized frame: no tie flips sides)
    frames = torch.zeros(4, 1, 16, 16)
    for i, (y, x) in enumerate([(2, 2), (3, 3), (10, 5), (11, 6)]):
        frames[i, 0, y, x] = 1.0
    landed = {divmod(int(f.flatten().argmax()), 16) for f in centre_of_contrast(frames)}
    assert len(landed) == 1


def test_position_share_by_hand_and_on_textures_and_objects():
    # the same two positions in both images: all variance is position; swapped: none is
    aligned = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 2.0]]]])
    swapped = torch.tensor([[[[0.0, 2.0]]], [[[2.0, 0.0]]]])
    assert position_share(aligned) == pytest.approx(1.0)
    assert position_share(swapped) == pytest.approx(0.0)
    assert position_share(torch.ones(3, 2, 4, 4)) == 0.0  # constant: no variance to explain
    gen = torch.Generator().manual_seed(0)
    texture = torch.randn(64, 8, 6, 6, generator=gen)  # every position drawn alike
    pattern = torch.randn(1, 8, 6, 6, generator=gen) * 3.0
    obj = pattern + torch.randn(64, 8, 6, 6, generator=gen)  # each position its own mean
    assert position_share(texture, batch=5) < 0.05  # about 1/N from the sampling of the means
    assert position_share(obj, batch=5) > 0.85  # 9 / (9 + 1) with the sampling
    assert position_share(texture, batch=5) == pytest.approx(position_share(texture, batch=64), rel=1e-9)
    # few images: the chance scatter of the position means is removed (plain R^2 of 3 noise images: ~1/3)
    few = torch.randn(3, 4, 16, 16, generator=gen)
    assert position_share(few) < 0.05
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        position_share(few[:1])
    # on pixels: a striped texture of random phase against a disc at the same place in every frame
    assert image_position_share(synthetic_good_images(12, 128, seed=3), batch=5) < 0.3
    assert image_position_share(_aligned_objects(12, 128, seed=4)) > 0.95
    # the same disc moved by up to 25 % of the frame: still an object (centred before the share is taken)
    moving = _aligned_objects(24, 128, seed=5, shift=0.25)
    assert image_position_share(moving) > 0.9
    assert position_share(torch.from_numpy(moving).float().mean(-1)[:, None]) < POSITION_SHARE_MAX  # uncentred
    # a part that fills most of the frame (64 %) and moves a little (6 %): centred alone it would follow the
    # background and read 0.44, a texture; the frames as they are read it an object
    large = _aligned_objects(12, 128, seed=6, radius=0.45, shift=0.06)
    grey = torch.from_numpy(large).float().mean(-1)[:, None]
    assert position_share(F.adaptive_avg_pool2d(centre_of_contrast(grey), 32)) < POSITION_SHARE_MAX
    assert image_position_share(large) > 0.75


@pytest.mark.parametrize(("share", "grid", "k"), [(0.32, 24, 19), (0.3, 16, 13), (0.3, 20, 17), (0.3, 7, 5),
                                                  (0.49, 4, 3), (0.3, 3, 0), (POSITION_SHARE_MAX, 24, 0),
                                                  (0.71, 16, 0)])
def test_auto_regional_window_is_four_fifths_of_the_grid_on_textures_only(share: float, grid: int, k: int):
    assert auto_regional(share, grid) == k


def test_regional_auto_adds_the_level_on_a_texture_and_not_on_an_object():
    def config() -> FODConfig:
        return FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2)

    settings = TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25, regional_auto=True,
                             regional_bank_size=32)
    model, record = train_model(synthetic_good_images(12, 64, seed=3), config(), settings)
    auto = record["regional_auto"]
    assert auto["position_share"] < POSITION_SHARE_MAX
    assert auto["regional"] == 3  # grid 4 -> K 3
    assert "surface texture" in auto["why"]
    assert model.config.regional == record["regional"] == 3
    assert model.regional is not None
    assert model.config.regional_bank_size == 32
    assert model.config.regional_norm is not None
    assert float(model.regional.bank_norm.min()) > 0  # filled like an explicit --regional 3
    model, record = train_model(_aligned_objects(12, 64, seed=4), config(), settings)
    assert record["regional_auto"]["position_share"] >= POSITION_SHARE_MAX
    assert "an object" in record["regional_auto"]["why"]
    assert model.regional is None
    assert model.config.regional == 0
    assert model.config.regional_bank_size == 0
    # no held-out images: no regional level, and no error (an explicit K is an error, above)
    no_holdout = TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.0, regional_auto=True)
    model, record = train_model(synthetic_good_images(6, 64, seed=3), config(), no_holdout)
    assert model.regional is None
    assert "--holdout 0" in record["regional_auto"]["why"]
    assert record["regional_auto"]["position_share"] is None  # not measured: no decision rested on it
    with pytest.raises(ValueError, match=r"regional_auto needs config\.regional 0"):
        train_model(synthetic_good_images(6, 64, seed=3), FODConfig(image_size=64, levels=((16, 32),), d_models=(16,),
                    regional=3, regional_bank_size=8), settings)


def test_global_level_describes_the_frame_and_finds_the_nearest_training_frame():
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(3, 2, 4, 5, generator=gen)
    desc = GlobalLevel.describe(feature)
    assert desc.shape == (3, 4)
    torch.testing.assert_close(desc[:, :2], feature.mean((2, 3)))
    torch.testing.assert_close(desc[:, 2:], feature.std((2, 3), unbiased=False))
    # position-blind: the same values in another order describe the same frame
    shuffled = feature.flatten(2)[:, :, torch.randperm(20, generator=gen)].reshape(3, 2, 4, 5)
    torch.testing.assert_close(GlobalLevel.describe(shuffled), desc)
    level = GlobalLevel(channels=2, bank_size=2)
    bank = torch.stack([desc[0], desc[1] + 10.0])
    level.set_bank(bank)
    dist = level(feature)
    assert dist.shape == (3,)
    assert float(dist[0]) == pytest.approx(0.0, abs=1e-3)  # the frame's own description is in the bank
    torch.testing.assert_close(dist, torch.cdist(desc, bank).amin(-1), rtol=1e-4, atol=1e-3)


def test_global_lift_raises_the_peak_and_keeps_the_shape_of_the_map():
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       level_norm=((0.5, 0.1),), map_power=2.0, peak_floor=1.0, global_bank_size=2)
    torch.manual_seed(0)
    model = FODModel(config, pretrained=False).eval()
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        inputs = model.level_inputs(model.backbone(images))
        before, before_score = model.maps_from_features(inputs)  # global_norm None: not measured, no part
        model.global_level.set_bank(GlobalLevel.describe(inputs[0][:1]))  # frame 0 is the only training frame
        dist = model.global_level(inputs[0])
        config.global_norm = (float(dist[1:].mean()), 0.5)  # frame 0 at distance 0 (no lift), one of 1-2 above
        lift = model.global_lift(inputs)
        amap, score = model.maps_from_features(inputs)
    torch.testing.assert_close(lift, torch.relu((dist - config.global_norm[0]) / 0.5))
    assert float(lift[0]) == 0.0
    assert float(lift.max()) > 0
    torch.testing.assert_close(score, before_score + lift)  # the peak rises by the lift
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))  # the score is still the map's maximum
    ratio = amap / before.clamp_min(1e-12)
    for i in range(3):  # every pixel of a frame in the same proportion: the frame's shape is kept
        kept = before[i] > 1e-6
        expected = float(1 + lift[i] / before_score[i])
        torch.testing.assert_close(ratio[i][kept], torch.full_like(ratio[i][kept], expected))
    torch.testing.assert_close(amap[0], before[0])
    # a frame whose map is all zeros (every patch below the held-out mean) is lifted to g everywhere
    config.level_norm = ((1e6, 1.0),)
    with torch.no_grad():
        flat, flat_score = model.maps_from_features(inputs)
    torch.testing.assert_close(flat, lift[:, None, None, None].expand_as(flat))
    torch.testing.assert_close(flat_score, lift)


def test_global_statistics_floor_the_spread_of_few_held_out_images():
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       global_bank_size=1)
    model = FODModel(config, pretrained=False).eval()
    feature = torch.randn(1, 432, 4, 4, generator=torch.Generator().manual_seed(0))
    model.global_level.set_bank(GlobalLevel.describe(feature))
    twins = (feature + 1.0).repeat(2, 1, 1, 1)  # two held-out frames at the same distance: no spread
    mean, std = global_statistics(model, [twins])
    assert mean > 0
    assert std == pytest.approx(0.1 * mean)


def test_global_level_trained_saved_reloaded_and_exported(tmp_path: Path):
    images = synthetic_good_images(12, 64, seed=3)
    config = FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                       reference="nearest", bank_size=64, anchor=True, score="rec", map_power=2.0)
    settings = TrainSettings(epochs=0, progress=False, holdout=0.25, global_level="on")
    model, record = train_model(images, config, settings)
    norm = model.config.global_norm
    assert norm is not None
    assert record["global_norm"] == list(norm)
    assert record["global_level"] == {"on": True, "why": "--global-level on"}
    assert model.global_level is not None
    assert model.config.global_bank_size == 9  # one description per training image (12 minus 3 held out)
    from fod.train import extract_features

    features = extract_features(model, images)
    held = torch.from_numpy(np.array(record["holdout_indices"]))
    kept = torch.from_numpy(np.setdiff1d(np.arange(12), record["holdout_indices"]))
    # the bank holds the training images' descriptions, not the held-out ones
    torch.testing.assert_close(model.global_level.bank.t(), GlobalLevel.describe(features[0][kept]))
    with torch.no_grad():  # a training frame finds itself (up to float32 cancellation), a held-out one does not
        own, other = model.global_level(features[0][kept]), model.global_level(features[0][held])
    assert float(own.max()) < 0.1 * float(other.min())
    again = global_statistics(model, [f[held] for f in features])
    np.testing.assert_allclose(np.array(again), np.array(norm), rtol=1e-6)
    # parity on frames the bank does not hold (held-out first), at least one of them lifted
    with torch.no_grad():
        assert float(model.global_lift([f[held] for f in features]).max()) > 0
    order = np.r_[record["holdout_indices"], kept.numpy()]
    loaded = _saved_reloaded_exported(model, record, images[order], tmp_path)
    assert loaded.config.global_norm == norm


def test_global_level_auto_on_textures_only_and_its_errors():
    def config() -> FODConfig:
        return FODConfig(image_size=64, levels=((16, 32),), d_models=(16,), heads=2, layers=1, ffn_mult=2,
                         reference="nearest", bank_size=64, anchor=True, score="rec")

    auto = TrainSettings(epochs=0, progress=False, holdout=0.25, global_level="auto")
    model, record = train_model(synthetic_good_images(12, 64, seed=3), config(), auto)
    assert record["global_level"]["on"] is True
    assert "surface texture" in record["global_level"]["why"]
    assert model.global_level is not None
    assert model.config.global_norm is not None
    model, record = train_model(_aligned_objects(12, 64, seed=4), config(), auto)
    assert record["global_level"]["on"] is False
    assert "an object" in record["global_level"]["why"]
    assert model.global_level is None
    assert (model.config.global_bank_size, model.config.global_norm) == (0, None)
    no_holdout = TrainSettings(epochs=0, progress=False, holdout=0.0, global_level="auto")
    model, record = train_model(synthetic_good_images(6, 64, seed=3), config(), no_holdout)
    assert model.global_level is None
    assert "--holdout 0" in record["global_level"]["why"]
    with pytest.raises(DataError, match=r"--global-level on needs held-out good images.*--holdout > 0"):
        train_model(synthetic_good_images(6, 64, seed=3), config(),
                    TrainSettings(epochs=0, progress=False, holdout=0.0, global_level="on"))
    with pytest.raises(ValueError, match=r"global_level 'yes': choose from \['auto', 'on', 'off'\]"):
        train_model(synthetic_good_images(6, 64, seed=3), config(),
                    TrainSettings(epochs=0, progress=False, global_level="yes"))
