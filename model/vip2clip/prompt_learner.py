"""ViP-Prompt: the image-conditioned prompt learner of ViP2-CLIP (DESIGN.md 2.2).

Two templates, no class name, by embedding slot (position 0 is start-of-text)::

    normal:    [prefix] [C_n x n_ctx] [middle: good]    [K_1 .. K_m] [suffix: . EOT pad...]
    abnormal:  [prefix] [C_a x n_ctx] [middle: damaged] [K_1 .. K_m] [suffix: . EOT pad...]

``C_n`` / ``C_a`` are separate learnable context vectors for each prompt. ``K_j`` are the
class slots, shared by both prompts: ``K_j = cls_ctx_j + MLP_j(global) + bias``, a learnable
vector plus the output of slot j's own small MLP (embed_dim -> embed_dim / 2 -> ReLU ->
text_width) of the image's global embedding, plus a learnable bias shared by the slots. So the
text is per image; it is encoded by the frozen text tower in one batched pass of B x 2
sequences, cut after the end-of-text token (exact: causal mask, end-of-text pooling).

The frozen rows (prefix, middle, suffix) and the token ids whose argmax is the end-of-text
position are buffers named as in the published checkpoints (``token_prefix_pos`` ...). Two
sources:

- ``stored_rows=False`` (the project's ViP2-CLIP): embedded from the freshly tokenized
  templates at construction; not part of checkpoints;
- ``stored_rows=True`` (profile ``vip2clip-official``): loaded from the checkpoint and used as
  they are. The published checkpoints' normal-prompt rows hold "damaged" (they were built from
  the abnormal template's ids) and have no full stop; that is what the published figures ran.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import ClipBackbone
from model.prompt_text import PLACEHOLDER, placeholder_prompt

STATE_WORDS = ("good", "damaged")
PROMPT_SUFFIXES = ("pos", "neg")  # normal, abnormal: the published buffer names


class ViPPrompt(nn.Module):
    """Learnable context + image-conditioned class slots for the [normal, abnormal] prompts.

    The backbone is *not* registered as a submodule (its parameters must not show up in this
    module's ``parameters()``, which feed the optimizer); it is passed to :meth:`forward`.

    Args:
        backbone: the frozen CLIP (token embedding, tokenizer, widths).
        context_tokens: n_ctx, learnable context vectors per prompt.
        class_slots: m, image-conditioned class slots shared by both prompts.
        full_stop: end the templates with ``.`` (the project's reading) or not (published).
        stored_rows: the frozen rows are checkpoint tensors (see the module docstring).

    Attributes:
        normal_context / abnormal_context: (n_ctx, text_width) learnable context vectors.
        class_slots: (m, text_width) learnable class-slot vectors, shared.
        slot_mlps: one MLP per class slot, embed_dim -> embed_dim // 2 -> ReLU -> text_width.
        slot_bias: (text_width,) learnable bias added to every slot's shift.
        token_prefix_{pos,neg}: (1, 1, W) start-of-text rows.
        token_middle_{pos,neg}: (1, s, W) state-word rows (s = 1 for CLIP's "good"/"damaged").
        token_suffix_{pos,neg}: (1, context - 1 - n_ctx - s - m, W) rows after the class slots.
        tokenized_prompts_{pos,neg}: (1, context) token ids; end-of-text = argmax.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        context_tokens: int = 7,
        class_slots: int = 3,
        full_stop: bool = True,
        stored_rows: bool = False,
    ) -> None:
        super().__init__()
        if context_tokens < 1 or class_slots < 1:
            raise ValueError(f"need at least one context token and one class slot, got {context_tokens}, {class_slots}")
        width, embed_dim = backbone.text_width, backbone.embed_dim
        hidden = max(1, embed_dim // 2)
        self.context_tokens = int(context_tokens)
        self.num_class_slots = int(class_slots)
        self.stored_rows = bool(stored_rows)
        self.normal_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
        self.abnormal_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
        self.class_slots = nn.Parameter(torch.randn(class_slots, width) * 0.02)
        self.slot_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(class_slots)
        )
        self.slot_bias = nn.Parameter(torch.zeros(width))

        slot_text = " ".join([PLACEHOLDER] * class_slots)
        self.templates = tuple(
            placeholder_prompt(context_tokens, f"{word} {slot_text}", full_stop=full_stop) for word in STATE_WORDS
        )
        tokens = backbone.tokenize(list(self.templates)).cpu()
        with torch.no_grad():
            rows = backbone.embed_tokens(tokens.to(backbone.device)).detach().float().cpu()
        # Tokens each state word takes (one for "good" / "damaged" in CLIP's BPE; kept general).
        words = backbone.tokenize(list(STATE_WORDS)).cpu()
        state_lengths = [int(n) - 1 for n in backbone.end_of_text_positions(words)]
        for index, (suffix, state) in enumerate(zip(PROMPT_SUFFIXES, state_lengths)):
            after_state = 1 + context_tokens + state
            buffers = {
                "token_prefix": rows[index : index + 1, :1],
                "token_middle": rows[index : index + 1, 1 + context_tokens : after_state],
                "token_suffix": rows[index : index + 1, after_state + class_slots :],
                "tokenized_prompts": tokens[index : index + 1],
            }
            for name, value in buffers.items():
                self.register_buffer(f"{name}_{suffix}", value.clone(), persistent=self.stored_rows)

    # ------------------------------------------------------------------ layout
    def frozen_rows(self, prompt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix, middle, suffix, token ids) of prompt 0 (normal) or 1 (abnormal)."""
        suffix = PROMPT_SUFFIXES[prompt]
        return (
            getattr(self, f"token_prefix_{suffix}"),
            getattr(self, f"token_middle_{suffix}"),
            getattr(self, f"token_suffix_{suffix}"),
            getattr(self, f"tokenized_prompts_{suffix}"),
        )

    def end_of_text_positions(self) -> torch.Tensor:
        """(2,) end-of-text index of the [normal, abnormal] prompt (argmax of the token ids)."""
        return torch.cat([self.frozen_rows(prompt)[3].argmax(dim=-1) for prompt in (0, 1)])

    def class_slot_vectors(self, global_embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) global embeddings -> (B, m, text_width): ``cls_ctx_j + MLP_j(g) + bias``."""
        dtype = self.class_slots.dtype
        shifts = torch.stack([mlp(global_embedding.to(dtype)) for mlp in self.slot_mlps], dim=1)
        return self.class_slots.unsqueeze(0) + shifts.to(dtype) + self.slot_bias

    def prompt_embeddings(self, global_embedding: torch.Tensor) -> torch.Tensor:
        """(B, 2, L, text_width) token embeddings of both prompts for every image, cut after
        the later end-of-text position (L = max EOT + 1)."""
        batch = global_embedding.shape[0]
        slots = self.class_slot_vectors(global_embedding)  # (B, m, W)
        length = int(self.end_of_text_positions().max()) + 1
        sequences = []
        for prompt, context in enumerate((self.normal_context, self.abnormal_context)):
            prefix, middle, suffix, _ = self.frozen_rows(prompt)
            head = 1 + self.context_tokens + middle.shape[1] + self.num_class_slots
            dtype = prefix.dtype
            sequences.append(
                torch.cat(
                    [
                        prefix.expand(batch, -1, -1),
                        context.to(dtype).unsqueeze(0).expand(batch, -1, -1),
                        middle.expand(batch, -1, -1),
                        slots.to(dtype),
                        suffix[:, : max(0, length - head)].expand(batch, -1, -1),
                    ],
                    dim=1,
                )
            )
        return torch.stack(sequences, dim=1)

    def forward(self, backbone: ClipBackbone, global_embedding: torch.Tensor) -> torch.Tensor:
        """Per-image [normal, abnormal] text features.

        Args:
            backbone: the frozen CLIP whose text tower encodes the prompts.
            global_embedding: (B, embed_dim) image embeddings conditioning the class slots.

        Returns:
            (B, 2, embed_dim) unit-norm text features (channel 0 normal, 1 abnormal).
        """
        sequences = self.prompt_embeddings(global_embedding)
        batch, prompts, length, width = sequences.shape
        eot = self.end_of_text_positions().view(1, prompts).expand(batch, -1).reshape(-1)
        features = backbone.encode_text_embeddings(sequences.reshape(batch * prompts, length, width), eot)
        return features.view(batch, prompts, -1)
