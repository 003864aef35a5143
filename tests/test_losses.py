"""Training losses: NCC, smoothness, soft Dice, one-hot, blur, and the deep-supervision objective."""

from __future__ import annotations

import pytest
import torch

from eoir_cli.config import PRESETS
from eoir_cli.losses import (
    deep_supervision_loss,
    gaussian_blur,
    ncc_loss,
    one_hot,
    smoothness_loss,
    soft_dice_loss,
)
from eoir_cli.model import EOIR, PyramidOutput
from eoir_cli.spatial import identity_grid


def _smooth_image(size: tuple[int, int, int] = (16, 16, 16), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(1, 1, *size, generator=gen), 1.0)


def test_ncc_of_image_with_itself_is_minus_one() -> None:
    image = _smooth_image()
    assert ncc_loss(image, image, 9).item() == pytest.approx(-1.0, abs=1e-3)


def test_ncc_is_invariant_to_affine_intensity_change() -> None:
    image = _smooth_image()
    assert ncc_loss(3.0 * image, image, 5).item() == pytest.approx(-1.0, abs=1e-3)
    # An intensity offset is exact inside but not in windows that reach the zero padding at the
    # border (measured -0.998 at 16³, window 5), hence the looser tolerance.
    assert ncc_loss(3.0 * image + 0.7, image, 5).item() == pytest.approx(-1.0, abs=5e-3)
    assert ncc_loss(-image, image, 5).item() == pytest.approx(-1.0, abs=1e-3)  # squared correlation


def test_ncc_with_noise_is_worse_than_perfect() -> None:
    image = _smooth_image()
    gen = torch.Generator().manual_seed(1)
    noisy = image + 0.2 * torch.rand(image.shape, generator=gen)
    value = ncc_loss(noisy, image, 9).item()
    assert -1.0 + 0.05 < value < 0.0


def test_ncc_rejects_bad_arguments() -> None:
    image = _smooth_image()
    with pytest.raises(ValueError, match="window: expected an odd size >= 1, got 4"):
        ncc_loss(image, image, 4)
    with pytest.raises(ValueError, match="warped and fixed: expected equal shapes"):
        ncc_loss(image, image[..., :8], 9)


def test_smoothness_goldens() -> None:
    constant = torch.full((1, 3, 6, 6, 6), 2.5)
    assert smoothness_loss(constant, "l2").item() == 0.0
    assert smoothness_loss(constant, "l1").item() == 0.0
    slope = 0.5
    grid = identity_grid((6, 6, 6))[0]
    # Every component = a·(x + y + z): each forward difference is a on every axis, so
    # l2 = (a² + a² + a²) / 3 = a² = 0.25 and l1 = |a| = 0.5.
    ramp = (slope * grid.sum(0)).expand(1, 3, 6, 6, 6)
    assert smoothness_loss(ramp, "l2").item() == pytest.approx(slope**2, abs=1e-6)
    assert smoothness_loss(ramp, "l1").item() == pytest.approx(slope, abs=1e-6)
    # A ramp along axis 0 only: (a² + 0 + 0) / 3.
    ramp0 = (slope * grid[0]).expand(1, 3, 6, 6, 6)
    assert smoothness_loss(ramp0, "l2").item() == pytest.approx(slope**2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="penalty: expected 'l1' or 'l2', got 'l3'"):
        smoothness_loss(ramp, "l3")  # type: ignore[arg-type]


def test_one_hot_and_soft_dice() -> None:
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    labels[..., :2, :, :] = 3
    labels[..., 2:, :2, :] = 7
    onehot = one_hot(labels, [0, 3, 7])
    assert onehot.shape == (1, 3, 4, 4, 4)
    # 32 voxels of label 3, 16 of label 7, 16 background.
    assert onehot.sum(dim=(0, 2, 3, 4)).tolist() == [16.0, 32.0, 16.0]
    assert soft_dice_loss(onehot, onehot).item() == pytest.approx(0.0, abs=1e-6)
    # Swapping channels 1 and 2 (disjoint masks): Dice 1 for background, 0 for both → 1 - 1/3.
    swapped = onehot[:, [0, 2, 1]]
    assert soft_dice_loss(swapped, onehot).item() == pytest.approx(2 / 3, abs=1e-4)
    assert soft_dice_loss(swapped, onehot, exclude_background=True).item() == pytest.approx(1.0, abs=1e-4)


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    constant = torch.full((1, 2, 5, 3, 2), 4.0)
    torch.testing.assert_close(gaussian_blur(constant, 1.0), constant)
    impulse = torch.zeros(1, 1, 15, 15, 15)
    impulse[..., 7, 7, 7] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    # Separable Gaussian: the centre is g(0)³ with g(0) = 1 / Σ exp(-k²/2), k = -3..3 ≈ 0.39905.
    assert blurred[..., 7, 7, 7].item() == pytest.approx(0.39905**3, rel=1e-3)


