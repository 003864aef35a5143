"""Inference-only kernels of the EOIR forward pass: the same network in a fraction of the memory, faster.

:meth:`eoir_cli.model.EOIR.forward` runs :func:`forward_lean` whenever gradients are off (``no_grad`` /
``inference_mode``) and nothing is tracing or exporting; training (``forward_pyramid`` with autograd)
never comes here. The weights and the arithmetic are the network's; only the order of evaluation
and the storage differ:

* **channels_last_3d** activations and weights: oneDNN convolves multi-channel inputs in that layout
  without reordering them (400-460 GFLOP/s fp32, 720-980 bf16 on the 2-core development CPU).
* **One image at a time** through the encoder, each layer's input handed back once its output exists.
* **Convolutions in slabs** of a few planes written into **reused buffers** (:class:`Buffers`): glibc
  maps every large block afresh and faults all its pages in again after each free; the flow
  estimator's 2C -> 2C convolution overwrites its own input.
* **In-place InstanceNorm + PReLU**: statistics accumulated in float32 from each convolution slab while
  it is in the caches (:class:`Moments`), the normalisation one ``addcmul`` per block of voxel rows.
* **Feature warps as rows** (:func:`eoir_cli.spatial.sample_rows`: 8 corner rows per voxel in one
  ``embedding_bag``) written straight into the estimator's input ``cat(f + m, f - m)``.
* **Low-precision storage end to end** (``dtype=bfloat16``/``float16``): convolutions, norms and
  activations stay in that dtype (no cast around each block); the velocity head, the warps'
  coordinates, the integration and every displacement stay float32 (a bf16 coordinate misplaces a
  sample by up to a voxel at index ~200).
* Each level's features are dropped once the level no longer needs them; the squarings of the
  integration reuse one grid and one result buffer per level.

The measurements behind each choice are in README ("Inference path").

Displacements are in voxels, channel c along array axis c (see :mod:`eoir_cli.spatial`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eoir_cli.spatial import Sampler, SamplerFn, get_sampler, integrate, resize, sample_rows, sample_torch_cached

# Blocks of voxel rows (float32 bytes) that the statistics and the normalisation work through: a block
# stays in the caches on a CPU; on a GPU, where each block is a kernel launch, it only bounds the temporary.
_BLOCK_BYTES = 4 * 2**20
_BLOCK_BYTES_GPU = 512 * 2**20
# Convolutions in slabs of at most this many bytes of the wider of input and output (a few planes at
# full size: the slab stays in the caches while it is copied into the output), at least this many slabs.
_CONV_SLAB_BYTES = 24 * 2**20
_CONV_MIN_SLABS = 4
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


class Moments:
    """Per-(sample, channel) mean and biased variance of a map, accumulated block by block in one pass.

    Sums of ``x - shift`` and of its squares, in float32 per block of voxel rows (``_row_blocks``) and
    float64 across blocks, with a per-channel ``shift`` near the mean (the first block's mean unless
    given), so ``var = E[(x - s)^2] - E[x - s]^2`` does not cancel. Blocks can come from several calls
    (a convolution's slabs as they are produced, while they are still in the caches).
    """

    def __init__(self, shift: torch.Tensor | None = None) -> None:
        self.shift = shift
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> Moments:
        """Accumulate ``x`` ``(N, C, d, h, w)`` (any float dtype; channels_last avoids strided reads)."""
        rows = _voxel_rows(x)
        n, _, c = rows.shape
        blocks = _row_blocks(rows)
        work = torch.empty((n, blocks[0].stop, c), dtype=torch.float32, device=x.device)
        for block in blocks:
            part = rows[:, block]
            if self.shift is None:
                self.shift = part.float().mean(dim=1, keepdim=True)
            if self.total is None:
                self.total = torch.zeros((n, 1, c), dtype=torch.float64, device=x.device)
                self.squares = torch.zeros_like(self.total)
            centred = work[:, : block.stop - block.start]
            torch.sub(part, self.shift, out=centred)
            self.total += centred.sum(dim=1, keepdim=True)
            self.squares += torch.linalg.vecdot(centred, centred, dim=1).unsqueeze(1)
            self.count += block.stop - block.start
        return self

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, var)``, each ``(N, C, 1, 1, 1)`` float32."""
        if self.total is None or self.squares is None or self.shift is None:
            raise ValueError("Moments: nothing accumulated")
        offset = self.total / self.count
        mean = (self.shift.double() + offset).float()
        var = (self.squares / self.count - offset * offset).clamp_min(0).float()
        shape = (mean.shape[0], mean.shape[2], 1, 1, 1)
        return mean.reshape(shape), var.reshape(shape)


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and biased variance of ``x`` ``(N, C, D, H, W)``, in float32.

    One pass of :class:`Moments` over the voxels as rows of channels, shifted by the mean of every
    97th row (a sample close to the mean, so nothing cancels however large the mean is). A bfloat16
    tensor never gets a full float32 copy. ``torch.var_mean`` over the spatial dims of a channels_last
    tensor reduces along strided axes and took ~6x as long (160 vs 25 ms for 64 channels at
    80x112x96 on 2 cores, two passes).

    Returns:
        ``(mean, var)``, each ``(N, C, 1, 1, 1)`` float32.
    """
    rows = _voxel_rows(x)
    shift = rows[:, ::97].float().mean(dim=1, keepdim=True)
    return Moments(shift).add(x).result()


def instance_norm_(x: torch.Tensor, eps: float = 1e-5, slope: float | None = None,
                   moments: Moments | None = None) -> torch.Tensor:
    """In-place ``InstanceNorm3d`` (no affine) followed by ``PReLU(slope)`` when ``slope`` is given.

    Equal to ``F.prelu(F.instance_norm(x, eps=eps), slope)`` up to float rounding; the statistics
    are float32 (:func:`instance_stats`), the normalisation ``x * rstd - mean * rstd`` is one float32
    ``addcmul`` per block of voxel rows (a bfloat16 block goes through a reused float32 buffer) and is
    stored back in ``x``'s dtype. Rows of channels make the per-channel factors a broadcast along the
    fastest axis: 64 channels at 80x112x96 normalise in 12 ms instead of 63 ms (bfloat16) through
    channels_last slabs. ``moments``: ``x``'s statistics already accumulated (by the convolution that
    wrote it). Inference only (``x`` is overwritten).
    """
    mean, var = moments.result() if moments is not None else instance_stats(x)
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


class Buffers:
    """Full-size activation buffers given back and taken again within one forward pass.

    glibc serves every block over 32 MB with a fresh mapping and unmaps it when freed, so each new
    full-size activation faults all its pages in again: at 160x224x192, C=32 one float32 forward
    touched 18 GB of fresh pages (4.5 M page faults, 9.4 s of kernel time beside 36 s of user time on
    2 cores). A buffer given back here becomes the next output of the same shape; at most one spare
    per shape is kept, so the peak does not grow. Disabled (every ``take`` a new tensor, ``give`` a
    no-op) where an allocator already caches, e.g. on a GPU.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._spare: dict[tuple, torch.Tensor] = {}
        self._owned: set[int] = set()

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
             memory_format: torch.memory_format = torch.channels_last_3d) -> torch.Tensor:
        """An uninitialised tensor in ``memory_format``: a spare of that shape and format, else a new one."""
        key = (tuple(shape), dtype, device, memory_format)
        spare = self._spare.pop(key, None)
        if spare is not None:
            return spare
        out = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)
        if self.enabled:
            self._owned.add(out.data_ptr())
        return out

    def give(self, *tensors: torch.Tensor) -> None:
        """Hand back tensors taken here whose contents are no longer needed (others are ignored)."""
        for t in tensors:
            if not self.enabled or t.data_ptr() not in self._owned:
                continue
            layout = torch.channels_last_3d if t.dim() == 5 and not t.is_contiguous() else torch.contiguous_format
            key = (tuple(t.shape), t.dtype, t.device, layout)
            if key in self._spare:
                self._owned.discard(t.data_ptr())  # freed with its last reference
            else:
                self._spare[key] = t

    def keep_sizes(self, *sizes: Sequence[int]) -> None:
        """Free the spares whose spatial size is none of ``sizes`` (a pyramid level never visited again)."""
        wanted = {tuple(size) for size in sizes}
        for key in [key for key in self._spare if key[0][2:] not in wanted]:
            self._owned.discard(self._spare.pop(key).data_ptr())


