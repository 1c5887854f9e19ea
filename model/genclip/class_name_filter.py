"""Class Name Filtering (CNF): keep a product name only where it helps (DESIGN.md 2.1).

The frozen CLIP judges each submitted name against the image: the name survives when
"a photo of a {name}." matches the image at least ``margin`` better (cosine) than the best
generic alternative, and when it is a plausible word sequence at all (a name that CLIP's
tokenizer shatters into many sub-word pieces is a code or a typo, not a concept CLIP knows).
Otherwise the prompt uses ``object``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.backbone import ClipBackbone
from model.detector import OBJECT_LABEL
from model.prompt_text import normalise_class_name

GENERIC_PROMPTS = (
    "a photo of an object.",
    "a photo of a thing.",
    "a photo of something.",
    "a photo of a product.",
)
MAX_PIECES_PER_WORD = 3
MAX_WORDS = 6


class ClassNameFilter:
    """Decides per image whether the submitted class name is informative.

    Text features of every name seen are cached: a production line repeats a few names.
    """

    def __init__(self, backbone: ClipBackbone, margin: float = 0.0, cache_size: int = 4096) -> None:
        self.backbone = backbone
        self.margin = margin
        self.cache_size = cache_size
        self._name_features: dict[str, torch.Tensor] = {}
        self._generic_features: torch.Tensor | None = None

    def is_word_like(self, name: str) -> bool:
        """False when the name is too long or any word splits into many BPE pieces."""
        words = name.split()
        if not words or len(words) > MAX_WORDS:
            return False
        encoder = getattr(self.backbone.tokenizer, "encode", None)
        if encoder is None:
            return True
        return all(len(encoder(word)) <= MAX_PIECES_PER_WORD for word in words)

    def _generic(self) -> torch.Tensor:
        if self._generic_features is None:
            self._generic_features = self.backbone.encode_texts(GENERIC_PROMPTS).detach()
        return self._generic_features

    def _features_for(self, names: Sequence[str]) -> torch.Tensor:
        missing = [name for name in dict.fromkeys(names) if name not in self._name_features]
        if missing:
            if len(self._name_features) + len(missing) > self.cache_size:
                self._name_features.clear()
            encoded = self.backbone.encode_texts([f"a photo of a {name}." for name in missing]).detach()
            self._name_features.update(zip(missing, encoded))
        return torch.stack([self._name_features[name] for name in names])

    @torch.no_grad()
    def filter(self, global_embedding: torch.Tensor, class_names: Sequence[str | None]) -> list[str]:
        """Names to put in the prompts.

        Args:
            global_embedding: (B, D) unit-norm image embeddings.
            class_names: B submitted names (``None`` = not given).

        Returns:
            B prompt names: the normalised submitted name, or ``object``.
        """
        normalised = [normalise_class_name(name) for name in class_names]
        kept = [OBJECT_LABEL] * len(normalised)
        candidates = [
            index for index, name in enumerate(normalised)
            if name != OBJECT_LABEL and self.is_word_like(name)
        ]
        if not candidates:
            return kept
        names = [normalised[index] for index in candidates]
        embeddings = global_embedding[candidates].float()
        named = (embeddings * self._features_for(names).float()).sum(dim=-1)
        generic = (embeddings @ self._generic().float().t()).amax(dim=-1)
        for index, name, keep in zip(candidates, names, (named - generic >= self.margin).tolist()):
            if keep:
                kept[index] = name
        return kept
