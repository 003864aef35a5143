"""The inference path (eoir_cli.lean): in-place norms, float32 statistics, parity with the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import eoir_cli.lean as lean
from eoir_cli.config import PRESETS
from eoir_cli.model import EOIR
from eoir_cli.spatial import resize

CL = torch.channels_last_3d


def _model(preset: str, channels: int = 4, head_gain: float = 5.0) -> EOIR:
    torch.manual_seed(0)
    model = EOIR(PRESETS[preset].replace(channels=channels)).eval()
    with torch.no_grad():  # larger velocity heads: fields of several voxels exercise every warp
        for est in model.estimators:
            est.to_velocity.weight.mul_(head_gain)
    return model


def _pair(size: tuple[int, int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    from eoir_cli.bench import smooth_pair

    moving, fixed = smooth_pair(size, seed=seed)
    return torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few voxel rows, so the tests cover the combination across many blocks (and a short last one)."""
    monkeypatch.setattr(lean, "_BLOCK_BYTES", 4 * 5 * 11)


def test_instance_stats_are_float32_accurate_for_bfloat16_storage(small_blocks: None) -> None:
    gen = torch.Generator().manual_seed(0)
    # A large mean over a small spread: bf16 statistics would lose it (8 mantissa bits), fp32 ones must not.
    x = (100 + torch.randn(2, 3, 13, 6, 7, generator=gen)).to(torch.bfloat16).contiguous(memory_format=CL)
    mean, var = lean.instance_stats(x)
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(2, 3, 4), keepdim=True, correction=0)
    assert mean.dtype == torch.float32 and mean.shape == (2, 3, 1, 1, 1)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_over_slabs_equal_the_whole_maps_statistics(small_blocks: None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    # The first slab is flat background (the shift it gives is 50 standard deviations off the mean).
    x = torch.cat([torch.zeros(1, 3, 2, 6, 7), 50 + torch.randn(1, 3, 9, 6, 7, generator=gen)], 2)
    x = x.to(dtype).contiguous(memory_format=CL)
    moments = lean.Moments()
    for start in range(0, 11, 3):
        moments.add(x[:, :, start:start + 3])
    mean, var = moments.result()
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(2, 3, 4), keepdim=True, correction=0)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="nothing accumulated"):
        lean.Moments().result()


@pytest.mark.parametrize("slope", [None, 0.25])
def test_instance_norm_in_place_equals_instance_norm_then_prelu(small_blocks: None, slope: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(1, 5, 9, 6, 7, generator=gen) + 2).contiguous(memory_format=CL)
    expected = F.instance_norm(x, eps=1e-5)
    if slope is not None:
        expected = F.prelu(expected, torch.tensor([slope]))
    out = lean.instance_norm_(x.clone(), 1e-5, slope)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert out.is_contiguous(memory_format=CL)


def test_instance_norm_in_place_bfloat16_is_within_bf16_rounding(small_blocks: None) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(1, 4, 8, 8, 8, generator=gen) + 50).to(torch.bfloat16)
    expected = F.prelu(F.instance_norm(x.float()), torch.tensor([0.2]))
    out = lean.instance_norm_(x.clone(), 1e-5, 0.2)
    assert out.dtype == torch.bfloat16
    # Normalised values are O(1): one bf16 rounding of the stored result is at most 2^-8 of |value|.
    assert ((out.float() - expected).abs() <= 2**-8 * expected.abs() + 1e-3).all()


@pytest.mark.parametrize(("preset", "size"), [
    ("lumir", (32, 32, 32)), ("oasis", (32, 32, 32)), ("abdomen", (64, 64, 64)), ("acdc", (32, 32, 16)),
])
def test_lean_forward_equals_plain_forward_in_float32(preset: str, size: tuple[int, int, int]) -> None:
    model = _model(preset)
    moving, fixed = _pair(size)
    with torch.no_grad():
        plain = model(moving, fixed, lean=False)
        got = model(moving, fixed)
    assert plain.abs().max() > 1.0  # several-voxel fields: the warps are exercised
    # float rounding only (another conv layout and order of operations), far below the 1e-3 voxel parity bar.
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-3)


def test_lean_forward_leaves_its_inputs_untouched() -> None:
    model = _model("lumir")
    moving, fixed = _pair((32, 32, 32))
    before = moving.clone(), fixed.clone()
    with torch.inference_mode():
        model(moving, fixed)
    assert torch.equal(moving, before[0]) and torch.equal(fixed, before[1])


