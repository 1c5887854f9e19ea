"""Adapts an :class:`AnomalyScorer` to the :class:`Detector` interface.

Handles what the maths should not: PIL in, preprocessing, no-grad inference, fp16 autocast
on CUDA, resizing each map back to its image's own resolution, and a product's few-shot
reference: its bank is searched with the patch tokens of the *same* vision pass that fed the
zero-shot scorer (no second pass), so it works on top of every scorer, ensembles included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from model.anomaly_maps import finalize_maps, max_map_score, upsample
from model.backbone import VisualFeatures
from model.detector import DetectorIdentity, FewShotReference, Inspection
from model.fewshot import (
    MIN_GOOD_IMAGES,
    GoodImageFeatures,
    ReferenceBank,
    ReferenceBuild,
    ReferenceConfig,
    ReferenceError,
    ReferenceMismatchError,
    bank_identity,
    build_reference_from_features,
    few_shot_coarse_map,
    fuse,
)
from model.scoring import AnomalyScorer, BatchScores

# Good images per vision pass while building a reference.
REFERENCE_BATCH_SIZE = 8


class ScorerDetector:
    """A ready-to-serve detector around one scorer (frozen, eval mode)."""

    def __init__(self, scorer: AnomalyScorer, checkpoint_digest: str | None = None, fp16_on_cuda: bool = True) -> None:
        self.scorer = scorer.eval()
        self.fp16 = fp16_on_cuda and scorer.backbone.device.type == "cuda"
        backbone = scorer.backbone
        runtime = backbone.vision_runtime
        self._identity = DetectorIdentity(
            name=scorer.name,
            backbone=backbone.model_name,
            backbone_weights=backbone.weights_label,
            layers=scorer.layers,
            image_size=scorer.image_size,
            checkpoint=checkpoint_digest,
            runtime=runtime.name,
            precision="fp16" if self.fp16 else runtime.precision,
        )

    @property
    def identity(self) -> DetectorIdentity:
        return self._identity

    @property
    def device(self) -> torch.device:
        return self.scorer.backbone.device

    # ------------------------------------------------------------------ one pass
    def _score(self, images: Sequence[Image.Image], names: Sequence[str | None]) -> tuple[VisualFeatures, BatchScores]:
        """Preprocess, one vision pass, zero-shot scoring; returns the pass's features too."""
        pixels = self.scorer.backbone.preprocess(images, self.scorer.image_size)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.fp16):
            features = self.scorer.backbone.encode_image(pixels, self.scorer.layers)
            result = self.scorer.score_features(features, names)
        return features, result

    # ------------------------------------------------------------------ inspection
    @torch.inference_mode()
    def inspect(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str | None] | None = None,
        references: Sequence[FewShotReference | None] | None = None,
        map_size: int | None = None,
    ) -> list[Inspection]:
        if not images:
            return []
        names = list(class_names) if class_names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f"{len(images)} images but {len(names)} class names")
        refs = list(references) if references is not None else [None] * len(images)
        if len(refs) != len(images):
            raise ValueError(f"{len(images)} images but {len(refs)} references")
        for bank in {id(ref.bank): ref.bank for ref in refs if ref is not None}.values():
            self.check_reference(bank)

        features, result = self._score(images, names)
        maps = result.maps.float()
        scores = result.scores.float()
        components = [dict(entry) for entry in result.component_scores] or [{} for _ in images]
        if any(ref is not None for ref in refs):
            maps, scores = self._fuse_references(features, maps, scores, refs, components)

        scores_list = scores.cpu().tolist()
        inspections = []
        for index, image in enumerate(images):
            width, height = image.size
            target = (map_size, map_size) if map_size else (height, width)
            full = upsample(maps[index : index + 1], target)[0].clamp_(0.0, 1.0)
            inspections.append(
                Inspection(
                    score=float(scores_list[index]),
                    anomaly_map=full.cpu().numpy().astype(np.float32, copy=False),
                    class_label=result.class_labels[index],
                    component_scores=components[index],
                )
            )
        return inspections

    def check_reference(self, bank: ReferenceBank) -> None:
        """Raise :class:`ReferenceMismatchError` if ``bank`` was not built for this detector."""
        bank.check_compatible(self.identity)
        width = self.scorer.backbone.embed_dim
        if bank.width != width:
            raise ReferenceMismatchError(f"The product reference holds {bank.width}-wide tokens, the backbone gives {width}")

    def few_shot_maps(self, features: VisualFeatures, bank: ReferenceBank) -> torch.Tensor:
        """(B, S, S) few-shot maps of a vision pass against one bank, smoothed like the zero-shot map."""
        tokens = features.select(bank.layers).patch_tokens
        dtype = torch.float32 if tokens[0].device.type == "cpu" else tokens[0].dtype
        coarse = few_shot_coarse_map(
            [layer.to(dtype) for layer in tokens], bank.patches_on(tokens[0].device, dtype), features.grid
        )
        return finalize_maps(coarse, self.scorer.image_size, self.scorer.smoothing_sigma)

    def _fuse_references(
        self,
        features: VisualFeatures,
        maps: torch.Tensor,
        scores: torch.Tensor,
        refs: Sequence[FewShotReference | None],
        components: list[dict[str, float]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse each referenced image's zero-shot map/score with its bank's few-shot ones.

        Images are grouped by bank so each bank is searched once per batch; unreferenced
        images keep their zero-shot outputs. Fills ``zero_shot``/``few_shot`` component scores.
        """
        maps, scores = maps.clone(), scores.clone()
        groups: dict[int, list[int]] = {}
        for index, ref in enumerate(refs):
            if ref is not None:
                groups.setdefault(id(ref.bank), []).append(index)
        for indices in groups.values():
            bank = refs[indices[0]].bank  # type: ignore[union-attr]
            rows = torch.tensor(indices, device=maps.device)
            few = self.few_shot_maps(features.take(rows), bank).to(maps.device, maps.dtype)
            few_scores = max_map_score(few)
            weights = torch.tensor([refs[i].weight for i in indices], device=maps.device, dtype=maps.dtype)  # type: ignore[union-attr]
            zero_scores = scores[rows]
            maps[rows] = fuse(maps[rows], few, weights.view(-1, 1, 1)).clamp_(0.0, 1.0)
            scores[rows] = fuse(zero_scores, few_scores, weights).clamp_(0.0, 1.0)
            for position, index in enumerate(indices):
                components[index]["zero_shot"] = float(zero_scores[position])
                components[index]["few_shot"] = float(few_scores[position])
        return maps, scores

    # ------------------------------------------------------------------ reference
    @torch.inference_mode()
    def build_reference(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str | None] | None = None,
        *,
        config: ReferenceConfig = ReferenceConfig(),
        progress: Callable[[int, int], None] | None = None,
    ) -> ReferenceBuild:
        started = time.perf_counter()
        total = len(images)
        if total < MIN_GOOD_IMAGES:
            raise ReferenceError(f"A reference needs at least {MIN_GOOD_IMAGES} good images (leave-one-out), got {total}")
        names = list(class_names) if class_names is not None else [None] * total
        if len(names) != total:
            raise ValueError(f"{total} images but {len(names)} class names")
        layers = self.scorer.layers
        tokens: list[list[torch.Tensor]] = [[] for _ in layers]
        maps, scores = [], []
        grid = (0, 0)
        for start in range(0, total, REFERENCE_BATCH_SIZE):
            stop = min(start + REFERENCE_BATCH_SIZE, total)
            features, result = self._score(images[start:stop], names[start:stop])
            grid = features.grid
            for position, layer_tokens in enumerate(features.select(layers).patch_tokens):
                # Kept float16 in host memory (8.4 MB per image at ViT-L / 518 px, not GPU
                # memory); the coreset and leave-one-out search still run on the device.
                tokens[position].append(layer_tokens.to("cpu", torch.float16))
            maps.append(result.maps.float().cpu())
            scores.append(result.scores.float().cpu())
            if progress is not None:
                progress(stop, total)
        good = GoodImageFeatures(
            patch_tokens=[torch.cat(layer) for layer in tokens],
            zero_shot_maps=torch.cat(maps),
            zero_shot_scores=torch.cat(scores),
            grid=grid,
        )
        return build_reference_from_features(
            good,
            layers,
            bank_identity(self.identity),
            self.scorer.image_size,
            self.scorer.smoothing_sigma,
            config,
            started=started,
            device=self.device,
        )
