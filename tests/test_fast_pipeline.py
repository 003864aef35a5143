"""The lean register pipeline (issue 10): fast metrics equal the reference ones, multi-member gzip
files read everywhere, output selection, live stage progress, Ctrl-C leaves nothing behind, the
whole-voxel composition shortcut equals interpolation, coarse-to-fine refinement, thread policy.
Speed itself is measured by benchmarks/bench_register.py, not asserted here."""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eoir_cli import metrics
from eoir_cli.cli import app
from eoir_cli.outputs import DEFAULT_OUTPUTS, OUTPUT_KINDS, parse_outputs, with_inverse

runner = CliRunner()


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("slab", [1, 3, 8])
def test_field_metrics_equal_the_reference_functions(seed: int, slab: int) -> None:
    rng = np.random.default_rng(seed)
    disp = rng.normal(0.0, 0.6, (3, 9, 8, 7))  # rough enough to fold in places
    mask = rng.random((9, 8, 7)) > 0.3
    for m in (None, mask):
        fast = metrics.field_metrics(disp, m, slab=slab)
        assert fast["ndv_percent"] > 0
        assert fast["ndv_percent"] == pytest.approx(metrics.ndv(disp, m), rel=1e-5)
        assert fast["jac_nonpos_percent"] == pytest.approx(metrics.jacobian_nonpositive_percent(disp, m), abs=1e-9)
        assert fast["sdlogj"] == pytest.approx(metrics.sdlogj(disp, m), rel=1e-4)


def test_field_metrics_with_a_linear_part_equal_those_of_the_whole_map() -> None:
    # x -> L·(x + u(x)) + t: the total displacement is L·(x + u) + t - x.
    rng = np.random.default_rng(2)
    disp = rng.normal(0.0, 0.4, (3, 8, 9, 10))
    linear = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.05]])
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in disp.shape[1:]], indexing="ij"))
    total = np.einsum("ij,j...->i...", linear, grid + disp) + np.array([3.0, -2.0, 1.0])[:, None, None, None] - grid
    expected = metrics.field_metrics(total)
    got = metrics.field_metrics(disp, linear=linear)
    assert expected["ndv_percent"] > 0
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-9)


def test_dice_per_label_equals_the_per_label_definition() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.integers(-3, 6, (9, 8, 7)), rng.integers(-3, 6, (9, 8, 7))
    labels = [-3, -1, 1, 2, 4, 7]  # 7 is absent from both: skipped
    expected = {}
    for v in labels:
        p, t = pred == v, target == v
        if p.sum() + t.sum():
            expected[v] = 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
    assert metrics.dice_per_label(pred, target, labels) == expected
    assert 7 not in expected
    # Default labels: every non-zero value present, also for non-negative maps (histogram path).
    pos_p, pos_t = np.abs(pred), np.abs(target)
    assert set(metrics.dice_per_label(pos_p, pos_t)) == set(np.unique(np.r_[pos_p.ravel(), pos_t.ravel()])) - {0}


# ----------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_parallel_gzip_is_one_stream_for_every_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      deflate: str) -> None:
    from eoir_cli.io import save_volume, write_gzip_parallel

    if deflate == "zlib":  # a platform without the isal wheel
        monkeypatch.setitem(sys.modules, "isal", None)
    else:
        pytest.importorskip("isal", reason="isal (a dependency) is not installed")

    data = np.random.default_rng(0).normal(size=100_000).astype(np.float32).tobytes()
    path = tmp_path / "x.gz"
    write_gzip_parallel(path, data, threads=2, chunk=65_536)  # 7 members
    raw = path.read_bytes()
    assert raw.count(b"\x1f\x8b\x08") >= 7
    assert gzip.decompress(raw) == data
    volume = np.random.default_rng(1).normal(size=(20, 21, 22, 3)).astype(np.float32)
    nii = tmp_path / "v.nii.gz"
    import eoir_cli.io as io_module

    chunk = io_module.GZIP_CHUNK
    io_module.GZIP_CHUNK = 4096
    try:
        save_volume(nii, volume, np.diag([2.0, 3.0, 4.0, 1.0]))
    finally:
        io_module.GZIP_CHUNK = chunk
    img = nib.load(str(nii))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), volume)
    np.testing.assert_array_equal(img.affine, np.diag([2.0, 3.0, 4.0, 1.0]))


