"""Apply a saved registration to other images and to points (``eoir apply``).

A registration folder written by ``eoir register`` holds the whole transform (affine included)
both ways as ITK/ANTs displacement fields (LPS mm, see :mod:`eoir_cli.itk`):

* ``warp_itk.nii.gz`` on the fixed grid: fixed point ``p`` samples moving point ``p + d(p)``;
* ``inverse_warp_itk.nii.gz`` on the moving grid: moving point ``q`` samples fixed point ``q + d⁻¹(q)``.

Direction convention: *forward* moves things from the moving space into the fixed space, the
direction of ``warped.nii.gz``, for images and points alike. An image is pulled back through the
field that lives on the target grid (forward: ``warp_itk``). A point moves the other way round a
field: forward, ``q`` goes to the ``p`` with ``p + d(p) = q`` (solved per point); ``inverse`` to
``p + d(p)``. ``antsApplyTransformsToPoints -t warp_itk.nii.gz`` computes the latter, so it
moves fixed points into the moving space (``eoir apply --inverse``); ANTs' forward equivalent is
``-t inverse_warp_itk.nii.gz``.

Images may have any grid of their own as long as they live in the source space (the moving
scan's physical space for forward, the fixed scan's for ``inverse``); the output is on the
registration's grid of the target space, like ``warped.nii.gz``. Between voxels a field is
trilinear; beyond its grid it takes the nearest border value (as ``eoir register`` does).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eoir_cli.coords import RAS_TO_LPS, apply_affine, index_grid, sample_at, sample_points
from eoir_cli.errors import EoirError
from eoir_cli.io import Volume, load_volume
from eoir_cli.itk import load_itk_displacement

log = logging.getLogger(__name__)

FORWARD_FIELD = "warp_itk.nii.gz"
INVERSE_FIELD = "inverse_warp_itk.nii.gz"
Interp = Literal["linear", "nearest", "label"]
INTERPS = ("linear", "nearest", "label")


@dataclass
class Field:
    """One displacement field as ``eoir register`` writes it.

    Attributes:
        disp_lps: ``(X, Y, Z, 3)`` float32 ITK displacement, LPS mm.
        affine: ``(4, 4)`` its grid, voxel index -> RAS mm.
        header: the NIfTI header (to write images on the same grid).
        path: the file.
    """

    disp_lps: np.ndarray
    affine: np.ndarray
    header: Any
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.disp_lps.shape[:3])  # type: ignore[return-value]

    def map_grid(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(grid points, mapped points)`` in RAS mm for planes ``start:stop`` of axis 0, ``(3, n, H, W)`` float64."""
        stop = self.shape[0] if stop is None else stop
        idx = index_grid((stop - start, self.shape[1], self.shape[2]), np.float64)
        idx[0] += start
        p = apply_affine(self.affine, idx)
        d = np.moveaxis(self.disp_lps[start:stop], -1, 0).astype(np.float64) * RAS_TO_LPS[:, None, None, None]
        return p, p + d

    def map_points(self, points_ras: np.ndarray) -> np.ndarray:
        """``p + d(p)`` for ``(n, 3)`` RAS mm points (the field trilinear, border-extended)."""
        index = _to_index(self.affine, points_ras)
        d = sample_points(self.disp_lps, index, np.float64) * RAS_TO_LPS
        return points_ras + d


@dataclass
class SavedTransform:
    """A registration to apply: the forward field and, when saved, the inverse field."""

    forward: Field
    inverse: Field | None
    source: Path

    def field(self, inverse: bool, reference: Volume | str | os.PathLike[str] | None = None) -> Field:
        """The field that lives on the target grid of images mapped in this direction.

        A folder saved without the inverse (``eoir register``'s default) gets it computed from the
        forward field on the moving grid (:func:`inverse_from_forward`, a few seconds at
        160×224×192): the grid of ``reference``, else of the moving image named in the folder's
        ``metrics.json``.
        """
        if not inverse:
            return self.forward
        if self.inverse is None:
            target = reference if reference is not None else self.moving_image()
            if target is None:
                raise EoirError(f"{self.source}: no {INVERSE_FIELD} beside {self.forward.path.name} (registered "
                                "without --inverse) and no moving image to compute it on: pass --reference "
                                "MOVING.nii.gz, or register again with --inverse")
            if not isinstance(target, Volume):
                target = load_volume(target, what="reference")
            log.info("computing the inverse field on the grid of %s", target.name)
            self.inverse = inverse_from_forward(self.forward, target)
        return self.inverse

    def moving_image(self) -> Path | None:
        """The moving image a registration folder's ``metrics.json`` names, when it still exists."""
        import json

        record = self.source / "metrics.json" if self.source.is_dir() else None
        if record is None or not record.is_file():
            return None
        try:
            moving = json.loads(record.read_text()).get("moving")
        except (OSError, ValueError):
            return None
        return Path(moving) if moving and Path(moving).is_file() else None


