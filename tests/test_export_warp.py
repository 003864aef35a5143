"""The ONNX translations of ``eoir::warp`` against ``sample_torch``, on random fields (hypothesis).

A single warp is exported once per (sampler, mode) on a non-cubic grid, so a swapped axis or a
wrong stride cannot cancel out; hypothesis then draws displacements, including far outside the
volume (zeros padding, int32 clamping).
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.spatial import sample_torch
from export.onnx_export import _define_warp_op, _onnx_translations, _quiet_exporter, clean_graph, export_sampler

IMAGE = (1, 2, 5, 6, 7)  # N, C, D, H, W: every axis a different length


class _Warp(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, image: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return export_sampler(image, disp, self.mode)


@functools.cache
def _session(sampler: str, mode: str) -> ort.InferenceSession:
    _define_warp_op()
    image, disp = torch.rand(IMAGE), torch.zeros(1, 3, *IMAGE[2:])
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(_Warp(mode).eval(), (image, disp), dynamo=True, opset_version=20,
                                    input_names=["image", "disp"], output_names=["out"],
                                    custom_translation_table=_onnx_translations(sampler), optimize=False)
    proto = clean_graph(program.model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _check(sampler: str, mode: str, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(IMAGE, generator=gen)
    disp = torch.randn(1, 3, *IMAGE[2:], generator=gen) * scale
    if mode == "nearest":
        # Keep samples away from exact .5 ties, where rounding conventions may legitimately differ.
        disp = torch.where((disp - disp.floor() - 0.5).abs() < 1e-3, disp + 0.01, disp)
    expected = sample_torch(image, disp, mode).numpy()
    got = _session(sampler, mode).run(None, {"image": image.numpy(), "disp": disp.numpy()})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["gather", "native"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.3, 2.0, 50.0, 1e6]))
def test_onnx_warp_matches_grid_sample(sampler, mode, seed, scale):
    _check(sampler, mode, seed, scale)


def test_single_axis_shift_moves_only_that_axis():
    # disp = +1 voxel along array axis 2 (W) only: out[d, h, w] = image[d, h, w + 1], zero in the last column.
    image = torch.arange(np.prod(IMAGE), dtype=torch.float32).reshape(IMAGE)
    disp = torch.zeros(1, 3, *IMAGE[2:])
    disp[:, 2] = 1.0
    out = _session("gather", "bilinear").run(None, {"image": image.numpy(), "disp": disp.numpy()})[0]
    np.testing.assert_array_equal(out[..., :-1], image.numpy()[..., 1:])
    assert (out[..., -1] == 0).all()