def test_bf16_end_to_end_stays_within_a_tenth_of_a_voxel_and_beats_autocast() -> None:
    model = _model("lumir", channels=8, head_gain=1.0)  # random init: fields of ~3 voxels
    moving, fixed = _pair((64, 64, 64))
    with torch.no_grad():
        fp32 = model(moving, fixed, lean=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(moving, fixed)
            autocast = model(moving, fixed, lean=False)
    assert bf16.dtype == torch.float32
    err, autocast_err = (bf16 - fp32).abs().max(), (autocast - fp32).abs().max()
    assert 0 < err <= 0.1
    # float32 statistics and a float32 velocity head: closer to fp32 than autocast around each op.
    assert err < autocast_err


def test_gradients_take_the_plain_path_under_training_autocast() -> None:
    model = _model("lumir")
    moving, fixed = _pair((32, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_pyramid(moving, fixed)
        disp = model(moving, fixed)
    assert disp.requires_grad and out.disps[0].requires_grad
    torch.testing.assert_close(disp, out.disps[0], rtol=0, atol=0)
    out.disps[0].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())


def test_input_scale_model_runs_lean_on_the_resampled_pair() -> None:
    model = _model("abdomen")
    moving, fixed = _pair((64, 64, 64))
    with torch.no_grad():
        pyramid = model.forward_pyramid(resize(moving, size=(32, 32, 32)), resize(fixed, size=(32, 32, 32)))
        got = lean.forward_lean(model, resize(moving, size=(32, 32, 32)), resize(fixed, size=(32, 32, 32)))
    torch.testing.assert_close(got, pyramid.disps[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("cin", "cout", "size", "padding", "stride"), [
    (8, 8, (20, 28, 24), (1, 1, 1), (1, 1, 1)),  # the shape PyTorch sends to its reference kernel
    (1, 8, (17, 9, 12), (1, 1, 1), (1, 1, 1)), (4, 6, (12, 10, 14), (2, 2, 2), (2, 2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_conv3d_equals_torch_conv3d(cin: int, cout: int, size: tuple[int, int, int],
                                           padding: tuple[int, int, int], stride: tuple[int, int, int],
                                           dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(cin * 100 + cout)
    x = torch.randn(1, cin, *size, generator=gen).to(dtype)
    w = torch.randn(cout, cin, 5 if padding[0] == 2 else 3, 5 if padding[0] == 2 else 3,
                    5 if padding[0] == 2 else 3, generator=gen).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype)
    ours = lean.conv3d(x, w, b, stride, padding)
    ref = F.conv3d(x.float(), w.float(), b.float(), stride, padding)
    tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cin", "cout", "pad_in", "pad_out"), [(1, 8, None, None), (6, 5, None, 16), (5, 3, 8, None)])
def test_conv_with_zero_padded_channels_equals_the_layer(cin: int, cout: int, pad_in: int | None,
                                                         pad_out: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(cin)
    conv = torch.nn.Conv3d(cin, cout, 3, 1, 1).requires_grad_(False)
    x = torch.randn(1, cin, 9, 7, 8)
    ref = conv(x)
    if pad_in:  # the caller carries the extra (zero) input channels
        x = torch.cat([x, torch.zeros(1, pad_in - cin, 9, 7, 8)], 1)
    got = lean._conv(conv, x.to(dtype).contiguous(memory_format=CL), in_channels=pad_in, out_channels=pad_out)
    assert got.is_contiguous(memory_format=CL) and got.dtype == dtype
    assert got.shape[1] == (pad_out or cout)
    tol = 1e-5 if dtype == torch.float32 else 0.02 * ref.abs().max().item()
    torch.testing.assert_close(got[:, :cout].float(), ref, rtol=0, atol=tol)
    assert torch.equal(got[:, cout:], torch.zeros_like(got[:, cout:]))  # padded outputs are exactly 0


def test_backends_cached_sampler_warps_features_as_rows(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from eoir_cli import open_backend, run_pair
    from eoir_cli.checkpoint import save_checkpoint

    calls = []
    real = lean.sample_rows
    monkeypatch.setattr(lean, "sample_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    moving, fixed = _pair((32, 32, 32))
    backend = open_backend(str(save_checkpoint(tmp_path / "m.pt", _model("lumir"))), device="cpu")
    disp = run_pair(backend, moving[0, 0].numpy(), fixed[0, 0].numpy())
    assert len(calls) == 4  # one warp per level below the coarsest
    with torch.no_grad():
        plain = _model("lumir")(moving, fixed, lean=False)
    torch.testing.assert_close(torch.from_numpy(disp)[None], plain, rtol=0, atol=1e-3)
