"""Inference-only kernels of the EOIR forward pass: the same network in a fraction of the memory, faster.

:meth:`eoir_cli.model.EOIR.forward` runs :func:`forward_lean` whenever gradients are off (``no_grad`` /
``inference_mode``) and nothing is tracing or exporting; training (``forward_pyramid`` with autograd)
never comes here. The weights and the arithmetic are the network's; only the order of evaluation
and the storage differ:

* **channels_last_3d** activations: oneDNN's 3-D convolutions run 1.5–1.7× faster in that layout on
  this CPU (fp32 and bf16) and need no reorder copies.
* **One image at a time** through the encoder, each layer's input freed as soon as its output exists.
* **In-place InstanceNorm + PReLU**, slab by slab along the first spatial axis, with statistics in
  float32 (Chan's pairwise combination of per-slab means and variances) whatever the storage dtype.
* **Low-precision storage end to end** (``dtype=bfloat16``/``float16``): convolutions, norms and
  activations stay in that dtype (no cast around each block); the velocity head, the warps'
  coordinates, the integration and every displacement stay float32 (a bf16 coordinate misplaces a
  sample by up to a voxel at index ~200).
* Each level's features are dropped once the level no longer needs them; the flow estimator's
  input ``cat(f + m, f - m)`` is written into one buffer.

Displacements are in voxels, channel c along array axis c (see :mod:`eoir_cli.spatial`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eoir_cli.spatial import Sampler, SamplerFn, get_sampler, integrate, resize, sample_rows, sample_torch_cached

# Blocks of voxel rows (float32 bytes) that the statistics and the normalisation work through: a block
# stays in the caches on a CPU; on a GPU, where each block is a kernel launch, it only bounds the temporary.
_BLOCK_BYTES = 4 * 2**20
_BLOCK_BYTES_GPU = 512 * 2**20
# Channels warped per grid_sample call when features are stored in a reduced precision (each chunk is
# upcast to float32, so this bounds the temporary to chunk/C of the feature map).
_WARP_CHUNK = 8


def _voxel_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, D, H, W)`` -> a ``(N, D*H*W, C)`` view (no copy for channels_last_3d or NCDHW storage)."""
    return x.permute(0, 2, 3, 4, 1).flatten(1, 3)