@pytest.mark.parametrize("preset", ["lumir", "oasis"])
def test_deep_supervision_loss_backpropagates(preset: str) -> None:
    torch.manual_seed(0)
    model = EOIR(PRESETS[preset].replace(channels=2, int_steps=2))
    # lumir: levels 16³ … 1³; oasis needs 32³ (levels 16³ … 2³): its large-kernel estimators
    # instance-normalise, which training mode refuses on a 1-voxel level.
    size = (16, 16, 16) if preset == "lumir" else (32, 32, 32)
    gen = torch.Generator().manual_seed(3)
    moving = gaussian_blur(torch.rand(1, 1, *size, generator=gen), 1.0)
    fixed = gaussian_blur(torch.rand(1, 1, *size, generator=gen), 1.0)
    labels_m = (moving > moving.mean()).long()
    labels_f = (fixed > fixed.mean()).long()
    out = model.forward_pyramid(moving, fixed)
    total, terms = deep_supervision_loss(
        out, moving, fixed, one_hot(labels_m, [0, 1]), one_hot(labels_f, [0, 1]),
        windows=(9, 5, 3), smooth_weight=1.0, dice_weight=1.0, level_factors=PRESETS[preset].level_factors,
    )
    levels = PRESETS[preset].levels
    assert {f"ncc_{i}" for i in range(levels)} <= terms.keys()
    assert {f"dice_{i}" for i in range(levels)} <= terms.keys()
    expected = terms["ncc"] + terms["smooth"] + terms["dice"]  # weights 1 for smoothness and Dice
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    weighted_ncc = sum(terms[f"ncc_{i}"] / 2**i for i in range(levels))
    assert terms["ncc"] == pytest.approx(weighted_ncc, rel=1e-6)
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.estimators[0].to_velocity.weight.grad.abs().sum() > 0


def test_deep_supervision_loss_checks_level_sizes() -> None:
    disps = [torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 3, 4, 4, 8)]
    out = PyramidOutput(velocities=list(disps), disps=disps)
    image = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"level 1 size \(4, 4, 8\): expected \(4, 4, 4\)"):
        deep_supervision_loss(out, image, image)
    total, terms = deep_supervision_loss(out, image, image, level_factors=(2, 2, 1))
    assert "dice" in terms and terms["dice"] == 0.0 and "dice_0" not in terms
    assert total.item() == pytest.approx(terms["total"])


@pytest.mark.parametrize("box", ["conv", "cumsum"])
def test_local_ncc_scores_many_images_as_ncc_loss_does(box: str) -> None:
    """LocalNCC keeps the fixed image's window sums across calls: each call equals ncc_loss."""
    from eoir_cli.losses import LocalNCC

    gen = torch.Generator().manual_seed(4)
    fixed = torch.rand(1, 1, 9, 8, 10, generator=gen, dtype=torch.float64)
    similarity = LocalNCC(fixed, window=5, box=box)  # type: ignore[arg-type]
    for k in range(3):
        warped = (fixed * (0.5 + 0.2 * k) + 0.3 * torch.rand(1, 1, 9, 8, 10, generator=gen, dtype=torch.float64))
        warped.requires_grad_(True)
        got, expected = similarity(warped), ncc_loss(warped, fixed, window=5, box=box)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, warped)[0], torch.autograd.grad(expected, warped)[0])
    with pytest.raises(ValueError, match="warped and fixed: expected equal shapes"):
        similarity(torch.zeros(1, 1, 9, 8, 9, dtype=torch.float64))


@pytest.mark.parametrize("window", [3, 5, 9])  # shifted sums up to 7, a scan beyond
def test_cumsum_box_sum_is_the_convolution_and_its_backward_its_adjoint(window: int) -> None:
    from eoir_cli.losses import box_sum

    x = torch.rand(1, 2, 5, 2, 6, dtype=torch.float64, requires_grad=True)  # an axis shorter than the window
    assert torch.autograd.gradcheck(lambda v: box_sum(v, window, "cumsum"), (x,))
    torch.testing.assert_close(box_sum(x, window, "cumsum"), box_sum(x, window, "conv"))
