"""The nearest-patch reference (``FODConfig.reference = "nearest"``): memory bank, retrieval, export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fod.checkpoint import load_checkpoint, save_checkpoint
from fod.errors import CheckpointError
from fod.model import FODConfig, FODLevel, FODModel
from fod.train import TrainSettings, coreset_indices, extract_features, fill_bank, train_model
from tests.fod.conftest import synthetic_good_images


def _config(**kwargs: object) -> FODConfig:
    base: dict[str, object] = dict(image_size=64, levels=((16,), (32,)), d_models=(16, 16), heads=2, layers=1,
                                   ffn_mult=2, reference="nearest", bank_size=40)
    base.update(kwargs)
    return FODConfig(**base)  # type: ignore[arg-type]


def test_nearest_is_the_true_nearest_bank_patch_and_exclusion_holds():
    torch.manual_seed(0)
    level = FODLevel(8, (4, 4), 16, 2, 1, 2, bank_size=30)
    patches = torch.randn(30, 8)
    level.set_bank(patches)
    tokens = torch.randn(3, 16, 8)
    idx = level.nearest(tokens)
    brute = torch.cdist(tokens, patches[None].expand(3, -1, -1)).argmin(-1)
    assert torch.equal(level.bank_patches(idx), patches[idx])
    assert torch.equal(idx, brute)
    exclude = torch.zeros(3, 30, dtype=torch.bool)
    exclude[:, brute[0, 0]] = True
    assert int(level.nearest(tokens, exclude)[0, 0]) != int(brute[0, 0])


def test_coreset_keeps_the_outlier_and_picks_distinct_rows():
    x = torch.randn(500, 6)
    x[123] = 50.0  # one patch far from all others: k-center picks it early
    picked = coreset_indices(x, 20, seed=1)
    assert len(set(picked.tolist())) == 20
    assert int(picked[1]) == 123  # the farthest row from the first pick, over every row
    assert torch.equal(coreset_indices(x, 600, seed=1), torch.arange(500))


def test_coreset_matches_the_textbook_k_center_loop():
    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    picked = coreset_indices(x, 30, seed=2)  # 5 channels <= dim: no projection
    expected = [int(picked[0])]
    min_d = (x - x[expected[0]]).square().sum(1)
    for _ in range(29):
        expected.append(int(min_d.argmax()))
        min_d = torch.minimum(min_d, (x - x[expected[-1]]).square().sum(1))
    assert picked.tolist() == expected
    # every row lies within the covering radius, which a random subset of the same size does not beat
    radius = torch.cdist(x, x[picked]).amin(1).max()
    rand = torch.randperm(400, generator=torch.Generator().manual_seed(3))[:30]
    assert radius < torch.cdist(x, x[rand]).amin(1).max()


def test_bank_holds_training_patches_and_training_references_come_from_other_images():
    images = synthetic_good_images(6, 64, seed=5)
    torch.manual_seed(0)
    model = FODModel(_config(), pretrained=False)
    tokens = FODModel.tokens(extract_features(model, images)[0])  # [6, 16, C]
    level = model.levels[0]
    refs = fill_bank(level, tokens, seed=0)
    flat = tokens.reshape(-1, tokens.shape[-1])
    # every bank row is one of the training patches
    bank = level.bank.t()
    assert torch.cdist(bank, flat).amin(1).max() < 1e-4
    torch.testing.assert_close(level.bank_norm, bank.square().sum(-1))
    owner = torch.cdist(bank, flat).argmin(1) // tokens.shape[1]
    picked_owner = owner[refs]  # [6, 16] image of each token's reference
    assert not (picked_owner == torch.arange(6)[:, None]).any()


def _save_reload_export(tmp_path: Path, model: FODModel, record: dict, images: np.ndarray) -> FODModel:
    """Save ``model``, reload it and export it; assert the reloaded checkpoint and the ONNX package
    score ``images[:3]`` as ``model`` does. Returns the reloaded model."""
    from fod.export import export_package
    from fod.runner import OnnxRuntimeRunner

    record["data"] = {"count": len(images), "sha256": "0" * 64, "root": "synthetic"}
    save_checkpoint(tmp_path / "run", model, record)
    loaded, _ = load_checkpoint(tmp_path / "run")
    x = torch.from_numpy(images[:3])
    with torch.no_grad():
        torch_score = model(x)[1]
        torch.testing.assert_close(loaded(x)[1], torch_score)
    export_package(tmp_path / "run", tmp_path / "pkg")  # raises when ONNX Runtime disagrees with PyTorch
    with OnnxRuntimeRunner(tmp_path / "pkg" / "model.onnx", images.shape[1:3]) as runner:
        out = runner.infer(images[:3])
    np.testing.assert_allclose(out.score, torch_score.numpy(), rtol=1e-3)
    return loaded


def test_nearest_reference_trains_saves_reloads_and_exports_with_parity(tmp_path: Path):
    images = synthetic_good_images(9, 64, seed=3)
    config = _config(bank_size=10_000)  # more than the 7 training images have: clamped to their patches
    model, record = train_model(images, config, TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25))
    assert model.config.bank_size == 7 * 4  # stride 32 at 64 px: 4 patches per image
    assert model.levels[0].bank is not None
    assert model.levels[0].bank.shape[1] == 28
    assert record["bank_seconds"] >= 0
    loaded = _save_reload_export(tmp_path, model, record, images)
    assert loaded.config.reference == "nearest"
    assert torch.equal(loaded.levels[1].bank, model.levels[1].bank)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reference": "median"}, "choose from ['mean', 'nearest']"),
        ({"bank_size": 0}, "needs a memory bank"),
        ({"reference": "mean", "bank_size": 16}, "the mean reference none"),
        ({"score": "inter"}, "score 'inter': choose from ['rec*inter', 'rec']"),
    ],
)
def test_invalid_reference_settings_name_the_option(kwargs: dict, message: str):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _config(**kwargs).validate()


def test_checkpoints_without_the_reference_keys_load_as_the_mean_reference():
    d = _config().to_dict()
    del d["reference"], d["bank_size"], d["score"]
    config = FODConfig.from_dict(d)
    assert (config.reference, config.bank_size, config.score) == ("mean", 0, "rec*inter")



def test_rec_score_is_the_reconstruction_error_and_the_paper_score_multiplies_it():
    torch.manual_seed(0)
    level = FODLevel(8, (4, 4), 16, 2, 1, 2).eval()
    level.reference.normal_()
    tokens = torch.randn(2, 16, 8)
    with torch.no_grad():
        recon, _ = level(tokens)
        rec = (tokens - recon).square().mean(-1) + 1.0 - torch.nn.functional.cosine_similarity(tokens, recon, dim=-1)
        only_rec = level.patch_scores(tokens, "rec")
        paper = level.patch_scores(tokens)
    torch.testing.assert_close(only_rec, rec.reshape(2, 1, 4, 4))
    inter = paper / only_rec  # the within-image inter score: 0 at each image's least discrepant patch
    assert torch.all(inter >= 0)
    assert torch.all(inter <= 1)
    assert torch.allclose(inter.flatten(1).amin(1), torch.zeros(2), atol=1e-6)


def test_anchored_level_starts_at_its_reference_and_scores_the_distance_to_it():
    torch.manual_seed(0)
    level = FODLevel(8, (4, 4), 16, 2, 1, 2, bank_size=30, anchor=True).eval()
    level.set_bank(torch.randn(30, 8))
    tokens = torch.randn(2, 16, 8)
    with torch.no_grad():
        recon, _ = level(tokens)
        nearest = level.bank_patches(level.nearest(tokens))
        score = level.patch_scores(tokens, "rec")
    # zero-initialised head: the reconstruction is the nearest bank patch itself
    torch.testing.assert_close(recon, nearest)
    cos = torch.nn.functional.cosine_similarity(tokens, nearest, dim=-1)
    expected = (tokens - nearest).square().mean(-1) + 1.0 - cos
    torch.testing.assert_close(score, expected.reshape(2, 1, 4, 4))
    # a token that is a bank patch scores 0; one far from every bank patch scores high
    tokens[0, 0] = level.bank[:, 3]
    tokens[0, 1] = 40.0
    with torch.no_grad():
        score = level.patch_scores(tokens, "rec")[0, 0].flatten()
    assert float(score[0]) < 1e-5
    assert float(score[1]) > 100 * float(score[2:].max())


def test_anchored_model_trains_its_head_reloads_and_exports_with_parity(tmp_path: Path):
    images = synthetic_good_images(9, 64, seed=4)
    model, record = train_model(images, _config(anchor=True),
                                TrainSettings(epochs=1, batch_size=4, progress=False, holdout=0.25))
    assert all(float(level.head.weight.abs().sum()) > 0 for level in model.levels)  # training moved the head
    loaded = _save_reload_export(tmp_path, model, record, images)
    assert loaded.config.anchor
    assert all(level.anchor for level in loaded.levels)


def test_configs_without_anchor_load_with_the_plain_reconstruction():
    d = _config(anchor=True).to_dict()
    assert d["anchor"] is True
    del d["anchor"]
    assert FODConfig.from_dict(d).anchor is False


def test_train_help_shows_anchor_and_its_default(capsys: pytest.CaptureFixture[str]):
    from fod.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--anchor, --no-anchor" in text
    assert "Default --anchor" in text
