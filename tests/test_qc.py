"""The QC picture: continuous grid lines on coarse grids, the font, the CT display window, the layout."""

from __future__ import annotations

import zlib

import numpy as np

from eoir_cli.qc import GRID_STEP, ORIENTATION, display_window, grid_lines, logjac_rgb, render_qc
from eoir_cli.qc_font import ADVANCE, draw_text, text_size


def _decode_png(data: bytes) -> np.ndarray:
    """Decode the PNGs :func:`eoir_cli.qc.png_bytes` writes (one IDAT, RGB8, filter 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    raw = np.frombuffer(zlib.decompress(data[start:start + length]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_grid_lines_stay_continuous_when_pixels_span_several_network_voxels() -> None:
    # A 3 mm image over a 1 mm network grid: each pixel moves 3 network voxels, so a test of
    # "within 0.5 voxel of a multiple of 8" (the old drawing) hits only some pixels; crossings never miss.
    rows, cols = np.mgrid[0:40, 0:50].astype(np.float32) * 3.0
    mask = grid_lines([rows, cols], GRID_STEP)
    full_cols = np.nonzero(mask.all(axis=0))[0]
    full_rows = np.nonzero(mask.all(axis=1))[0]
    # Column j is marked when floor(3j / 8) != floor(3(j + 1) / 8): j = 2, 5, 7, 10, ... (every multiple of 8 crossed).
    expected_cols = [j for j in range(49) if (3 * j) // 8 != (3 * (j + 1)) // 8]
    assert list(full_cols) == expected_cols and len(expected_cols) == (3 * 49) // 8
    assert len(full_rows) == (3 * 39) // 8
    old = np.abs(cols - GRID_STEP * np.round(cols / GRID_STEP)) < 0.5
    assert old.any(axis=0).sum() < len(expected_cols)  # the old rule loses lines here


def test_font_sizes_and_drawing() -> None:
    assert text_size("Dice", 2) == (18, (4 * ADVANCE - 1) * 2)
    canvas = np.zeros((20, 40, 3), np.uint8)
    end = draw_text(canvas, "l1", 0, 0, scale=1, color=(255, 0, 0))
    assert end == 2 * ADVANCE
    # "l": a column at x = 2 from row 1 to 6 and a foot row 6 from x = 1 to 3 (see the glyph table).
    assert canvas[1:7, 2, 0].tolist() == [255] * 6 and canvas[6, 1:4, 0].tolist() == [255] * 3
    assert canvas[:, :, 1].max() == 0


def test_ct_is_shown_in_the_soft_tissue_window() -> None:
    rng = np.random.default_rng(0)
    ct = np.where(rng.random((20, 20, 20)) < 0.3, -1000.0, rng.normal(40, 30, (20, 20, 20)))
    ct[0, 0, :5] = 1200  # bone
    mr = rng.random((20, 20, 20)) * 800
    assert display_window(ct) == (-160.0, 240.0)
    assert display_window(mr) is None


def test_jacobian_colours() -> None:
    rgb = logjac_rgb(np.array([1.0, np.e, 1 / np.e, -0.5]))
    assert rgb[0].tolist() == [255, 255, 255]
    assert rgb[1].tolist() == [255, 38, 38]     # expansion: red (1 - 0.85 = 0.15 -> 38)
    assert rgb[2].tolist() == [38, 38, 255]     # compression: blue
    assert rgb[3].tolist() == [255, 217, 0]     # folding: yellow


def test_qc_layout_names_dice_and_patient_right_on_the_right() -> None:
    shape = (40, 48, 36)
    img = np.zeros(shape, np.float32)
    img[8:32, 8:40, 6:30] = 0.4
    img[20:32, 8:40, 6:30] = 1.0  # the patient's right half is bright (RAS affine: axis 0 points right)
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    png = render_qc(img, img, img, coords, np.ones(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]),
                    fixed_name="f.nii.gz", moving_name="m.nii.gz", dice=(0.5, 0.75, 3), notes=["NDV 0 %"])
    rgb = _decode_png(png)
    plain = _decode_png(render_qc(img, img, img, coords, np.ones(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])))
    assert rgb.shape[0] > plain.shape[0] + 30  # two header lines
    assert rgb.shape[1] >= 6 * 200  # six panels of ~256 px, no thumbnail
    # In the first panel of the axial row, the bright half is on the picture's right.
    gray = rgb[..., 0].astype(int) * (rgb[..., 0] == rgb[..., 2])  # grey pixels only (no letters)
    row = gray[plain.shape[0] // 4 + 30 + (rgb.shape[0] - plain.shape[0]), :300]  # the FIXED panel only
    bright = np.nonzero(row > 200)[0]
    mid = np.nonzero(row > 60)[0]
    assert bright.size and mid.size and bright.mean() > mid.mean()
    assert ORIENTATION["axial"][:2] == ("L", "R")
