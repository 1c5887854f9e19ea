"""Readers for MVTec AD, VisA and folder layouts, on tiny data sets built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import (
    DATASET_KINDS,
    DatasetError,
    InspectionSample,
    load_image,
    load_mask,
    read_dataset,
    read_folder,
    read_mvtec,
    read_visa,
)


def write_image(path: Path, size: int = 8, value: int = 128, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": (size, size, 3), "L": (size, size)}[mode]
    Image.fromarray(np.full(channels, value, np.uint8), mode=None).save(path)
    return path


def write_mask(path: Path, size: int = 8, high: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    mask[2:5, 3:6] = high
    Image.fromarray(mask).save(path)
    return path


def build_mvtec(root: Path) -> Path:
    """bottle: 2 good + 2 broken_large; cable: 1 good + 1 cut; bottle also has train/good."""
    for category, defects in {"bottle": {"good": 2, "broken_large": 2}, "cable": {"good": 1, "cut": 1}}.items():
        write_image(root / category / "train" / "good" / "000.png")
        for defect, count in defects.items():
            for index in range(count):
                write_image(root / category / "test" / defect / f"{index:03d}.png")
                if defect != "good":
                    write_mask(root / category / "ground_truth" / defect / f"{index:03d}_mask.png")
    (root / "license.txt").write_text("not a category")
    return root


def build_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for index, (split, label) in enumerate([("train", "normal"), ("test", "normal"), ("test", "anomaly")]):
            folder = "Normal" if label == "normal" else "Anomaly"
            image = f"{obj}/Data/Images/{folder}/{index:04d}.JPG"
            write_image(root / image)
            mask = ""
            if label == "anomaly":
                mask = f"{obj}/Data/Masks/Anomaly/{index:04d}.png"
                write_mask(root / mask, high=1)  # VisA masks hold 0/1
            rows.append(f"{obj},{split},{label},{image},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------------ MVTec AD


def test_mvtec_reads_counts_labels_and_mask_paths(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mvtec")
    samples = read_mvtec(root)
    assert len(samples) == 6
    assert [s.category for s in samples] == ["bottle"] * 4 + ["cable"] * 2
    broken = [s for s in samples if s.defect == "broken_large"]
    assert len(broken) == 2 and all(s.is_anomalous for s in broken)
    assert broken[0].mask_path == root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    good = [s for s in samples if s.defect == "good"]
    assert len(good) == 3 and not any(s.is_anomalous for s in good)
    assert all(s.mask_path is None for s in good)
    assert isinstance(samples[0], InspectionSample)


def test_mvtec_category_filter_and_train_split(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mvtec")
    assert {s.category for s in read_mvtec(root, categories=["cable"])} == {"cable"}
    assert len(read_mvtec(root, categories="cable")) == 2  # a single name works too
    train = read_mvtec(root, split="train")
    assert len(train) == 2 and all(s.defect == "good" and s.mask_path is None for s in train)


def test_mvtec_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as error:
        read_mvtec(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_mvtec_wrong_layout_names_expected_structure(tmp_path: Path) -> None:
    write_image(tmp_path / "flat" / "img.png")
    with pytest.raises(DatasetError, match="does not look like MVTec AD") as error:
        read_mvtec(tmp_path / "flat")
    assert "<root>/<category>/test/<defect>/" in str(error.value)
    assert str(tmp_path / "flat") in str(error.value)


def test_mvtec_unknown_category_lists_available(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match="unknown category screw") as error:
        read_mvtec(root, categories=["screw"])
    assert "bottle, cable" in str(error.value)


def test_mvtec_missing_promised_mask_names_expected_path(tmp_path: Path) -> None:
    root = build_mvtec(tmp_path / "mvtec")
    expected = root / "cable" / "ground_truth" / "cut" / "000_mask.png"
    expected.unlink()
    with pytest.raises(DatasetError, match="mask missing") as error:
        read_mvtec(root)
    assert str(expected) in str(error.value)


# ------------------------------------------------------------------------ VisA


def test_visa_reads_split_labels_and_masks(tmp_path: Path) -> None:
    root = build_visa(tmp_path / "visa")
    samples = read_visa(root)
    assert len(samples) == 4
    assert [(s.category, s.defect, s.is_anomalous) for s in samples] == [
        ("candle", "good", False), ("candle", "anomaly", True), ("pcb1", "good", False), ("pcb1", "anomaly", True),
    ]
    assert samples[1].mask_path == root / "candle" / "Data" / "Masks" / "Anomaly" / "0002.png"
    assert samples[0].mask_path is None
    assert len(read_visa(root, split="train")) == 2
    assert len(read_visa(root, split=None)) == 6
    assert {s.category for s in read_visa(root, categories=["pcb1"])} == {"pcb1"}
    # VisA's 0/1 masks read as anomalous where the value is 1.
    assert load_mask(samples[1].mask_path).sum() == 9


def test_visa_missing_csv_names_it(tmp_path: Path) -> None:
    root = build_visa(tmp_path / "visa")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="split file not found") as error:
        read_visa(root)
    assert str(root / "split_csv" / "1cls.csv") in str(error.value)


def test_visa_missing_columns(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,test,a.png\n")
    with pytest.raises(DatasetError, match=r"lacks column.*label, mask"):
        read_visa(root)


def test_visa_missing_image_and_mask_are_named(tmp_path: Path) -> None:
    root = build_visa(tmp_path / "visa")
    mask = root / "pcb1" / "Data" / "Masks" / "Anomaly" / "0002.png"
    mask.unlink()
    with pytest.raises(DatasetError, match="mask listed at") as error:
        read_visa(root)
    assert str(mask) in str(error.value)
    image = root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG"
    image.unlink()
    with pytest.raises(DatasetError, match="image listed at") as error:
        read_visa(root)
    assert str(image) in str(error.value)


def test_visa_anomaly_row_without_mask(tmp_path: Path) -> None:
    root = build_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","  # candle's anomaly row, mask emptied
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="empty mask") as error:
        read_visa(root)
    assert f"{csv_path}:4" in str(error.value)


def test_visa_unknown_category(tmp_path: Path) -> None:
    root = build_visa(tmp_path / "visa")
    with pytest.raises(DatasetError, match=r"unknown category capsules \(available: candle, pcb1\)"):
        read_visa(root, categories=["capsules"])


# ------------------------------------------------------------------------ folder


def test_folder_reads_optional_masks(tmp_path: Path) -> None:
    root = tmp_path / "my_part"
    write_image(root / "good" / "a.png")
    write_image(root / "good" / "b.jpg")
    write_image(root / "dent" / "d1.png")
    write_image(root / "dent" / "d2.bmp")
    write_image(root / "scratch" / "s1.png")
    write_image(root / "good" / ".hidden.png")
    (root / "good" / "notes.txt").write_text("ignored")
    write_mask(root / "ground_truth" / "dent" / "d1_mask.png")
    write_mask(root / "ground_truth" / "scratch" / "s1.png")  # same stem, no _mask suffix
    samples = read_folder(root)
    by_name = {s.image_path.name: s for s in samples}
    assert sorted(by_name) == ["a.png", "b.jpg", "d1.png", "d2.bmp", "s1.png"]
    assert {s.category for s in samples} == {"my_part"}
    assert by_name["d1.png"].mask_path == root / "ground_truth" / "dent" / "d1_mask.png"
    assert by_name["d2.bmp"].mask_path is None and by_name["d2.bmp"].is_anomalous
    assert by_name["s1.png"].mask_path == root / "ground_truth" / "scratch" / "s1.png"
    assert not by_name["a.png"].is_anomalous and by_name["a.png"].mask_path is None
    assert {s.category for s in read_folder(root, category="widget")} == {"widget"}


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected <root>/good/") as error:
        read_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)
    (tmp_path / "no_images" / "good").mkdir(parents=True)
    (tmp_path / "no_images" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no image files"):
        read_folder(tmp_path / "no_images")


# ------------------------------------------------------------------------ loaders


def test_load_image_converts_to_rgb_and_mask_resizes(tmp_path: Path) -> None:
    gray = write_image(tmp_path / "gray.png", value=7, mode="L")
    image = load_image(gray)
    assert image.mode == "RGB" and image.size == (8, 8)
    mask_path = write_mask(tmp_path / "mask.png")
    mask = load_mask(mask_path)
    assert mask.dtype == np.bool_ and mask.shape == (8, 8) and mask.sum() == 9
    resized = load_mask(mask_path, size=(16, 24))  # (height, width)
    assert resized.shape == (16, 24) and resized.dtype == np.bool_
    assert set(np.unique(resized)) == {False, True}


def test_corrupt_and_missing_files_raise_dataset_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DatasetError, match="cannot decode") as error:
        load_image(corrupt)
    assert str(corrupt) in str(error.value)
    truncated = write_image(tmp_path / "truncated.png", size=64)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"truncated\.png"):
        load_mask(truncated)
    with pytest.raises(DatasetError, match="not found"):
        load_image(tmp_path / "absent.png")


# ------------------------------------------------------------------------ registry


def test_registry_dispatches_every_kind(tmp_path: Path) -> None:
    assert set(DATASET_KINDS) == {"mvtec", "visa", "folder", "synthetic"}
    assert len(read_dataset("mvtec", build_mvtec(tmp_path / "mvtec"))) == 6
    assert len(read_dataset("visa", build_visa(tmp_path / "visa"), categories=["pcb1"])) == 2
    write_image(tmp_path / "part" / "good" / "a.png")
    assert read_dataset("folder", tmp_path / "part", categories=["widget"])[0].category == "widget"
    synthetic = read_dataset("synthetic", tmp_path / "synthetic", categories=["grid_like"])
    assert {s.category for s in synthetic} == {"grid_like"} and any(s.is_anomalous for s in synthetic)
    # A second read reuses the generated files instead of regenerating them.
    stamp = synthetic[0].image_path.stat().st_mtime_ns
    read_dataset("synthetic", tmp_path / "synthetic")
    assert synthetic[0].image_path.stat().st_mtime_ns == stamp


def test_registry_unknown_kind_lists_kinds() -> None:
    with pytest.raises(DatasetError, match=r"unknown data set kind 'coco'.*mvtec, visa, folder, synthetic"):
        read_dataset("coco", "/nowhere")
