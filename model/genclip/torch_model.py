"""GenCLIP (our reading of the paper, DESIGN.md 2.1).

Prompt layout by embedding slot (position 0 is start-of-text)::

    vision-enhanced, layer i:  [N_p | A_p] [Q_P] [MVP_i] <class name> .
    query-only:                [N_p | A_p] [Q_P] object .

``N_p``/``A_p`` are the normal/abnormal state tokens, ``Q_P`` the general query tokens shared
by both prompts, ``MVP_i`` the tokens a per-layer projection makes from block i's class token.
The vision-enhanced text is per image and per layer, so it is encoded in one batched text pass
of B x layers x 2 sequences cut to the longest real prompt; the query-only text is the same
for every image and is cached outside training.

Training uses the vision-enhanced branch only (the paper's framework figure: "During
training, all modules except for CNF and F_Q are used"); the query-only branch, built from the
same learned ``N_p``/``A_p``/``Q_P``, joins at inference. Inference fuses the branches with
weight ``enhanced_weight`` (maps and global logits); image score
``global_score_weight * p_abnormal(global embedding) + (1 - global_score_weight) * max(map)``.
Both weights and the token counts are our reading (``GenCLIP.our_reading``, written into every
checkpoint sidecar): the paper does not give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.anomaly_maps import (
    TEMPERATURE,
    anomaly_from_probabilities,
    finalize_maps,
    max_map_score,
    patch_probabilities_to_grid,
    two_way_probabilities,
    upsample,
)
from model.backbone import ClipBackbone, VisualFeatures
from model.detector import OBJECT_LABEL
from model.genclip.class_name_filter import ClassNameFilter
from model.prompt_text import normalise_class_name, placeholder_prompt
from model.scoring import BatchScores, TrainableScorer, TrainingOutputs


@dataclass(frozen=True)
class GenCLIPConfig:
    """GenCLIP's whole configuration (stored in checkpoint sidecars).

    Attributes:
        state_tokens: learnable tokens per state prompt (``N_p`` and ``A_p`` each).
        query_tokens: general query tokens ``Q_P`` shared by both prompts.
        vision_tokens: MVP tokens inserted per layer.
        smoothing_sigma: Gaussian sigma at 518 px (scaled with the input size).
        cnf_margin: cosine margin the class name must win by over generic prompts.
        enhanced_weight: weight of the vision-enhanced branch in the inference fusion (maps
            and global logits); the query-only branch gets ``1 - enhanced_weight``.
        global_score_weight: weight of the global-embedding probability in the image score;
            the map's peak gets ``1 - global_score_weight``.
    """

    state_tokens: int = 4
    query_tokens: int = 8
    vision_tokens: int = 1
    smoothing_sigma: float = 4.0
    cnf_margin: float = 0.0
    enhanced_weight: float = 0.5
    global_score_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.state_tokens < 1 or self.query_tokens < 0 or self.vision_tokens < 1:
            raise ValueError(
                f"need state_tokens >= 1, query_tokens >= 0, vision_tokens >= 1, got "
                f"{self.state_tokens}, {self.query_tokens}, {self.vision_tokens}"
            )
        for name in ("enhanced_weight", "global_score_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class GenCLIP(TrainableScorer):
    """GenCLIP prompts on a frozen backbone; only prompt tensors and MVP projections learn."""

    name = "genclip"
    config_class = GenCLIPConfig
    our_reading = {
        "token_counts": "state_tokens, query_tokens, vision_tokens: the paper gives no counts; ours are chosen",
        "vision_prompts": "MVP_i = one Linear from block i's class token (after ln_post) to vision_tokens x text width",
        "fusion": "maps and global logits: enhanced_weight x vision-enhanced + (1 - enhanced_weight) x query-only",
        "image_score": "global_score_weight x p_abnormal(global) + (1 - global_score_weight) x max(smoothed map)",
        "class_name_filter": "name kept when 'a photo of a {name}.' beats generic prompts by cnf_margin and is word-like",
        "smoothing": "Gaussian sigma smoothing_sigma at 518 px (the paper does not state it)",
        "training": "vision-enhanced branch only (framework figure); loss focal + Dice per layer + image CE",
    }

    def __init__(
        self,
        backbone: ClipBackbone,
        layers: Sequence[int],
        image_size: int,
        config: GenCLIPConfig = GenCLIPConfig(),
    ) -> None:
        super().__init__(backbone, layers, image_size, config)
        width = backbone.text_width
        self.normal_state = nn.Parameter(torch.randn(config.state_tokens, width) * 0.02)
        self.abnormal_state = nn.Parameter(torch.randn(config.state_tokens, width) * 0.02)
        self.query = nn.Parameter(torch.randn(config.query_tokens, width) * 0.02)
        self.vision_prompts = nn.ModuleList(
            nn.Linear(backbone.vision_width, config.vision_tokens * width) for _ in self.layers
        )
        self.class_filter = ClassNameFilter(backbone, margin=config.cnf_margin)
        self._query_only_cache: torch.Tensor | None = None
        self._token_cache: dict[str, torch.Tensor] = {}

    @property
    def smoothing_sigma(self) -> float:
        return self.config.smoothing_sigma

    # ------------------------------------------------------------------ bookkeeping
    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """One Adam group: every prompt tensor and MVP projection at ``lr``."""
        return [{"params": self.prompt_parameters(), "lr": lr}]

    def train(self, mode: bool = True) -> GenCLIP:
        self._query_only_cache = None  # prompts are about to change (or just did)
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._query_only_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def _prompt_slots(self) -> int:
        return self.config.state_tokens + self.config.query_tokens

    def _tokens(self, text: str) -> torch.Tensor:
        """(context,) token ids of a placeholder prompt, cached per text."""
        tokens = self._token_cache.get(text)
        if tokens is None:
            if len(self._token_cache) > 4096:
                self._token_cache.clear()
            tokens = self.backbone.tokenize([text])[0]
            self._token_cache[text] = tokens
        return tokens

    # ------------------------------------------------------------------ text
    def _state_slots(self) -> torch.Tensor:
        """(2, state + query, W): [N_p Q_P] and [A_p Q_P]."""
        query = self.query.unsqueeze(0).expand(2, -1, -1)
        return torch.cat([torch.stack([self.normal_state, self.abnormal_state]), query], dim=1)

    def query_only_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings of ``[N_p/A_p] [Q_P] object.``

        Returns:
            ``(sequences, eot)``: (2, context, W) [normal, abnormal] embeddings and (2,)
            end-of-text positions.
        """
        tokens = self._tokens(placeholder_prompt(self._prompt_slots, OBJECT_LABEL)).unsqueeze(0)
        embedded = self.backbone.embed_tokens(tokens).expand(2, -1, -1)
        slots = self._state_slots().to(embedded.dtype)
        sequences = torch.cat([embedded[:, :1], slots, embedded[:, 1 + self._prompt_slots :]], dim=1)
        return sequences, self.backbone.end_of_text_positions(tokens).expand(2)

    def query_only_text(self) -> torch.Tensor:
        """(2, D) text features of ``[N_p/A_p] [Q_P] object.``; cached outside training."""
        if self._query_only_cache is not None and not self.training:
            return self._query_only_cache
        features = self.backbone.encode_text_embeddings(*self.query_only_embeddings())
        if not self.training:
            self._query_only_cache = features.detach()
        return features

    def vision_enhanced_embeddings(
        self, layer_class_tokens: list[torch.Tensor], prompt_names: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings of ``[N_p/A_p] [Q_P] [MVP_i] <name>.`` per image and layer.

        Args:
            layer_class_tokens: per layer, (B, vision_width) class tokens.
            prompt_names: B names (already filtered) to write in the prompts.

        Returns:
            ``(sequences, eot)``: (B, layers, 2, context, W) embeddings and (B,) end-of-text
            positions.
        """
        cfg = self.config
        batch, num_layers = len(prompt_names), len(layer_class_tokens)
        slots = cfg.state_tokens + cfg.query_tokens + cfg.vision_tokens
        tokens = torch.stack([self._tokens(placeholder_prompt(slots, name)) for name in prompt_names])
        embedded = self.backbone.embed_tokens(tokens)  # (B, L, W)
        width = embedded.shape[-1]
        vision = torch.stack(
            [projection(cls.to(projection.weight.dtype)) for projection, cls in zip(self.vision_prompts, layer_class_tokens)],
            dim=1,
        ).view(batch, num_layers, 1, cfg.vision_tokens, width).expand(-1, -1, 2, -1, -1)
        state = self._state_slots().view(1, 1, 2, self._prompt_slots, width).expand(batch, num_layers, -1, -1, -1)
        start = embedded[:, None, None, :1].expand(-1, num_layers, 2, -1, -1)
        rest = embedded[:, None, None, 1 + slots :].expand(-1, num_layers, 2, -1, -1)
        sequences = torch.cat([start, state.to(embedded.dtype), vision.to(embedded.dtype), rest], dim=3)
        return sequences, self.backbone.end_of_text_positions(tokens)

    def vision_enhanced_text(self, layer_class_tokens: list[torch.Tensor], prompt_names: Sequence[str]) -> torch.Tensor:
        """Per-image, per-layer text features in one batched pass.

        Args:
            layer_class_tokens: per layer, (B, vision_width) class tokens.
            prompt_names: B names (already filtered) to write in the prompts.

        Returns:
            (B, layers, 2, D) unit-norm text features.
        """
        sequences, eot = self.vision_enhanced_embeddings(layer_class_tokens, prompt_names)
        batch, num_layers = sequences.shape[:2]
        eot = eot.view(batch, 1, 1).expand(-1, num_layers, 2)
        features = self.backbone.encode_text_embeddings(sequences.reshape(-1, *sequences.shape[3:]), eot.reshape(-1))
        return features.view(batch, num_layers, 2, -1)

    # ------------------------------------------------------------------ maps
    def _enhanced_branch(
        self, features: VisualFeatures, prompt_names: Sequence[str]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Vision-enhanced branch: per-layer (B, 2, gh, gw) probabilities, (B, 2) global cosines."""
        enhanced = self.vision_enhanced_text(features.layer_class_tokens, prompt_names)  # (B, Ly, 2, D)
        layer_maps = [
            patch_probabilities_to_grid(two_way_probabilities(tokens, enhanced[:, index]), features.grid)
            for index, tokens in enumerate(features.patch_tokens)
        ]
        enhanced_global = nn.functional.normalize(enhanced.mean(dim=1), dim=-1)  # (B, 2, D)
        cosines = (features.global_embedding.unsqueeze(1) @ enhanced_global.transpose(1, 2)).squeeze(1)
        return layer_maps, cosines

    def _query_only_branch(self, features: VisualFeatures) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Query-only branch: per-layer (B, 2, gh, gw) probabilities, (B, 2) global cosines."""
        query_only = self.query_only_text()  # (2, D)
        layer_maps = [
            patch_probabilities_to_grid(two_way_probabilities(tokens, query_only), features.grid)
            for tokens in features.patch_tokens
        ]
        return layer_maps, features.global_embedding @ query_only.t()

    def forward_train(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> TrainingOutputs:
        """Training pass on the vision-enhanced branch only (CNF and the query-only branch are
        inference-only): the submitted names go into the prompts unfiltered.

        Returns:
            per tapped layer (B, 2, S, S) probabilities, and (B, 2) global logits (cosine / 0.07).
        """
        features = self.backbone.encode_image(pixels, self.layers)
        names = [normalise_class_name(name) for name in class_names]
        layer_maps, cosines = self._enhanced_branch(features, names)
        size = (pixels.shape[-2], pixels.shape[-1])
        return TrainingOutputs([upsample(probabilities, size) for probabilities in layer_maps], cosines / TEMPERATURE)

    def score_features(self, features: VisualFeatures, class_names: Sequence[str | None]) -> BatchScores:
        prompt_names = self.class_filter.filter(features.global_embedding, class_names)
        enhanced_maps, enhanced_cosines = self._enhanced_branch(features, prompt_names)
        query_maps, query_cosines = self._query_only_branch(features)
        weight = self.config.enhanced_weight

        def branch_anomaly(layer_maps: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([anomaly_from_probabilities(p) for p in layer_maps]).mean(dim=0)  # (B, gh, gw)

        coarse = weight * branch_anomaly(enhanced_maps) + (1.0 - weight) * branch_anomaly(query_maps)
        maps = finalize_maps(coarse, self.image_size, self.config.smoothing_sigma)
        logits = (weight * enhanced_cosines + (1.0 - weight) * query_cosines) / TEMPERATURE
        share = self.config.global_score_weight
        scores = (share * logits.softmax(dim=-1)[:, 1] + (1.0 - share) * max_map_score(maps)).clamp(0.0, 1.0)
        return BatchScores(maps=maps, scores=scores, class_labels=list(prompt_names))