def open_transform(path: str | os.PathLike[str]) -> SavedTransform:
    """Open a registration folder, or one ITK displacement field file.

    A single file stands for a transform whose fixed grid is the file's own grid: images are
    resampled onto it; ``inverse`` is available only with the folder.

    Raises:
        EoirError: missing folder/file, a folder without ``warp_itk.nii.gz``, a field of the wrong shape.
    """
    path = Path(path)
    if path.is_dir():
        forward_path = path / FORWARD_FIELD
        if not forward_path.is_file():
            raise EoirError(f"{path}: expected a folder written by eoir register (with {FORWARD_FIELD}), "
                            f"found no {FORWARD_FIELD}")
        forward = Field(*load_itk_displacement(forward_path, "forward field"), forward_path)
        inverse_path = path / INVERSE_FIELD
        inverse = Field(*load_itk_displacement(inverse_path, "inverse field"), inverse_path) \
            if inverse_path.is_file() else None
        return SavedTransform(forward, inverse, path)
    if not path.exists():
        raise EoirError(f"{path}: no such registration folder or field file")
    return SavedTransform(Field(*load_itk_displacement(path, "field"), path), None, path)


def inverse_from_forward(forward: Field, target: Volume) -> Field:
    """The inverse of a saved forward field, as an ITK field on ``target``'s grid (the moving image's).

    The forward map in fixed voxel indices, ``i -> i + u(i)`` with ``u = A_fixed⁻¹ · d`` (affine part
    included), is inverted by Newton's method coarse to fine (:func:`eoir_cli.inverse.invert_disp`)
    and every target voxel is mapped back with one more Newton step at its own position
    (:func:`eoir_cli.composition.compose_inverse_to_native`), then fitted between target voxels to
    every fixed voxel's image (:func:`eoir_cli.inverse.fit_inverse`): the chain ``eoir register
    --inverse`` runs, with the fixed grid in the role of the network grid and no separate affine.
    """
    import torch

    from eoir_cli.composition import compose_inverse_to_native
    from eoir_cli.coords import identity_grid
    from eoir_cli.inverse import invert_disp
    from eoir_cli.preprocess import NetworkGrid

    to_index = np.linalg.inv(forward.affine)[:3, :3].astype(np.float32)
    d_ras = np.moveaxis(forward.disp_lps, -1, 0).astype(np.float32) * RAS_TO_LPS.astype(np.float32)[:, None, None, None]
    u = np.ascontiguousarray(np.einsum("ij,j...->i...", to_index, d_ras))
    inversion = invert_disp(torch.from_numpy(u)[None])
    # The forward map in the fit's terms: fixed index i -> target index A_target⁻¹ · A_fixed · (i + u(i)).
    index = identity_grid(forward.shape)[0]
    reach = apply_affine(np.linalg.inv(target.affine) @ forward.affine, index + torch.from_numpy(u)) - index
    ahead = np.ascontiguousarray(reach.permute(1, 2, 3, 0).numpy())
    del index, reach
    grid = Volume(data=np.empty((0, 0, 0), np.float32), affine=forward.affine, header=forward.header, path=None)
    maps = compose_inverse_to_native(grid, target, NetworkGrid(shape=forward.shape, affine=forward.affine), u,
                                     inversion.inverse[0].numpy(), np.eye(4), warp_fixed=False, forward=ahead)
    return Field(maps.warp_itk, target.affine.copy(), target.header, forward.path.parent / INVERSE_FIELD)


