"""EOIR network: presets at small sizes, shapes, parameter count, size checks, sampler parity."""

from __future__ import annotations

import re

import pytest
import torch

from eoir_cli.config import PRESETS
from eoir_cli.model import EOIR, count_parameters

# (preset, input size): sizes are the smallest multiples of each preset's size_multiple() that the
# tests can afford; abdomen halves its input first (input_scale 0.5), so 64³ runs the pyramid at 32³.
SMALL_CASES = [
    ("lumir", (32, 32, 32)),
    ("oasis", (32, 32, 32)),
    ("abdomen", (64, 64, 64)),
    ("acdc", (32, 32, 16)),
]


def _pair(size: tuple[int, int, int], n: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *size, generator=gen), torch.rand(n, 1, *size, generator=gen)


def _model(preset: str, channels: int = 4, sampler: str = "torch") -> EOIR:
    torch.manual_seed(0)
    return EOIR(PRESETS[preset].replace(channels=channels), sampler=sampler).eval()


@pytest.mark.parametrize(("preset", "size"), SMALL_CASES)
def test_every_preset_runs_at_small_size(preset: str, size: tuple[int, int, int]) -> None:
    model = _model(preset)
    moving, fixed = _pair(size)
    with torch.no_grad():
        disp = model(moving, fixed)
    assert disp.shape == (1, 3, *size)
    assert torch.isfinite(disp).all()
    assert disp.abs().max() > 0  # random weights give a non-trivial field


def test_batch_of_two_matches_single_samples() -> None:
    model = _model("lumir")
    moving, fixed = _pair((32, 32, 32), n=2)
    with torch.no_grad():
        both = model(moving, fixed)
        first = model(moving[:1], fixed[:1])
        second = model(moving[1:], fixed[1:])
    assert both.shape == (2, 3, 32, 32, 32)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("preset", "size", "multiple"), [
    ("lumir", (32, 32, 24), "(16, 16, 16)"),
    ("acdc", (24, 32, 16), "(16, 16, 1)"),
])
def test_size_not_a_multiple_is_rejected(preset: str, size: tuple[int, int, int], multiple: str) -> None:
    model = _model(preset)
    moving, fixed = _pair(size)
    with pytest.raises(ValueError, match="expected multiples of " + re.escape(multiple)):
        model(moving, fixed)


def test_input_checks() -> None:
    model = _model("lumir")
    moving, fixed = _pair((32, 32, 32))
    with pytest.raises(ValueError, match=r"moving: expected \(N, 1, D, H, W\), got shape \(1, 2, 32, 32, 32\)"):
        model(moving.repeat(1, 2, 1, 1, 1), fixed)
    with pytest.raises(ValueError, match="moving and fixed differ"):
        model(moving, fixed[..., :16])


def test_lumir_parameter_count_matches_published() -> None:
    # official_checkpoint.md / EOIR.md: the LUMIR submission has 909,232 parameters.
    assert count_parameters(EOIR(PRESETS["lumir"])) == 909_232


@pytest.mark.parametrize(("preset", "size", "expected"), [
    ("lumir", (32, 32, 32), [(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]),
    # feature halving: the finest level is already at half the input size, 4 levels.
    ("oasis", (32, 32, 32), [(16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]),
    # in-plane only: the last axis keeps its 16 slices at every level.
    ("acdc", (32, 32, 16), [(32, 32, 16), (16, 16, 16), (8, 8, 16), (4, 4, 16), (2, 2, 16)]),
])
def test_forward_pyramid_level_sizes(
    preset: str, size: tuple[int, int, int], expected: list[tuple[int, int, int]]
) -> None:
    model = _model(preset)
    moving, fixed = _pair(size)
    with torch.no_grad():
        out = model.forward_pyramid(moving, fixed)
    assert [tuple(d.shape[2:]) for d in out.disps] == expected
    assert [tuple(v.shape[2:]) for v in out.velocities] == expected
    assert all(d.shape[:2] == (1, 3) for d in out.disps)


def test_gather_model_matches_torch_model() -> None:
    torch_model = _model("lumir", sampler="torch")
    gather_model = _model("lumir", sampler="gather")
    gather_model.load_state_dict(torch_model.state_dict())
    # Larger weights on the velocity heads so the field moves several voxels (a real test of warping).
    with torch.no_grad():
        for model in (torch_model, gather_model):
            for est in model.estimators:
                est.to_velocity.weight.mul_(20)
    moving, fixed = _pair((32, 32, 32), seed=1)
    with torch.no_grad():
        a, b = torch_model(moving, fixed), gather_model(moving, fixed)
    assert a.abs().max() > 0.5
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
