"""ViP-Prompt: the image-conditioned prompt learner of ViP2-CLIP (DESIGN.md 2.2).

Two templates, no class name, by embedding slot (position 0 is start-of-text)::

    normal:    [C_n x n_ctx] good    [K_1 .. K_m] .
    abnormal:  [C_a x n_ctx] damaged [K_1 .. K_m] .

``C_n`` / ``C_a`` are separate learnable context vectors for each prompt. ``K_j`` are the
class slots, shared by both prompts: a learnable vector plus the output of slot j's own small
MLP (embed_dim -> embed_dim / 2 -> ReLU -> text_width) applied to the image's global embedding
(shifted by a learnable bias first). So the text is per image; it is encoded by the frozen
text tower in one batched pass of B x 2 sequences, cut to the template's real length.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import ClipBackbone
from model.prompt_text import PLACEHOLDER, placeholder_prompt

STATE_WORDS = ("good", "damaged")


class ViPPrompt(nn.Module):
    """Learnable context + image-conditioned class slots for the [normal, abnormal] prompts.

    The backbone is *not* registered as a submodule (its parameters must not show up in this
    module's ``parameters()``, which feed the optimizer); it is passed to :meth:`forward`.

    Attributes:
        normal_context / abnormal_context: (n_ctx, text_width) learnable context vectors.
        class_slots: (class_slots, text_width) learnable class-slot vectors, shared.
        image_bias: (embed_dim,) learnable bias added to the global embedding before the MLPs.
        slot_mlps: one MLP per class slot, embed_dim -> embed_dim // 2 -> ReLU -> text_width.
    """

    def __init__(self, backbone: ClipBackbone, context_tokens: int = 7, class_slots: int = 3) -> None:
        super().__init__()
        if context_tokens < 1 or class_slots < 1:
            raise ValueError(f"need at least one context token and one class slot, got {context_tokens}, {class_slots}")
        width, embed_dim = backbone.text_width, backbone.embed_dim
        hidden = max(1, embed_dim // 2)
        self.context_tokens = int(context_tokens)
        self.num_class_slots = int(class_slots)
        self.normal_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
        self.class_slots = nn.Parameter(torch.randn(class_slots, width) * 0.02)
        self.image_bias = nn.Parameter(torch.randn(embed_dim) * 0.02)
        self.slot_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(class_slots)
        )

        slot_text = " ".join([PLACEHOLDER] * class_slots)
        templates = [placeholder_prompt(context_tokens, f"{word} {slot_text}") for word in STATE_WORDS]
        tokens = backbone.tokenize(templates).cpu()
        eot = backbone.end_of_text_positions(tokens)
        # Tokens each state word takes (one for "good" / "damaged" in CLIP's BPE; kept general).
        words = backbone.tokenize(list(STATE_WORDS)).cpu()
        self._state_lengths = tuple(int(n) - 1 for n in backbone.end_of_text_positions(words))
        self._length = int(eot.max()) + 1  # everything after the last EOT is never attended to
        self.templates = tuple(templates)
        self.register_buffer("tokens", tokens[:, : self._length].clone(), persistent=False)
        self.register_buffer("eot_positions", eot.clone(), persistent=False)

    def class_slot_vectors(self, global_embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) unit-norm global embeddings -> (B, class_slots, text_width)."""
        conditioned = global_embedding + self.image_bias.to(global_embedding.dtype)
        shifts = torch.stack([mlp(conditioned) for mlp in self.slot_mlps], dim=1)
        return self.class_slots.unsqueeze(0) + shifts.to(self.class_slots.dtype)

    def prompt_embeddings(self, backbone: ClipBackbone, global_embedding: torch.Tensor) -> torch.Tensor:
        """(B, 2, L, text_width) token embeddings of both prompts for every image (L cut to the EOT)."""
        batch = global_embedding.shape[0]
        embedded = backbone.embed_tokens(self.tokens)  # (2, L, W), frozen lookup
        dtype = embedded.dtype
        slots = self.class_slot_vectors(global_embedding).to(dtype)  # (B, m, W)
        n, m = self.context_tokens, self.num_class_slots
        sequences = []
        for index, context in enumerate((self.normal_context, self.abnormal_context)):
            row, state = embedded[index].unsqueeze(0), self._state_lengths[index]
            after_state = 1 + n + state
            sequences.append(
                torch.cat(
                    [
                        row[:, :1].expand(batch, -1, -1),  # start-of-text
                        context.to(dtype).unsqueeze(0).expand(batch, -1, -1),
                        row[:, 1 + n : after_state].expand(batch, -1, -1),  # state word
                        slots,
                        row[:, after_state + m :].expand(batch, -1, -1),  # "." EOT (padding)
                    ],
                    dim=1,
                )
            )
        return torch.stack(sequences, dim=1)

    def forward(self, backbone: ClipBackbone, global_embedding: torch.Tensor) -> torch.Tensor:
        """Per-image [normal, abnormal] text features.

        Args:
            backbone: the frozen CLIP whose text tower encodes the prompts.
            global_embedding: (B, embed_dim) unit-norm image embeddings.

        Returns:
            (B, 2, embed_dim) unit-norm text features (channel 0 normal, 1 abnormal).
        """
        sequences = self.prompt_embeddings(backbone, global_embedding)
        batch, prompts, length, width = sequences.shape
        eot = self.eot_positions.view(1, prompts).expand(batch, -1).reshape(-1)
        features = backbone.encode_text_embeddings(sequences.reshape(batch * prompts, length, width), eot)
        return features.view(batch, prompts, -1)