def _to_index(affine: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RAS mm -> continuous voxel indices of a grid (float64)."""
    inv = np.linalg.inv(affine)
    return points_ras @ inv[:3, :3].T + inv[:3, 3]


def _sample_image(image: Any, index: Any, interp: str) -> Any:
    """Sample a ``(1, 1, D, H, W)`` tensor at continuous indices ``(3, n, h, w)``, zeros outside.

    ``label`` picks, among the 8 corner labels, the one with the largest summed trilinear weight,
    i.e. the argmax of per-label linear interpolation (ANTs' ``GenericLabel`` idea) without one
    pass per label; voxels beyond the image count as label 0.
    """
    import torch

    size = image.shape[2:]
    if interp != "label":
        return sample_at(image, index, "bilinear" if interp == "linear" else "nearest", "zeros")[0]
    flat = image.reshape(-1)
    lo = [torch.floor(index[a]) for a in range(3)]
    frac = [index[a] - lo[a] for a in range(3)]
    labels, weights = [], []
    for corner in range(8):
        offs = [(corner >> (2 - a)) & 1 for a in range(3)]
        pos = [lo[a] + offs[a] for a in range(3)]
        inside = (pos[0] >= 0) & (pos[0] <= size[0] - 1) & (pos[1] >= 0) & (pos[1] <= size[1] - 1) & \
                 (pos[2] >= 0) & (pos[2] <= size[2] - 1)
        clamped = [pos[a].clamp(0, size[a] - 1).long() for a in range(3)]
        lab = flat[(clamped[0] * size[1] + clamped[1]) * size[2] + clamped[2]]
        labels.append(torch.where(inside, lab, torch.zeros_like(lab)))
        w = 1.0
        for a in range(3):
            w = w * (frac[a] if offs[a] else 1 - frac[a])
        weights.append(w)
    score = torch.stack([sum(weights[b] * (labels[b] == labels[c]) for b in range(8)) for c in range(8)])
    best = score.argmax(0, keepdim=True)
    return torch.gather(torch.stack(labels), 0, best)[0]


def check_overlap(field: Field, image: Volume, what: str, stride: int = 4) -> float:
    """Fraction of the target grid that samples inside ``image``; error when it is (nearly) none.

    Checked on every ``stride``-th voxel before any full-size work, so an image from another
    space (another subject's scanner coordinates, a fixed image given without ``--inverse`` to a
    registration across spaces) is refused in a fraction of a second.
    """
    sub = field.disp_lps[::stride, ::stride, ::stride]
    idx = np.moveaxis(index_grid(sub.shape[:3], np.float64), 0, -1) * stride
    p = idx @ field.affine[:3, :3].T + field.affine[:3, 3]
    q = p + sub.astype(np.float64) * RAS_TO_LPS
    j = _to_index(image.affine, q.reshape(-1, 3))
    inside = np.all((j >= -0.5) & (j <= np.array(image.shape) - 0.5), axis=1)
    fraction = float(inside.mean())
    if fraction < 0.01:
        raise EoirError(f"{what} {image.name}: it does not overlap the space the transform samples from "
                        f"(expected an image in the {'fixed' if 'inverse' in field.path.name else 'moving'} "
                        f"scan's physical space; {100 * fraction:.1f}% of the target grid falls inside it)")
    return fraction


def apply_to_image(
    transform: SavedTransform | str | os.PathLike[str],
    image: Volume | str | os.PathLike[str],
    inverse: bool = False,
    interp: Interp = "linear",
    slab: int = 16,
    reference: Volume | str | os.PathLike[str] | None = None,
) -> Volume:
    """Resample an image of the source space onto the registration's grid of the target space.

    Args:
        transform: a :class:`SavedTransform` or what :func:`open_transform` opens.
        image: path or :class:`~eoir_cli.io.Volume`, any grid in the moving (``inverse``: fixed)
            physical space.
        inverse: map a fixed-space image onto the moving grid.
        interp: ``"linear"`` (trilinear, float32), ``"nearest"`` or ``"label"`` (label-preserving:
            argmax of per-label trilinear weights); zeros outside the image.
        slab: planes of the target grid per step (bounds memory).
        reference: with ``inverse`` and a folder saved without the inverse: an image on the moving
            grid, where the inverse is computed (default: the moving image its ``metrics.json`` names).

    Returns:
        A :class:`~eoir_cli.io.Volume` on the target grid (float32 for ``linear``, int32 otherwise).
    """
    import torch

    if interp not in INTERPS:
        raise EoirError(f"interpolation: expected one of {INTERPS}, got {interp!r}")
    if not isinstance(transform, SavedTransform):
        transform = open_transform(transform)
    field = transform.field(inverse, reference)
    if not isinstance(image, Volume):
        image = load_volume(image, kind="image" if interp == "linear" else "label", what="image")
    check_overlap(field, image, "image")
    data = image.data.astype(np.float32) if interp == "linear" else image.data
    src = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    if interp == "nearest":
        src = src.float()
    to_index = np.linalg.inv(image.affine)
    out = np.empty(field.shape, np.float32 if interp == "linear" else np.int32)
    for start in range(0, field.shape[0], slab):
        stop = min(start + slab, field.shape[0])
        _, q = field.map_grid(start, stop)
        j = apply_affine(to_index, q)
        # float64 up to here: the index is exact to ~1e-9 voxels, only the float32 field rounds.
        values = _sample_image(src, torch.from_numpy(j.astype(np.float32)), interp)
        out[start:stop] = values.numpy() if interp == "linear" else values.round().int().numpy()
    return Volume(data=out, affine=field.affine.copy(), header=field.header, path=None)


def invert_points(field: Field, targets_ras: np.ndarray, iterations: int = 50, tolerance: float = 1e-4) -> np.ndarray:
    """Points ``p`` with ``p + d(p) = q`` for ``(n, 3)`` RAS mm ``q`` (Newton, numerical Jacobian).

    Solving per point is exact to ``tolerance`` mm (where the field does not fold) and costs
    milliseconds for thousands of landmarks.
    """
    p = targets_ras.copy()
    h = 0.5 * float(np.min(np.linalg.norm(field.affine[:3, :3], axis=0)))
    for _ in range(iterations):
        residual = field.map_points(p) - targets_ras
        if np.abs(residual).max() <= tolerance:
            break
        jac = np.stack([(field.map_points(p + h * e) - field.map_points(p - h * e)) / (2 * h) for e in np.eye(3)],
                       axis=-1)
        try:
            step = np.linalg.solve(jac, residual[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = residual
        p = p - np.clip(step, -10.0, 10.0)
    return p


def map_points(transform: SavedTransform | str | os.PathLike[str], points_ras: np.ndarray,
               inverse: bool = False) -> np.ndarray:
    """Map ``(n, 3)`` RAS mm points from the moving space to the fixed space (``inverse``: back).

    Both directions use the forward field (``warp_itk.nii.gz``, on the fixed grid): ``inverse``
    is ``p + d(p)``; forward solves ``p + d(p) = q`` per point (:func:`invert_points`), so a round
    trip returns to 1e-4 mm whatever the grids' resolutions. (The inverse field would do too,
    but its interpolation between moving voxels costs accuracy where the moving grid is coarse.)
    """
    if not isinstance(transform, SavedTransform):
        transform = open_transform(transform)
    points_ras = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    if inverse:
        return transform.forward.map_points(points_ras)
    return invert_points(transform.forward, points_ras)


# ------------------------------------------------------------------------------------------- points

PointSpace = Literal["ras", "lps", "index"]
POINT_HEADERS: dict[tuple[str, str, str], PointSpace] = {
    ("r", "a", "s"): "ras", ("x_ras", "y_ras", "z_ras"): "ras",
    ("l", "p", "s"): "lps", ("x_lps", "y_lps", "z_lps"): "lps",
    ("x", "y", "z"): "lps",  # the antsApplyTransformsToPoints layout (LPS mm)
    ("i", "j", "k"): "index",
}


@dataclass
class PointTable:
    """A points CSV: its rows as read, which three columns hold the coordinates, in which space."""

    header: list[str]
    rows: list[list[str]]
    columns: tuple[int, int, int]
    space: PointSpace


def read_points(path: str | os.PathLike[str]) -> PointTable:
    """Read ``points.csv``: a header naming three coordinate columns, one point per row.

    The columns say the convention: ``R,A,S`` (or ``x_ras,y_ras,z_ras``) RAS mm; ``L,P,S`` (or
    ``x_lps,...``) LPS mm; ``x,y,z`` LPS mm as ``antsApplyTransformsToPoints`` reads them;
    ``i,j,k`` voxel indices (of a reference image). Other columns (``t``, labels, names) are kept.

    Raises:
        EoirError: missing/unreadable file, no recognised columns, non-numeric coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise EoirError(f"points {path}: no such file")
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise EoirError(f"points {path}: not a readable CSV ({err})") from None
    if not rows:
        raise EoirError(f"points {path}: empty file, expected a header such as R,A,S or L,P,S")
    header = [c.strip() for c in rows[0]]
    names = [c.lower() for c in header]
    key = next((k for k in POINT_HEADERS if all(c in names for c in k)), None)
    if key is None:
        raise EoirError(f"points {path}: expected coordinate columns R,A,S (RAS mm), L,P,S or x,y,z (LPS mm) "
                        f"or i,j,k (voxel indices) in the header, got {header}")
    columns = tuple(names.index(c) for c in key)
    body = rows[1:]
    for n, r in enumerate(body, start=2):
        try:
            [float(r[c]) for c in columns]
        except (ValueError, IndexError):
            raise EoirError(f"points {path}: line {n}: expected numbers in columns "
                            f"{', '.join(header[c] for c in columns)}, got {r}") from None
    return PointTable(header, body, columns, POINT_HEADERS[key])  # type: ignore[arg-type]


def table_to_ras(table: PointTable, reference: np.ndarray | None) -> np.ndarray:
    """``(n, 3)`` RAS mm of a table's points (``reference``: the index -> RAS affine for ``i,j,k``)."""
    xyz = np.array([[float(r[c]) for c in table.columns] for r in table.rows], dtype=np.float64).reshape(-1, 3)
    if table.space == "lps":
        return xyz * RAS_TO_LPS
    if table.space == "index":
        if reference is None:
            raise EoirError("points: i,j,k voxel indices need the grid they index (a reference image)")
        return xyz @ reference[:3, :3].T + reference[:3, 3]
    return xyz


def table_from_ras(table: PointTable, points_ras: np.ndarray, reference: np.ndarray | None) -> str:
    """The table as CSV text with its coordinates replaced by ``points_ras`` in the table's own space."""
    if table.space == "lps":
        xyz = points_ras * RAS_TO_LPS
    elif table.space == "index":
        assert reference is not None
        xyz = _to_index(reference, points_ras)
    else:
        xyz = points_ras
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.header)
    for row, point in zip(table.rows, xyz, strict=True):
        out = list(row)
        for c, v in zip(table.columns, point, strict=True):
            out[c] = f"{v:.6f}"
        writer.writerow(out)
    return buf.getvalue()


