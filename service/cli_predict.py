"""``genclip predict IMAGE... [--class-name NAME | --product NAME] [--out DIR]``: inspect files
from the shell.

Writes ``<stem>_heatmap.png`` (and ``<stem>_overlay.png``) per image plus ``predictions.json``
into ``--out``, and prints one line per image: score, verdict, class label, path. With
``--product`` the product's class name, few-shot reference and calibrated thresholds (from
``GENCLIP_DATABASE_URL``) are used, as ``POST /inspect`` with ``product`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.cli_settings import MODEL_SETTINGS, add_settings_flags, settings_from_args
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
    parser.add_argument("--threshold", type=float, default=None,
                        help="decision threshold (default: the product's, else the thresholds file's, else the default)")
    parser.add_argument("--product", default=None, help="registered product (genclip products add)")
    add_settings_flags(parser, (*MODEL_SETTINGS, "thresholds_file", "database_url"))
    parser.set_defaults(func=main_predict)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"genclip predict: cannot read {path}: {error}") from None


def _product(settings, name: str, detector):  # type: ignore[no-untyped-def]
    """(ProductView, FewShotReference or None) of a registered product, checked against ``detector``."""
    from model.fewshot import ReferenceError as BankError

    from service.db.database import open_database
    from service.products.references import ReferenceMissing, ReferenceStore
    from service.products.repository import ProductNotFound
    from service.products.resolver import product_view

    database = open_database(settings.database_url, settings.database_migrate, threads=1)
    try:
        try:
            view = database.transaction(lambda session: product_view(session, name))
        except ProductNotFound as error:
            raise SystemExit(f"genclip predict: {error} (register it: genclip products add {name} --good DIR)") from None
        try:
            found = ReferenceStore(database, detector.identity).reference_for(view.job_ref())
        except (ReferenceMissing, BankError) as error:
            raise SystemExit(f"genclip predict: product {name!r}: {error} (genclip products calibrate {name})") from None
        return view, found[0] if found is not None else None
    finally:
        database.close()


def main_predict(args: argparse.Namespace) -> int:
    from model.errors import DETECTOR_LOAD_ERRORS
    from model.factory import build_detector

    from service.decisions import decision_policy, find_defects

    settings = settings_from_args(args)
    try:
        detector = build_detector(settings.detector_config())
    except DETECTOR_LOAD_ERRORS as error:
        print(f"genclip predict: cannot load the detector: {error}", file=sys.stderr)
        return 2
    thresholds = Thresholds.load(settings.thresholds_file, settings.default_threshold)
    view, reference = _product(settings, args.product, detector) if args.product else (None, None)
    class_name = view.class_name if view is not None else args.class_name
    args.out.mkdir(parents=True, exist_ok=True)
    identity = detector.identity.as_dict()
    records: list[dict[str, Any]] = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        images = [_open(path) for path in paths]
        references = [reference] * len(images) if reference is not None else None
        results = detector.inspect(images, [class_name] * len(images), references=references)
        for path, image, result in zip(paths, images, results):
            policy = decision_policy(view, thresholds, class_name, result.class_label, settings.default_pixel_threshold)
            threshold = args.threshold if args.threshold is not None else policy.threshold
            map_u8 = to_uint8(result.anomaly_map)
            heatmap_path = args.out / f"{path.stem}_heatmap.png"
            heatmap_path.write_bytes(heatmap_png(map_u8))
            (args.out / f"{path.stem}_overlay.png").write_bytes(overlay_png(map_u8, image))
            record = {
                "image": str(path),
                "score": round(result.score, 6),
                "is_anomalous": result.score >= threshold,
                "threshold": threshold,
                "threshold_source": "argument" if args.threshold is not None else policy.threshold_source,
                "product": view.name if view is not None else None,
                "class_name": class_name,
                "class_label": result.class_label,
                "pixel_threshold": policy.pixel_threshold,
                "defects": find_defects(map_u8, policy.pixel_threshold, settings.defect_min_area_px, settings.max_defects),
                "heatmap": str(heatmap_path),
                "component_scores": result.component_scores,
            }
            records.append(record)
            verdict = "ANOMALOUS" if record["is_anomalous"] else "ok"
            print(f"{result.score:.4f}  {verdict:9s}  label={result.class_label}  defects={len(record['defects'])}  {path}")
    report = {"detector": identity, "product": view.name if view is not None else None, "predictions": records}
    (args.out / "predictions.json").write_text(json.dumps(report, indent=2) + "\n")
    if identity["backbone_weights"] == "random":
        print("note: the backbone has random weights: these scores say nothing about defects.", file=sys.stderr)
    return 0
