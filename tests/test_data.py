"""Dataset layouts, loaders and their error messages; the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eoir_cli.data.datasets import DatasetError, label_lut, load_pair, normalize, open_dataset
from eoir_cli.data.synth import SynthConfig, SynthPairs, random_disp
from eoir_cli.spatial import jacobian_determinant
from tests.conftest_data import (
    abdomen_original_tree,
    acdc_tree,
    blob,
    l2r_tree,
    lumir_tree,
    oasis2021_tree,
    pairs_tree,
    save,
)


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


def test_lumir_layout(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    layout = open_dataset("lumir", root)
    assert len(layout.train_images) == 3
    assert len(layout.val_pairs) == 2  # 2 labelled images taken pairwise in both orders
    assert [(p.fixed.id, p.moving.id) for p in layout.test_pairs] == [("3455", "3454")]
    sample = load_pair(layout.val_pairs[0], layout.normalization, True)
    assert sample["moving"].shape == (1, 32, 32, 32)
    # u8 normalisation: background 20/255, label 2 = 180/255
    assert float(sample["moving"].min()) == pytest.approx(20 / 255)
    assert float(sample["moving"].max()) == pytest.approx(180 / 255)
    assert sorted(torch.unique(sample["fixed_labels"]).tolist()) == [0, 1, 2]


def test_lumir_errors_name_the_entry(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    (root / "imagesTr" / "LUMIRMRI_0001_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"LUMIR_dataset.json: training\[1\]: file .*LUMIRMRI_0001_0000.nii.gz does "
                                           "not exist"):
        open_dataset("lumir", root)
    (root / "LUMIR_dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed JSON manifest"):
        open_dataset("lumir", root)
    with pytest.raises(DatasetError, match="expected the lumir dataset root directory"):
        open_dataset("lumir", tmp_path / "nowhere")
    one = {"training": [{"image": "/imagesTr/LUMIRMRI_0000_0000.nii.gz"}]}
    (root / "LUMIR_dataset.json").write_text(json.dumps(one))
    with pytest.raises(DatasetError, match="training images: expected at least 2, got 1"):
        open_dataset("lumir", root)


def test_label_shape_mismatch_and_unreadable(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    save(root / "SanityCheckLabelsTr" / "LUMIRMRI_3364_0000.nii.gz", np.zeros((8, 8, 8), np.int16))
    layout = open_dataset("lumir", root)
    pair = next(p for p in layout.val_pairs if p.moving.id == "3364")
    with pytest.raises(DatasetError, match=r"validation\[0\]: label shape \(8, 8, 8\) differs from image shape"):
        load_pair(pair, layout.normalization, True)
    (root / "imagesTr" / "LUMIRMRI_3365_0000.nii.gz").write_bytes(b"garbage")
    other = next(p for p in layout.val_pairs if p.moving.id == "3365")
    with pytest.raises(DatasetError, match=r"validation\[1\]: .*not a readable NIfTI"):
        load_pair(other, layout.normalization, True)


def test_oasis_both_layouts(tmp_path: Path) -> None:
    new = open_dataset("oasis", l2r_tree(tmp_path / "new", "OASIS"))
    assert len(new.train_images) == 2 and len(new.val_pairs) == 1  # 4 images, 2 in the val pair
    assert new.val_pairs[0].fixed.id == "0003" and new.val_pairs[0].moving.id == "0004"
    old = open_dataset("oasis", oasis2021_tree(tmp_path / "old"))
    assert len(old.train_images) == 3
    assert [(p.fixed.id, p.moving.id) for p in old.val_pairs] == [("0438", "0439")]
    assert old.labels == tuple(range(1, 36))
    (tmp_path / "old" / "pairs_val.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"expected a CSV with columns \['fixed', 'moving'\]"):
        open_dataset("oasis", tmp_path / "old")
    with pytest.raises(DatasetError, match="expected OASIS_dataset.json"):
        open_dataset("oasis", tmp_path)


def test_abdomen_layouts_and_ct_window(tmp_path: Path) -> None:
    new = open_dataset("abdomen", l2r_tree(tmp_path / "new", "AbdomenCTCT", ct=True))
    assert new.normalization == "ct"
    sample = load_pair(new.val_pairs[0], new.normalization, True)
    # background HU 20*5-300 = -200 -> (-200+500)/1300 = 0.230769; label 2: 180*5-300 = 600 -> 0.846154
    assert float(sample["fixed"].min()) == pytest.approx(300 / 1300, abs=1e-6)
    assert float(sample["fixed"].max()) == pytest.approx(1100 / 1300, abs=1e-6)
    old = open_dataset("abdomen", abdomen_original_tree(tmp_path / "old"))
    assert [r.id for r in old.train_images] == ["0001", "0002"]
    assert len(old.val_pairs) == 2 and len(old.test_pairs) == 2  # 21<->22, 24<->25
    assert normalize(np.array([-1000.0, 800.0, 2000.0]), "ct").tolist() == [0.0, 1.0, 1.0]


def test_acdc_both_directions(tmp_path: Path) -> None:
    layout = open_dataset("acdc", acdc_tree(tmp_path / "ACDC"))
    assert len(layout.train_pairs) == 2 and len(layout.val_pairs) == 2  # patient 1 train, 18 validation
    ids = {(p.fixed.id, p.moving.id) for p in layout.val_pairs}
    assert ids == {("018_es", "018_ed"), ("018_ed", "018_es")}
    (tmp_path / "ACDC" / "training" / "patient001" / "Info.cfg").write_text("ES: 12\n")
    with pytest.raises(DatasetError, match="expected an integer 'ED:' frame entry"):
        open_dataset("acdc", tmp_path / "ACDC")


def test_pairs_json_and_csv(tmp_path: Path) -> None:
    for fmt in ("json", "csv"):
        path = pairs_tree(tmp_path / fmt, fmt=fmt)
        layout = open_dataset("pairs", path)
        assert len(layout.val_pairs) == 1 and layout.val_pairs[0].fixed.image.name == "img0.nii.gz"
    (tmp_path / "json" / "pairs.json").write_text(json.dumps([{"fixed": "img0.nii.gz", "moving": "nope.nii.gz"}]))
    with pytest.raises(DatasetError, match=r"pairs.json: pair 1.moving: file .*nope.nii.gz does not exist"):
        open_dataset("pairs", tmp_path / "json")


def test_loading_never_writes_into_data_dir(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    before = _snapshot(root)
    layout = open_dataset("lumir", root)
    for pair in layout.val_pairs:
        load_pair(pair, layout.normalization, True)
    assert _snapshot(root) == before


def test_label_lut() -> None:
    lut = label_lut([5, 2])
    assert lut.tolist() == [0, 0, 1, 0, 0, 2]


def test_synth_deterministic_and_in_range() -> None:
    config = SynthConfig(shape=(24, 24, 24), num_shape_labels=6)
    ds = SynthPairs(config, None, seed=3)
    a, b = ds[5], ds[5]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = ds[6]
    assert not torch.equal(a["moving"], c["moving"])
    assert not torch.equal(a["moving"], SynthPairs(config, None, seed=4)[5]["moving"])
    for key in ("moving", "fixed"):
        assert a[key].shape == (1, 24, 24, 24) and a[key].dtype == torch.float32
        assert 0.0 <= float(a[key].min()) and float(a[key].max()) <= 1.0
    assert a["moving_labels"].shape == (24, 24, 24) and int(a["moving_labels"].max()) < 6
    assert ds.num_classes == 6


def test_synth_deformation_is_diffeomorphic() -> None:
    gen = torch.Generator().manual_seed(0)
    disp = random_disp((32, 32, 32), SynthConfig(deform_max=3.0), gen)
    assert float(disp.abs().max()) > 0.1
    assert float(jacobian_determinant(disp).min()) > 0


def test_synth_label_maps_and_real_pairs(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    for i in range(2):
        from tests.conftest_data import blob

        image, labels = blob((20, 20, 20), i)
        save(root / "brain_lumirlike" / "imagesTr" / f"S_{i}.nii.gz", image)
        save(root / "brain_lumirlike" / "labelsTr" / f"S_{i}.nii.gz", labels)
    ds = SynthPairs(SynthConfig(shape=(16, 16, 16), real_fraction=1.0), root, seed=0)
    assert len(ds.sources) == 2 and len(ds.reals) == 2
    sample = ds[0]
    assert bool(sample["has_labels"]) and sample["moving"].shape == (1, 16, 16, 16)
    # real pairs are the two different subjects: intensities are k/255 multiples of the blob values
    assert float(sample["moving"].max()) <= 180 / 255 + 1e-6
    with pytest.raises(Exception, match="expected >= 2 real images"):
        SynthPairs(SynthConfig(shape=(16, 16, 16), real_fraction=0.5), root / "brain_lumirlike" / "labelsTr")


def test_lumir_validation_needs_only_the_validation_files(tmp_path: Path) -> None:
    root = lumir_tree(tmp_path / "LUMIR")
    (root / "imagesTr" / "LUMIRMRI_0001_0000.nii.gz").unlink()  # a training image the user did not download
    layout = open_dataset("lumir", root, splits=("val",))
    assert len(layout.val_pairs) == 2
    with pytest.raises(DatasetError, match=r"training\[1\]: file .*LUMIRMRI_0001_0000.nii.gz does not exist"):
        open_dataset("lumir", root)  # training reads it
    (root / "SanityCheckLabelsTr" / "LUMIRMRI_3364_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"validation\[0\]: file .*LUMIRMRI_3364_0000.nii.gz does not exist"):
        open_dataset("lumir", root, splits=("val",))


def _pair_list(root: Path, n: int, split: list[str] | None = None, labels: list[int] | None = None) -> Path:
    entries = []
    for i in range(n + 1):
        image, seg = blob((16, 16, 16), i % 3)
        save(root / f"img{i}.nii.gz", image)
        save(root / f"seg{i}.nii.gz", seg * 3)  # label values 3 and 6
    for i in range(n):
        entry = {"fixed": f"img{i}.nii.gz", "moving": f"img{i + 1}.nii.gz", "fixed_seg": f"seg{i}.nii.gz",
                 "moving_seg": f"seg{i + 1}.nii.gz"}
        if split:
            entry["split"] = split[i]
        entries.append(entry)
    path = root / "pairs.json"
    path.write_text(json.dumps({"pairs": entries, "labels": labels} if labels else entries))
    return path


def test_pair_list_training_holds_out_validation_pairs_and_uses_the_labels(tmp_path: Path) -> None:
    from eoir_cli.data.datasets import build_training_data
    from eoir_cli.train import TrainConfig

    path = _pair_list(tmp_path / "ten", 10)
    assert len(open_dataset("pairs", path).val_pairs) == 10  # `eoir test` evaluates every labelled pair
    data = build_training_data(TrainConfig(dataset="pairs", data_dir=str(path), val_pairs=4, shape=(16, 16, 16)))
    assert len(data.val) == 2  # min(--val-pairs 4, 10 // 5)
    train_pairs = [data.train.pair(i) for i in range(200)]
    assert {(p.fixed.image.name, p.moving.image.name) for p in train_pairs} == {
        (f"img{i}.nii.gz", f"img{i + 1}.nii.gz") for i in range(10) if i not in (2, 7)}  # (k + 0.5) * 10 / 2
    # Dice supervision: the label values found in the maps (3, 6) become classes 1, 2 (+ background).
    assert data.num_classes == 3
    assert set(data.train[0]["moving_labels"].unique().tolist()) <= {0, 1, 2}


def test_pair_list_split_column_and_labels_key(tmp_path: Path) -> None:
    from eoir_cli.data.datasets import build_training_data
    from eoir_cli.train import TrainConfig

    path = _pair_list(tmp_path / "split", 3, split=["train", "train", "val"], labels=[3])
    layout = open_dataset("pairs", path)
    assert [p.fixed.image.name for p in layout.train_pairs] == ["img0.nii.gz", "img1.nii.gz"]
    assert [p.fixed.image.name for p in layout.val_pairs] == ["img2.nii.gz"]
    assert layout.labels == (3,)
    data = build_training_data(TrainConfig(dataset="pairs", data_dir=str(path), shape=(16, 16, 16)))
    assert len(data.val) == 1 and data.num_classes == 2
    bad = tmp_path / "split" / "bad.json"
    bad.write_text(json.dumps([{"fixed": "img0.nii.gz", "moving": "img1.nii.gz", "split": "tset"}]))
    with pytest.raises(DatasetError, match="expected split 'train' or 'val', got 'tset'"):
        open_dataset("pairs", bad)
