"""The FOD math: target in softmax form, KL/entropy, positions, shapes, batch invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fod.losses import TERMS, fod_loss, reconstruction_loss
from fod.model import (
    FODConfig,
    FODLevel,
    FODModel,
    entropy,
    peak_relative,
    rbf_target,
    sincos_position_2d,
    squared_distance_maps,
    symmetric_kl,
)
from fod.smoothing import GaussianSmoothing, gaussian_kernel_1d


@pytest.mark.parametrize(("h", "w"), [(5, 5), (3, 7)])
def test_separable_target_equals_normalised_rbf_kernel(h: int, w: int):
    # the literal reference kernel on the full [L, L] distance maps (fod-method.md 2.3)
    torch.manual_seed(0)
    dist_y, dist_x = squared_distance_maps(h, w)
    assert dist_y.shape == (h * w, h)
    assert dist_x.shape == (h * w, w)
    rows = torch.arange(h).repeat_interleave(w).double()
    cols = torch.arange(w).repeat(h).double()
    full_y, full_x = (rows[:, None] - rows[None]) ** 2, (cols[:, None] - cols[None]) ** 2
    sigma = torch.rand(2, 3, h * w, 2) * 1.5 + 0.2  # [N, H, L, 2]
    sy, sx = sigma[..., 0:1].double(), sigma[..., 1:2].double()
    kernel = torch.exp(-full_y / (2 * sy**2) - full_x / (2 * sx**2)) / (2 * math.pi * sy * sx)
    expected = kernel / kernel.sum(-1, keepdim=True)
    torch.testing.assert_close(rbf_target(sigma, dist_y, dist_x).double(), expected, rtol=1e-5, atol=1e-7)


def test_target_with_tiny_sigma_is_one_hot_not_nan():
    dist_y, dist_x = squared_distance_maps(4, 4)
    sigma = torch.full((1, 1, 16, 2), 1e-5)
    p = rbf_target(sigma, dist_y, dist_x)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[0, 0], torch.eye(16))


@pytest.mark.parametrize(
    ("p", "q", "expected"),
    [
        # identical distributions: zero divergence
        ([0.5, 0.5], [0.5, 0.5], 0.0),
        # one-hot vs uniform, computed by hand with eps = 1e-4
        (
            [1.0, 0.0],
            [0.5, 0.5],
            (1.0 * (math.log(1.0001) - math.log(0.5001)) + 0.0)
            + (0.5 * (math.log(0.5001) - math.log(1.0001)) + 0.5 * (math.log(0.5001) - math.log(1e-4))),
        ),
    ],
)
def test_symmetric_kl_known_values(p, q, expected):
    pt = torch.tensor(p, dtype=torch.float64).view(1, 1, 1, -1)
    qt = torch.tensor(q, dtype=torch.float64).view(1, 1, 1, -1)
    assert symmetric_kl(pt, qt).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert symmetric_kl(qt, pt).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)  # symmetric


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        ([1.0, 0.0, 0.0, 0.0], -math.log(1.0001)),  # one-hot: ~0
        ([0.25] * 4, -4 * 0.25 * math.log(0.2501)),  # uniform: ~log 4
    ],
)
def test_entropy_known_values(p, expected):
    pt = torch.tensor(p, dtype=torch.float64).view(1, 1, 1, -1)
    assert entropy(pt).item() == pytest.approx(expected, rel=1e-9)


def test_positional_code_layout():
    pe = sincos_position_2d(8, 3, 4)  # d=8: 4 channels for x, 4 for y; 2 frequencies each
    assert pe.shape == (12, 8)
    token = 1 * 4 + 2  # row 1, column 2
    omega1 = math.exp(-2 * math.log(1e4) / 4)
    expected = [math.sin(2), math.cos(2), math.sin(2 * omega1), math.cos(2 * omega1),
                math.sin(1), math.cos(1), math.sin(omega1), math.cos(omega1)]
    torch.testing.assert_close(pe[token], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_distance_maps_row_major():
    dist_y, dist_x = squared_distance_maps(2, 3)
    # token 0 = (0,0), token 5 = (1,2); dist_y[i, r] = (row_i - r)^2, dist_x[i, c] = (col_i - c)^2
    assert dist_y[0, 1] == 1
    assert dist_x[0, 2] == 4
    assert dist_y[5, 1] == 0
    assert dist_x[5, 2] == 0


def test_gaussian_kernel_matches_scipy_radius_and_smoothing_keeps_mass():
    k = gaussian_kernel_1d(4.0)
    assert k.numel() == 33
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    smooth = GaussianSmoothing(4.0)
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 32, 32] = 1.0
    y = smooth(x)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)  # interior impulse keeps its mass
    assert y.argmax().item() == 32 * 64 + 32


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = FODModel(FODConfig(image_size=64, d_models=(32, 32)))
    for level in model.levels:  # a non-trivial reference
        level.reference.normal_()
    return model.eval()


def test_level_shapes_at_256_px():
    # the real resolutions of the default backbone at 256 px (without running the backbone)
    for channels, grid, d in ((40, (32, 32), 128), (112, (16, 16), 256)):
        level = FODLevel(channels, grid, d, heads=8, layers=3, ffn_mult=4)
        tokens = torch.randn(1, grid[0] * grid[1], channels)
        with torch.no_grad():
            recon, maps = level(tokens, training_maps=True)
            scores = level.patch_scores(tokens)
        length = grid[0] * grid[1]
        assert recon.shape == (1, length, channels)
        assert len(maps) == 3
        assert maps[0].inter_attn.shape == (1, 8, length, length)
        assert maps[0].intra_target.shape == (1, 8, length, length)
        assert scores.shape == (1, 1, *grid)


def test_backbone_feature_shapes(small_model):
    f8, f16 = small_model.backbone(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert f8.shape == (2, 40, 8, 8)
    assert f16.shape == (2, 112, 4, 4)


def test_result_same_alone_and_in_batch(small_model):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        batch_map, batch_score = small_model(images)
        for i in range(4):
            alone_map, alone_score = small_model(images[i : i + 1])
            torch.testing.assert_close(alone_map[0], batch_map[i], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(alone_score[0], batch_score[i], rtol=1e-5, atol=1e-7)


def test_score_is_max_of_map_and_patch_score_nonnegative(small_model):
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        amap, score = small_model(images)
    assert amap.shape == (2, 1, 64, 64)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    assert (amap >= 0).all()


def test_loss_gradients_follow_stop_gradient_rules():
    torch.manual_seed(0)
    level = FODLevel(8, (4, 4), 16, heads=2, layers=1, ffn_mult=2)
    tokens = torch.randn(2, 16, 8)
    recon, maps = level(tokens, training_maps=True)
    loss, term_values = fod_loss(tokens, recon, maps, 0.5, 0.5)
    loss.backward()
    terms = dict(zip(TERMS, term_values.tolist()))
    assert set(terms) >= {"rec", "intra1", "intra2", "inter1", "inter2", "h_intra", "h_inter"}
    assert terms["intra1"] == pytest.approx(terms["intra2"])  # same value, different gradient paths
    layer = level.layers[0]
    for module in (layer.intra.sigma, layer.inter.sigma, layer.intra.q, layer.inter.k, level.head):
        assert module.weight.grad is not None
        assert module.weight.grad.abs().sum() > 0
    assert reconstruction_loss(tokens, tokens).item() == pytest.approx(0.0, abs=1e-6)


def test_shared_log_loss_has_the_gradient_of_the_literal_loss():
    # literal loss1 + loss2 (fod-method.md 3.2) with four separate KL evaluations per layer
    def literal(tokens, recon, maps, l1, l2):
        rec = reconstruction_loss(tokens, recon)
        t = {k: 0 for k in ("intra1", "intra2", "inter1", "inter2", "h_intra", "h_inter")}
        for m in maps:
            t["intra1"] = t["intra1"] + symmetric_kl(m.intra_target.detach(), m.intra_attn).mean() / len(maps)
            t["intra2"] = t["intra2"] + symmetric_kl(m.intra_target, m.intra_attn.detach()).mean() / len(maps)
            t["inter1"] = t["inter1"] + symmetric_kl(m.inter_target.detach(), m.inter_attn).mean() / len(maps)
            t["inter2"] = t["inter2"] + symmetric_kl(m.inter_target, m.inter_attn.detach()).mean() / len(maps)
            t["h_intra"] = t["h_intra"] + entropy(m.intra_attn).mean() / len(maps)
            t["h_inter"] = t["h_inter"] + entropy(m.inter_attn).mean() / len(maps)
        loss1 = rec + l1 * t["intra2"] - l1 * t["inter2"]
        loss2 = rec - l1 * t["intra1"] - l2 * t["h_intra"] + l1 * t["inter1"] + l2 * t["h_inter"]
        return loss1 + loss2

    grads = []
    for fn in (lambda *a: fod_loss(*a)[0], literal):
        torch.manual_seed(0)
        level = FODLevel(8, (4, 4), 16, heads=2, layers=2, ffn_mult=2).double()
        tokens = torch.randn(3, 16, 8, dtype=torch.float64)
        recon, maps = level(tokens, training_maps=True)
        loss = fn(tokens, recon, maps, 0.5, 0.5)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in level.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_peak_relative_keeps_each_peak_and_ranks_a_raised_background_below_another_frames_defect():
    # frame A: a strong defect (peak 10) on a raised background of 3; frame B: a weak defect (4) on 0.5
    a = torch.full((1, 1, 8, 8), 3.0)
    a[0, 0, 2, 2] = 10.0
    b = torch.full((1, 1, 8, 8), 0.5)
    b[0, 0, 5, 5] = 4.0
    maps = torch.cat([a, b])
    out = peak_relative(maps, 2.0)
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), torch.tensor([10.0, 4.0]))  # the scores
    assert maps[0, 0, 0, 0] < maps[1, 0, 5, 5]  # before: A's background 3 < B's defect 4 (already)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(0.9))  # 3 * 3 / 10
    torch.testing.assert_close(out[1, 0, 0, 0], torch.tensor(0.0625))  # 0.5 * 0.5 / 4
    # the within-frame order is kept and the map is scale-covariant
    order = torch.argsort(maps.flatten(1), dim=1, stable=True)
    assert torch.equal(torch.argsort(out.flatten(1), dim=1, stable=True), order)
    torch.testing.assert_close(peak_relative(7.0 * maps, 2.0), 7.0 * out)
    torch.testing.assert_close(peak_relative(maps, 3.0)[0, 0, 0, 0], torch.tensor(0.27))  # 10 * 0.3 ** 3


def test_peak_relative_at_power_one_is_the_map_and_a_flat_zero_frame_stays_zero():
    maps = torch.rand(2, 1, 6, 6)
    assert peak_relative(maps, 1.0) is maps
    zero = peak_relative(torch.zeros(1, 1, 4, 4), 2.0)
    assert torch.equal(zero, torch.zeros(1, 1, 4, 4))
    assert (peak_relative(maps - 0.5, 2.0) >= 0).all()  # negative values count as 0


def test_peak_floor_puts_normal_looking_frames_on_one_scale_and_keeps_the_order_of_frames():
    maps = torch.zeros(3, 1, 4, 4)
    maps[:, 0, 0, 0] = torch.tensor([2.0, 5.0, 9.0])  # peaks: two under the floor of 6, one over
    maps[:, 0, 3, 3] = 1.0  # the same background pixel in every frame
    out = peak_relative(maps, 2.0, floor=6.0)
    scores = out.amax(dim=(1, 2, 3))
    torch.testing.assert_close(scores, torch.tensor([4.0 / 6.0, 25.0 / 6.0, 9.0]))  # M >= floor keeps M
    assert torch.equal(torch.argsort(scores), torch.argsort(maps.amax(dim=(1, 2, 3))))
    # under the floor the background is divided by the floor, not stretched up to the frame's small peak
    torch.testing.assert_close(out[:2, 0, 3, 3], torch.tensor([1.0 / 6.0, 1.0 / 6.0]))
    torch.testing.assert_close(peak_relative(maps, 2.0)[0, 0, 3, 3], torch.tensor(0.5))  # without: 1 / 2
    torch.testing.assert_close(out[2, 0, 3, 3], torch.tensor(1.0 / 9.0))
    torch.testing.assert_close(peak_relative(3.0 * maps, 2.0, floor=18.0), 3.0 * out)


def test_map_power_is_applied_last_and_keeps_the_score(small_model):
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    config = FODConfig.from_dict({**small_model.config.to_dict(), "map_power": 2.0})
    sharp = FODModel(config, pretrained=False).eval()
    sharp.load_state_dict(small_model.state_dict())
    with torch.no_grad():
        amap, score = small_model(images)
        sharp_map, sharp_score = sharp(images)
    torch.testing.assert_close(sharp_score, score)
    torch.testing.assert_close(sharp_map, peak_relative(amap, 2.0))
    assert (sharp_map <= amap + 1e-6).all()


@pytest.mark.parametrize("power", [0.5, 0.0, -1.0, float("nan"), float("inf"), 9.0])
def test_config_refuses_a_map_power_outside_one_to_eight(power: float):
    from fod.errors import CheckpointError

    with pytest.raises(CheckpointError, match="map_power"):
        FODConfig(image_size=64, map_power=power).validate()


@pytest.mark.parametrize("floor", [-0.1, float("nan"), float("inf")])
def test_config_refuses_a_negative_or_non_finite_peak_floor(floor: float):
    from fod.errors import CheckpointError

    with pytest.raises(CheckpointError, match="peak_floor"):
        FODConfig(image_size=64, map_power=2.0, peak_floor=floor).validate()


def test_config_without_map_power_loads_as_the_unchanged_map():
    d = FODConfig(image_size=64).to_dict()
    assert (d["map_power"], d["peak_floor"]) == (1.0, 0.0)
    del d["map_power"], d["peak_floor"]  # a checkpoint made before the option
    config = FODConfig.from_dict(d)
    assert (config.map_power, config.peak_floor) == (1.0, 0.0)
