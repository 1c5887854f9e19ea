"""Zero-shot evaluation through the :class:`Detector` interface, with exact metrics.

Per category: image AUROC, AP, F1-max (one score per image) and pixel AUROC, AP, AUPRO
(FPR <= 0.3), pixel F1-max, exact whatever range the maps span
(:class:`model.metrics.SegmentationMetrics`). A category's pixels are held only until its last
image is scored, then its metrics are computed and the buffer dropped, so memory is set by the
largest category. Maps and masks are compared at ``eval_size`` (the detector's input size by
default: the papers' protocol) to keep pixel counts comparable across data sets.

A metric that is undefined for a category (no anomalous pixel, no pixel masks, a single image
class) is reported as ``null`` with the reason in ``status``; the mean is over the categories
where it is defined, and the report lists the ones left out and why, so nothing drops out of a
mean silently.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.data.sample import InspectionSample, load_image, load_mask
from model.detector import Detector, Inspection
from model.metrics import SegmentationMetrics, image_level_metrics

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_ap")

# (sample, image, mask at eval size, inspection, map at eval size)
ResultCallback = Callable[[InspectionSample, Image.Image, np.ndarray, Inspection, np.ndarray], None]
NO_ANOMALOUS_PIXELS = "no anomalous pixels"
NO_PIXEL_MASKS = "no pixel masks"
ONLY_GOOD_IMAGES = "only good images"
ONLY_ANOMALOUS_IMAGES = "only anomalous images"


@dataclass
class _CategoryState:
    remaining: int
    labels: list[int]
    scores: list[float]
    segmentation: SegmentationMetrics | None
    has_masks: bool = True
    pixel_metrics: dict[str, float] | None = None
    anomalous_pixels: int = 0


def same_data_root(first: str | Path, second: str | Path) -> bool:
    """Whether two data-set folders are the same or one lies inside the other (symlinks resolved):
    training there and evaluating here is not zero-shot."""
    a, b = Path(first).expanduser().resolve(), Path(second).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def _resize_map(anomaly_map: np.ndarray, size: int) -> np.ndarray:
    if anomaly_map.shape == (size, size):
        return anomaly_map
    resized = Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _mask_for(sample: InspectionSample, size: int) -> np.ndarray | None:
    """(size, size) bool mask, all False for good images, ``None`` when unknown."""
    if sample.mask_path is not None:
        return load_mask(sample.mask_path, (size, size))
    if not sample.is_anomalous:
        return np.zeros((size, size), dtype=bool)
    return None


def _image_status(labels: Sequence[int]) -> str:
    if all(labels):
        return ONLY_ANOMALOUS_IMAGES
    if not any(labels):
        return ONLY_GOOD_IMAGES
    return "ok"


def _pixel_status(state: _CategoryState) -> str:
    if not state.has_masks:
        return NO_PIXEL_MASKS
    if state.anomalous_pixels == 0:
        return NO_ANOMALOUS_PIXELS
    if state.pixel_metrics is None or math.isnan(state.pixel_metrics["pixel_auroc"]):
        return "no normal pixels"
    return "ok"


def _finish_category(state: _CategoryState) -> None:
    """Compute the category's pixel metrics and drop its pixel buffer."""
    if state.segmentation is not None:
        state.pixel_metrics = state.segmentation.compute()
        state.anomalous_pixels = state.segmentation.anomalous_pixels
        state.segmentation = None  # the category is done: its pixels go


