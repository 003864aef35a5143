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

from eoir_cli.spatial import Sampler, SamplerFn, get_sampler, integrate, resize, sample_torch_cached

# Slabs of at most this many bytes (float32) keep each normalisation pass inside the L2/L3 caches on a
# CPU; on a GPU, where each slab is a kernel launch, they only bound the float32 temporary.
_SLAB_BYTES = 8 * 2**20
_SLAB_BYTES_GPU = 512 * 2**20
# Convolutions over 32 planes or more run in slabs of at most this size, at least 8 of them (see _conv).
_CONV_SLAB_BYTES = 96 * 2**20
# Channels warped per grid_sample call when features are stored in a reduced precision (each chunk is
# upcast to float32, so this bounds the temporary to chunk/C of the feature map).
_WARP_CHUNK = 8


def _slabs(x: torch.Tensor) -> list[slice]:
    """Slices along dim 2 whose float32 size stays below ``_SLAB_BYTES`` (at least one plane each)."""
    plane = x.shape[0] * x.shape[1] * x.shape[3] * x.shape[4] * 4
    step = max(1, (_SLAB_BYTES if x.device.type == "cpu" else _SLAB_BYTES_GPU) // max(plane, 1))
    return [slice(a, min(a + step, x.shape[2])) for a in range(0, x.shape[2], step)]


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and biased variance of ``x`` ``(N, C, D, H, W)``, in float32.

    Computed slab by slab in float32 and combined pairwise (Chan et al.), so a bfloat16 tensor never
    needs a full float32 copy and the statistics keep float32 accuracy.

    Returns:
        ``(mean, var)``, each ``(N, C, 1, 1, 1)`` float32.
    """
    count = 0
    mean = m2 = None
    for sl in _slabs(x):
        part = x[:, :, sl].float()
        var_s, mean_s = torch.var_mean(part, dim=(2, 3, 4), keepdim=True, correction=0)
        n_s = part.shape[2] * part.shape[3] * part.shape[4]
        var_s, mean_s = var_s.double(), mean_s.double()
        if mean is None:
            mean, m2 = mean_s, var_s * n_s
        else:
            delta = mean_s - mean
            total = count + n_s
            mean = mean + delta * (n_s / total)
            m2 = m2 + var_s * n_s + delta * delta * (count * n_s / total)
        count += n_s
    assert mean is not None and m2 is not None  # a tensor has at least one slab
    return mean.float(), (m2 / count).float()


def instance_norm_(x: torch.Tensor, eps: float = 1e-5, slope: float | None = None) -> torch.Tensor:
    """In-place ``InstanceNorm3d`` (no affine) followed by ``PReLU(slope)`` when ``slope`` is given.

    Equal to ``F.prelu(F.instance_norm(x, eps=eps), slope)`` up to float rounding; the statistics
    are float32 (:func:`instance_stats`), the normalisation runs in float32 per slab and is stored
    back in ``x``'s dtype. Inference only (``x`` is overwritten).
    """
    mean, var = instance_stats(x)
    rstd = (var + eps).rsqrt()
    shift = -mean * rstd
    for sl in _slabs(x):
        part = x[:, :, sl]
        work = part if part.dtype == torch.float32 else part.float()
        work.mul_(rstd).add_(shift)
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


def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (stride 1, 'same' padding) with the weights in ``x``'s dtype, output in channels_last_3d.

    Large inputs are convolved in slabs along dim 2 (each with its halo of ``k // 2`` planes, zeros
    beyond the volume) written into one output: oneDNN's reorder of its input (a copy of the whole
    input for some channel counts) then only ever holds one slab. The weight's layout decides the
    output's for a one-channel input (whose strides fit both layouts), hence channels_last weights.
    """
    weight = conv.weight.to(x.dtype).contiguous(memory_format=torch.channels_last_3d)
    bias = conv.bias.to(x.dtype) if conv.bias is not None else None
    halo = conv.padding[0]
    plane = x.shape[0] * max(x.shape[1], conv.out_channels) * x.shape[3] * x.shape[4] * x.element_size()
    step = max(1, min(_CONV_SLAB_BYTES // max(plane, 1), x.shape[2] // 8))
    if x.shape[2] < 32 or conv.stride != (1, 1, 1) or conv.groups != 1 or conv.dilation != (1, 1, 1):
        return conv3d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    depth = x.shape[2]
    out = torch.empty((x.shape[0], conv.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    padding = (0, conv.padding[1], conv.padding[2])
    for a in range(0, depth, step):
        b = min(a + step, depth)
        lo, hi = max(a - halo, 0), min(b + halo, depth)
        part = x[:, :, lo:hi]
        if lo > a - halo or hi < b + halo:  # zero planes beyond the volume, as the 'same' padding has
            part = F.pad(part, (0, 0, 0, 0, lo - (a - halo), (b + halo) - hi))
        out[:, :, a:b] = conv3d(part, weight, bias, (1, 1, 1), padding)
    return out


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
    h = F.relu_(_conv(second, h))
    return _conv(estimator.to_velocity, h.float())


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
        moving_features = xs[level] if up is None else warp_features(xs[level], up, warp_fn)
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
