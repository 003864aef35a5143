"""Quality-check picture (``qc.png``) drawn with numpy alone (no matplotlib/PIL dependency).

Layout: one row per plane (axial, coronal, sagittal of the fixed image's closest canonical RAS
orientation, anterior/superior up, patient right on the picture's right), one column per view:
FIXED, MOVING (before registration, on the fixed grid in scanner coordinates), WARPED,
CHECKER (fixed/warped checkerboard), GRID (the deformable part as a deformed grid over the warped
image), JACOBIAN (log det J: blue < 0 < red, yellow where det J <= 0).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

PANEL = 176  # pixels of the longest physical side of a panel
GRID_STEP = 8.0  # network voxels between deformed-grid lines

# 3×5 pixel glyphs for the titles (rows top to bottom, 3 bits each).
_FONT = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", " ": "000000000000000",
}


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG (8-bit RGB, zlib)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _text(canvas: np.ndarray, text: str, row: int, col: int, scale: int = 2, color: Sequence[int] = (255,) * 3) -> None:
    for n, ch in enumerate(text.upper()):
        bits = _FONT.get(ch, _FONT[" "])
        for i in range(5):
            for j in range(3):
                if bits[3 * i + j] == "1":
                    r, c = row + i * scale, col + (4 * n + j) * scale
                    canvas[r:r + scale, c:c + scale] = color


def _gray(img: np.ndarray) -> np.ndarray:
    v = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def _logjac_rgb(jac: np.ndarray) -> np.ndarray:
    logj = np.log(np.clip(jac, 1e-6, None))
    t = np.clip(logj / 1.0, -1, 1)
    rgb = np.ones(jac.shape + (3,), np.float32)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb[..., 1] -= pos + neg  # white -> red (expansion) or blue (compression)
    rgb[..., 2] -= pos
    rgb[..., 0] -= neg
    rgb = np.clip(rgb, 0, 1)
    rgb[jac <= 0] = (1.0, 0.85, 0.0)
    return (rgb * 255).astype(np.uint8)


def _slices(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a canonical (RAS) volume, shown with A or S up."""
    i, j, k = centre
    return [vol[:, :, k].T[::-1], vol[:, j, :].T[::-1], vol[i, :, :].T[::-1]]


def _fit(img: np.ndarray, spacing: Sequence[float], size: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D (or 2-D × channels) slice to ``size`` px on its longest mm side."""
    h_mm, w_mm = img.shape[0] * spacing[0], img.shape[1] * spacing[1]
    scale = size / max(h_mm, w_mm)
    h, w = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
    rows = np.minimum((np.arange(h) + 0.5) / h * img.shape[0], img.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) / w * img.shape[1], img.shape[1] - 1).astype(int)
    return img[rows][:, cols]


def render_qc(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    net_coords: np.ndarray,
    jacobian: np.ndarray,
    affine: np.ndarray,
) -> bytes:
    """Draw the QC figure.

    Args:
        fixed: ``(D, H, W)`` fixed image in [0, 1], native grid.
        moving: ``(D, H, W)`` moving image in [0, 1] resampled on the fixed grid before registration.
        warped: ``(D, H, W)`` warped moving image in [0, 1].
        net_coords: ``(3, D, H, W)`` deformed network-grid coordinates ``x + u(x)`` of every fixed voxel
            (components along the canonical axes), for the deformed grid.
        jacobian: ``(D, H, W)`` Jacobian determinant of the total transform.
        affine: fixed native index -> RAS mm.

    Returns:
        PNG file content.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)

    def canon(v: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(v, ornt)

    vols = [canon(v) for v in (fixed, moving, warped)]
    coords = [canon(c) for c in net_coords]
    jac = canon(jacobian)
    aff_c = affine @ nib.orientations.inv_ornt_aff(ornt, fixed.shape)
    sp = np.linalg.norm(aff_c[:3, :3], axis=0)
    mask = vols[0] > 0.05
    centre = [int(np.round(np.mean(np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0])))
              if mask.any() else vols[0].shape[a] // 2 for a in range(3)]
    plane_axes = [(1, 0), (2, 0), (2, 1)]  # (row axis, column axis) of each displayed plane
    plane_sp = [(sp[1], sp[0]), (sp[2], sp[0]), (sp[2], sp[1])]
    titles = ["FIXED", "MOVING", "WARPED", "CHECKER", "GRID", "JACOBIAN"]
    pad, top = 6, 18
    rows = []
    for p in range(3):
        f, m, w = (_slices(v, centre)[p] for v in vols)
        checker_idx = (np.add.outer(np.arange(f.shape[0]) // 16, np.arange(f.shape[1]) // 16) % 2).astype(bool)
        checker = np.where(checker_idx, f, w)
        grid_rgb = _gray(w * 0.7)
        on_line = np.zeros(f.shape, bool)
        for axis in plane_axes[p]:
            c = _slices(coords[axis], centre)[p]
            on_line |= np.abs(c - GRID_STEP * np.round(c / GRID_STEP)) < 0.5
        grid_rgb[on_line] = (255, 60, 40)
        panels = [_gray(f), _gray(m), _gray(w), _gray(checker), grid_rgb, _logjac_rgb(_slices(jac, centre)[p])]
        panels = [_fit(x, plane_sp[p], PANEL) for x in panels]
        rows.append(panels)
    width = max(sum(x.shape[1] for x in r) + pad * (len(r) + 1) for r in rows)
    height = top + sum(r[0].shape[0] + pad for r in rows) + pad
    canvas = np.full((height, width, 3), 24, np.uint8)
    y = top
    for r in rows:
        x = pad
        for panel in r:
            canvas[y:y + panel.shape[0], x:x + panel.shape[1]] = panel
            x += panel.shape[1] + pad
        y += r[0].shape[0] + pad
    x = pad
    for title, panel in zip(titles, rows[0], strict=True):
        _text(canvas, title, 4, x)
        x += panel.shape[1] + pad
    return png_bytes(canvas)
