"""FGP: local refinement of the text features by cross-attention to one layer's patches.

The two text embeddings ([normal, abnormal]) are the queries, the layer's patch tokens the keys
and values; q/k/v/out are 1x1 Conv1d maps (kept as ``nn.Conv1d`` for the public layout, applied
as the equivalent per-token linear maps so no (B, D, N) transposes are made). Logits are
unscaled (no 1/sqrt(head_dim)), softmax runs over the patches, and the output is L2-normalised
and *replaces* the text features for that layer: there is no residual, as in the public code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pointwise(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d applied to (B, T, C_in) tokens -> (B, T, C_out), without transposes."""
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)


class FGP(nn.Module):
    """Multi-head cross-attention from text queries to patch tokens.

    Args:
        text_dim: width of the text features (queries).
        patch_dim: width of the patch tokens (keys / values).
        width: attention width (``embed_dim`` for ViP2-CLIP); must be divisible by ``heads``.
        heads: number of attention heads.
    """

    def __init__(self, text_dim: int, patch_dim: int, width: int, heads: int = 8) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"FGP width {width} is not divisible by {heads} heads")
        self.heads = int(heads)
        self.width = int(width)
        self.q_proj = nn.Conv1d(text_dim, width, kernel_size=1)
        self.k_proj = nn.Conv1d(patch_dim, width, kernel_size=1)
        self.v_proj = nn.Conv1d(patch_dim, width, kernel_size=1)
        self.out_proj = nn.Conv1d(width, width, kernel_size=1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Refine text features against patch tokens.

        Args:
            text: (B, T, text_dim) text features (T = 2: normal, abnormal).
            patches: (B, N, patch_dim) patch tokens of one layer.

        Returns:
            (B, T, width) unit-norm refined text features.
        """
        batch, queries, _ = text.shape
        patch_count = patches.shape[1]
        head_dim = self.width // self.heads
        q = _pointwise(self.q_proj, text).view(batch, queries, self.heads, head_dim).transpose(1, 2)
        k = _pointwise(self.k_proj, patches).view(batch, patch_count, self.heads, head_dim).transpose(1, 2)
        v = _pointwise(self.v_proj, patches).view(batch, patch_count, self.heads, head_dim).transpose(1, 2)
        # scale=1.0: unscaled logits, softmax over patches (fused kernel where available).
        attended = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, T, head_dim)
        attended = attended.transpose(1, 2).reshape(batch, queries, self.width)
        return F.normalize(_pointwise(self.out_proj, attended), dim=-1)
