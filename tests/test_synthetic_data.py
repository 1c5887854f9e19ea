"""The synthetic generator: MVTec layout, exact masks, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import DEFECT_TYPES, generate_synthetic_dataset, load_mask, read_mvtec
from model.data.synthetic import apply_defect, available_categories, render_texture, synthesize_sample

SMALL = {"n_good": 2, "n_defect": 1, "image_size": 48, "train_good": 1}


def read_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_synthetic_dataset(root, categories=("grid_like", "wood_like"), **SMALL)


def test_layout_is_mvtec_and_reader_reads_it_back(dataset: Path) -> None:
    samples = read_mvtec(dataset)
    assert {s.category for s in samples} == {"grid_like", "wood_like"}
    per_category = 2 + len(DEFECT_TYPES)  # n_good + one image per defect type
    assert len(samples) == 2 * per_category
    assert {s.defect for s in samples} == {"good", *DEFECT_TYPES}
    for sample in samples:
        assert sample.is_anomalous == (sample.defect != "good")
        assert (sample.mask_path is not None) == sample.is_anomalous
    assert len(read_mvtec(dataset, split="train")) == 2
    assert (dataset / "grid_like" / "ground_truth" / "hole" / "000_mask.png").is_file()


def test_masks_are_0_255_and_mark_exactly_the_changed_pixels(dataset: Path) -> None:
    for sample in read_mvtec(dataset):
        if not sample.is_anomalous:
            continue
        stem = int(sample.image_path.stem)
        clean, image, mask = synthesize_sample(sample.category, sample.defect, stem, SMALL["image_size"], seed=0)
        assert np.array_equal(read_pixels(sample.image_path), image)
        raw_mask = read_pixels(sample.mask_path)
        assert set(np.unique(raw_mask)) <= {0, 255}
        changed = np.any(image != clean, axis=-1)
        assert changed.any()
        assert np.array_equal(load_mask(sample.mask_path), changed)
        assert np.array_equal(mask, changed)


def test_good_images_are_clean_textures(dataset: Path) -> None:
    clean, image, mask = synthesize_sample("wood_like", "test/good", 1, SMALL["image_size"], seed=0)
    assert mask is None and image is clean
    assert np.array_equal(read_pixels(dataset / "wood_like" / "test" / "good" / "001.png"), clean)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "a", categories=("carpet_like",), **SMALL)
    second = generate_synthetic_dataset(tmp_path / "b", categories=("carpet_like",), **SMALL)
    other = generate_synthetic_dataset(tmp_path / "c", categories=("carpet_like",), seed=1, **SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    relative = Path("carpet_like/test/scratch/000.png")
    assert not np.array_equal(read_pixels(first / relative), read_pixels(other / relative))


@pytest.mark.parametrize("category", available_categories())
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_every_category_and_defect_gives_an_exact_nonempty_mask(category: str, defect: str) -> None:
    rng = np.random.default_rng(3)
    texture = render_texture(category, 64, rng)
    assert texture.shape == (64, 64, 3) and texture.dtype == np.uint8
    image, mask = apply_defect(texture, defect, rng)
    assert mask.shape == (64, 64) and mask.dtype == np.bool_
    assert mask.sum() >= 6
    assert np.array_equal(mask, np.any(image != texture, axis=-1))


def test_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic"):
        generate_synthetic_dataset(tmp_path, categories=("marble_like",))
    with pytest.raises(ValueError, match="unknown defect"):
        generate_synthetic_dataset(tmp_path, defects=("crack",))
