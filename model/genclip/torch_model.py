"""GenCLIP (our reading of the paper, DESIGN.md 2.1).

Prompt layout by embedding slot (position 0 is start-of-text)::

    vision-enhanced, layer i:  [N_p | A_p] [Q_P] [MVP_i] <class name> .
    query-only:                [N_p | A_p] [Q_P] object .

``N_p``/``A_p`` are the normal/abnormal state tokens, ``Q_P`` the general query tokens shared
by both prompts, ``MVP_i`` the tokens a per-layer projection makes from block i's class token.
The vision-enhanced text is per image and per layer, so it is encoded in one batched text pass
of B x layers x 2 sequences cut to the longest real prompt; the query-only text is the same
for every image and is cached outside training.

Inference fuses both branches by the mean (maps and global probabilities). Image score rule:
``0.5 * p_abnormal(global embedding) + 0.5 * max(smoothed map)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.anomaly_maps import (
    TEMPERATURE,
    anomaly_from_probabilities,
    finalize_maps,
    global_and_peak_score,
    patch_probabilities_to_grid,
    two_way_probabilities,
    upsample,
)
from model.backbone import ClipBackbone, VisualFeatures
from model.detector import OBJECT_LABEL
from model.genclip.class_name_filter import ClassNameFilter
from model.prompt_text import normalise_class_name, placeholder_prompt
from model.scoring import AnomalyScorer, BatchScores


@dataclass(frozen=True)
class GenCLIPConfig:
    """Prompt sizes and inference options.

    Attributes:
        state_tokens: learnable tokens per state prompt (``N_p`` and ``A_p`` each).
        query_tokens: general query tokens ``Q_P`` shared by both prompts.
        vision_tokens: MVP tokens inserted per layer.
        smoothing_sigma: Gaussian sigma at 518 px (scaled with the input size).
        cnf_margin: cosine margin the class name must win by over generic prompts.
    """

    state_tokens: int = 4
    query_tokens: int = 8
    vision_tokens: int = 1
    smoothing_sigma: float = 4.0
    cnf_margin: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class TrainingOutputs:
    """What the losses need.

    Attributes:
        layer_probabilities: per map (vision-enhanced layers, then query-only layers),
            (B, 2, S, S) [normal, abnormal] probabilities upsampled to the input size.
        image_logits: (B, 2) global-embedding logits (cosine / 0.07), branch mean.
    """

    layer_probabilities: list[torch.Tensor]
    image_logits: torch.Tensor


class GenCLIP(AnomalyScorer):
    """GenCLIP prompts on a frozen backbone; only prompt tensors and MVP projections learn."""

    name = "genclip"

    def __init__(
        self,
        backbone: ClipBackbone,
        layers: Sequence[int],
        image_size: int,
        config: GenCLIPConfig = GenCLIPConfig(),
    ) -> None:
        super().__init__(backbone, layers, image_size)
        self.config = config
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

    # ------------------------------------------------------------------ bookkeeping
    def prompt_sizes(self) -> dict[str, int]:
        return {
            "state_tokens": self.config.state_tokens,
            "query_tokens": self.config.query_tokens,
            "vision_tokens": self.config.vision_tokens,
        }

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

    def query_only_text(self) -> torch.Tensor:
        """(2, D) text features of ``[N_p/A_p] [Q_P] object.``; cached outside training."""
        if self._query_only_cache is not None and not self.training:
            return self._query_only_cache
        tokens = self._tokens(placeholder_prompt(self._prompt_slots, OBJECT_LABEL)).unsqueeze(0)
        embedded = self.backbone.embed_tokens(tokens).expand(2, -1, -1)
        slots = self._state_slots().to(embedded.dtype)
        sequences = torch.cat([embedded[:, :1], slots, embedded[:, 1 + self._prompt_slots :]], dim=1)
        eot = self.backbone.end_of_text_positions(tokens).expand(2)
        features = self.backbone.encode_text_embeddings(sequences, eot)
        if not self.training:
            self._query_only_cache = features.detach()
        return features

    def vision_enhanced_text(self, layer_class_tokens: list[torch.Tensor], prompt_names: Sequence[str]) -> torch.Tensor:
        """Per-image, per-layer text features in one batched pass.

        Args:
            layer_class_tokens: per layer, (B, vision_width) class tokens.
            prompt_names: B names (already filtered) to write in the prompts.

        Returns:
            (B, layers, 2, D) unit-norm text features.
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
        eot = self.backbone.end_of_text_positions(tokens).view(batch, 1, 1).expand(-1, num_layers, 2)
        features = self.backbone.encode_text_embeddings(sequences.reshape(-1, *sequences.shape[3:]), eot.reshape(-1))
        return features.view(batch, num_layers, 2, -1)

    # ------------------------------------------------------------------ maps
    def _branch_probabilities(
        self, features: VisualFeatures, prompt_names: Sequence[str]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-map patch probabilities (B, 2, gh, gw) and branch-mean image logits (B, 2)."""
        enhanced = self.vision_enhanced_text(features.layer_class_tokens, prompt_names)  # (B, Ly, 2, D)
        query_only = self.query_only_text()  # (2, D)
        layer_maps = [
            patch_probabilities_to_grid(two_way_probabilities(tokens, enhanced[:, index]), features.grid)
            for index, tokens in enumerate(features.patch_tokens)
        ] + [
            patch_probabilities_to_grid(two_way_probabilities(tokens, query_only), features.grid)
            for tokens in features.patch_tokens
        ]
        enhanced_global = nn.functional.normalize(enhanced.mean(dim=1), dim=-1)  # (B, 2, D)
        image = features.global_embedding.unsqueeze(1)
        enhanced_logits = (image @ enhanced_global.transpose(1, 2)).squeeze(1)
        query_logits = features.global_embedding @ query_only.t()
        image_logits = (enhanced_logits + query_logits) / (2.0 * TEMPERATURE)
        return layer_maps, image_logits

    def forward_train(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> TrainingOutputs:
        """Training pass: the submitted names go into the prompts unfiltered (CNF is inference-only)."""
        features = self.backbone.encode_image(pixels, self.layers)
        names = [normalise_class_name(name) for name in class_names]
        layer_maps, image_logits = self._branch_probabilities(features, names)
        size = (pixels.shape[-2], pixels.shape[-1])
        return TrainingOutputs([upsample(probabilities, size) for probabilities in layer_maps], image_logits)

    def score_features(self, features: VisualFeatures, class_names: Sequence[str | None]) -> BatchScores:
        prompt_names = self.class_filter.filter(features.global_embedding, class_names)
        layer_maps, image_logits = self._branch_probabilities(features, prompt_names)
        coarse = torch.stack([anomaly_from_probabilities(p) for p in layer_maps]).mean(dim=0)  # (B, gh, gw)
        maps = finalize_maps(coarse, self.image_size, self.config.smoothing_sigma)
        scores = global_and_peak_score(image_logits.softmax(dim=-1)[:, 1], maps)
        return BatchScores(maps=maps, scores=scores, class_labels=list(prompt_names))