# Where no buffers are given: every take a new tensor, every give a no-op (it holds nothing).
NO_BUFFERS = Buffers(enabled=False)


def _slabbed(conv: nn.Conv3d, x: torch.Tensor, buffers: Buffers) -> bool:
    """Whether :func:`_conv` runs ``conv`` on ``x`` in slabs: a 'same' stride-1 CPU convolution, with buffers."""
    same = conv.padding == tuple(k // 2 for k in conv.kernel_size) and conv.stride == (1, 1, 1)
    return (buffers.enabled and same and conv.dilation == (1, 1, 1) and conv.groups == 1
            and x.device.type == "cpu" and x.shape[2] >= 2 * _CONV_MIN_SLABS)


def _conv(conv: nn.Conv3d, x: torch.Tensor, buffers: Buffers = NO_BUFFERS, *, in_channels: int | None = None,
          out_channels: int | None = None, in_place: bool = False, dtype: torch.dtype | None = None,
          moments: Moments | None = None) -> torch.Tensor:
    """``conv(x)`` computed and returned in ``dtype`` (default ``x``'s), channels_last_3d.

    Args:
        conv: the layer (its weights are not modified).
        x: ``(N, C, D, H, W)`` with C = ``in_channels`` (default ``conv.in_channels``).
        buffers: where the output comes from (see below); disabled ones: one oneDNN call, a new output.
        in_channels, out_channels: run the layer with zero input channels appended (``x`` carries
            them) or zero output channels appended (weights and bias 0, so those outputs are 0):
            the same numbers, in shapes oneDNN runs faster.
        in_place: write the output over ``x`` (same channel count): each slab's result is held until
            no later slab reads the planes it replaces.
        dtype: the weights' and the computation's dtype; in slabs only a slab of ``x`` is converted.
        moments: accumulate the output's statistics (:class:`Moments`), slab by slab while each is
            in the caches (the whole output afterwards when not in slabs).

    A 'same' stride-1 CPU convolution with ``buffers`` runs in slabs of a few planes along dim 2, each
    with its halo (a view; zero planes at the volume's ends), written into a buffer from ``buffers``:
    10-20 % faster than one call that returns a new full-size output (its page faults), e.g. 1.49 vs
    1.72 s for 64 -> 64 at 80x224x192 in float32, the same numbers. A channels_last input with
    channels_last weights is convolved without oneDNN reordering it. A one-channel input is given a
    zero second channel: oneDNN's kernel for one input channel writes NCDHW and reorders it (an
    output-sized copy, ~1.3 GB/s), two channels write channels_last directly (49 vs 82 ms for 1 -> 32
    at 80x112x96 in float32).
    """
    cin, cout = in_channels or conv.in_channels, out_channels or conv.out_channels
    dtype = dtype or x.dtype
    if x.shape[1] == 1 and cin == 1:
        two = buffers.take((x.shape[0], 2, *x.shape[2:]), x.dtype, x.device)
        two[:, :1] = x
        two[:, 1:] = 0
        out = _conv(conv, two, buffers, in_channels=2, out_channels=out_channels, dtype=dtype, moments=moments)
        buffers.give(two)
        return out
    weight = conv.weight.to(dtype)
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    if (cout, cin) != weight.shape[:2]:
        padded = weight.new_zeros((cout, cin, *weight.shape[2:]))
        padded[: weight.shape[0], : weight.shape[1]] = weight
        weight = padded
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(cout - bias.shape[0])])
    weight = weight.contiguous(memory_format=torch.channels_last_3d)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if not _slabbed(conv, x, buffers):
        if in_place:
            raise ValueError("in_place: expected a 'same' stride-1 CPU convolution with buffers")
        out = conv3d(x.to(dtype), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        out = out.contiguous(memory_format=torch.channels_last_3d)
        if moments is not None:
            moments.add(out)
        return out
    if in_place and (cin != cout or dtype != x.dtype):
        raise ValueError(f"in_place: expected as many output as input channels in x's dtype, got {cin} -> {cout}, "
                         f"{x.dtype} -> {dtype}")
    depth, halo = x.shape[2], conv.padding[0]
    plane = x.shape[0] * max(cin, cout) * x.shape[3] * x.shape[4] * x.element_size()
    step = max(1, min(_CONV_SLAB_BYTES // max(plane, 1), depth // _CONV_MIN_SLABS))
    out = x if in_place else buffers.take((x.shape[0], cout, *x.shape[2:]), dtype, x.device)
    padding = (0, conv.padding[1], conv.padding[2])
    pending: list[tuple[int, int, torch.Tensor]] = []
    for a in range(0, depth, step):
        b = min(a + step, depth)
        lo, hi = a - halo, b + halo
        part = x[:, :, max(lo, 0):min(hi, depth)]
        if lo < 0 or hi > depth:  # zero planes beyond the volume, as the 'same' padding has
            part = F.pad(part, (0, 0, 0, 0, max(-lo, 0), max(hi - depth, 0))).contiguous(
                memory_format=torch.channels_last_3d)
        result = conv3d(part.to(dtype), weight, bias, (1, 1, 1), padding)
        if moments is not None:
            moments.add(result)
        if not in_place:
            out[:, :, a:b] = result
            continue
        pending.append((a, b, result))
        while pending and (b == depth or pending[0][1] <= b - halo):  # no later slab reads these planes
            start, stop, done = pending.pop(0)
            out[:, :, start:stop] = done
    return out


def _slope(prelu: nn.PReLU) -> float:
    if prelu.weight.numel() != 1:
        raise ValueError(f"PReLU: expected one shared slope, got {prelu.weight.numel()} parameters")
    return float(prelu.weight.reshape(()))


def _conv_norm(seq: nn.Sequential, x: torch.Tensor, slope: float | None, buffers: Buffers) -> torch.Tensor:
    """``Sequential(Conv3d, InstanceNorm3d)`` (+ PReLU) in place on the conv output."""
    conv, norm = seq[0], seq[1]
    moments = Moments()
    return instance_norm_(_conv(conv, x, buffers, moments=moments), norm.eps, slope, moments)


def large_kernel_block(block: nn.Module, x: torch.Tensor, buffers: Buffers = NO_BUFFERS) -> torch.Tensor:
    """:class:`eoir_cli.model.LargeKernelBlock` with its three branches summed in place."""
    out = _conv_norm(block.regular, x, None, buffers)
    for branch in (block.large, block.one):
        part = _conv_norm(branch, x, None, buffers)
        out.add_(part)
        buffers.give(part)
    if block.residual:
        out.add_(x)
    return F.leaky_relu_(out, _slope(block.prelu))


def encoder_block(block: nn.Module, x: torch.Tensor, buffers: Buffers = NO_BUFFERS) -> torch.Tensor:
    """:class:`eoir_cli.model.EncoderBlock` with in-place InstanceNorm + PReLU."""
    layer = block.layer
    if isinstance(layer, nn.Sequential):
        return _conv_norm(layer, x, _slope(layer[2]), buffers)
    return large_kernel_block(layer, x, buffers)


def encode(encoder: nn.Sequential, image: torch.Tensor, dtype: torch.dtype,
           buffers: Buffers = NO_BUFFERS) -> torch.Tensor:
    """Shared encoder on one image batch ``(N, 1, D, H, W)`` -> ``(N, C, D, H, W)`` in ``dtype``, channels_last."""
    x = image.to(dtype).contiguous(memory_format=torch.channels_last_3d)  # may be the caller's tensor
    for index, block in enumerate(encoder):
        y = encoder_block(block, x, buffers)
        if index > 0:
            buffers.give(x)  # the previous layer's output becomes the next layer's of that shape
        x = y
    return x


def estimator_input(moving: torch.Tensor, fixed: torch.Tensor, up: torch.Tensor | None, sampler: SamplerFn | None,
                    buffers: Buffers) -> torch.Tensor:
    """``cat(fixed + warped, fixed - warped)`` for a flow estimator, with ``warped = warp(moving, up)``.

    Args:
        moving, fixed: ``(N, C, D, H, W)`` feature maps of one level (any float dtype, channels_last).
        up: the coarser levels' displacement ``(N, 3, D, H, W)`` float32 voxels, or None (no warp).
        sampler: the warp for ``up`` (``None``: :func:`eoir_cli.spatial.sample_rows`, one pair on a CPU).
        buffers: the output comes from them.

    Returns:
        ``(N, 2C, D, H, W)`` in the features' dtype, channels_last_3d. The warped moving features are
        written straight into the second half and then replaced by ``fixed - warped``, so no separate
        warped map is held.
    """
    n, c = fixed.shape[:2]
    both = buffers.take((n, 2 * c, *fixed.shape[2:]), fixed.dtype, fixed.device)
    difference = both[:, c:]
    if up is None:
        warped = moving
    elif sampler is None:
        warped = sample_rows(moving, up, out=difference)
    elif moving.dtype == up.dtype:
        warped = difference.copy_(sampler(moving, up, "bilinear"))
    else:  # reduced-precision features upcast a few channels at a time: a small float32 temporary
        for start in range(0, c, _WARP_CHUNK):
            part = moving[:, start:start + _WARP_CHUNK].to(up.dtype)
            difference[:, start:start + _WARP_CHUNK] = sampler(part, up, "bilinear")
        warped = difference
    torch.add(fixed, warped, out=both[:, :c])
    torch.sub(fixed, warped, out=difference)
    return both


def estimate_velocity(estimator: nn.Module, both: torch.Tensor, buffers: Buffers = NO_BUFFERS) -> torch.Tensor:
    """:class:`eoir_cli.model.FlowEstimator` on its input ``cat(fixed + moving, fixed - moving)``; velocity float32.

    Args:
        estimator: the level's flow estimator.
        both: its input (:func:`estimator_input`); overwritten by the first conv of a plain estimator
            (2C -> 2C) when it runs in slabs, and given back to ``buffers``.
        buffers: activation buffers.

    The last conv (27 -> 3 channels, <1 % of the FLOPs) runs in float32, so the velocity, hence every
    displacement, keeps float32 resolution.
    """
    first, _, second, _ = estimator.features
    if isinstance(first, nn.Conv3d):
        in_place = first.in_channels == first.out_channels and _slabbed(first, both, buffers)
        h = F.relu_(_conv(first, both, buffers, in_place=in_place))
    else:
        h = F.relu_(large_kernel_block(first, both, buffers))
    if h is not both:
        buffers.give(both)
    del both
    # 27 hidden channels computed as 32 (5 zero channels): oneDNN's blocked kernels run 32 faster than 27.
    hidden = -(-second.out_channels // 16) * 16
    hidden_features = F.relu_(_conv(second, h, buffers, out_channels=hidden))
    buffers.give(h)
    del h
    # The head converts its input to float32 a slab at a time: no full-size float32 copy of 32 channels.
    velocity = _conv(estimator.to_velocity, hidden_features, buffers, in_channels=hidden, dtype=torch.float32)
    buffers.give(hidden_features)
    return velocity


def forward_lean(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, dtype: torch.dtype = torch.float32,
                 sampler: Sampler | None = None) -> torch.Tensor:
    """The network at its own (network-scale) size: ``(N, 1, D, H, W)`` pair -> level-0 displacement (voxels).

    Same result as ``model.forward_pyramid(moving, fixed).disps[0]`` to float rounding (float32) or
    to reduced-precision rounding of the features (``dtype`` bfloat16/float16). Inference only.

    Args:
        model: the :class:`eoir_cli.model.EOIR` (its weights, config and sampler).
        moving, fixed: ``(N, 1, D, H, W)`` images in [0, 1].
        dtype: storage and compute dtype of convolutions, norms and activations.
        sampler: sampler for the warps (default: the model's). ``"torch"`` (or the cached-grid
            ``grid_sample`` itself): fields through the cached-grid ``grid_sample`` and, for one pair
            on a CPU, feature maps through :func:`eoir_cli.spatial.sample_rows`; same convention.

    Returns:
        ``(N, 3, D', H', W')`` float32 displacement in voxels, at the finest level's size.
    """
    config = model.config
    chosen = model.sampler if sampler is None else sampler
    torch_sampler = chosen == "torch" or chosen is sample_torch_cached  # the backends pass the cached one
    warp_fn = sample_torch_cached if torch_sampler else get_sampler(chosen)
    # One CPU pair: feature maps are warped as rows of channels (sample_rows), in their own dtype.
    rows = torch_sampler and moving.device.type == "cpu" and moving.shape[0] == 1
    buffers = Buffers(enabled=moving.device.type == "cpu")
    xs = [encode(model.encoder, moving, dtype, buffers)]
    ys = [encode(model.encoder, fixed, dtype, buffers)]
    down = [1.0 / f for f in config.level_factors]
    if config.feature_halving:
        xs[0], ys[0] = resize(xs[0], scale=down), resize(ys[0], scale=down)
    for _ in range(1, config.levels):
        xs.append(resize(xs[-1], scale=down))
        ys.append(resize(ys[-1], scale=down))
    up = None
    disp = None
    for level in reversed(range(config.levels)):
        # Spares of other levels go: holding the encoder's 64-channel spare through the coarse levels
        # made the float32 peak at 160x224x192 0.45 GB higher for the 0.4 s its page faults cost.
        buffers.keep_sizes(ys[level].shape[2:])
        both = estimator_input(xs[level], ys[level], up, None if rows else warp_fn, buffers)
        buffers.give(xs[level], ys[level])
        xs[level] = ys[level] = None  # type: ignore[call-overload]
        velocity = estimate_velocity(model.estimators[level], both, buffers)
        del both
        level_warp, reused = warp_fn, ()
        if torch_sampler and buffers.enabled and velocity.shape[0] == 1:  # the squarings reuse two buffers
            size = velocity.shape[2:]
            reused = (buffers.take(velocity.shape, torch.float32, velocity.device, torch.contiguous_format),
                      buffers.take((1, *size, 3), torch.float32, velocity.device, torch.contiguous_format))
            level_warp = functools.partial(sample_torch_cached, out=reused[0], work=reused[1])
        disp = integrate(velocity, config.int_steps, level_warp)
        del velocity
        if up is not None:
            disp.add_(level_warp(up, disp, "bilinear"))  # compose(up, disp): up sampled along disp
        buffers.give(*reused)
        if level > 0:
            up = model._upsample(disp)
    assert disp is not None  # levels >= 1
    return disp
