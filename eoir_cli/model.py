"""The EOIR network (Encoder-Only Image Registration): the one model definition in eoir.

Training, evaluation, registration, ONNX export and the deployment runtime all build this
module; export only changes the *sampler* it is constructed with (see :mod:`eoir_cli.spatial`).
Displacements are in voxels, channel c along array axis c (the convention in ``spatial``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from eoir_cli.config import ModelConfig
from eoir_cli.errors import InputError
from eoir_cli.spatial import Sampler, check_size, compose, integrate, resize, resize_disp, warp


class LargeKernelBlock(nn.Module):
    """Sum of 3×3×3, k×k×k and 1×1×1 conv+IN branches (+ identity when in == out), then PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.residual = in_channels == out_channels
        self.regular = nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, 1, 1), nn.InstanceNorm3d(out_channels))
        self.large = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size, 1, kernel_size // 2), nn.InstanceNorm3d(out_channels)
        )
        self.one = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, 1, 0), nn.InstanceNorm3d(out_channels))
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.regular(x) + self.large(x) + self.one(x)
        return self.prelu(out + x if self.residual else out)


class EncoderBlock(nn.Module):
    """``Conv3d(k=3) -> InstanceNorm3d -> PReLU``, or a :class:`LargeKernelBlock` for k > 3."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size == 3:
            self.layer: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 3, 1, 1), nn.InstanceNorm3d(out_channels), nn.PReLU()
            )
        else:
            self.layer = LargeKernelBlock(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class FlowEstimator(nn.Module):
    """Velocity from the sum/difference of fixed and (warped) moving features at one level."""

    def __init__(self, channels: int, large_kernel: int = 0) -> None:
        super().__init__()
        width = 2 * channels
        first: nn.Module = (
            LargeKernelBlock(width, width, large_kernel) if large_kernel else nn.Conv3d(width, width, 3, 1, 1)
        )
        # 27 = (2k+1)^3 with k = 1, as in the original code.
        self.features = nn.Sequential(first, nn.ReLU(), nn.Conv3d(width, 27, 3, 1, 1), nn.ReLU())
        self.to_velocity = nn.Conv3d(27, 3, 3, 1, 1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.to_velocity(self.features(torch.cat((fixed + moving, fixed - moving), dim=1)))


@dataclass
class PyramidOutput:
    """Per-level outputs, index 0 = finest level. All fields in voxels of their own level."""

    velocities: list[torch.Tensor]
    disps: list[torch.Tensor]


class EOIR(nn.Module):
    """Encoder-only image registration network.

    Args:
        config: the architecture (see :class:`eoir_cli.config.ModelConfig`).
        sampler: how every warp inside the network samples (``"torch"`` = ``grid_sample``,
            ``"gather"`` = no GridSample op, or a callable); weights are independent of it.

    ``forward(moving, fixed)`` takes ``(N, 1, D, H, W)`` images with intensities in [0, 1] and
    returns the level-0 displacement ``(N, 3, D, H, W)`` in voxels, on the fixed grid, such that
    ``warp(moving, disp)`` is aligned to ``fixed``.
    """

    def __init__(self, config: ModelConfig | None = None, sampler: Sampler = "torch") -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.sampler = sampler
        c, k = self.config.channels, self.config.large_kernel
        blocks = [EncoderBlock(1, c), EncoderBlock(c, 2 * c), EncoderBlock(2 * c, c)]
        if k:
            blocks.insert(2, EncoderBlock(2 * c, 2 * c, k))
        self.encoder = nn.Sequential(*blocks)
        self.estimators = nn.ModuleList(FlowEstimator(c, k) for _ in range(self.config.levels))

    def _upsample(self, disp: torch.Tensor) -> torch.Tensor:
        factors = self.config.level_factors
        up = resize(disp, scale=[float(f) for f in factors])
        if len(set(factors)) == 1:
            return up * float(factors[0])
        return up * torch.tensor(factors, dtype=disp.dtype, device=disp.device).view(1, 3, 1, 1, 1)

    def forward_pyramid(self, moving: torch.Tensor, fixed: torch.Tensor, graph: bool = False) -> PyramidOutput:
        """Run the network at the given (network-scale) size and return every level.

        With ``feature_halving`` the finest level is at half the input size. ``graph=True`` is the
        form traced for export: each image through the encoder on its own, so a runtime holds one
        image's full-resolution activations at a time (the batch of two doubles the encoder's peak);
        same result to float rounding.
        """
        if graph:
            moving_features, fixed_features = self.encoder(moving), self.encoder(fixed)
        else:
            features = self.encoder(torch.cat([moving, fixed], 0))
            moving_features, fixed_features = features.chunk(2, dim=0)
        xs, ys = [moving_features], [fixed_features]
        down = [1.0 / f for f in self.config.level_factors]
        if self.config.feature_halving:
            xs[0], ys[0] = resize(xs[0], scale=down), resize(ys[0], scale=down)
        for _ in range(1, self.config.levels):
            xs.append(resize(xs[-1], scale=down))
            ys.append(resize(ys[-1], scale=down))

        levels = self.config.levels
        velocities: list[torch.Tensor] = [None] * levels  # type: ignore[list-item]
        disps: list[torch.Tensor] = [None] * levels  # type: ignore[list-item]
        up = None
        # Under autocast the geometry stays fp32: a bf16 sampling position is off by up to 0.25 voxel at
        # index 32-64 and 1 voxel at ~200, and squaring compounds it (bf16 training hit NaN at 32^3).
        device_type = moving.device.type
        autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)  # not on "meta"
        fp32 = torch.autocast(device_type, enabled=False) if autocast else nullcontext()
        for level in reversed(range(levels)):
            if up is None:
                moving_features = xs[level]
            else:
                with fp32:
                    moving_features = warp(xs[level].float() if autocast else xs[level], up, self.sampler)
            velocity = self.estimators[level](moving_features, ys[level])
            if autocast:
                velocity = velocity.float()
            with fp32:
                disp = integrate(velocity, self.config.int_steps, self.sampler)
                if up is not None:
                    disp = compose(up, disp, self.sampler)
                if level > 0:
                    up = self._upsample(disp)
            velocities[level], disps[level] = velocity, disp
        return PyramidOutput(velocities, disps)

    def network_size(self, size: tuple[int, ...]) -> tuple[int, int, int]:
        """Spatial size the pyramid runs at for an input of ``size`` (after ``input_scale``)."""
        s = self.config.input_scale
        return tuple(int(round(n * s)) for n in size)  # type: ignore[return-value]

    def check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise ``ValueError`` ("expected ..., got ...") for inputs the network cannot take."""
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.dim() != 5 or t.shape[1] != 1:
                raise InputError(f"{name}: expected (N, 1, D, H, W), got shape {tuple(t.shape)}")
        if moving.shape != fixed.shape:
            raise InputError(f"moving and fixed differ: {tuple(moving.shape)} vs {tuple(fixed.shape)}")
        size = tuple(moving.shape[2:])
        net = self.network_size(size)
        if self.config.input_scale != 1.0 and any(abs(n * self.config.input_scale - m) > 1e-6
                                                   for n, m in zip(size, net, strict=False)):
            raise InputError(f"input size {size}: expected sizes that input_scale "
                             f"{self.config.input_scale} maps to whole numbers")
        check_size(net, self.config.size_multiple(), "network input")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, lean: bool | None = None) -> torch.Tensor:
        """Level-0 displacement ``(N, 3, D, H, W)`` float32, voxels (see the class docstring).

        Args:
            moving, fixed: ``(N, 1, D, H, W)`` images in [0, 1].
            lean: ``None`` (default) runs :func:`eoir_cli.lean.forward_lean` whenever gradients are
                off and nothing is tracing or exporting: the same network in about half the memory,
                channels_last, in-place norms, and under CPU/CUDA autocast features kept in the
                autocast dtype end to end (displacements stay float32). ``False`` always runs
                :meth:`forward_pyramid` (the original code's arithmetic, as training and export see it).
        """
        traced = _tracing(moving)
        if not traced:
            self.check_inputs(moving, fixed)
        size = moving.shape[2:]
        if self.config.input_scale != 1.0:
            net = self.network_size(tuple(size))
            moving, fixed = resize(moving, size=net), resize(fixed, size=net)
        if lean is None:
            lean = not (traced or torch.is_grad_enabled()) and moving.device.type in ("cpu", "cuda")
        if not lean:
            disp = self.forward_pyramid(moving, fixed, graph=traced).disps[0]
        else:
            from eoir_cli.lean import forward_lean

            device = moving.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
            with torch.autocast(device, enabled=False):
                disp = forward_lean(self, moving.float(), fixed.float(), dtype=dtype)
        if self.config.feature_halving:
            disp = self._upsample(disp)
        if self.config.input_scale != 1.0:
            disp = resize_disp(disp, tuple(size))
        return disp


def _tracing(x: torch.Tensor) -> bool:
    """True while jit-tracing, compiling or exporting (fake tensors): the traced graph is the plain one."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting() or is_fake(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
