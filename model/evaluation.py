"""Zero-shot evaluation through the :class:`Detector` interface, with streaming pixel metrics.

Per category: image AUROC, AP, F1-max (one score per image) and pixel AUROC, AUPRO
(FPR <= 0.3), pixel F1-max, accumulated one map at a time so memory stays bounded however
large the test set. Maps and masks are compared at ``eval_size`` (the detector's input
size by default: the papers' protocol) to keep pixel counts comparable across data sets.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from model.data.sample import InspectionSample, load_image, load_mask
from model.detector import Detector, Inspection
from model.metrics import SegmentationMetrics, image_level_metrics

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_ap")

ResultCallback = Callable[[InspectionSample, Image.Image, np.ndarray, Inspection], None]


@dataclass
class _CategoryState:
    labels: list[int]
    scores: list[float]
    segmentation: SegmentationMetrics | None


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


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(
    detector: Detector,
    samples: Sequence[InspectionSample],
    batch_size: int = 8,
    eval_size: int | None = None,
    progress: bool = True,
    on_result: ResultCallback | None = None,
    pixel_bins: int | None = None,
) -> dict[str, Any]:
    """Run the detector over ``samples`` and compute the per-category and mean metrics.

    Args:
        detector: any :class:`Detector`.
        samples: test samples (several categories allowed).
        batch_size: images per ``inspect`` call.
        eval_size: side of the square grid metrics are computed on (default: detector input size).
        on_result: called per image with (sample, image, mask at eval size, inspection),
            e.g. to save qualitative figures.
        pixel_bins: histogram bins of the streaming pixel metrics (default: the accumulator's).

    Returns:
        ``{"detector", "eval_size", "categories": {name: metrics}, "mean": metrics, "images", "seconds"}``;
        a category without pixel masks reports pixel metrics as NaN.
    """
    from tqdm.auto import tqdm

    size = eval_size or detector.identity.image_size
    states: dict[str, _CategoryState] = {}
    has_masks: dict[str, bool] = defaultdict(lambda: True)
    for sample in samples:
        if sample.is_anomalous and sample.mask_path is None:
            has_masks[sample.category] = False
    for sample in samples:
        if sample.category not in states:
            segmentation = None
            if has_masks[sample.category]:
                segmentation = SegmentationMetrics(num_bins=pixel_bins) if pixel_bins else SegmentationMetrics()
            states[sample.category] = _CategoryState([], [], segmentation)

    started = time.time()
    bar = tqdm(total=len(samples), desc="evaluate", disable=not progress, unit="img")
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        images = [load_image(sample.image_path) for sample in batch]
        results = detector.inspect(images, [sample.category for sample in batch])
        for sample, image, result in zip(batch, images, results):
            state = states[sample.category]
            state.labels.append(int(sample.is_anomalous))
            state.scores.append(float(result.score))
            mask = _mask_for(sample, size)
            if state.segmentation is not None and mask is not None:
                state.segmentation.update(_resize_map(result.anomaly_map, size), mask)
            if on_result is not None:
                on_result(sample, image, mask if mask is not None else np.zeros((size, size), bool), result)
        bar.update(len(batch))
        bar.set_postfix(category=batch[-1].category)
    bar.close()

    categories: dict[str, dict[str, float]] = {}
    for name, state in states.items():
        image_metrics = image_level_metrics(state.labels, state.scores)
        row = {f"image_{key}": value for key, value in image_metrics.items()}
        pixel = state.segmentation.compute() if state.segmentation is not None else {}
        row.update({key: float(pixel.get(key, float("nan"))) for key in PIXEL_METRICS})
        row["images"] = len(state.labels)
        row["anomalous"] = int(sum(state.labels))
        categories[name] = row
    mean = {key: _mean([row[key] for row in categories.values()]) for key in IMAGE_METRICS + PIXEL_METRICS}
    return {
        "detector": detector.identity.as_dict(),
        "eval_size": size,
        "categories": categories,
        "mean": mean,
        "images": len(samples),
        "seconds": round(time.time() - started, 2),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Paper-style table (percent, one decimal) of a report from :func:`evaluate`."""
    columns = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "pixel_f1_max")
    header = "| category | img AUROC | img AP | img F1-max | px AUROC | AUPRO | px F1-max |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]

    def cells(row: dict[str, float]) -> str:
        return " | ".join("n/a" if math.isnan(row[c]) else f"{100 * row[c]:.1f}" for c in columns)

    for name in sorted(report["categories"]):
        lines.append(f"| {name} | {cells(report['categories'][name])} |")
    lines.append(f"| **mean** | {cells(report['mean'])} |")
    identity = report["detector"]
    note = (
        f"\nDetector `{identity['name']}`, backbone `{identity['backbone']}` ({identity['backbone_weights']} weights), "
        f"layers {identity['layers']}, input {identity['image_size']} px, checkpoint {identity['checkpoint'] or 'none'}; "
        f"metrics at {report['eval_size']} px over {report['images']} images."
    )
    if identity["backbone_weights"] == "random":
        note += "\n\n**Random backbone weights: these figures test the pipeline, not the method.**"
    return "\n".join(lines) + "\n" + note + "\n"