@pytest.mark.parametrize("case", ["float vector C-order", "float vector channel-first view", "float Fortran-order",
                                  "int16 labels big-endian header", "uint8 with an extension"])
def test_nifti_parts_are_nibabels_bytes(case: str) -> None:
    """save_volume's own serialisation (header + one view of the data) is byte for byte nibabel's to_bytes."""
    from eoir_cli.io import nifti_parts

    rng = np.random.default_rng(3)
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    header = None
    if case == "float vector C-order":
        data = rng.normal(size=(6, 7, 5, 1, 3)).astype(np.float32)
    elif case == "float vector channel-first view":  # how register's fields are held
        data = rng.normal(size=(3, 6, 7, 5)).astype(np.float32).transpose(1, 2, 3, 0)[:, :, :, None, :]
    elif case == "float Fortran-order":
        data = np.asfortranarray(rng.normal(size=(6, 7, 5)).astype(np.float32))
    elif case == "int16 labels big-endian header":
        data = rng.integers(0, 40, size=(5, 6, 7)).astype(np.int16)
        header = nib.Nifti1Header(endianness=">")
    else:
        data = rng.integers(0, 255, size=(4, 5, 6)).astype(np.uint8)
        header = nib.Nifti1Header()
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"eoir test extension"))
    img = nib.Nifti1Image(data, affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    head, body = nifti_parts(img, data)
    expected = img.to_bytes()
    assert head + bytes(body) == expected
    assert nib.Nifti1Image.from_bytes(head + bytes(body)).get_fdata().shape == data.shape


# ------------------------------------------------------------------------------------ the register command


@pytest.fixture(scope="module")
def small_pair(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real brains at 4 mm on one grid (40×56×48), with labels."""
    root = tmp_path_factory.mktemp("pair")
    brains = shared_data / "brain_lumirlike"
    out = {}
    for key, name, labels in (("fixed", "imagesTr/SYNBRAIN_0002_0000.nii.gz", False),
                              ("moving", "imagesTr/SYNBRAIN_0001_0000.nii.gz", False),
                              ("fixed_seg", "labelsTr/SYNBRAIN_0002_0000.nii.gz", True),
                              ("moving_seg", "labelsTr/SYNBRAIN_0001_0000.nii.gz", True)):
        img = nib.load(str(brains / name))
        data = np.asanyarray(img.dataobj)
        small = data[2::4, 2::4, 2::4] if labels else data.reshape(40, 4, 56, 4, 48, 4).mean((1, 3, 5))
        scale = np.diag([4.0, 4.0, 4.0, 1.0])
        scale[:3, 3] = 1.5
        out[key] = root / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(small.astype(np.int16 if labels else np.float32), img.affine @ scale), out[key])
    return out


@pytest.fixture(scope="module")
def cli_pair(small_pair: dict[str, Path], tiny_checkpoint: Path) -> dict[str, Path]:
    return {**small_pair, "model": tiny_checkpoint}


def _cli(pair: dict[str, Path], out: Path, *extra: str):  # noqa: ANN202
    return runner.invoke(app, ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--model",
                               str(pair["model"]), "--spacing", "4", "--refine", "1", "--no-hd95", "--threads", "1",
                               *extra])


def test_outputs_option_writes_only_what_is_asked(cli_pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli(cli_pair, out, "--moving-seg", str(cli_pair["moving_seg"]), "--outputs", "warped,warped_seg")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "warped.nii.gz", "warped_seg.nii.gz"]
    assert "jacobian_native" not in json.loads((out / "metrics.json").read_text())  # not computed either
    default = tmp_path / "default"
    assert _cli(cli_pair, default).exit_code == 0
    assert sorted(p.name for p in default.iterdir()) == [
        "affine_itk.txt", "disp.nii.gz", "jacobian.nii.gz", "metrics.json", "qc.png", "warp_itk.nii.gz",
        "warped.nii.gz"]
    assert "inverse_consistency" not in json.loads((default / "metrics.json").read_text())  # not computed either
    inverse = tmp_path / "inverse"
    assert _cli(cli_pair, inverse, "--outputs", "warped", "--inverse").exit_code == 0
    assert sorted(p.name for p in inverse.iterdir()) == [
        "affine_itk.txt", "inverse_disp.nii.gz", "inverse_warp_itk.nii.gz", "inverse_warped.nii.gz", "metrics.json",
        "warped.nii.gz"]
    assert "inverse_consistency" in json.loads((inverse / "metrics.json").read_text())


@pytest.mark.parametrize(("outputs", "inverse", "expected"), [
    (None, None, DEFAULT_OUTPUTS), ("default", None, DEFAULT_OUTPUTS), ("all", None, OUTPUT_KINDS),
    ("all", False, DEFAULT_OUTPUTS), (None, True, OUTPUT_KINDS), ("none", True, ("inverse",)),
    ("qc,warped", None, ("warped", "qc")), ("inverse,default", False, DEFAULT_OUTPUTS)])
def test_outputs_and_inverse_choose_the_kinds(outputs, inverse, expected) -> None:
    assert with_inverse(parse_outputs(outputs), inverse) == expected
    assert "inverse" not in DEFAULT_OUTPUTS


def test_unknown_output_is_one_line(cli_pair: dict[str, Path], tmp_path: Path) -> None:
    result = _cli(cli_pair, tmp_path / "out", "--outputs", "warped,jacobain")
    assert result.exit_code == 1
    assert "error: outputs: expected a comma-separated subset of warped,disp" in result.output
    assert "got jacobain" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_stages_are_shown_as_they_finish(cli_pair: dict[str, Path], tmp_path: Path) -> None:
    result = _cli(cli_pair, tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [ln.split() for ln in result.output.splitlines() if ln.startswith("  ")]
    stages = [ln[0] for ln in lines if len(ln) == 3 and ln[2] == "s"]
    for stage in ("load", "preprocess", "affine", "network", "refine", "compose", "metrics", "qc", "write"):
        assert stage in stages, result.output
    assert stages.index("affine") < stages.index("network") < stages.index("refine") < stages.index("write")


@pytest.mark.parametrize("where", ["compose", "metrics"])  # metrics: while the images are being written
def test_ctrl_c_says_what_was_kept_and_leaves_nothing(cli_pair: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import eoir_cli.composition as composition

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    if where == "compose":
        monkeypatch.setattr(composition, "compose_to_native", interrupted)
    else:
        monkeypatch.setattr(metrics, "field_metrics", interrupted)
    result = _cli(cli_pair, out)
    assert result.exit_code == 130
    lines = [ln for ln in result.output.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "nothing was written" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no staging folder, the user's file kept


def test_ctrl_c_in_a_batch_keeps_finished_pairs_and_resumes(cli_pair: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import eoir_cli.composition as composition

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,name\n{cli_pair['fixed']},{cli_pair['moving']},a\n"
                     f"{cli_pair['moving']},{cli_pair['fixed']},b\n")
    real = composition.compose_to_native
    calls = []

    def second_interrupted(*args: object, **kwargs: object):  # noqa: ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(composition, "compose_to_native", second_interrupted)
    out = tmp_path / "batch"
    args = ["register", "--pairs", str(pairs), "-o", str(out), "--model", str(cli_pair["model"]), "--spacing", "4",
            "--refine", "0", "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert [ln for ln in result.output.splitlines() if ln.startswith("interrupted:")][0].count("resume") == 1
    assert (out / "a" / "metrics.json").is_file() and not (out / "b").exists()
    monkeypatch.setattr(composition, "compose_to_native", real)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = (out / "summary.csv").read_text()
    assert "a,skipped" in summary and "b,done" in summary


def _batch_csv(cli_pair: dict[str, Path], path: Path, names: str = "abc") -> Path:
    rows = [(cli_pair["fixed"], cli_pair["moving"]), (cli_pair["moving"], cli_pair["fixed"])]
    path.write_text("fixed,moving,name\n" + "".join(f"{rows[k % 2][0]},{rows[k % 2][1]},{name}\n"
                                                     for k, name in enumerate(names)))
    return path


def test_pairs_side_by_side_give_the_pairs_one_at_a_time(cli_pair: dict[str, Path], tmp_path: Path) -> None:
    pairs = _batch_csv(cli_pair, tmp_path / "pairs.csv")
    common = ["register", "--pairs", str(pairs), "--model", str(cli_pair["model"]), "--spacing", "4", "--refine", "1",
              "--no-hd95", "--threads", "2"]
    one = runner.invoke(app, [*common, "-o", str(tmp_path / "one"), "--workers", "1"])
    two = runner.invoke(app, [*common, "-o", str(tmp_path / "two"), "--workers", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    for name in "abc":
        a = nib.load(str(tmp_path / "one" / name / "disp.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / "two" / name / "disp.nii.gz")).get_fdata()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)  # 2 threads vs 1: float rounding only
    rows = (tmp_path / "two" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["a", "done"], ["b", "done"], ["c", "done"]]  # input order


def test_ctrl_c_stops_every_pair_in_flight_and_the_batch_resumes(cli_pair: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import eoir_cli.composition as composition

    real = composition.compose_to_native

    def interrupted_for_b(fixed, *args: object, **kwargs: object):  # noqa: ANN001, ANN202
        if fixed.path is not None and fixed.path == cli_pair["moving"]:  # pair b (fixed and moving swapped)
            raise KeyboardInterrupt
        return real(fixed, *args, **kwargs)

    monkeypatch.setattr(composition, "compose_to_native", interrupted_for_b)
    pairs = _batch_csv(cli_pair, tmp_path / "pairs.csv", "ab")
    out = tmp_path / "batch"
    args = ["register", "--pairs", str(pairs), "-o", str(out), "--model", str(cli_pair["model"]), "--spacing", "4",
            "--refine", "0", "--workers", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert not (out / "b" / "metrics.json").exists()
    leftovers = [p for p in out.rglob(".eoir-partial-*")]
    assert leftovers == []  # every pair in flight removed its staging folder
    monkeypatch.setattr(composition, "compose_to_native", real)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all((out / name / "metrics.json").is_file() for name in "ab")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failing_pair_is_reported_and_the_others_finish(cli_pair: dict[str, Path], tmp_path: Path,
                                                           workers: str) -> None:
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a NIfTI file")  # exists (the list is checked for that up front), fails when read
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,name\n{cli_pair['fixed']},{cli_pair['moving']},a\n"
                     f"{cli_pair['fixed']},{bad},b\n{cli_pair['moving']},{cli_pair['fixed']},c\n")
    out = tmp_path / "batch"
    result = runner.invoke(app, ["register", "--pairs", str(pairs), "-o", str(out), "--model", str(cli_pair["model"]),
                                 "--spacing", "4", "--refine", "0", "--workers", workers])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: 1 of 3 pairs failed")
    rows = [r.split(",") for r in (out / "summary.csv").read_text().splitlines()[1:]]
    assert [r[:2] for r in rows] == [["a", "done"], ["b", "failed"], ["c", "done"]]
    assert "corrupt.nii.gz" in rows[1][-1] and not (out / "b").exists()


def test_workers_need_a_batch(cli_pair: dict[str, Path], tmp_path: Path) -> None:
    result = _cli(cli_pair, tmp_path / "out", "--workers", "2")
    assert result.exit_code == 1 and "--workers applies to a batch" in result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- composition, refine


def test_whole_voxel_composition_equals_interpolation(small_pair: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import eoir_cli.composition as composition
    from eoir_cli.io import load_volume
    from eoir_cli.preprocess import NetworkGrid

    fixed, moving = load_volume(small_pair["fixed"]), load_volume(small_pair["moving"])
    seg = load_volume(small_pair["moving_seg"], kind="label").data
    # The network grid = the fixed grid cropped by 3 voxels at the start of axis 1 (a whole-voxel shift).
    shift = np.eye(4)
    shift[1, 3] = 3
    grid = NetworkGrid(shape=(40, 48, 48), affine=fixed.affine @ shift)
    rng = np.random.default_rng(0)
    u = rng.normal(0, 1.0, (3, 40, 48, 48)).astype(np.float32)
    transform = np.eye(4)
    transform[:3, 3] = [2.0, -1.0, 0.5]
    m01 = moving.data / moving.data.max()
    fast = composition.compose_to_native(fixed, moving, grid, u, transform, m01, seg)
    monkeypatch.setattr(composition, "integer_shift", lambda index_map, tol=1e-6: None)
    slow = composition.compose_to_native(fixed, moving, grid, u, transform, m01, seg)
    for name in ("disp", "warp_itk", "warped", "before", "net_coords"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-4, atol=2e-4, err_msg=name)
    np.testing.assert_array_equal(fast.before_seg, slow.before_seg)
    assert (fast.warped_seg != slow.warped_seg).mean() < 1e-3  # nearest neighbour at float ties


@pytest.mark.parametrize("search_int_steps", [None, 1])
def test_coarse_to_fine_refinement_improves_the_match(search_int_steps: int | None) -> None:
    from eoir_cli.coords import jacobian_determinant
    from eoir_cli.losses import ncc_loss
    from eoir_cli.refine import refine
    from eoir_cli.spatial import identity_grid, warp

    torch.manual_seed(0)
    grid = identity_grid((32, 40, 36))[0]
    blobs = sum(torch.exp(-((grid - torch.rand(3, 1, 1, 1) * torch.tensor([32, 40, 36]).view(3, 1, 1, 1)) ** 2)
                          .sum(0) / 20.0) for _ in range(12))
    moving = (blobs / blobs.max())[None, None]
    d_true = torch.stack([2.0 * torch.sin(2 * math.pi * grid[(c + 1) % 3] / 32) for c in range(3)])[None]
    fixed = warp(moving, d_true)
    start = -ncc_loss(moving, fixed, window=5).item()
    disp = refine(fixed, moving, None, steps=10, lr=0.5, weight=1.0, window=5, int_steps=4, scale=0.5,
                  coarse_steps=10, search_int_steps=search_int_steps)
    assert disp.shape == (1, 3, 32, 40, 36)
    assert -ncc_loss(warp(moving, disp), fixed, window=5).item() > start + 0.05
    assert jacobian_determinant(disp).min() > 0  # a cheaper search still ends in a 4-step exponential
    if search_int_steps is not None:  # the knob changes the search, not a no-op
        full = refine(fixed, moving, None, steps=10, lr=0.5, weight=1.0, window=5, int_steps=4, scale=0.5,
                      coarse_steps=10)
        assert (disp - full).abs().max() > 1e-3


def test_smoothed_updates_improve_the_match_with_a_smoother_field() -> None:
    from eoir_cli.losses import ncc_loss, smoothness_loss
    from eoir_cli.refine import refine
    from eoir_cli.spatial import identity_grid, warp

    torch.manual_seed(1)
    grid = identity_grid((32, 40, 36))[0]
    # Fine texture (noise) on blobs: per-voxel Adam steps chase the noise, smoothed updates cannot.
    blobs = sum(torch.exp(-((grid - torch.rand(3, 1, 1, 1) * torch.tensor([32, 40, 36]).view(3, 1, 1, 1)) ** 2)
                          .sum(0) / 20.0) for _ in range(12))
    moving = (blobs / blobs.max() + 0.2 * torch.rand(32, 40, 36))[None, None]
    d_true = torch.stack([2.0 * torch.sin(2 * math.pi * grid[(c + 1) % 3] / 32) for c in range(3)])[None]
    fixed = warp(moving, d_true) + 0.1 * torch.rand(1, 1, 32, 40, 36)
    start = -ncc_loss(moving, fixed, window=5).item()
    kwargs = dict(steps=10, lr=0.5, weight=1.0, window=5, int_steps=4, scale=0.5, coarse_steps=10)
    plain = refine(fixed, moving, None, sigma=0.0, **kwargs)
    smooth = refine(fixed, moving, None, sigma=1.0, **kwargs)
    assert -ncc_loss(warp(moving, smooth), fixed, window=5).item() > start + 0.05
    assert smoothness_loss(smooth).item() < 0.8 * smoothness_loss(plain).item()


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.5])
def test_gaussian_blur_equals_scipy_with_replicated_borders(sigma: float) -> None:
    from scipy import ndimage

    from eoir_cli.losses import gaussian_blur

    field = torch.rand(1, 2, 9, 12, 7, dtype=torch.float64).float()
    got = gaussian_blur(field, sigma)
    want = np.stack([ndimage.gaussian_filter(field[0, c].double().numpy(), sigma, mode="nearest",
                                             radius=math.ceil(3.0 * sigma))  # the kernel eoir truncates
                     for c in range(2)])
    np.testing.assert_allclose(got[0].numpy(), want, rtol=0, atol=1e-5)
    assert gaussian_blur(field, 0.0) is field


# ------------------------------------------------------------------------------------------------ threads


def test_freed_memory_is_kept_for_reuse_where_glibc_allows_it() -> None:
    import platform
    import subprocess
    import sys

    code = "from eoir_cli.threads import retain_freed_memory; print(retain_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_thread_knob_sets_torch_threads_and_a_small_block_runs_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from eoir_cli.threads import THREADS_ENV, configure_threads, default_threads, torch_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(2) == 2 and torch.get_num_threads() == 2
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        monkeypatch.setenv(THREADS_ENV, "3")
        assert default_threads() == 3
        monkeypatch.delenv(THREADS_ENV)
        assert default_threads() == 5
        with pytest.raises(ValueError, match="threads: expected >= 1, got 0"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("window", [3, 5, 9])
def test_cumsum_box_ncc_equals_the_convolution_in_value_and_gradient(window: int) -> None:
    from eoir_cli.losses import ncc_loss

    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 11, 7, 9, dtype=torch.float64)
    warped = (0.5 * fixed + 0.3 * torch.rand(1, 1, 11, 7, 9, dtype=torch.float64)).requires_grad_(True)
    conv = ncc_loss(warped, fixed, window=window)
    (grad_conv,) = torch.autograd.grad(conv, warped)
    cumsum = ncc_loss(warped, fixed, window=window, box="cumsum")
    (grad_cumsum,) = torch.autograd.grad(cumsum, warped)
    assert -1.0 < conv.item() < -0.05
    torch.testing.assert_close(cumsum, conv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_cumsum, grad_conv, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="box: expected 'conv' or 'cumsum', got 'fft'"):
        ncc_loss(warped, fixed, box="fft")  # type: ignore[arg-type]


def test_early_writer_hands_back_paths_errors_and_stops_when_abandoned() -> None:
    from eoir_cli.outputs import EarlyWriter

    steps: list[str] = []

    def write(ready):  # noqa: ANN001, ANN202
        steps.append("big files")
        ready()
        steps.append("the rest")
        return {"metrics.json": Path("m")}

    assert EarlyWriter(write).release() == {"metrics.json": Path("m")} and steps == ["big files", "the rest"]
    steps.clear()
    EarlyWriter(write).abandon()
    assert steps == ["big files"]  # stopped at ready()

    def failing(ready):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        EarlyWriter(failing).release()


def test_refinement_sources_sampled_on_the_smaller_grid_are_the_resized_warp() -> None:
    """refine's half-resolution source: the moving image at p + disp(p) for the points p of the smaller
    grid equals the full-size warp resized (align_corners) for an image and a field linear in space."""
    from eoir_cli.refine import _warp_at
    from eoir_cli.spatial import resize, warp

    full, small = (17, 21, 13), (9, 11, 7)
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in full), indexing="ij"))
    moving = (0.5 * idx[0] - 0.25 * idx[1] + 0.75 * idx[2] + 3.0)[None, None]
    disp = torch.stack([0.02 * idx[1] + 0.3, -0.01 * idx[0] - 0.2, torch.full_like(idx[2], 0.4)])[None]
    got = _warp_at(moving, disp, small)
    expected = resize(warp(moving, disp), size=small)
    assert got.shape == (1, 1, *small)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))  # away from the zero padding
    torch.testing.assert_close(got[inner], expected[inner], rtol=0, atol=1e-4)