def _row_blocks(rows: torch.Tensor) -> list[slice]:
    """Slices of dim 1 of ``(N, V, C)`` rows, each at most ``_BLOCK_BYTES`` in float32 (at least one row)."""
    limit = _BLOCK_BYTES if rows.device.type == "cpu" else _BLOCK_BYTES_GPU
    step = max(1, limit // (4 * rows.shape[0] * rows.shape[2]))
    return [slice(a, min(a + step, rows.shape[1])) for a in range(0, rows.shape[1], step)]


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and biased variance of ``x`` ``(N, C, D, H, W)``, in float32.

    Two passes over the voxels as rows of channels (``_voxel_rows``), a cache-sized block of rows at
    a time: the sums in float32 per block and float64 across blocks, then the squared deviations from
    that mean (no cancellation however large the mean). A bfloat16 tensor never gets a full float32
    copy. ``torch.var_mean`` over the spatial dims of a channels_last tensor reduces along strided
    axes and took ~6x as long (160 vs 25 ms for 64 channels at 80x112x96 on 2 cores).

    Returns:
        ``(mean, var)``, each ``(N, C, 1, 1, 1)`` float32.
    """
    rows = _voxel_rows(x)
    n, count, c = rows.shape
    blocks = _row_blocks(rows)
    total = torch.zeros(n, 1, c, dtype=torch.float64, device=x.device)
    for block in blocks:
        total += torch.sum(rows[:, block], dim=1, keepdim=True, dtype=torch.float32)
    mean = (total / count).float()
    squares = torch.zeros_like(total)
    work = torch.empty((n, blocks[0].stop, c), dtype=torch.float32, device=x.device)
    for block in blocks:
        part = work[:, : block.stop - block.start]
        torch.sub(rows[:, block], mean, out=part)
        squares += torch.linalg.vecdot(part, part, dim=1).unsqueeze(1)
    var = (squares / count).float()
    shape = (n, c, 1, 1, 1)
    return mean.view(shape), var.view(shape)


def instance_norm_(x: torch.Tensor, eps: float = 1e-5, slope: float | None = None) -> torch.Tensor:
    """In-place ``InstanceNorm3d`` (no affine) followed by ``PReLU(slope)`` when ``slope`` is given.

    Equal to ``F.prelu(F.instance_norm(x, eps=eps), slope)`` up to float rounding; the statistics
    are float32 (:func:`instance_stats`), the normalisation ``x * rstd - mean * rstd`` is one float32
    ``addcmul`` per block of voxel rows (a bfloat16 block goes through a reused float32 buffer) and is
    stored back in ``x``'s dtype. Rows of channels make the per-channel factors a broadcast along the
    fastest axis: 64 channels at 80x112x96 normalise in 12 ms instead of 63 ms (bfloat16) through
    channels_last slabs. Inference only (``x`` is overwritten).
    """
    mean, var = instance_stats(x)
    rstd = (var + eps).rsqrt()
    shift = -mean * rstd
    rows = _voxel_rows(x)
    blocks = _row_blocks(rows)
    n, c = rows.shape[0], rows.shape[2]
    rstd, shift = rstd.view(n, 1, c), shift.view(n, 1, c)
    buffer = None if x.dtype == torch.float32 else torch.empty((n, blocks[0].stop, c), device=x.device)
    for block in blocks:
        part = rows[:, block]
        work = part if buffer is None else buffer[:, : block.stop - block.start].copy_(part)
        torch.addcmul(shift, work, rstd, out=work)
        if slope is not None:
            F.leaky_relu_(work, slope)
        if work is not part:
            part.copy_(work)
    return x


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int] = (1, 1, 1), groups: int = 1) -> torch.Tensor:
    """``F.conv3d``, but through oneDNN on a CPU for fp32 and bf16.

    PyTorch's dispatcher sends some fp32 3-D convolutions to its reference kernel
    (``slow_conv3d``), e.g. 8 -> 8 channels at 40×56×48 (the bundled model's finest level): 43 ms
    there against 3.7 ms through oneDNN on this machine's 2 cores; the numbers agree to fp32 rounding.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.enabled
            and torch.backends.mkldnn.is_available() and not needs_grad):
        return torch.mkldnn_convolution(x, weight, bias, list(padding), list(stride), list(dilation), groups)
    return F.conv3d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def _conv(conv: nn.Conv3d, x: torch.Tensor, in_channels: int | None = None,
          out_channels: int | None = None) -> torch.Tensor:
    """``conv(x)`` with the weights in ``x``'s dtype and the output in channels_last_3d, in one call.

    Args:
        conv: the layer (any stride/padding; its weights are not modified).
        x: ``(N, C, D, H, W)`` with C = ``in_channels`` (default ``conv.in_channels``).
        in_channels, out_channels: run the layer with zero input channels appended (``x`` carries
            them) or zero output channels appended (weights and bias 0, so those outputs are 0):
            the same numbers, in shapes oneDNN runs faster.

    A one-channel input is given a zero second channel: oneDNN's kernel for one input channel writes
    NCDHW and reorders it (an output-sized copy) at ~1.3 GB/s, while two channels write channels_last
    directly (49 vs 82 ms for 1 -> 32 at 80x112x96 in float32). A channels_last multi-channel input with
    channels_last weights is convolved without any reorder, so the whole volume is one call (slabs
    with halos, the previous way, cost 10-30 % in copies).
    """
    cin, cout = in_channels or conv.in_channels, out_channels or conv.out_channels
    if x.shape[1] == 1 and cin == 1:
        two = torch.empty((x.shape[0], 2, *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last_3d)
        two[:, :1] = x
        two[:, 1:] = 0
        return _conv(conv, two, 2, out_channels)
    weight = conv.weight.to(x.dtype)
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    if (cout, cin) != weight.shape[:2]:
        padded = weight.new_zeros((cout, cin, *weight.shape[2:]))
        padded[: weight.shape[0], : weight.shape[1]] = weight
        weight = padded
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(cout - bias.shape[0])])
    weight = weight.contiguous(memory_format=torch.channels_last_3d)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    out = conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.contiguous(memory_format=torch.channels_last_3d)


def _slope(prelu: nn.PReLU) -> float:
    if prelu.weight.numel() != 1:
        raise ValueError(f"PReLU: expected one shared slope, got {prelu.weight.numel()} parameters")
    return float(prelu.weight.reshape(()))


def _conv_norm(seq: nn.Sequential, x: torch.Tensor, slope: float | None) -> torch.Tensor:
    """``Sequential(Conv3d, InstanceNorm3d)`` (+ PReLU) in place on the conv output."""
    conv, norm = seq[0], seq[1]
    return instance_norm_(_conv(conv, x), norm.eps, slope)


def large_kernel_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`eoir_cli.model.LargeKernelBlock` with its three branches summed in place."""
    out = _conv_norm(block.regular, x, None)
    out.add_(_conv_norm(block.large, x, None))
    out.add_(_conv_norm(block.one, x, None))
    if block.residual:
        out.add_(x)
    return F.leaky_relu_(out, _slope(block.prelu))


def encoder_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`eoir_cli.model.EncoderBlock` with in-place InstanceNorm + PReLU."""
    layer = block.layer
    if isinstance(layer, nn.Sequential):
        return _conv_norm(layer, x, _slope(layer[2]))
    return large_kernel_block(layer, x)