def apply_to_points(
    transform: SavedTransform | str | os.PathLike[str],
    points: PointTable | str | os.PathLike[str],
    inverse: bool = False,
    reference: Volume | str | os.PathLike[str] | None = None,
) -> str:
    """Map a points CSV from the moving space to the fixed space (``inverse``: back) and return the CSV text.

    Coordinates come back in the convention of the input's columns. Voxel indices (``i,j,k``)
    are read on ``reference`` (default: the registration's grid of the source space) and
    written on the registration's grid of the target space.
    """
    if not isinstance(transform, SavedTransform):
        transform = open_transform(transform)
    table = points if isinstance(points, PointTable) else read_points(points)
    source_grid = target_grid = None
    if table.space == "index":
        if reference is not None:
            ref = reference if isinstance(reference, Volume) else load_volume(reference, what="reference")
            source_grid = ref.affine
        else:
            side = transform.forward if inverse else transform.inverse
            source_grid = side.affine if side is not None else None
        side = transform.inverse if inverse else transform.forward
        target_grid = side.affine if side is not None else None
        if source_grid is None or target_grid is None:
            raise EoirError("points: i,j,k voxel indices need both grids of the registration (its folder with "
                            f"{FORWARD_FIELD} and {INVERSE_FIELD}) or --reference for the input grid")
    moved = map_points(transform, table_to_ras(table, source_grid), inverse=inverse)
    return table_from_ras(table, moved, target_grid)
