"""Evaluation metrics as the Learn2Reg / LUMIR challenges compute them (numpy in, floats out).

Conventions:
    * Label images are integer arrays ``(D, H, W)`` on the same grid.
    * A displacement ``disp`` is a numpy array ``(3, D, H, W)`` in **voxels**, channel c along array
      axis c, pull-back on the fixed grid: ``warped(x) = moving(x + disp(x))`` (see
      :mod:`eoir_cli.spatial`).
    * ``spacing`` is the voxel size in mm per array axis; distances are returned in mm.

Choices (documented because the challenge scripts differ in details):
    * Dice: a label absent from both images is skipped. ``labels=None`` means every non-zero label
      present in either image; pass ``labels`` explicitly to count background (LUMIR counts it).
    * HD95: ``max`` over the two directions of the 95th percentile of the distances from the surface
      voxels of one mask to the surface of the other (Euclidean distance transform with spacing).
      A label absent from both images is skipped; a label present in only one gets ``nan`` (as the
      Learn2Reg script does for labels missing from an input), so ``np.nanmean`` ignores it.
    * NDV, %|J|<=0: the interior voxels ``[1:-1]`` on every axis, like the reference
      implementation of Liu et al. 2024 (``digital_diffeomorphism``); the mask is cropped likewise.
    * SDlogJ: standard deviation of ``log(clip(|J|, 1e-9, 1e9))`` over the same interior voxels
      (central differences). The Learn2Reg script adds 3 to ``|J|`` before clipping; we do not, so
      values differ from that script for folded fields but not for smooth ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from eoir_cli.coords import sample_points

# scipy.ndimage is imported inside the functions that use it (HD95, TRE, landmarks, round trips): ~0.2 s
# of start-up that a registration without them does not pay.

_OCTANTS = tuple((a, b, c) for a in (1, -1) for b in (1, -1) for c in (1, -1))


def _check_labels(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"label images: expected equal shapes, got {pred.shape} vs {target.shape}")
    if pred.ndim != 3:
        raise ValueError(f"label images: expected (D, H, W), got shape {pred.shape}")
    return pred, target


def _present_labels(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (a histogram when the values are small and
    non-negative: ~20x faster than ``np.unique``'s sort on a 7 M-voxel label map)."""
    if labels.size and labels.dtype.kind in "iub":
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 0 and hi < 1 << 20:
            return np.flatnonzero(np.bincount(labels.ravel(), minlength=hi + 1))
    return np.unique(labels)


def scored_labels(fixed_seg: np.ndarray, moving_seg: np.ndarray, labels: Iterable[int] | None = None) -> list[int]:
    """The label set a registration is scored on (the one rule of ``register``, batches, ``test`` and ``demo``).

    ``labels`` when given (``--labels``, or the manifest's ``labels_eval`` that the caller passes in),
    else every non-zero value present in the fixed or the moving label map.
    """
    return _label_list([fixed_seg, moving_seg], labels)


def _label_list(maps: Sequence[np.ndarray], labels: Iterable[int] | None) -> list[int]:
    """``labels``, or every non-zero value present in any of the label ``maps``."""
    if labels is not None:
        return [int(v) for v in labels]
    values = functools.reduce(np.union1d, [_present_labels(m) for m in maps])
    return [int(v) for v in values if v != 0]


