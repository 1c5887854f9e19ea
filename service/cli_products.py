"""``genclip products add|list|show|delete|calibrate``: products from the shell.

Works directly on ``GENCLIP_DATABASE_URL`` (the same database the service uses) and, for
``add`` and ``calibrate``, builds the reference with a detector in this process (the settings'
detector and backbone), with a progress bar; the calibration report is printed as JSON (and
written to ``--report`` when given). Every worker of a running service picks the change up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli_settings import MODEL_SETTINGS, add_settings_flags, settings_from_args

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "products", help="register products and teach them from good photos",
        description="Manage products in GENCLIP_DATABASE_URL; add/calibrate run the detector here.",
    )
    actions = parser.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="create or update a product and add good photos from a folder")
    add.add_argument("name", help="product name ([a-z0-9][a-z0-9_.-]{0,63})")
    add.add_argument("--good", type=Path, default=None, help="folder of good photos (JPEG, PNG, BMP, TIFF)")
    add.add_argument("--class-name", dest="product_class_name", default=None,
                     help="class name written in the prompts (default: the product name)")
    add.add_argument("--false-reject-rate", type=float, default=None, help="target false-reject rate (default 0.01)")
    add.add_argument("--fusion-weight", type=float, default=None, help="few-shot weight in [0, 1] (default 0.5)")
    add.add_argument("--few-shot", action=argparse.BooleanOptionalAction, default=None,
                     help="fuse the good-photo reference (default on)")
    add.add_argument("--report", type=Path, default=None, help="also write the calibration report (JSON) here")
    add.add_argument("--no-progress", action="store_true")
    add_settings_flags(add, (*MODEL_SETTINGS, "database_url", "bank_max_patches"))
    add.set_defaults(func=main_add)

    for action, helptext in (("list", "list products"), ("show", "one product as JSON"),
                             ("delete", "delete a product, its photos and reference"),
                             ("calibrate", "rebuild the reference and recalibrate from the stored photos")):
        sub = actions.add_parser(action, help=helptext)
        if action != "list":
            sub.add_argument("name")
        if action == "calibrate":
            sub.add_argument("--report", type=Path, default=None, help="also write the calibration report here")
            sub.add_argument("--no-progress", action="store_true")
            add_settings_flags(sub, (*MODEL_SETTINGS, "database_url", "bank_max_patches"))
        else:
            add_settings_flags(sub, ("database_url",))
        sub.set_defaults(func={"list": main_list, "show": main_show, "delete": main_delete,
                               "calibrate": main_calibrate}[action])


def _fail(message: str) -> int:
    print(f"genclip products: {message}", file=sys.stderr)
    return 2


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.db.database import open_database

    settings = settings_from_args(args)
    return settings, open_database(settings.database_url, settings.database_migrate, threads=1)


def _product_json(database, name: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from service.products import repository
    from service.products.models import ProductOut

    def work(session):  # type: ignore[no-untyped-def]
        product = repository.get_product(session, name)
        count = repository.image_counts(session, [product.id]).get(product.id, 0)
        return ProductOut.of(product, count, repository.reference_of(session, product.id)).model_dump(mode="json")

    return database.transaction(work)


def _read_folder(folder: Path, settings) -> list:  # type: ignore[no-untyped-def]
    """Every image file of ``folder`` validated as the API validates uploads (first failure stops)."""
    from service.image_input import ImageRejected, decode_image
    from service.products.repository import GoodImage

    if not folder.is_dir():
        raise SystemExit(_fail(f"--good {folder} is not a folder"))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(_fail(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}"))
    good = []
    for path in files:
        data = path.read_bytes()
        try:
            decoded = decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        except ImageRejected as exc:
            raise SystemExit(_fail(f"{path}: {exc.message}; nothing was stored")) from None
        good.append(GoodImage(path.name, decoded.format, decoded.width, decoded.height, data))
    return good


def _calibrate(settings, database, name: str, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    from model.errors import DETECTOR_LOAD_ERRORS
    from service.products import repository
    from service.products.onboarding import CalibrationFailed, OnboardingLimits, build_and_store
    from service.worker import load_detector

    try:
        detector = load_detector(settings)
    except DETECTOR_LOAD_ERRORS as exc:
        return _fail(f"cannot load the detector: {exc}")
    product_id = database.transaction(lambda s: repository.get_product(s, name).id)
    bar = tqdm(total=0, unit="img", desc=f"calibrating {name}", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        outcome = build_and_store(database, detector, product_id, OnboardingLimits.from_settings(settings),
                                  progress=progress)
    except CalibrationFailed as exc:
        return _fail(f"calibration failed: {exc}")
    finally:
        bar.close()
    if outcome is None:
        return _fail(f"product {name!r} was deleted meanwhile")
    report = dict(outcome.report, stored=outcome.stored)
    text = json.dumps(report, indent=2)
    if getattr(args, "report", None):
        args.report.write_text(text + "\n")
    print(text)
    if not outcome.stored:
        print("note: the photos or settings changed meanwhile; this calibration was not stored", file=sys.stderr)
    if detector.identity.backbone_weights == "random":
        print("note: random backbone weights: thresholds from it say nothing about real parts", file=sys.stderr)
    return 0


def main_add(args: argparse.Namespace) -> int:
    import re

    from sqlalchemy.exc import IntegrityError

    from service.db.products import NAME_PATTERN
    from service.products import repository
    from service.products.models import ProductSettings

    if not re.fullmatch(NAME_PATTERN, args.name):
        return _fail(f"invalid product name {args.name!r}: use {NAME_PATTERN}")
    try:
        changes = ProductSettings(
            class_name=args.product_class_name, false_reject_rate=args.false_reject_rate,
            few_shot=args.few_shot, fusion_weight=args.fusion_weight,
        ).changes()
    except ValueError as exc:
        return _fail(str(exc))
    settings, database = _open(args)
    try:
        good = _read_folder(args.good, settings) if args.good is not None else []

        def work(session):  # type: ignore[no-untyped-def]
            product, created, recalibrate = repository.upsert_product(session, args.name, changes)
            added, duplicates = 0, 0
            if good:
                _, added, duplicates = repository.add_images(session, args.name, good)
            return created, recalibrate, added, duplicates

        try:
            created, recalibrate, added, duplicates = database.transaction(work)
        except IntegrityError as exc:
            return _fail(f"a concurrent change stored the same photos; retry ({exc.orig})")
        print(f"{'created' if created else 'updated'} product {args.name}: {added} photo(s) added, "
              f"{duplicates} already stored", file=sys.stderr)
        if added or recalibrate:
            return _calibrate(settings, database, args.name, args)
        return 0
    finally:
        database.close()


def main_calibrate(args: argparse.Namespace) -> int:
    from service.products.repository import ProductNotFound

    settings, database = _open(args)
    try:
        return _calibrate(settings, database, args.name, args)
    except ProductNotFound as exc:
        return _fail(str(exc))
    finally:
        database.close()


def main_list(args: argparse.Namespace) -> int:
    from service.products import repository

    _, database = _open(args)
    try:
        def work(session):  # type: ignore[no-untyped-def]
            counts = repository.image_counts(session)
            return [(p.name, p.class_name, counts.get(p.id, 0), p.calibration_status, p.image_threshold)
                    for p in repository.list_products(session)]

        rows = database.transaction(work)
    finally:
        database.close()
    print(f"{'name':24s} {'class name':24s} {'photos':>6s} {'calibration':11s} threshold")
    for name, class_name, count, status, threshold in rows:
        shown = f"{threshold:.4f}" if threshold is not None else "-"
        print(f"{name:24s} {class_name[:24]:24s} {count:6d} {status:11s} {shown}")
    return 0


def main_show(args: argparse.Namespace) -> int:
    from service.products.repository import ProductNotFound

    _, database = _open(args)
    try:
        print(json.dumps(_product_json(database, args.name), indent=2))
    except ProductNotFound as exc:
        return _fail(str(exc))
    finally:
        database.close()
    return 0


def main_delete(args: argparse.Namespace) -> int:
    from service.products import repository
    from service.products.repository import ProductNotFound

    _, database = _open(args)
    try:
        database.transaction(lambda s: repository.delete_product(s, args.name))
    except ProductNotFound as exc:
        return _fail(str(exc))
    finally:
        database.close()
    print(f"deleted product {args.name}", file=sys.stderr)
    return 0
