"""`genclip predict / train / evaluate` end to end on the tiny backbone and synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data.synthetic import generate_synthetic_dataset
from model.training import resume_path
from service.cli import main

TINY_FLAGS = ["--backbone", "tiny-clip-random", "--backbone-weights", "random", "--device", "cpu"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), categories=("carpet_like", "wood_like"), n_good=2, n_defect=1, image_size=64
    )


@pytest.fixture(scope="module")
def trained_checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("weights") / "genclip_synthetic.safetensors"
    code = main(["train", "--data", "synthetic", "--root", str(synthetic_root), "--epochs", "2", "--batch-size", "8",
                 "--train-image-size", "64", "--output", str(output), "--no-progress", *TINY_FLAGS])
    assert code == 0
    return output


def test_train_writes_checkpoint_and_sidecar(trained_checkpoint: Path, synthetic_root: Path) -> None:
    sidecar = json.loads(trained_checkpoint.with_suffix(".json").read_text())
    assert sidecar["detector"] == "genclip"
    assert sidecar["backbone"] == "tiny-clip-random" and sidecar["backbone_weights"] == "random"
    assert sidecar["layers"] == [1, 2, 3, 4] and sidecar["image_size"] == 64
    training = sidecar["training"]
    assert training["data"] == "synthetic" and training["categories"] == ["carpet_like", "wood_like"]
    assert training["epochs"] == 2 and len(training["epoch_losses"]) == 2
    assert training["final_loss"] == training["epoch_losses"][-1]
    assert sidecar["code_version"]
    assert not resume_path(trained_checkpoint).exists()  # cleaned up after a finished run


def test_interrupted_training_resumes_where_it_stopped(synthetic_root: Path, tmp_path: Path) -> None:
    from model.backbone import load_backbone
    from model.data.mvtec import read_mvtec
    from model.training import TrainingConfig, train
    from model.weights_source import BackboneSpec

    backbone = load_backbone(BackboneSpec("tiny-clip-random", "random"))
    samples = read_mvtec(synthetic_root)
    config = TrainingConfig(output=tmp_path / "straight.safetensors", epochs=2, batch_size=4, image_size=64)
    straight = train(backbone, samples, config, progress=False).epoch_losses

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch: int, loss: float) -> None:
        if epoch == 1:
            raise Interrupt

    config.output = tmp_path / "interrupted.safetensors"
    with pytest.raises(Interrupt):
        train(backbone, samples, config, progress=False, on_epoch_end=stop_after_first)
    assert not config.output.exists() and resume_path(config.output).exists()
    config.resume = True
    resumed_epochs: list[int] = []
    result = train(backbone, samples, config, progress=False, on_epoch_end=lambda e, l: resumed_epochs.append(e))
    assert resumed_epochs == [2]  # epoch 1 was not run again
    assert result.epoch_losses == pytest.approx(straight, rel=1e-5)  # same seed, same data order, same result


def test_evaluate_writes_report_table_and_figures(trained_checkpoint: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = main(["evaluate", "--data", "synthetic", "--root", str(synthetic_root), "--checkpoint", str(trained_checkpoint),
                 "--out", str(out), "--no-progress", "--qualitative", "1", *TINY_FLAGS])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["categories"]) == {"carpet_like", "wood_like"}
    for row in report["categories"].values():
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["aupro"] <= 1.0
    assert report["detector"]["name"] == "genclip"
    table = (out / "report.md").read_text()
    assert "| **mean** |" in table and "Random backbone weights" in table
    figures = sorted((out / "qualitative").glob("*.png"))
    assert len(figures) == 2
    with Image.open(figures[0]) as figure:
        assert figure.size == (3 * 64, 64)  # image | mask | heatmap


def test_predict_writes_heatmaps_at_input_size(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_path = tmp_path / "part.png"
    Image.new("RGB", (150, 90), (120, 40, 40)).save(image_path)
    out = tmp_path / "pred"
    assert main(["predict", str(image_path), "--class-name", "bottle", "--out", str(out), *TINY_FLAGS]) == 0
    with Image.open(out / "part_heatmap.png") as heatmap:
        assert heatmap.size == (150, 90) and heatmap.convert("RGB").getpixel((0, 0)) != (0, 0, 0)
    record = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert 0.0 <= record["score"] <= 1.0 and record["class_label"] == "bottle"
    assert "part.png" in capsys.readouterr().out


def test_predict_rejects_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot read .*bad.png"):
        main(["predict", str(bad), "--out", str(tmp_path / "o"), *TINY_FLAGS])


def test_train_on_wrong_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", "mvtec", "--root", str(tmp_path / "missing"), *TINY_FLAGS])
    assert code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_missing_backbone_weights_stop_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    image_path = tmp_path / "part.png"
    Image.new("RGB", (32, 32)).save(image_path)
    code = main(["predict", str(image_path), "--backbone", "ViT-B-16", "--backbone-weights", "openai",
                 "--clip-cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "GENCLIP_ALLOW_DOWNLOAD" in capsys.readouterr().err
