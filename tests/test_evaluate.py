"""``eoir test`` / evaluate: identity model metrics, submissions, padding; training on a fake LUMIR tree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eoir_cli.checkpoint import save_checkpoint
from eoir_cli.cli import app
from eoir_cli.config import resolve_config
from eoir_cli.evaluate import evaluate
from eoir_cli.inference import padded_size, predict_disp
from eoir_cli.metrics import mean_dice
from eoir_cli.model import EOIR
from eoir_cli.train import TrainConfig, train
from tests.conftest_data import blob, lumir_tree

runner = CliRunner()


def _identity_model(path: Path) -> Path:
    """An EOIR whose velocity heads are zero: every level's velocity is 0, so disp = 0 (identity)."""
    model = EOIR(resolve_config("lumir", channels=2))
    with torch.no_grad():
        for est in model.estimators:
            est.to_velocity.weight.zero_()
            est.to_velocity.bias.zero_()
    return save_checkpoint(path, model)


def test_padded_size_golden() -> None:
    # 160*0.5 = 80 = 5*16; 17 -> 64: 64*0.5 = 32 = 2*16 (the coarsest level needs 2 voxels per axis)
    assert padded_size((150, 160, 17), (16, 16, 16), 0.5) == (160, 160, 64)
    assert padded_size((32, 32, 32), (16, 16, 16), 1.0) == (32, 32, 32)


def test_predict_disp_pads_and_crops() -> None:
    model = EOIR(resolve_config("lumir", channels=2)).eval()
    x = torch.rand(1, 1, 20, 18, 17)
    with torch.no_grad():
        disp = predict_disp(model, x, x)
    assert disp.shape == (1, 3, 20, 18, 17)


def test_identity_model_metrics_and_submission(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    model = _identity_model(tmp_path / "identity.pt")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", str(model),
                                 "--out", str(out), "--save-disp", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(out / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    # The two labelled images are the same blob shifted by 2 voxels on axis 0.
    _, a = blob((32, 32, 32), 0)
    _, b = blob((32, 32, 32), 2)
    before = mean_dice(a, b)
    for row in rows:
        assert float(row["dice"]) == pytest.approx(before, abs=1e-9)
        assert float(row["dice_before"]) == pytest.approx(before, abs=1e-9)
        assert float(row["ndv_percent"]) == 0.0
        assert float(row["jac_nonpos_percent"]) == 0.0
    assert before == pytest.approx((2944 * 2 / 7168 + 0.75) / 2)  # see test_identity_dice_by_hand
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 2 and summary["dice"] == pytest.approx(before)
    assert set(summary["dice_per_label"]) == {"1", "2"}
    files = sorted(p.name for p in (out / "submission").iterdir())
    assert files == ["disp_3455_3454.nii.gz"]
    img = nib.load(str(out / "submission" / files[0]))
    assert img.shape == (32, 32, 32, 3) and img.get_data_dtype() == np.float32
    assert float(np.abs(np.asarray(img.dataobj)).max()) == 0.0


def test_identity_dice_by_hand() -> None:
    _, a = blob((32, 32, 32), 0)
    _, b = blob((32, 32, 32), 2)
    # label 2: 8x8x8 cubes shifted by 2 along axis 0 -> overlap 6*8*8; Dice = 2*384/(512+512) = 0.75
    assert mean_dice(a, b, labels=[2]) == pytest.approx(0.75)
    # label 1: 16^3 - 8^3 = 3584 voxels each; overlapping slices x in [10, 24): 256 voxels per slice where
    # neither inner cube is present (4 slices), 192 where one is (x in [12, 22), 10 slices):
    # 4*256 + 10*192 = 2944 -> Dice = 2*2944 / 7168 = 0.821428...
    assert mean_dice(a, b, labels=[1]) == pytest.approx(2 * 2944 / 7168)


def test_eval_bad_inputs(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    model = _identity_model(tmp_path / "identity.pt")
    inside = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", str(model),
                                 "--out", str(root / "results"), "--device", "cpu"])
    assert inside.exit_code == 1 and "outside the data directory" in inside.output
    assert not (root / "results").exists()
    missing = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(tmp_path / "nope"), "--model",
                                  str(model), "--device", "cpu"])
    assert missing.exit_code == 1 and "expected the lumir dataset root directory" in missing.output
    assert "Traceback" not in missing.output


