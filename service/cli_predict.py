"""``genclip predict IMAGE... [--class-name NAME] [--out DIR]``: inspect files from the shell.

Writes ``<stem>_heatmap.png`` (and ``<stem>_overlay.png``) per image plus ``predictions.json``
into ``--out``, and prints one line per image: score, verdict, class label, path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.cli_serve import _MODEL_FLAGS, _add, settings_from_args
from service.heatmap import heatmap_png, overlay_png, to_uint8
from service.thresholds import Thresholds


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="inspect image files and write heatmaps",
        description="Run the configured detector on image files; settings from GENCLIP_* env vars, flags override.",
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, TIFF)")
    parser.add_argument("--class-name", default=None, help="product name for all images (CNF may replace it by 'object')")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output directory (default ./predictions)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the settings')")
    _add(parser, _MODEL_FLAGS)
    parser.set_defaults(func=main_predict)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"genclip predict: cannot read {path}: {error}") from None


def main_predict(args: argparse.Namespace) -> int:
    from model.errors import DETECTOR_LOAD_ERRORS
    from model.factory import build_detector

    settings = settings_from_args(args)
    try:
        detector = build_detector(settings.detector_config())
    except DETECTOR_LOAD_ERRORS as error:
        print(f"genclip predict: cannot load the detector: {error}", file=sys.stderr)
        return 2
    thresholds = Thresholds.load(settings.thresholds_file, settings.default_threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    identity = detector.identity.as_dict()
    records: list[dict[str, Any]] = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        images = [_open(path) for path in paths]
        results = detector.inspect(images, [args.class_name] * len(images))
        for path, image, result in zip(paths, images, results):
            threshold = args.threshold if args.threshold is not None else thresholds.for_class(args.class_name, result.class_label)
            map_u8 = to_uint8(result.anomaly_map)
            heatmap_path = args.out / f"{path.stem}_heatmap.png"
            heatmap_path.write_bytes(heatmap_png(map_u8))
            (args.out / f"{path.stem}_overlay.png").write_bytes(overlay_png(map_u8, image))
            record = {
                "image": str(path),
                "score": round(result.score, 6),
                "is_anomalous": result.score >= threshold,
                "threshold": threshold,
                "class_name": args.class_name,
                "class_label": result.class_label,
                "heatmap": str(heatmap_path),
                "component_scores": result.component_scores,
            }
            records.append(record)
            verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
            print(f"{result.score:.4f}  {verdict:9s}  label={result.class_label}  {path}")
    report = {"detector": identity, "predictions": records}
    (args.out / "predictions.json").write_text(json.dumps(report, indent=2) + "\n")
    if identity["backbone_weights"] == "random":
        print("note: the backbone has random weights: these scores say nothing about defects.", file=sys.stderr)
    return 0
