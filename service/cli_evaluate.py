"""``genclip evaluate``: the paper-style table for a detector on a test set.

Writes into ``--out``: ``report.json`` (per category and mean; undefined metrics are ``null``
with the reason, and the mean lists the categories it leaves out), ``report.md`` (the table),
``scores.csv`` (one row per image: category, defect, label, score, class label), a few
qualitative PNGs per category (image | mask | heatmap | colour bar) and, with ``--save-maps``,
every anomaly map at the evaluation size as float16 ``.npy`` under ``maps/<category>/``.

Zero-shot check: a prompt checkpoint whose sidecar says it was trained on the data being
evaluated (same folder, or one inside the other) is not a zero-shot result: the command warns
and the report records it (``zero_shot: false``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service.cli_settings import MODEL_SETTINGS, add_settings_flags, settings_from_args
from service.heatmap import JET_LUT, colorize, to_uint8

COLOUR_BAR_WIDTH = 48


def register(subparsers: Any) -> None:
    from model.data.registry import DATASET_KINDS

    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a detector on MVTec AD / VisA / folder / synthetic data",
        description="Image AUROC/AP/F1-max and pixel AUROC/AP/AUPRO/F1-max per category and mean (exact).",
    )
    parser.add_argument("--data", required=True, choices=DATASET_KINDS)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<detector>_<data>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=None, help="metric grid side (default: detector input size)")
    parser.add_argument("--qualitative", type=int, default=3, help="figures per category (0: none)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write every anomaly map (float16 .npy at the evaluation size) under <out>/maps/")
    parser.add_argument("--no-progress", action="store_true")
    add_settings_flags(parser, MODEL_SETTINGS)
    parser.set_defaults(func=main_evaluate)


def colour_bar(height: int, width: int = COLOUR_BAR_WIDTH) -> np.ndarray:
    """(height, width, 3) legend of the heatmap colours: 1.0 at the top, 0.0 at the bottom."""
    levels = np.linspace(255, 0, height).round().astype(np.uint8)
    bar = np.full((height, width, 3), 255, np.uint8)
    strip = width // 3
    bar[:, :strip] = JET_LUT[levels][:, None, :]
    image = Image.fromarray(bar)
    draw = ImageDraw.Draw(image)
    for value, y in ((1.0, 0), (0.5, height // 2 - 5), (0.0, height - 11)):
        draw.text((strip + 2, max(0, y)), f"{value:.1f}", fill=(0, 0, 0))
    return np.asarray(image)


def qualitative_figure(image: Image.Image, mask: np.ndarray, anomaly_map: np.ndarray) -> Image.Image:
    """image | mask | heatmap | colour bar, at the mask's (evaluation) size."""
    size = mask.shape[::-1]
    panels = [
        np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)),
        np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2),
        colorize(to_uint8(np.asarray(Image.fromarray(anomaly_map, mode="F").resize(size, Image.Resampling.BILINEAR)))),
        colour_bar(mask.shape[0]),
    ]
    return Image.fromarray(np.concatenate(panels, axis=1))


def zero_shot_warnings(settings: Any, data_root: Path) -> list[str]:
    """Warnings for prompt checkpoints trained on the data being evaluated (sidecar ``training.root``)."""
    from model.checkpoint import sidecar_path
    from model.evaluation import same_data_root

    warnings = []
    for path in (settings.checkpoint, settings.vip2clip_checkpoint):
        if path is None:
            continue
        try:
            training = json.loads(sidecar_path(Path(path).with_suffix(".safetensors")).read_text()).get("training") or {}
        except (OSError, ValueError, AttributeError):
            continue
        root = training.get("root") if isinstance(training, dict) else None
        if root and same_data_root(root, data_root):
            warnings.append(
                f"{path} was trained on {root}, the data being evaluated: this is not a zero-shot result "
                "(the protocol trains on the other data set's test split)"
            )
    return warnings


class _ResultWriter:
    """Writes figures, ``scores.csv`` rows and (optionally) maps as results arrive."""

    def __init__(self, out: Path, qualitative: int, save_maps: bool) -> None:
        self.out, self.qualitative, self.save_maps = out, qualitative, save_maps
        self.figures = out / "qualitative"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.saved: Counter[str] = Counter()
        self.maps = 0
        self._csv_file = (out / "scores.csv").open("w", newline="")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(["category", "defect", "image", "label", "score", "class_label", "map"])

    def __call__(self, sample: Any, image: Image.Image, mask: np.ndarray, result: Any, eval_map: np.ndarray) -> None:
        stem = f"{sample.defect}_{sample.image_path.stem}"
        if sample.is_anomalous and self.saved[sample.category] < self.qualitative:
            self.saved[sample.category] += 1
            qualitative_figure(image, mask, result.anomaly_map).save(self.figures / f"{sample.category}_{stem}.png")
        map_file = ""
        if self.save_maps:
            folder = self.out / "maps" / sample.category
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{stem}.npy", eval_map.astype(np.float16))
            map_file = f"maps/{sample.category}/{stem}.npy"
            self.maps += 1
        self._csv.writerow([sample.category, sample.defect, str(sample.image_path), int(sample.is_anomalous),
                            f"{result.score:.6f}", result.class_label, map_file])

    def close(self) -> None:
        self._csv_file.close()


def main_evaluate(args: argparse.Namespace) -> int:
    from model.data.errors import DatasetError
    from model.data.registry import read_dataset
    from model.errors import DETECTOR_LOAD_ERRORS
    from model.evaluation import evaluate, markdown_table
    from model.factory import build_detector

    settings = settings_from_args(args)
    try:
        samples = read_dataset(args.data, args.root, args.categories)
        detector = build_detector(settings.detector_config())
    except (DatasetError, *DETECTOR_LOAD_ERRORS) as error:
        print(f"genclip evaluate: {error}", file=sys.stderr)
        return 2
    warnings = zero_shot_warnings(settings, args.root)
    for warning in warnings:
        print(f"genclip evaluate: warning: {warning}", file=sys.stderr)
    out = args.out or Path("reports") / f"{detector.identity.name}_{args.data}"
    writer = _ResultWriter(out, args.qualitative, args.save_maps)
    try:
        report = evaluate(detector, samples, args.batch_size, args.eval_size, not args.no_progress, writer)
    except DatasetError as error:
        print(f"genclip evaluate: {error}", file=sys.stderr)
        return 2
    finally:
        writer.close()
    report["data"] = {"kind": args.data, "root": str(args.root)}
    report["zero_shot"] = not warnings
    report["warnings"] = warnings
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (out / "report.md").write_text(table)
    print(table)
    maps = f", {writer.maps} maps under {out / 'maps'}" if args.save_maps else ""
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'scores.csv'} and "
          f"{sum(writer.saved.values())} figures{maps}", file=sys.stderr)
    return 0