def test_padding_odd_sizes(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR", shape=(20, 24, 18))
    model = _identity_model(tmp_path / "identity.pt")
    result = evaluate(str(model), "lumir", root, tmp_path / "out", save_disp=True, hd95=False)
    assert result.summary["ndv_percent"] == 0.0
    img = nib.load(str(tmp_path / "out" / "submission" / "disp_3455_3454.nii.gz"))
    assert img.shape == (20, 24, 18, 3)


def test_few_step_training_on_fake_lumir(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    out = tmp_path / "run"
    result = train(TrainConfig(dataset="lumir", data_dir=str(root), channels=2, steps=2, val_every=1, save_every=2,
                               out=str(out), device="cpu"))
    assert result.metric_name == "dice" and result.best_metric is not None and 0 < result.best_metric <= 1
    assert (out / "model.safetensors").is_file() and (out / "best.pt").is_file()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert rows[0]["dice"] == "0.0"  # LUMIR training images carry no labels: no Dice term
    ev = evaluate(str(out / "model.safetensors"), "lumir", root, None, hd95=False)
    assert len(ev.rows) == 2
    # every checkpoint says how to run the model: LUMIR trains on uint8 brains divided by 255
    from eoir_cli.checkpoint import load_model
    from eoir_cli.deployment import Normalization, deployment_of

    for name in ("model.safetensors", "best.pt", "last.pt"):
        facts = deployment_of(load_model(out / name).checkpoint_info)
        assert facts.source == "model file" and facts.domain == "brain MRI"
        assert facts.normalization == Normalization("divide", None, 255.0) and facts.spacing == (1.0, 1.0, 1.0)


def test_test_and_register_give_the_same_field_for_the_same_pair(tmp_path: Path) -> None:
    from eoir_cli.deployment import DATASET_DEPLOYMENT
    from eoir_cli.pipeline import register

    root = lumir_tree(tmp_path / "LUMIR")
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "m.pt", EOIR(resolve_config("lumir", channels=2)),
                            extra={"deployment": DATASET_DEPLOYMENT["lumir"].to_dict()})  # /255, 1 mm
    evaluate(str(model), "lumir", root, tmp_path / "eval", save_disp=True, hd95=False)
    submitted = nib.load(str(tmp_path / "eval/submission/disp_3455_3454.nii.gz")).get_fdata()
    # The same pair through the register pipeline, its grid being the images' own (32^3 at 1 mm, no affine).
    res = register(root / "imagesVal/LUMIRMRI_3455_0000.nii.gz", root / "imagesVal/LUMIRMRI_3454_0000.nii.gz",
                   model=str(model), affine=False, refine=0, shape=(32, 32, 32), qc=False, hd95=False)
    assert res.metrics["deployment"]["normalization_used"]["kind"] == "divide"
    assert np.abs(submitted).max() > 1e-3  # a field worth comparing
    np.testing.assert_allclose(res.disp, submitted, atol=1e-4)


def test_eval_output_checked_before_any_computation(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    (tmp_path / "afile").write_text("x")
    missing_model = str(tmp_path / "not_there.pt")  # the model is opened after the checks: never reached
    for out, message in ((tmp_path / "afile", "expected a folder, got an existing file"),
                         (tmp_path / "afile" / "sub", "cannot create it"),
                         (root / "results", "outside the data directory")):
        result = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", missing_model,
                                     "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 1 and message in result.output, result.output


def test_eval_refuses_to_replace_results_without_overwrite(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    model = _identity_model(tmp_path / "identity.pt")
    out = tmp_path / "eval"
    args = ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", str(model), "--out", str(out),
            "--device", "cpu", "--no-hd95"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already holds results (pairs.csv, summary.json); pass --overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_eval_pair_list_in_the_working_folder(tmp_path: Path) -> None:
    # A pairs.csv beside the results folder is fine; an --out whose pairs.csv IS the list is refused.
    from tests.conftest_data import pairs_tree

    path = pairs_tree(tmp_path, fmt="csv", shape=(32, 32, 32))
    model = _identity_model(tmp_path / "identity.pt")
    ok = runner.invoke(app, ["test", "--dataset", "pairs", "--data-dir", str(path), "--model", str(model),
                             "--out", str(tmp_path / "results"), "--device", "cpu", "--no-hd95"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "results" / "pairs.csv").is_file()
    clash = runner.invoke(app, ["test", "--dataset", "pairs", "--data-dir", str(path), "--model", str(model),
                                "--out", str(tmp_path), "--device", "cpu", "--no-hd95", "--overwrite"])
    assert clash.exit_code == 1 and "pairs.csv would replace the input" in clash.output
    assert path.read_text().startswith("fixed,moving")


def test_eval_says_network_alone_and_offers_the_register_pipeline(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    model = _identity_model(tmp_path / "identity.pt")
    alone = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", str(model),
                                "--out", str(tmp_path / "a"), "--device", "cpu", "--no-hd95"])
    assert alone.exit_code == 0 and "network alone" in alone.output
    piped = runner.invoke(app, ["test", "--dataset", "lumir", "--data-dir", str(root), "--model", str(model),
                                "--out", str(tmp_path / "b"), "--device", "cpu", "--no-hd95", "--affine",
                                "--refine", "2", "--labels", "2"])
    assert piped.exit_code == 0, piped.output
    assert "affine + network + 2 refinement steps" in piped.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["pipeline"] == {"affine": True, "refine": 2, "network_alone": False}
    assert set(summary["dice_per_label"]) == {"2"}
    # The blobs differ by a 2-voxel shift: affine + refinement must recover part of it.
    assert summary["dice"] > summary["dice_before"] + 0.05


def test_test_command_does_not_offer_synth() -> None:
    result = runner.invoke(app, ["test", "--dataset", "synth", "--data-dir", ".", "--model", "default"])
    assert result.exit_code == 2 and "synth" in result.output