def encode(encoder: nn.Sequential, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shared encoder on one image batch ``(N, 1, D, H, W)`` -> ``(N, C, D, H, W)`` in ``dtype``, channels_last."""
    x = image.to(dtype).contiguous(memory_format=torch.channels_last_3d)
    for block in encoder:
        x = encoder_block(block, x)  # rebinding frees the previous layer's output
    return x


def warp_features(image: torch.Tensor, disp: torch.Tensor, sampler: SamplerFn) -> torch.Tensor:
    """Pull-back warp of features stored in any dtype; coordinates and interpolation weights in float32.

    Reduced-precision features are upcast a few channels at a time, so the float32 temporary is a
    fraction of the feature map; the result keeps ``image``'s dtype and memory format.
    """
    if image.dtype == disp.dtype:
        return sampler(image, disp, "bilinear")
    out = torch.empty((image.shape[0], image.shape[1], *disp.shape[2:]), dtype=image.dtype, device=image.device)
    out = out.contiguous(memory_format=torch.channels_last_3d)
    for c in range(0, image.shape[1], _WARP_CHUNK):
        part = image[:, c:c + _WARP_CHUNK].to(disp.dtype)
        out[:, c:c + _WARP_CHUNK] = sampler(part, disp, "bilinear")
    return out


def estimate_velocity(estimator: nn.Module, features: list[torch.Tensor]) -> torch.Tensor:
    """:class:`eoir_cli.model.FlowEstimator` on ``cat(fixed + moving, fixed - moving)``; velocity in float32.

    Args:
        estimator: the level's flow estimator.
        features: ``[moving, fixed]`` feature maps; the list is emptied, so (when the caller holds no
            other reference) their memory is released as soon as the concatenated input exists.

    The last conv (27 -> 3 channels, <1 % of the FLOPs) runs in float32, so the velocity, hence every
    displacement, keeps float32 resolution.
    """
    moving, fixed = features
    features.clear()
    n, c = fixed.shape[:2]
    both = torch.empty((n, 2 * c, *fixed.shape[2:]), dtype=fixed.dtype, device=fixed.device,
                       memory_format=torch.channels_last_3d)
    torch.add(fixed, moving, out=both[:, :c])
    torch.sub(fixed, moving, out=both[:, c:])
    del moving, fixed
    first, _, second, _ = estimator.features
    if isinstance(first, nn.Conv3d):
        h = F.relu_(_conv(first, both))
    else:
        h = F.relu_(large_kernel_block(first, both))
    del both
    # 27 hidden channels computed as 32 (5 zero channels): oneDNN's blocked kernels run 32 faster than 27.
    hidden = -(-second.out_channels // 16) * 16
    h = F.relu_(_conv(second, h, out_channels=hidden))
    return _conv(estimator.to_velocity, h.float(), in_channels=hidden)


def forward_lean(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, dtype: torch.dtype = torch.float32,
                 sampler: Sampler | None = None) -> torch.Tensor:
    """The network at its own (network-scale) size: ``(N, 1, D, H, W)`` pair -> level-0 displacement (voxels).

    Same result as ``model.forward_pyramid(moving, fixed).disps[0]`` to float rounding (float32) or
    to reduced-precision rounding of the features (``dtype`` bfloat16/float16). Inference only.

    Args:
        model: the :class:`eoir_cli.model.EOIR` (its weights, config and sampler).
        moving, fixed: ``(N, 1, D, H, W)`` images in [0, 1].
        dtype: storage and compute dtype of convolutions, norms and activations.
        sampler: sampler for the warps (default: the model's; ``"torch"`` becomes the cached-grid
            ``grid_sample``, same convention, fewer passes).

    Returns:
        ``(N, 3, D', H', W')`` float32 displacement in voxels, at the finest level's size.
    """
    config = model.config
    chosen = model.sampler if sampler is None else sampler
    warp_fn = sample_torch_cached if chosen == "torch" else get_sampler(chosen)
    # One CPU pair: feature maps are warped as rows of channels (sample_rows), in their own dtype.
    rows = chosen == "torch" and moving.device.type == "cpu" and moving.shape[0] == 1
    xs = [encode(model.encoder, moving, dtype)]
    ys = [encode(model.encoder, fixed, dtype)]
    down = [1.0 / f for f in config.level_factors]
    if config.feature_halving:
        xs[0], ys[0] = resize(xs[0], scale=down), resize(ys[0], scale=down)
    for _ in range(1, config.levels):
        xs.append(resize(xs[-1], scale=down))
        ys.append(resize(ys[-1], scale=down))
    up = None
    disp = None
    for level in reversed(range(config.levels)):
        if up is None:
            moving_features = xs[level]
        else:
            moving_features = sample_rows(xs[level], up) if rows else warp_features(xs[level], up, warp_fn)
        features = [moving_features, ys[level]]
        xs[level] = ys[level] = moving_features = None  # type: ignore[call-overload]
        velocity = estimate_velocity(model.estimators[level], features)
        disp = integrate(velocity, config.int_steps, warp_fn)
        del velocity
        if up is not None:
            disp.add_(warp_fn(up, disp, "bilinear"))  # compose(up, disp): up sampled along disp
        if level > 0:
            up = model._upsample(disp)
    assert disp is not None  # levels >= 1
    return disp
