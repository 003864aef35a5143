"""Test oracle: an independent re-implementation of the ORIGINAL EOIR PyTorch module.

Written from ``official_checkpoint.md`` and ``EOIR.md`` only, in the original code's style (module
names, persistent ``grid`` buffers built at a fixed image size, ``grid_sample`` with normalised
coordinates), so that its ``state_dict`` has exactly the original keys. It deliberately does not
import ``eoir_cli`` so it can catch mistakes in ``eoir_cli.model`` and the checkpoint key mapping.
Plain 3×3×3 network only (the published LUMIR configuration).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvInsBlock(nn.Module):
    """``layer = Sequential(Conv3d(k=3), InstanceNorm3d, PReLU)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, 1, 1), nn.InstanceNorm3d(out_channels), nn.PReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class SpatialTransformer(nn.Module):
    """VoxelMorph-style transformer with a persistent voxel-index grid of a fixed size."""

    def __init__(self, size: Sequence[int], mode: str = "bilinear") -> None:
        super().__init__()
        self.mode = mode
        vectors = [torch.arange(0, s) for s in size]
        grids = torch.meshgrid(vectors, indexing="ij")
        grid = torch.stack(grids).unsqueeze(0).type(torch.FloatTensor)
        self.register_buffer("grid", grid)

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        new_locs = self.grid + flow
        shape = flow.shape[2:]
        new_locs = torch.stack([2 * (new_locs[:, i, ...] / (shape[i] - 1) - 0.5) for i in range(3)], dim=1)
        new_locs = new_locs.permute(0, 2, 3, 4, 1)
        new_locs = new_locs[..., [2, 1, 0]]
        return F.grid_sample(src, new_locs, align_corners=True, mode=self.mode)


class VecInt(nn.Module):
    """Scaling and squaring with its own transformer."""

    def __init__(self, size: Sequence[int], nsteps: int = 7) -> None:
        super().__init__()
        self.nsteps = nsteps
        self.scale = 1.0 / (2**nsteps)
        self.transformer = SpatialTransformer(size)

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        vec = vec * self.scale
        for _ in range(self.nsteps):
            vec = vec + self.transformer(vec, vec)
        return vec


class DispWarp(nn.Module):
    """Flow estimator: sum/difference of fixed (y) and moving (x) features -> velocity."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.disp_field_fea = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 3, 1, 1),
            nn.ReLU(),
            nn.Conv3d(in_channels, 27, 3, 1, 1),
            nn.ReLU(),
        )
        self.get_flow = nn.Conv3d(27, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.get_flow(self.disp_field_fea(torch.cat((y + x, y - x), dim=1)))


class OriginalEOIR(nn.Module):
    """The plain EOIR network of the original code (5 levels, grids built at ``img_size``)."""

    def __init__(self, img_size: Sequence[int], start_channel: int = 32, int_steps: int = 7) -> None:
        super().__init__()
        c = start_channel
        self.img_size = tuple(img_size)
        self.simple_encoder = nn.Sequential(ConvInsBlock(1, c), ConvInsBlock(c, 2 * c), ConvInsBlock(2 * c, c))
        sizes = [[s // 2**i for s in img_size] for i in range(5)]
        self.transformers = nn.ModuleList([SpatialTransformer(s) for s in sizes])
        self.integrates = nn.ModuleList([VecInt(s, int_steps) for s in sizes])
        self.disp_warp_4 = DispWarp(2 * c)
        self.disp_warp_3 = DispWarp(2 * c)
        self.disp_warp_2 = DispWarp(2 * c)
        self.disp_warp_1 = DispWarp(2 * c)
        self.disp_warp_0 = DispWarp(2 * c)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        feats = self.simple_encoder(torch.cat((moving, fixed), dim=0))
        x, y = torch.split(feats, moving.shape[0], dim=0)
        xs, ys = [x], [y]
        for _ in range(4):
            xs.append(F.interpolate(xs[-1], scale_factor=0.5, mode="trilinear", align_corners=True))
            ys.append(F.interpolate(ys[-1], scale_factor=0.5, mode="trilinear", align_corners=True))
        estimators = [self.disp_warp_0, self.disp_warp_1, self.disp_warp_2, self.disp_warp_3, self.disp_warp_4]
        up_flow = None
        flow = None
        for i in range(4, -1, -1):
            x_i = xs[i] if up_flow is None else self.transformers[i](xs[i], up_flow)
            velocity = estimators[i](x_i, ys[i])
            flow = self.integrates[i](velocity)
            if up_flow is not None:
                flow = flow + self.transformers[i](up_flow, flow)
            if i > 0:
                up_flow = self.up(flow) * 2
        return flow
