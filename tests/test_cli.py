"""`genclip predict / train / evaluate` end to end on the tiny backbone and synthetic data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

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


def test_evaluate_writes_report_table_figures_scores_and_maps(
    trained_checkpoint: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code = main(["evaluate", "--data", "synthetic", "--root", str(synthetic_root), "--checkpoint", str(trained_checkpoint),
                 "--out", str(out), "--no-progress", "--qualitative", "1", "--save-maps", *TINY_FLAGS])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["categories"]) == {"carpet_like", "wood_like"}
    for row in report["categories"].values():
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["aupro"] <= 1.0
        assert row["image_status"] == row["pixel_status"] == "ok"
    assert report["detector"]["name"] == "genclip" and report["mean_excluded"] == {}
    # The checkpoint was trained on this very folder: said loudly, recorded in the report.
    assert report["zero_shot"] is False and "not a zero-shot result" in capsys.readouterr().err
    table = (out / "report.md").read_text()
    assert "| **mean** |" in table and "Random backbone weights" in table and "not a zero-shot result" in table
    figures = sorted((out / "qualitative").glob("*.png"))
    assert len(figures) == 2
    with Image.open(figures[0]) as figure:
        assert figure.size == (3 * 64 + 48, 64)  # image | mask | heatmap | colour bar
        bar = np.asarray(figure.convert("RGB"))[:, 3 * 64 : 3 * 64 + 10]
        assert tuple(bar[0, 0]) != tuple(bar[-1, 0])  # the bar runs from red (1.0) down to blue (0.0)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == report["images"] == 12
    for row in rows:
        saved = np.load(out / row["map"])
        assert saved.dtype == np.float16 and saved.shape == (64, 64)
        assert 0.0 <= float(row["score"]) <= 1.0 and row["label"] in ("0", "1")


def test_all_good_category_is_reported_not_dropped(trained_checkpoint: Path, synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for folder in (root / "wood_like" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)  # wood_like: good images only
    out = tmp_path / "report"
    assert main(["evaluate", "--data", "synthetic", "--root", str(root), "--checkpoint", str(trained_checkpoint),
                 "--out", str(out), "--no-progress", "--qualitative", "0", *TINY_FLAGS]) == 0
    report = json.loads((out / "report.json").read_text())
    wood = report["categories"]["wood_like"]
    assert wood["pixel_status"] == "no anomalous pixels" and wood["image_status"] == "only good images"
    assert wood["pixel_auroc"] is None and wood["aupro"] is None and wood["image_auroc"] is None
    assert report["mean_excluded"]["aupro"] == {"wood_like": "no anomalous pixels"}
    assert report["mean"]["aupro"] == report["categories"]["carpet_like"]["aupro"]
    table = (out / "report.md").read_text()
    assert "| wood_like | n/a (a) |" in table and "(a) only good images" in table and "(b) no anomalous pixels" in table
    assert "(1/2)" in table  # the mean says it averages one category of two


def test_train_warns_when_it_trains_on_the_evaluation_data(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", "synthetic", "--root", str(synthetic_root), "--eval-root", str(synthetic_root / "carpet_like"),
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--train-image-size", "64",
                 "--output", str(tmp_path / "w.safetensors"), "--no-progress", *TINY_FLAGS])
    assert code == 0
    assert "not zero-shot" in capsys.readouterr().err


def test_resume_says_what_it_resumed_and_refuses_another_run(synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run.safetensors"
    base = ["train", "--data", "synthetic", "--root", str(synthetic_root), "--train-image-size", "64",
            "--max-steps-per-epoch", "1", "--output", str(output), "--no-progress", *TINY_FLAGS]
    # A finished 1-epoch run leaves no state; an interrupted one does: fake it by keeping the state.
    from model.backbone import load_backbone
    from model.data.mvtec import read_mvtec
    from model.training import TrainingConfig, train
    from model.weights_source import BackboneSpec

    class Stop(Exception):
        pass

    def stop(epoch: int, loss: float) -> None:
        raise Stop

    config = TrainingConfig(output=output, epochs=3, batch_size=8, image_size=64, max_steps_per_epoch=1,
                            data_description={"data": "synthetic", "root": str(synthetic_root)})
    with pytest.raises(Stop):
        train(load_backbone(BackboneSpec("tiny-clip-random", "random")), read_mvtec(synthetic_root), config,
              progress=False, on_epoch_end=stop)
    state_file = resume_path(output)
    assert state_file.is_file()

    assert main([*base, "--detector", "vip2clip", "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and "detector: 'genclip' there, 'vip2clip' now" in err
    assert "delete" in err and state_file.is_file()  # nothing overwritten

    assert main([*base, "--lr", "0.01", "--epochs", "3", "--resume"]) == 2
    assert "learning_rate: 0.001 there, 0.01 now" in capsys.readouterr().err

    state = torch.load(state_file, weights_only=True)
    state["prompts"]["query"][0, 0] = float("nan")
    torch.save(state, state_file)
    assert main([*base, "--epochs", "3", "--resume"]) == 2
    assert "NaN or Inf in ['query']" in capsys.readouterr().err
    state["prompts"]["query"][0, 0] = 0.0
    torch.save(state, state_file)

    assert main([*base, "--epochs", "3", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {state_file}: 1 of 3 epochs done" in err
    assert "epoch 1:" not in err and "epoch 2:" in err and "epoch 3:" in err


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