def _mean_and_exclusions(categories: dict[str, dict[str, Any]], metrics: Sequence[str]) -> tuple[dict[str, float | None], dict[str, dict[str, str]]]:
    """Per metric: the mean over categories where it is defined, and the others with why."""
    mean: dict[str, float | None] = {}
    excluded: dict[str, dict[str, str]] = {}
    for metric in metrics:
        status_key = "image_status" if metric.startswith("image_") else "pixel_status"
        values = [row[metric] for row in categories.values() if row[metric] is not None]
        mean[metric] = float(np.mean(values)) if values else None
        left_out = {name: row[status_key] for name, row in categories.items() if row[metric] is None}
        if left_out:
            excluded[metric] = left_out
    return mean, excluded


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluate(
    detector: Detector,
    samples: Sequence[InspectionSample],
    batch_size: int = 8,
    eval_size: int | None = None,
    progress: bool = True,
    on_result: ResultCallback | None = None,
) -> dict[str, Any]:
    """Run the detector over ``samples`` and compute the per-category and mean metrics.

    Args:
        detector: any :class:`Detector`.
        samples: test samples (several categories allowed, in any order).
        batch_size: images per ``inspect`` call.
        eval_size: side of the square grid metrics are computed on (default: detector input size).
        on_result: called per image with (sample, image, mask at eval size, inspection, map at
            eval size), e.g. to save figures and maps.

    Returns:
        ``{"detector", "eval_size", "categories": {name: row}, "mean": metrics,
        "mean_excluded": {metric: {category: reason}}, "images", "seconds"}``. Each row holds
        the metrics (``None`` where undefined), ``images``, ``anomalous``, ``image_status`` and
        ``pixel_status`` (``ok``, ``no anomalous pixels``, ``no pixel masks``...).
    """
    from tqdm.auto import tqdm

    size = eval_size or detector.identity.image_size
    counts: dict[str, int] = defaultdict(int)
    has_masks: dict[str, bool] = defaultdict(lambda: True)
    for sample in samples:
        counts[sample.category] += 1
        if sample.is_anomalous and sample.mask_path is None:
            has_masks[sample.category] = False
    states = {
        name: _CategoryState(
            count,
            [],
            [],
            SegmentationMetrics(expected_pixels=count * size * size) if has_masks[name] else None,
            has_masks=has_masks[name],
        )
        for name, count in counts.items()
    }

    started = time.time()
    bar = tqdm(total=len(samples), desc="evaluate", disable=not progress, unit="img")
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        images = [load_image(sample.image_path) for sample in batch]
        # maps straight on the metrics grid: no round trip through each image's own size
        results = detector.inspect(images, [sample.category for sample in batch], map_size=size)
        for sample, image, result in zip(batch, images, results):
            state = states[sample.category]
            state.labels.append(int(sample.is_anomalous))
            state.scores.append(float(result.score))
            mask = _mask_for(sample, size)
            eval_map = _resize_map(result.anomaly_map, size)
            if state.segmentation is not None and mask is not None:
                state.segmentation.update(eval_map, mask)
            if on_result is not None:
                on_result(sample, image, mask if mask is not None else np.zeros((size, size), bool), result, eval_map)
            state.remaining -= 1
            if state.remaining == 0:
                _finish_category(state)
        bar.update(len(batch))
        bar.set_postfix(category=batch[-1].category)
    bar.close()

    categories: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        image_metrics = image_level_metrics(state.labels, state.scores)
        row: dict[str, Any] = {f"image_{key}": _defined(value) for key, value in image_metrics.items()}
        pixel = state.pixel_metrics or {}
        row.update({key: _defined(pixel.get(key, math.nan)) for key in PIXEL_METRICS})
        row["images"] = len(state.labels)
        row["anomalous"] = int(sum(state.labels))
        row["image_status"] = _image_status(state.labels)
        row["pixel_status"] = _pixel_status(state)
        categories[name] = row
    mean, excluded = _mean_and_exclusions(categories, IMAGE_METRICS + PIXEL_METRICS)
    return {
        "detector": detector.identity.as_dict(),
        "eval_size": size,
        "categories": categories,
        "mean": mean,
        "mean_excluded": excluded,
        "images": len(samples),
        "seconds": round(time.time() - started, 2),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Paper-style table (percent, one decimal) of a report from :func:`evaluate`.

    An undefined cell reads ``n/a`` with a footnote giving the reason, and the mean row says
    over how many categories each column is averaged."""
    columns = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")
    header = "| category | img AUROC | img AP | img F1-max | px AUROC | AUPRO | px F1-max |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    reasons: list[str] = []

    def note(reason: str) -> str:
        if reason not in reasons:
            reasons.append(reason)
        return f"n/a ({'abcdefghij'[reasons.index(reason)]})"

    def cells(row: dict[str, Any]) -> str:
        out = []
        for column in columns:
            value = row[column]
            if value is None:
                out.append(note(row["image_status" if column.startswith("image_") else "pixel_status"]))
            else:
                out.append(f"{100 * value:.1f}")
        return " | ".join(out)

    for name in sorted(report["categories"]):
        lines.append(f"| {name} | {cells(report['categories'][name])} |")
    total = len(report["categories"])
    mean_cells = []
    for column in columns:
        value = report["mean"][column]
        left_out = len(report.get("mean_excluded", {}).get(column, {}))
        text = "n/a" if value is None else f"{100 * value:.1f}"
        mean_cells.append(text if not left_out else f"{text} ({total - left_out}/{total})")
    lines.append(f"| **mean** | {' | '.join(mean_cells)} |")
    footnotes = [f"({'abcdefghij'[index]}) {reason}" for index, reason in enumerate(reasons)]
    if footnotes:
        lines.append("")
        lines.append(
            "n/a: the metric is undefined for that category (" + "; ".join(footnotes) + "). "
            "A mean marked (k/n) averages the k categories where it is defined."
        )
    identity = report["detector"]
    note_text = (
        f"\nDetector `{identity['name']}`, backbone `{identity['backbone']}` ({identity['backbone_weights']} weights), "
        f"layers {identity['layers']}, input {identity['image_size']} px, checkpoint {identity['checkpoint'] or 'none'}; "
        f"metrics at {report['eval_size']} px over {report['images']} images."
    )
    if identity["backbone_weights"] == "random":
        note_text += "\n\n**Random backbone weights: these figures test the pipeline, not the method.**"
    for warning in report.get("warnings", []):
        note_text += f"\n\n**Warning: {warning}**"
    return "\n".join(lines) + "\n" + note_text + "\n"