def _label_index(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of every voxel's label in sorted ``values``; ``len(values)`` for other labels."""
    k = len(values)
    flat = labels.ravel()
    if flat.size and flat.dtype.kind in "iub":
        lo, hi = int(flat.min()), int(flat.max())
        if lo >= 0 and hi < 1 << 20:  # a lookup table: one gather instead of a binary search per voxel
            lut = np.full(hi + 1, k, dtype=np.intp)
            inside = values[(values >= 0) & (values <= hi)]
            lut[inside] = np.searchsorted(values, inside)
            return lut[flat]
    if k == 0:
        return np.zeros(flat.shape, dtype=np.intp)
    pos = np.searchsorted(values, flat)
    pos[pos == k] = 0
    return np.where(values[pos] == flat, pos, k)


def _check_disp(disp: np.ndarray) -> np.ndarray:
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"disp: expected (3, D, H, W) in voxels, got shape {disp.shape}")
    return disp.astype(np.float64, copy=False)


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice ``2|P∩T| / (|P| + |T|)`` per label; labels absent from both images are skipped.

    Args:
        pred: ``(D, H, W)`` integer labels (e.g. warped moving labels).
        target: ``(D, H, W)`` integer labels (fixed labels).
        labels: label values to score; ``None`` = every non-zero value in either image.

    Returns:
        ``{label: dice in [0, 1]}``.
    """
    return dice_per_label_each([pred], target, labels)[0]


def dice_per_label_each(preds: Sequence[np.ndarray], target: np.ndarray,
                        labels: Iterable[int] | None = None) -> list[dict[int, float]]:
    """:func:`dice_per_label` of several label maps against one ``target`` (e.g. before and after
    registration), the target's label positions computed once."""
    checked = [_check_labels(pred, target) for pred in preds]
    if not checked:
        return []
    target = checked[0][1]
    wanted = _label_list([target, *(pred for pred, _ in checked)], labels)
    # One pass over the volume for all labels: the joint histogram of label positions (pred x
    # target) instead of three full-volume comparisons per label; its margins are the label
    # volumes, its diagonal the overlaps.
    values = np.unique(np.asarray(wanted, dtype=np.int64))
    k = len(values)
    pos_t = _label_index(target, values)
    results = []
    for pred, _ in checked:
        pos_p = _label_index(pred, values)
        pos_p *= k + 1
        pos_p += pos_t
        joint = np.bincount(pos_p, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        count_p, count_t, both = joint.sum(axis=1), joint.sum(axis=0), np.diagonal(joint)
        out: dict[int, float] = {}
        for label in wanted:
            i = int(np.searchsorted(values, label))
            total = int(count_p[i]) + int(count_t[i])
            if total:
                out[label] = 2.0 * float(both[i]) / total
        results.append(out)
    return results


def mean_dice(pred: np.ndarray, target: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` (``nan`` when no label is present)."""
    values = list(dice_per_label(pred, target, labels).values())
    return float(np.mean(values)) if values else float("nan")


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # Border voxels of the mask (6-connected erosion); a mask touching the array edge keeps its edge.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_per_label(
    pred: np.ndarray,
    target: np.ndarray,
    labels: Iterable[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label, in mm.

    For each direction, the distances from every surface voxel of one mask to the nearest surface
    voxel of the other (Euclidean, ``spacing`` applied); HD95 = max of the two 95th percentiles.

    Args:
        pred: ``(D, H, W)`` integer labels.
        target: ``(D, H, W)`` integer labels.
        labels: label values; ``None`` = every non-zero value in either image.
        spacing: voxel size in mm per array axis.

    Returns:
        ``{label: hd95 in mm}``; labels absent from both are skipped, labels present in only one
        image map to ``nan``.
    """
    from scipy import ndimage

    pred, target = _check_labels(pred, target)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing: expected 3 positive values in mm, got {spacing}")
    out: dict[int, float] = {}
    for label in _label_list([pred, target], labels):
        p, t = pred == label, target == label
        has_p, has_t = bool(p.any()), bool(t.any())
        if not has_p and not has_t:
            continue
        if not (has_p and has_t):
            out[label] = float("nan")
            continue
        # Work inside the union's bounding box (+1 voxel): every surface voxel of both masks lies in
        # it, so the distances are exact, and the two distance transforms cost the box, not the volume.
        box = _bounding_box(p | t, pred.shape)
        p, t = p[box], t[box]
        sp, st = _surface(p), _surface(t)
        to_t = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
        to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
        out[label] = float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return out


def _bounding_box(mask: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, grown by one voxel within ``shape``."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, shape[axis])))
    return tuple(box)


def _det3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Determinant of the 3×3 matrices with rows ``a``, ``b``, ``c`` (each ``(3, ...)``)."""
    return (a[0] * (b[1] * c[2] - b[2] * c[1])
            - a[1] * (b[0] * c[2] - b[2] * c[0])
            + a[2] * (b[0] * c[1] - b[1] * c[0]))


def _shifted(trans: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """``trans[:, v + offset]`` for every interior voxel v (``offset`` entries in {-1, 0, 1})."""
    d, h, w = trans.shape[1:]
    i, j, k = offset
    return trans[:, 1 + i:d - 1 + i, 1 + j:h - 1 + j, 1 + k:w - 1 + k]


def _deformation(disp: np.ndarray) -> np.ndarray:
    disp = _check_disp(disp)
    if min(disp.shape[1:]) < 3:
        raise ValueError(f"disp: expected at least 3 voxels per axis, got shape {disp.shape}")
    from eoir_cli.coords import index_grid

    return index_grid(disp.shape[1:], np.float64) + disp


def _interior_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(tuple(s - 2 for s in shape), dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask: expected shape {shape} (the field's grid), got {mask.shape}")
    return mask[1:-1, 1:-1, 1:-1] > 0


def tetrahedra_determinants(disp: np.ndarray) -> list[np.ndarray]:
    """The 10 tetrahedron Jacobian determinants of Liu et al. 2024 at every interior voxel.

    Eight one-sided ("octant") determinants, one per choice of forward/backward difference on each
    axis (the corner tetrahedra of the 8 cubes around a voxel), and the two central tetrahedra of
    the cubes ``[v-1, v]`` (vertices v, v-e0-e1, v-e0-e2, v-e1-e2) and ``[v, v+1]`` (vertices v,
    v+e0+e1, v+e1+e2, v+e0+e2). Each value is 6× the signed volume of the deformed tetrahedron in
    voxel³ (1 for a corner tetrahedron and 2 for a central one under the identity).

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels.

    Returns:
        10 arrays ``(D-2, H-2, W-2)``.
    """
    trans = _deformation(disp)
    centre = _shifted(trans, (0, 0, 0))
    eye = np.eye(3, dtype=int)
    dets = []
    for signs in _OCTANTS:
        # Forward difference T(v+e) - T(v) or backward T(v) - T(v-e): both +e under the identity.
        rows = [(_shifted(trans, s * eye[a]) - centre) * s for a, s in enumerate(signs)]
        dets.append(_det3(*rows))
    for sign in (-1, 1):
        rows = [_shifted(trans, sign * (eye[a] + eye[b])) - centre for a, b in ((0, 1), (0, 2), (1, 2))]
        if sign == 1:  # v+e0+e1, v+e1+e2, v+e0+e2: the reference order, identity det 2
            rows = [rows[0], rows[2], rows[1]]
        dets.append(_det3(*rows))
    return dets


def ndv(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Non-diffeomorphic volume (Liu et al. 2024, "digital diffeomorphism"), percent of the mask.

    Sum over interior voxels of the negative signed volumes of the 10 tetrahedra of
    :func:`tetrahedra_determinants` (``-min(det, 0) / 6``), halved because the two five-tetrahedra
    splits of each cube are averaged, divided by the number of interior mask voxels, × 100.

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels.
        mask: optional ``(D, H, W)`` mask (non-zero = inside); default the whole volume.

    Returns:
        NDV in percent (0 for a diffeomorphic field).
    """
    dets = tetrahedra_determinants(disp)
    inside = _interior_mask(mask, tuple(disp.shape[1:]))
    total = int(inside.sum())
    if total == 0:
        raise ValueError("mask: expected at least one interior voxel inside the mask, got none")
    volume = sum(float((-0.5 * np.minimum(d, 0.0) / 6.0)[inside].sum()) for d in dets)
    return 100.0 * volume / total


def _central_jacobian_det(disp: np.ndarray) -> np.ndarray:
    """Central-difference Jacobian determinant of ``x + disp(x)`` at the interior voxels."""
    trans = _deformation(disp)
    eye = np.eye(3, dtype=int)
    rows = [0.5 * (_shifted(trans, eye[a]) - _shifted(trans, -eye[a])) for a in range(3)]
    return _det3(*rows)


def _interior_jacobian_det(disp: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Central-difference ``|J|`` at the interior (mask) voxels, flattened."""
    det = _central_jacobian_det(disp)
    inside = _interior_mask(mask, tuple(disp.shape[1:]))
    if not inside.any():
        raise ValueError("mask: expected at least one interior voxel inside the mask, got none")
    return det[inside]


def jacobian_nonpositive_percent(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Percentage of interior (mask) voxels whose central-difference ``|J|`` is ``<= 0``.

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels.
        mask: optional ``(D, H, W)`` mask.
    """
    det = _interior_jacobian_det(disp, mask)
    return 100.0 * float((det <= 0).sum()) / float(det.size)


def sdlogj(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of ``log(clip(|J|, 1e-9, 1e9))`` over the interior (mask) voxels.

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels.
        mask: optional ``(D, H, W)`` mask.
    """
    det = _interior_jacobian_det(disp, mask)
    return float(np.log(np.clip(det, 1e-9, 1e9)).std())


def field_metrics(disp: np.ndarray, mask: np.ndarray | None = None, linear: np.ndarray | None = None,
                  slab: int = 8) -> dict[str, float]:
    """Regularity of a displacement (voxels): ``ndv_percent``, ``jac_nonpos_percent``, ``sdlogj``.

    The same three numbers as :func:`ndv`, :func:`jacobian_nonpositive_percent` and :func:`sdlogj`
    in one pass, a slab of ``slab`` planes at a time in float32 torch (differences of ``disp``, not
    of ``x + disp``, so float32 loses nothing that matters: ~1e-6 voxel on a difference). On the
    LUMIR grid this takes a fraction of a second where the three float64 reference functions take
    ~5 s and ~2 GB of temporaries.

    Args:
        disp: ``(3, D, H, W)`` displacement in voxels.
        mask: optional ``(D, H, W)`` mask (non-zero = inside).
        linear: optional ``(3, 3)`` matrix ``L``: the metrics are those of the map
            ``x -> L·(x + disp(x)) + t`` (any ``t``), e.g. the whole transform when ``disp`` is the
            deformable part and ``L`` the linear part of an affine pre-alignment (voxel units). Every
            tetrahedron's and the Jacobian's determinant is multiplied by ``det(L)``.
        slab: planes along axis 0 processed at once (memory ~ 60 floats per voxel of a slab).
    """
    import torch

    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"disp: expected (3, D, H, W) in voxels, got shape {disp.shape}")
    if min(disp.shape[1:]) < 3:
        raise ValueError(f"disp: expected at least 3 voxels per axis, got shape {disp.shape}")
    d, h, w = disp.shape[1:]
    inside = _interior_mask(mask, (d, h, w))
    total = int(inside.sum())
    if total == 0:
        raise ValueError("mask: expected at least one interior voxel inside the mask, got none")
    scale = float(np.linalg.det(np.asarray(linear, dtype=np.float64))) if linear is not None else 1.0
    u = torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32))
    masks = torch.from_numpy(np.ascontiguousarray(inside)) if mask is not None else None
    neg = nonpos = 0.0
    log_sum = log_sq = 0.0
    with torch.inference_mode():
        for start in range(1, d - 1, max(1, slab)):
            n = min(start + slab, d - 1) - start
            dets, jac = _slab_determinants(u[:, start - 1:start + n + 1])
            jac = jac * scale
            sel = masks[start - 1:start - 1 + n] if masks is not None else None
            for det in dets:
                part = torch.clamp(det * scale, max=0.0)
                neg -= float((part[sel] if sel is not None else part).sum(dtype=torch.float64))
            if sel is not None:
                jac = jac[sel]
            nonpos += float((jac <= 0).sum())
            logj = torch.log(torch.clamp(jac, 1e-9, 1e9))
            log_sum += float(logj.sum(dtype=torch.float64))
            log_sq += float((logj * logj).sum(dtype=torch.float64))
    mean = log_sum / total
    return {
        "ndv_percent": 100.0 * (0.5 * neg / 6.0) / total,
        "jac_nonpos_percent": 100.0 * nonpos / total,
        "sdlogj": float(math.sqrt(max(log_sq / total - mean * mean, 0.0))),
    }


def _slab_determinants(block: Any) -> tuple[list[Any], Any]:
    """The 10 tetrahedron determinants and the central-difference ``|J|`` at the interior voxels
    of a ``(3, n + 2, H, W)`` torch slab of a displacement (its n middle planes, interior rows/columns)."""
    n, h, w = block.shape[1] - 2, block.shape[2], block.shape[3]

    def at(dp: int, dh: int, dw: int) -> Any:
        return block[:, 1 + dp:1 + n + dp, 1 + dh:h - 1 + dh, 1 + dw:w - 1 + dw]

    centre = at(0, 0, 0)

    def edge(offset: tuple[int, int, int]) -> list[Any]:
        # T(v + offset) - T(v) = offset + u(v + offset) - u(v), per component.
        diff = at(*offset) - centre
        return [diff[c] + offset[c] if offset[c] else diff[c] for c in range(3)]

    unit = [tuple(int(a == b) for b in range(3)) for a in range(3)]
    fwd = [edge(e) for e in unit]  # type: ignore[arg-type]
    bwd = [[-x for x in edge(tuple(-v for v in e))] for e in unit]  # type: ignore[arg-type]
    crosses = {(s1, s2): _cross(r1, r2) for s1, r1 in ((1, fwd[1]), (-1, bwd[1]))
               for s2, r2 in ((1, fwd[2]), (-1, bwd[2]))}
    dets = [_dot(fwd[0] if s0 == 1 else bwd[0], crosses[(s1, s2)]) for s0, s1, s2 in _OCTANTS]
    low = [edge((-1, -1, 0)), edge((-1, 0, -1)), edge((0, -1, -1))]
    dets.append(_dot(low[0], _cross(low[1], low[2])))
    high = [edge((1, 1, 0)), edge((0, 1, 1)), edge((1, 0, 1))]  # the reference order (identity det 2)
    dets.append(_dot(high[0], _cross(high[1], high[2])))
    central = [[0.5 * (f + b) for f, b in zip(fwd[a], bwd[a], strict=True)] for a in range(3)]
    return dets, _dot(central[0], _cross(central[1], central[2]))


def _cross(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _dot(a: Sequence[Any], b: Sequence[Any]) -> Any:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def tre_mm(
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    disp: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Target registration error per landmark, in mm.

    A fixed landmark ``f`` maps to ``f + disp(f)`` in the moving image (``disp`` interpolated
    trilinearly at ``f``, nearest value beyond the border); the error is
    ``|| (f + disp(f) - m) * spacing ||``.

    Args:
        fixed_points: ``(K, 3)`` landmark positions in fixed voxel indices (array-axis order).
        moving_points: ``(K, 3)`` corresponding positions in moving voxel indices.
        disp: ``(3, D, H, W)`` displacement in voxels on the fixed grid.
        spacing: voxel size in mm per array axis.

    Returns:
        ``(K,)`` float64 distances in mm.
    """
    from scipy import ndimage

    disp = _check_disp(disp)
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    for name, pts in (("fixed_points", fixed_points), ("moving_points", moving_points)):
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"{name}: expected (K, 3) voxel positions, got shape {pts.shape}")
    if fixed_points.shape != moving_points.shape:
        raise ValueError(f"fixed_points and moving_points: expected equal shapes, got "
                         f"{fixed_points.shape} vs {moving_points.shape}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or (spacing_arr <= 0).any():
        raise ValueError(f"spacing: expected 3 positive values in mm, got {tuple(spacing)}")
    moved = np.stack([ndimage.map_coordinates(disp[c], fixed_points.T, order=1, mode="nearest")
                      for c in range(3)], axis=1)
    return np.linalg.norm((fixed_points + moved - moving_points) * spacing_arr, axis=1)


def landmarks_from_label_image(label: np.ndarray) -> dict[int, np.ndarray]:
    """Centroid (voxel indices, array-axis order) of every non-zero label of a landmark image.

    Args:
        label: ``(D, H, W)`` integer image, one small blob per landmark id.

    Returns:
        ``{label: (3,) float64 centroid}``, labels in increasing order.
    """
    from scipy import ndimage

    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label: expected (D, H, W), got shape {label.shape}")
    ids = [int(v) for v in np.unique(label) if v != 0]
    centres = ndimage.center_of_mass(np.ones(label.shape), label, ids) if ids else []
    return {i: np.asarray(c, dtype=np.float64) for i, c in zip(ids, centres, strict=True)}


def _round_trip_mm(there: np.ndarray, back: np.ndarray, start_affine: np.ndarray, mask: np.ndarray,
                   stride: int, between: int = 0, seed: int = 0) -> np.ndarray:
    """``|A_start (x'' - x)|`` mm for grid voxels ``x`` in ``mask`` (every ``stride``-th per axis), or with
    ``between > 0`` for that many random points ``x`` in the voxels of ``mask`` (anywhere inside them)."""
    if between:
        rng = np.random.default_rng(seed)
        voxels = np.argwhere(mask)[rng.integers(0, int(mask.sum()), between)]
        x = np.clip(voxels + rng.random((between, 3)) - 0.5, 0, np.array(mask.shape) - 1)
        y = x + sample_points(there, x)
    else:
        sub = mask[::stride, ::stride, ::stride]
        x = np.argwhere(sub).astype(np.float64) * stride
        xi = x.astype(int)
        y = x + there[xi[:, 0], xi[:, 1], xi[:, 2]]  # the other grid's index, exact at our grid points
    hi = np.array(back.shape[:3], dtype=np.float64) - 1
    inside = np.all((y >= 0) & (y <= hi), axis=1)  # beyond the other grid its field is not defined
    y = y[inside]
    error = (y + sample_points(back, y) - x[inside]) @ start_affine[:3, :3].T
    return np.linalg.norm(error, axis=1)


def inverse_consistency(
    disp: np.ndarray, fixed_affine: np.ndarray, fixed_mask: np.ndarray,
    inverse_disp: np.ndarray, moving_affine: np.ndarray, moving_mask: np.ndarray, stride: int = 2,
    between: int = 0,
) -> dict[str, dict[str, float]]:
    """How far a point lands from where it started after the transform and its inverse (mm).

    ``fixed_to_moving_to_fixed``: for fixed voxels ``i`` in ``fixed_mask``, ``j = i + disp[i]`` then
    ``i' = j + inverse_disp(j)`` (trilinear between moving voxels), ``|A_fixed (i' - i)|``;
    ``moving_to_fixed_to_moving`` the same from the moving side. These are the written fields
    as a user applies them, so the interpolation of each field counts too. Voxels whose image
    falls outside the other grid are left out (``fraction_inside`` says how many remained).

    Args:
        disp: ``(D, H, W, 3)`` voxels on the fixed grid (``disp.nii.gz``).
        fixed_affine: its index -> mm affine.
        fixed_mask: ``(D, H, W)`` bool, e.g. the fixed foreground.
        inverse_disp: ``(D', H', W', 3)`` voxels on the moving grid (``inverse_disp.nii.gz``).
        moving_affine: its index -> mm affine.
        moving_mask: ``(D', H', W')`` bool.
        stride: score every ``stride``-th voxel per axis (2: an eighth of them, the same statistics).
        between: score that many random points inside the mask's voxels instead (both fields then
            interpolated, as for any point a user maps): grid points alone favour the direction whose
            first field is exact there.

    Returns:
        ``{direction: {"mean_mm", "p95_mm", "max_mm", "fraction_inside"}}``.
    """
    out = {}
    for name, there, back, start, mask in (
            ("fixed_to_moving_to_fixed", disp, inverse_disp, fixed_affine, fixed_mask),
            ("moving_to_fixed_to_moving", inverse_disp, disp, moving_affine, moving_mask)):
        err = _round_trip_mm(there, back.astype(np.float32, copy=False), start, mask, stride, between) \
            if mask.any() else np.zeros(0)
        total = between if between else int(mask[::stride, ::stride, ::stride].sum())
        out[name] = {
            "mean_mm": float(err.mean()) if err.size else float("nan"),
            "p95_mm": float(np.percentile(err, 95)) if err.size else float("nan"),
            "max_mm": float(err.max()) if err.size else float("nan"),
            "fraction_inside": float(err.size / total) if total else float("nan"),
        }
    return out
