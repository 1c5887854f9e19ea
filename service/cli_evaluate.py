"""``genclip evaluate``: the paper-style table for a detector on a test set.

Writes ``report.json`` (per category and mean), ``report.md`` (the table) and a few
qualitative PNGs (image | mask | heatmap) per category into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.cli_serve import _MODEL_FLAGS, _add, settings_from_args
from service.heatmap import colorize, to_uint8


def register(subparsers: Any) -> None:
    from model.data.registry import DATASET_KINDS

    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a detector on MVTec AD / VisA / folder / synthetic data",
        description="Image AUROC/AP/F1-max and pixel AUROC/AUPRO/F1-max per category and mean.",
    )
    parser.add_argument("--data", required=True, choices=DATASET_KINDS)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default reports/<detector>_<data>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=None, help="metric grid side (default: detector input size)")
    parser.add_argument("--qualitative", type=int, default=3, help="figures per category (0: none)")
    parser.add_argument("--no-progress", action="store_true")
    _add(parser, _MODEL_FLAGS)
    parser.set_defaults(func=main_evaluate)


def qualitative_figure(image: Image.Image, mask: np.ndarray, anomaly_map: np.ndarray) -> Image.Image:
    """image | mask | heatmap, side by side at the mask's (evaluation) size."""
    size = mask.shape[::-1]
    panels = [
        np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR)),
        np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2),
        colorize(to_uint8(np.asarray(Image.fromarray(anomaly_map, mode="F").resize(size, Image.Resampling.BILINEAR)))),
    ]
    return Image.fromarray(np.concatenate(panels, axis=1))


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
    out = args.out or Path("reports") / f"{detector.identity.name}_{args.data}"
    figures = out / "qualitative"
    figures.mkdir(parents=True, exist_ok=True)
    saved: Counter[str] = Counter()

    def save_figure(sample: Any, image: Image.Image, mask: np.ndarray, result: Any) -> None:
        if sample.is_anomalous and saved[sample.category] < args.qualitative:
            saved[sample.category] += 1
            name = f"{sample.category}_{sample.defect}_{sample.image_path.stem}.png"
            qualitative_figure(image, mask, result.anomaly_map).save(figures / name)

    try:
        report = evaluate(detector, samples, args.batch_size, args.eval_size, not args.no_progress, save_figure)
    except DatasetError as error:
        print(f"genclip evaluate: {error}", file=sys.stderr)
        return 2
    report["data"] = {"kind": args.data, "root": str(args.root)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (out / "report.md").write_text(table)
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {sum(saved.values())} figures", file=sys.stderr)
    return 0
