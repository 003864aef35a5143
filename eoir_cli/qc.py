"""Quality-check picture (``qc.png``) drawn with numpy alone (no matplotlib/PIL dependency).

Layout: a header (file names, Dice before -> after, field statistics, notes such as the CT display
window), then one row per plane (axial, coronal, sagittal through the fixed foreground's centre,
in the fixed image's closest canonical RAS orientation: patient right on the picture's right,
anterior or superior up; letters on every panel say so) and one column per view: FIXED, MOVING
(before registration, on the fixed grid in scanner coordinates), WARPED, CHECKERBOARD (fixed and
warped tiles), GRID (lines of the network grid every ``GRID_STEP`` network voxels, carried through
the deformable part of the transform and drawn over the warped image) and log det J (blue below 0,
red above, yellow where det J <= 0) with its colour bar.

Panels are resampled to ``PANEL`` pixels on their longest side in millimetres, so anisotropic
voxels keep their physical proportions. Grid lines are drawn where a grid coordinate crosses a
multiple of ``GRID_STEP`` between neighbouring *pixels* (not where it is near one at a voxel), so
lines stay continuous whatever the ratio of image voxels to network voxels.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

from eoir_cli.qc_font import LINE_HEIGHT, draw_text, text_size

PANEL = 256  # pixels of the longest physical side of a panel
GRID_STEP = 8.0  # network voxels between deformed-grid lines
PAD = 8
BACKGROUND = (18, 18, 18)
TEXT = (230, 230, 230)
DIM = (150, 150, 150)
MARKER = (255, 200, 40)
GRID_COLOR = (255, 70, 50)
FOLDING = (255, 217, 0)
LOGJ_RANGE = 1.0  # colour saturates at |log det J| = 1 (det J = 0.37 or 2.72)
CT_DISPLAY_WINDOW = (-160.0, 240.0)  # HU: the soft-tissue window (level 40, width 400)
PLANES = ("axial", "coronal", "sagittal")
# Letters at (left, right, top, bottom) of each plane's panels (canonical RAS arrays, see _slices).
ORIENTATION = {"axial": ("L", "R", "A", "P"), "coronal": ("L", "R", "S", "I"), "sagittal": ("P", "A", "S", "I")}


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


def display_window(data: np.ndarray) -> tuple[float, float] | None:
    """The soft-tissue window (HU) when ``data`` looks like CT (air near -1000, tissue above 0), else None.

    CT normalised by percentiles spans air to bone, which leaves every organ the same grey; a
    person reads abdominal CT in the soft-tissue window.
    """
    sample = np.asarray(data, np.float32).ravel()[:: max(1, data.size // 200_000)]
    lo, hi = np.percentile(sample, [1, 99])
    return CT_DISPLAY_WINDOW if lo <= -700 and hi >= 100 else None


def apply_window(data: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Raw intensities -> [0, 1] float32 through a display window ``(low, high)`` (e.g. HU)."""
    lo, hi = window
    return np.clip((np.asarray(data, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _gray(img: np.ndarray) -> np.ndarray:
    v = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def logjac_rgb(jac: np.ndarray) -> np.ndarray:
    """``det J`` -> RGB uint8: white at 1, red for expansion, blue for compression (log scale,
    saturating at ``LOGJ_RANGE``), yellow where ``det J <= 0`` (folding)."""
    logj = np.log(np.clip(jac, 1e-6, None))
    t = np.clip(logj / LOGJ_RANGE, -1, 1)
    rgb = np.ones(jac.shape + (3,), np.float32)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb[..., 1] -= 0.85 * (pos + neg)
    rgb[..., 2] -= 0.85 * pos
    rgb[..., 0] -= 0.85 * neg
    rgb = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    rgb[jac <= 0] = FOLDING
    return rgb


def _slices(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a canonical (RAS) volume, shown with A or S up."""
    i, j, k = centre
    return [vol[:, :, k].T[::-1], vol[:, j, :].T[::-1], vol[i, :, :].T[::-1]]


def _panel_size(shape: Sequence[int], spacing: Sequence[float], size: int) -> tuple[int, int]:
    h_mm, w_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    scale = size / max(h_mm, w_mm)
    return max(1, round(h_mm * scale)), max(1, round(w_mm * scale))


def _positions(n_in: int, n_out: int) -> np.ndarray:
    """Continuous input index of each output pixel centre (pixel areas matched)."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def resize_nearest(img: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D (or 2-D × channels) array to ``out`` pixels."""
    rows = np.clip(np.round(_positions(img.shape[0], out[0])), 0, img.shape[0] - 1).astype(int)
    cols = np.clip(np.round(_positions(img.shape[1], out[1])), 0, img.shape[1] - 1).astype(int)
    return img[rows][:, cols]


def resize_linear(img: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float array to ``out`` pixels (edges clamped)."""
    r = np.clip(_positions(img.shape[0], out[0]), 0, img.shape[0] - 1)
    c = np.clip(_positions(img.shape[1], out[1]), 0, img.shape[1] - 1)
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    r1, c1 = np.minimum(r0 + 1, img.shape[0] - 1), np.minimum(c0 + 1, img.shape[1] - 1)
    fr, fc = (r - r0)[:, None], (c - c0)[None, :]
    top = img[r0][:, c0] * (1 - fc) + img[r0][:, c1] * fc
    bottom = img[r1][:, c0] * (1 - fc) + img[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def grid_lines(coords: Sequence[np.ndarray], step: float) -> np.ndarray:
    """Pixels where any coordinate map crosses a multiple of ``step`` towards its right or lower
    neighbour: the deformed grid as 1-pixel lines, continuous however coarse the pixels are."""
    mask = np.zeros(coords[0].shape, bool)
    for c in coords:
        cell = np.floor(c / step)
        mask[:, :-1] |= cell[:, :-1] != cell[:, 1:]
        mask[:-1, :] |= cell[:-1, :] != cell[1:, :]
    return mask


def _checker(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    h, w = a.shape[:2]
    tile = max(h, w) / tiles
    pattern = (np.add.outer((np.arange(h) // tile).astype(int), (np.arange(w) // tile).astype(int)) % 2).astype(bool)
    return np.where(pattern[..., None], a, b)


def _letters(panel: np.ndarray, plane: str) -> None:
    left, right, top, bottom = ORIENTATION[plane]
    h, w = panel.shape[:2]
    th, tw = text_size("X", 2)
    draw_text(panel, left, h // 2 - th // 2, 3, color=MARKER)
    draw_text(panel, right, h // 2 - th // 2, w - tw - 3, color=MARKER)
    if h >= 5 * th:  # a thin slab has no room for top and bottom letters beside its content
        draw_text(panel, top, 3, w // 2 - tw // 2, color=MARKER)
        draw_text(panel, bottom, h - th - 2, w // 2 - tw // 2, color=MARKER)


def _vertical_text(text: str, height: int, scale: int = 2, color: Sequence[int] = TEXT) -> np.ndarray:
    """``text`` reading bottom to top, centred in ``height`` rows (smaller when it would not fit)."""
    if text_size(text, scale)[1] > height and scale > 1:
        scale = 1
    th, tw = text_size(text, scale)
    strip = np.zeros((th + 2, max(tw, 1), 3), np.uint8)
    strip[:] = BACKGROUND
    draw_text(strip, text, 1, 0, scale, color)
    rotated = np.rot90(strip)  # reads bottom to top
    out = np.zeros((max(height, rotated.shape[0]), rotated.shape[1], 3), np.uint8)
    out[:] = BACKGROUND
    top = max((height - rotated.shape[0]) // 2, 0)
    out[top:top + rotated.shape[0]] = rotated
    return out[:height]


def _colour_bar(height: int) -> np.ndarray:
    """The log det J colour bar with its labels (det J at the top, middle and bottom)."""
    bar_w, label_w = 16, 6 * 2 * 6
    out = np.zeros((height, bar_w + 6 + label_w, 3), np.uint8)
    out[:] = BACKGROUND
    th, _ = text_size("0", 2)
    top, bottom = th, height - 3 * th - 8  # room for the "det J" title and the folding swatch
    values = np.exp(np.linspace(LOGJ_RANGE, -LOGJ_RANGE, max(bottom - top, 2)))
    out[top:bottom, :bar_w] = logjac_rgb(values)[:, None, :]
    draw_text(out, "det J", 0, 0, color=TEXT)
    for value, row in ((f"{np.exp(LOGJ_RANGE):.2f}", top), ("1", (top + bottom) // 2),
                       (f"{np.exp(-LOGJ_RANGE):.2f}", bottom - th)):
        draw_text(out, value, row, bar_w + 6, color=TEXT)
    swatch = bottom + 8
    out[swatch:swatch + th, :bar_w] = FOLDING
    draw_text(out, "<=0", swatch, bar_w + 6, color=TEXT)
    return out


def render_qc(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    net_coords: np.ndarray,
    jacobian: np.ndarray,
    affine: np.ndarray,
    *,
    fixed_name: str | None = None,
    moving_name: str | None = None,
    dice: tuple[float, float, int] | None = None,
    notes: Sequence[str] = (),
) -> bytes:
    """Draw the QC figure.

    Args:
        fixed: ``(D, H, W)`` fixed image for display, in [0, 1], native grid.
        moving: ``(D, H, W)`` moving image in [0, 1] resampled on the fixed grid before registration.
        warped: ``(D, H, W)`` warped moving image in [0, 1].
        net_coords: ``(3, D, H, W)`` deformed network-grid coordinates ``x + u(x)`` (network voxels)
            of every fixed voxel, components along the canonical axes, for the deformed grid.
        jacobian: ``(D, H, W)`` Jacobian determinant of the total transform.
        affine: fixed native index -> RAS mm.
        fixed_name, moving_name: shown in the header (file names).
        dice: ``(before, after, number of labels)`` shown in the header.
        notes: further header items (field statistics, the display window, ...).

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
    # Crop to what any of the three images shows (plus a margin): no panel is mostly background.
    box = _foreground_box(vols, margin=0.06)
    vols, coords, jac = [v[box] for v in vols], [c[box] for c in coords], jac[box]
    mask = vols[0] > 0.05
    centre = [int(np.round(np.mean(np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0])))
              if mask.any() else vols[0].shape[a] // 2 for a in range(3)]
    plane_axes = [(1, 0), (2, 0), (2, 1)]  # (row axis, column axis) of each displayed plane
    plane_sp = [(sp[1], sp[0]), (sp[2], sp[0]), (sp[2], sp[1])]
    titles = ["fixed", "moving (before)", "warped", "checkerboard", f"grid ({GRID_STEP:g} net voxels)", "log det J"]

    rows = []
    for p, plane in enumerate(PLANES):
        f, m, w = (_slices(v, centre)[p] for v in vols)
        size = _panel_size(f.shape, plane_sp[p], PANEL)
        f_px, m_px, w_px = (_gray(resize_linear(x.astype(np.float32), size)) for x in (f, m, w))
        grid_rgb = (w_px.astype(np.float32) * 0.6).astype(np.uint8)
        lines = grid_lines([resize_linear(_slices(coords[a], centre)[p].astype(np.float32), size)
                            for a in plane_axes[p]], GRID_STEP)
        grid_rgb[lines] = GRID_COLOR
        jac_px = logjac_rgb(resize_nearest(_slices(jac, centre)[p], size))
        panels = [f_px, m_px, w_px, _checker(f_px, w_px), grid_rgb, jac_px]
        for panel in panels:
            _letters(panel, plane)
        rows.append(panels)

    col_w = [max(r[c].shape[1] for r in rows) for c in range(len(titles))]
    col_w = [max(w, text_size(t, 2)[1]) for w, t in zip(col_w, titles, strict=True)]
    label_w = LINE_HEIGHT * 2 + 4
    bar = _colour_bar(max(rows[0][0].shape[0], 170))  # its own column: may run past a short first row
    header_lines = _header(fixed_name, moving_name, dice, notes)
    header_h = PAD + len(header_lines) * (LINE_HEIGHT * 2 + 4)
    title_h = LINE_HEIGHT * 2 + 2
    width = label_w + sum(col_w) + PAD * (len(col_w) + 1) + bar.shape[1] + PAD
    height = header_h + title_h + max(sum(r[0].shape[0] + PAD for r in rows), bar.shape[0]) + PAD
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    y = PAD
    for text, color in header_lines:
        draw_text(canvas, text, y, PAD, color=color)
        y += LINE_HEIGHT * 2 + 4
    x = label_w + PAD
    for title, cw in zip(titles, col_w, strict=True):
        tw = text_size(title, 2)[1]
        draw_text(canvas, title, y, x + (cw - tw) // 2, color=TEXT)
        x += cw + PAD
    y += title_h
    for r, (plane, panels) in enumerate(zip(PLANES, rows, strict=True)):
        rh = panels[0].shape[0]
        label = _vertical_text(plane, rh)
        canvas[y:y + label.shape[0], 4:4 + label.shape[1]] = label
        x = label_w + PAD
        for panel, cw in zip(panels, col_w, strict=True):
            off = (cw - panel.shape[1]) // 2
            canvas[y:y + rh, x + off:x + off + panel.shape[1]] = panel
            x += cw + PAD
        if r == 0:
            canvas[y:y + bar.shape[0], x:x + bar.shape[1]] = bar
        y += rh + PAD
    return png_bytes(canvas)


def _foreground_box(vols: Sequence[np.ndarray], margin: float) -> tuple[slice, slice, slice]:
    """Bounding box of voxels above 0.05 in any volume, widened by ``margin`` of each axis."""
    mask = np.zeros(vols[0].shape, bool)
    for v in vols:
        mask |= v > 0.05
    if not mask.any():
        return (slice(None),) * 3  # type: ignore[return-value]
    box = []
    for a in range(3):
        hit = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        pad = int(round(margin * mask.shape[a]))
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[a])))
    return tuple(box)  # type: ignore[return-value]


def _header(fixed_name: str | None, moving_name: str | None, dice: tuple[float, float, int] | None,
            notes: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    lines: list[tuple[str, tuple[int, int, int]]] = []
    names = []
    if moving_name:
        names.append(f"moving {moving_name}")
    if fixed_name:
        names.append(f"fixed {fixed_name}")
    if names:
        lines.append(("  ->  ".join(names), TEXT))
    facts = []
    if dice is not None:
        before, after, n = dice
        facts.append(f"Dice {before:.3f} -> {after:.3f} (mean of {n} labels)")
    facts.extend(notes)
    if facts:
        lines.append(("   |   ".join(facts), DIM))
    return lines
