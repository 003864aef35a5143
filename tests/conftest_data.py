"""Tiny dataset trees in each released layout, written by the tests (imported explicitly)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def blob(shape: tuple[int, int, int], shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, int16 labels): a cube (label 1) holding a smaller cube (label 2), shifted on axis 0."""
    labels = np.zeros(shape, np.int16)
    d, h, w = shape
    labels[d // 4 + shift: 3 * d // 4 + shift, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    labels[3 * d // 8 + shift: 5 * d // 8 + shift, 3 * h // 8: 5 * h // 8, 3 * w // 8: 5 * w // 8] = 2
    image = (labels * 80 + 20).astype(np.uint8)
    return image, labels


def save(path: Path, data: np.ndarray, spacing: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def lumir_tree(root: Path, shape: tuple[int, int, int] = (32, 32, 32)) -> Path:
    """LUMIR layout: 3 training images, 2 labelled validation images, 1 test pair in imagesVal."""
    train, val, test = [], [], []
    for i in range(3):
        image, _ = blob(shape, i - 1)
        save(root / "imagesTr" / f"LUMIRMRI_{i:04d}_0000.nii.gz", image)
        train.append({"image": f"/imagesTr/LUMIRMRI_{i:04d}_0000.nii.gz"})
    for k, i in enumerate((3364, 3365)):
        image, labels = blob(shape, 2 * k)
        save(root / "imagesTr" / f"LUMIRMRI_{i}_0000.nii.gz", image)
        save(root / "SanityCheckLabelsTr" / f"LUMIRMRI_{i}_0000.nii.gz", labels)
        val.append({"image": f"/imagesTr/LUMIRMRI_{i}_0000.nii.gz",
                    "seg": f"/SanityCheckLabelsTr/LUMIRMRI_{i}_0000.nii.gz"})
    for k, i in enumerate((3454, 3455)):
        image, _ = blob(shape, k)
        save(root / "imagesVal" / f"LUMIRMRI_{i}_0000.nii.gz", image)
    test.append({"fixed": "/imagesVal/LUMIRMRI_3455_0000.nii.gz", "moving": "/imagesVal/LUMIRMRI_3454_0000.nii.gz"})
    (root / "LUMIR_dataset.json").write_text(json.dumps({"training": train, "validation": val, "test": test}))
    return root


def l2r_tree(root: Path, name: str, n: int = 4, shape: tuple[int, int, int] = (16, 16, 16), ct: bool = False) -> Path:
    """Learn2Reg 2022+ layout (imagesTr/labelsTr/<NAME>_dataset.json, registration_val pairs)."""
    training = []
    for i in range(1, n + 1):
        image, labels = blob(shape, i % 3)
        data = (image.astype(np.int16) * 5 - 300) if ct else image
        save(root / "imagesTr" / f"{name}_{i:04d}_0000.nii.gz", data)
        save(root / "labelsTr" / f"{name}_{i:04d}_0000.nii.gz", labels)
        training.append({"image": f"./imagesTr/{name}_{i:04d}_0000.nii.gz",
                         "label": f"./labelsTr/{name}_{i:04d}_0000.nii.gz"})
    val = [{"fixed": f"./imagesTr/{name}_{n - 1:04d}_0000.nii.gz", "moving": f"./imagesTr/{name}_{n:04d}_0000.nii.gz"}]
    (root / f"{name}_dataset.json").write_text(json.dumps({"training": training, "registration_val": val}))
    return root


def oasis2021_tree(root: Path, shape: tuple[int, int, int] = (16, 16, 16)) -> Path:
    for i in (1, 2, 3):
        image, labels = blob(shape, i % 2)
        save(root / "L2R_2021_Task3_train" / f"img{i:04d}.nii.gz", image)
        save(root / "L2R_2021_Task3_train" / f"seg{i:04d}.nii.gz", labels)
    for i in (438, 439):
        image, labels = blob(shape, i % 2)
        save(root / "L2R_2021_Task3_val" / f"img{i:04d}.nii.gz", image)
        save(root / "L2R_2021_Task3_val" / f"seg{i:04d}.nii.gz", labels)
    (root / "pairs_val.csv").write_text("fixed,moving\n438,439\n")
    return root


def abdomen_original_tree(root: Path, shape: tuple[int, int, int] = (16, 16, 16)) -> Path:
    for i in (1, 2, 21, 22, 24, 25):
        image, labels = blob(shape, i % 3)
        save(root / "img" / f"img{i:04d}.nii.gz", image.astype(np.int16) * 5 - 300)
        save(root / "label" / f"label{i:04d}.nii.gz", labels)
    return root


def acdc_tree(root: Path, patients: tuple[int, ...] = (1, 18), shape: tuple[int, int, int] = (16, 16, 16)) -> Path:
    for p in patients:
        folder = root / "training" / f"patient{p:03d}"
        for frame, shift in ((1, 0), (12, 2)):
            image, labels = blob(shape, shift)
            save(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", image)
            save(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", labels)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\nHeight: 180\nNbFrame: 30\nWeight: 80\n")
    return root


def pairs_tree(root: Path, shape: tuple[int, int, int] = (16, 16, 16), fmt: str = "json") -> Path:
    entries = []
    for i in range(2):
        image, labels = blob(shape, 2 * i)
        save(root / f"img{i}.nii.gz", image)
        save(root / f"seg{i}.nii.gz", labels)
    entries.append({"fixed": "img0.nii.gz", "moving": "img1.nii.gz", "fixed_seg": "seg0.nii.gz",
                    "moving_seg": "seg1.nii.gz"})
    if fmt == "csv":
        path = root / "pairs.csv"
        path.write_text("fixed,moving,fixed_seg,moving_seg\nimg0.nii.gz,img1.nii.gz,seg0.nii.gz,seg1.nii.gz\n")
    else:
        path = root / "pairs.json"
        path.write_text(json.dumps(entries))
    return path
