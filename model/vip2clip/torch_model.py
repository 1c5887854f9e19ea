"""ViP2-CLIP on a frozen backbone (DESIGN.md 2.2; facts from the public code).

Per image: ViP-Prompt turns the global embedding into [normal, abnormal] text features (one
batched text pass of B x 2 sequences); per tapped layer, the shared FGP module refines them
against that layer's patch tokens. With the refined text of each layer:

- map: softmax over [normal, abnormal] of cosine / 0.07 per patch, anomaly
  ``(p_abnormal + 1 - p_normal) / 2``, mean over layers, bilinear upsample to the input size,
  Gaussian smoothing (sigma 8 at 518 px, scaled with the input size);
- image score: per layer the top-k patches by p_abnormal, their cosines to both texts,
  concatenated over layers and averaged, / 0.07, softmax, p_abnormal
  (:func:`topk_image_logits`). The global embedding enters only through the prompts.

Two profiles (:data:`PROFILES`), chosen by four config fields and recorded in sidecars:

- ``vip2clip``, the project's clean reading: the standard CLIP global embedding (``ln_post``
  then the projection), freshly tokenized ``good`` / ``damaged`` templates with a full stop,
  mirror borders when smoothing;
- ``vip2clip-official``, the published inference exactly (what the authors' checkpoints were
  trained and measured with; ``../shared/reference/vip2clip-official-checkpoint.md``): the
  final class token projected *without* ``ln_post``, the frozen token rows stored in the
  checkpoint used as they are (the normal prompt's middle row is "damaged"), no full stop,
  scipy's half-sample-symmetric borders. ``genclip import-checkpoint`` writes it.

The detector uses no class name: its class label is always ``object``. All layers go through
FGP, the similarities and the top-k selection as one stacked batch (no loop over images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.anomaly_maps import (
    SMOOTHING_BORDERS,
    TEMPERATURE,
    anomaly_from_probabilities,
    finalize_maps,
    patch_probabilities_to_grid,
    upsample,
)
from model.backbone import ClipBackbone, VisualFeatures
from model.detector import OBJECT_LABEL
from model.scoring import BatchScores, TrainableScorer, TrainingOutputs
from model.vip2clip.fgp import FGP
from model.vip2clip.prompt_learner import ViPPrompt

FGP_LR_RATIO = 0.01  # the published code trains FGP at 1e-5 with the prompts at 1e-3
GLOBAL_EMBEDDINGS = ("ln_post", "no_ln_post")
PROMPT_ROWS = ("tokenized", "stored")
PROFILES: dict[str, dict[str, Any]] = {
    "vip2clip": {"global_embedding": "ln_post", "prompt_rows": "tokenized", "full_stop": True, "smoothing_border": "mirror"},
    "vip2clip-official": {
        "global_embedding": "no_ln_post",
        "prompt_rows": "stored",
        "full_stop": False,
        "smoothing_border": "symmetric",
    },
}
CUSTOM_PROFILE = "custom"


@dataclass(frozen=True)
class VIP2CLIPConfig:
    """ViP2-CLIP's whole configuration (stored in checkpoint sidecars).

    Attributes:
        context_tokens: learnable context vectors per prompt (normal and abnormal each).
        class_slots: image-conditioned class-slot vectors shared by both prompts.
        fgp_heads: attention heads of FGP (must divide the backbone's embed_dim).
        top_k: patches per layer that make the image score (capped at the patch count).
        smoothing_sigma: Gaussian sigma of the map at 518 px (scaled with the input size).
        global_embedding: what conditions the class slots: ``ln_post`` (standard CLIP: the
            final class token through ``ln_post`` and the projection) or ``no_ln_post`` (the
            published code: projection without ``ln_post``); L2-normalised either way.
        prompt_rows: the prompts' frozen token rows: ``tokenized`` (from the templates) or
            ``stored`` (checkpoint tensors, used as they are).
        full_stop: whether the templates end with ``.`` (published: no).
        smoothing_border: ``mirror`` or ``symmetric`` (published: scipy's default); see
            :func:`model.anomaly_maps.gaussian_smooth`.
    """

    context_tokens: int = 7
    class_slots: int = 3
    fgp_heads: int = 8
    top_k: int = 50
    smoothing_sigma: float = 8.0
    global_embedding: str = "ln_post"
    prompt_rows: str = "tokenized"
    full_stop: bool = True
    smoothing_border: str = "mirror"

    def __post_init__(self) -> None:
        choices = {
            "global_embedding": GLOBAL_EMBEDDINGS,
            "prompt_rows": PROMPT_ROWS,
            "smoothing_border": SMOOTHING_BORDERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")

    @classmethod
    def for_profile(cls, profile: str, **fields: Any) -> VIP2CLIPConfig:
        """The config of a named profile (``vip2clip``, ``vip2clip-official``), sizes from ``fields``."""
        if profile not in PROFILES:
            raise ValueError(f"unknown ViP2-CLIP profile {profile!r}; choose one of {tuple(PROFILES)}")
        return cls(**{**fields, **PROFILES[profile]})

    @property
    def profile(self) -> str:
        """The profile whose behaviours this config follows, or ``custom``."""
        for name, behaviours in PROFILES.items():
            if all(getattr(self, field) == value for field, value in behaviours.items()):
                return name
        return CUSTOM_PROFILE


def _topk_logits_from_cosines(cosines: torch.Tensor, k: int) -> torch.Tensor:
    """(L, B, N, 2) patch-to-[normal, abnormal] cosines -> (B, 2) image logits (top-k rule)."""
    layers, batch, patches, _ = cosines.shape
    k = max(1, min(int(k), patches))
    p_abnormal = (cosines / TEMPERATURE).softmax(dim=-1)[..., 1]  # (L, B, N)
    index = p_abnormal.topk(k, dim=-1).indices  # (L, B, k)
    selected = cosines.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 2))  # (L, B, k, 2)
    # Concatenating the L x k selections and averaging = mean over both axes.
    return selected.mean(dim=(0, 2)) / TEMPERATURE


def layer_cosines(patch_tokens: Sequence[torch.Tensor], text_per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosines of every patch to each layer's [normal, abnormal] text.

    Args:
        patch_tokens: per layer, (B, N, D) unit-norm patch tokens.
        text_per_layer: per layer, (B, 2, D) unit-norm text features.

    Returns:
        (L, B, N, 2) cosines.
    """
    if len(patch_tokens) != len(text_per_layer) or not patch_tokens:
        raise ValueError(f"{len(patch_tokens)} patch layers but {len(text_per_layer)} text layers")
    return torch.stack([tokens @ text.transpose(1, 2) for tokens, text in zip(patch_tokens, text_per_layer)])


def topk_image_logits(
    patch_tokens: Sequence[torch.Tensor], text_per_layer: Sequence[torch.Tensor], k: int
) -> torch.Tensor:
    """ViP2-CLIP image logits from the top-k patches of each layer.

    Per layer, rank the patches by p_abnormal (softmax over [normal, abnormal] of cosine / 0.07),
    keep the top ``k`` (at most N), gather their cosines to both texts, concatenate over layers,
    average, and divide by 0.07.

    Args:
        patch_tokens: per layer, (B, N, D) unit-norm patch tokens.
        text_per_layer: per layer, (B, 2, D) unit-norm [normal, abnormal] text features.
        k: patches kept per layer.

    Returns:
        (B, 2) logits; ``softmax(...)[:, 1]`` is the image anomaly score.
    """
    return _topk_logits_from_cosines(layer_cosines(patch_tokens, text_per_layer), k)


class VIP2CLIP(TrainableScorer):
    """ViP-Prompt + FGP on a frozen backbone; only those two modules learn."""

    name = "vip2clip"
    config_class = VIP2CLIPConfig
    our_reading = {
        "profile vip2clip": "ln_post on the global embedding, fresh templates with a full stop, mirror borders "
        "(the published code does otherwise: profile vip2clip-official)",
    }

    def __init__(
        self,
        backbone: ClipBackbone,
        layers: Sequence[int],
        image_size: int,
        config: VIP2CLIPConfig = VIP2CLIPConfig(),
    ) -> None:
        super().__init__(backbone, layers, image_size, config)
        embed_dim = backbone.embed_dim
        if embed_dim % config.fgp_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by fgp_heads {config.fgp_heads}")
        self.prompt_learner = ViPPrompt(
            backbone,
            config.context_tokens,
            config.class_slots,
            full_stop=config.full_stop,
            stored_rows=config.prompt_rows == "stored",
        )
        self.fgp = FGP(embed_dim, embed_dim, embed_dim, config.fgp_heads)
        self.prompt_learner.to(backbone.device)
        self.fgp.to(backbone.device)

    @property
    def smoothing_sigma(self) -> float:
        return self.config.smoothing_sigma

    # ------------------------------------------------------------------ bookkeeping
    @property
    def profile(self) -> str:
        return self.config.profile

    def checkpoint_metadata(self) -> dict[str, Any]:
        metadata = super().checkpoint_metadata()
        if self.profile != "vip2clip":
            metadata["our_reading"] = {}  # the official profile is the published behaviour
        return metadata

    def parameter_groups(self, lr: float, fgp_lr: float | None = None) -> list[dict[str, Any]]:
        """Adam groups: ViP-Prompt at ``lr``, FGP at ``fgp_lr`` (default ``lr / 100``: the
        published 1e-3 / 1e-5)."""
        return [
            {"params": [p for p in self.prompt_learner.parameters() if p.requires_grad], "lr": lr},
            {"params": [p for p in self.fgp.parameters() if p.requires_grad], "lr": lr * FGP_LR_RATIO if fgp_lr is None else fgp_lr},
        ]

    # ------------------------------------------------------------------ maths
    def global_embedding(self, features: VisualFeatures) -> torch.Tensor:
        """(B, D) unit-norm embedding that conditions the class slots (``config.global_embedding``)."""
        if self.config.global_embedding == "ln_post":
            return features.global_embedding
        projection = self.backbone.clip.visual.proj
        return F.normalize(features.final_class_token.to(projection.dtype) @ projection, dim=-1)

    def text_features(self, global_embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) global embeddings -> (B, 2, D) unit-norm ViP-Prompt text features (before FGP)."""
        return self.prompt_learner(self.backbone, global_embedding)

    def refined_text(self, patch_tokens: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """FGP per layer, all layers in one call.

        Args:
            patch_tokens: per layer, (B, N, D) unit-norm patch tokens.
            text: (B, 2, D) ViP-Prompt text features.

        Returns:
            (L, B, 2, D) unit-norm refined text features.
        """
        return self._refine_stacked(torch.stack(list(patch_tokens)), text)

    def _refine_stacked(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(L, B, N, D) patches, (B, 2, D) text -> (L, B, 2, D): one FGP call over L x B."""
        layers, batch, count, dim = patches.shape
        queries = text.unsqueeze(0).expand(layers, -1, -1, -1).reshape(layers * batch, 2, text.shape[-1])
        refined = self.fgp(queries, patches.reshape(layers * batch, count, dim))
        return refined.view(layers, batch, 2, -1)

    def _layer_outputs(self, features: VisualFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, B, 2, gh, gw) patch probabilities and (B, 2) top-k image logits."""
        text = self.text_features(self.global_embedding(features))
        patches = torch.stack(features.patch_tokens)  # (L, B, N, D), stacked once
        refined = self._refine_stacked(patches, text)  # (L, B, 2, D)
        cosines = patches @ refined.transpose(-1, -2)  # (L, B, N, 2)
        probabilities = (cosines / TEMPERATURE).softmax(dim=-1)
        layers, batch = probabilities.shape[:2]
        grid = patch_probabilities_to_grid(probabilities.flatten(0, 1), features.grid)
        grid = grid.view(layers, batch, 2, *features.grid)
        return grid, _topk_logits_from_cosines(cosines, self.config.top_k)

    def forward_train(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> TrainingOutputs:
        """Training pass (class names are unused: the prompts carry no class name).

        Returns:
            per layer (B, 2, H, W) probabilities at the input size, and (B, 2) top-k image logits.
        """
        with torch.no_grad():  # the backbone is frozen: no graph through the vision tower
            features = self.backbone.encode_image(pixels, self.layers)
        grid, image_logits = self._layer_outputs(features)
        layers, batch = grid.shape[:2]
        size = (pixels.shape[-2], pixels.shape[-1])
        upsampled = upsample(grid.flatten(0, 1), size).view(layers, batch, 2, *size)
        return TrainingOutputs(list(upsampled.unbind(0)), image_logits)

    def score_features(self, features: VisualFeatures, class_names: Sequence[str | None]) -> BatchScores:
        batch = features.global_embedding.shape[0]
        if len(class_names) != batch:
            raise ValueError(f"{batch} images but {len(class_names)} class names")
        grid, image_logits = self._layer_outputs(features)
        # Mean over layers commutes with the (linear) bilinear upsample: upsample once.
        coarse = anomaly_from_probabilities(grid.flatten(0, 1)).view(grid.shape[0], batch, *features.grid).mean(dim=0)
        maps = finalize_maps(coarse.float(), self.image_size, self.config.smoothing_sigma, self.config.smoothing_border)
        scores = image_logits.float().softmax(dim=-1)[:, 1].clamp(0.0, 1.0)
        return BatchScores(maps=maps, scores=scores, class_labels=[OBJECT_LABEL] * batch)
