"""A frozen open_clip CLIP with the taps anomaly detection needs.

One vision forward pass gives, for chosen transformer blocks, the patch tokens passed through
``ln_post`` + the visual projection and L2-normalised, that block's class token (after
``ln_post``, before projection, for prompt generators), and the global image embedding. The
positional embedding is resized bilinearly on the patch grid at run time, so any input size
that is a multiple of the patch size works (ViT-L-14-336 runs at 518 px on a 37x37 grid).

The transformer blocks of the vision tower run through a pluggable :class:`VisionRuntime`:
:class:`TorchVisionRuntime` (the default, this module) or the OpenVINO one
(:mod:`model.runtime.openvino_runtime`). Whatever runs them, ``ln_post``, the projection and
the L2 norm stay here in torch, so every runtime shares the same post-processing.

The text side encodes either plain strings or caller-built token embeddings (learned prompt
vectors in some slots), always cut to the longest real prompt of the batch: the causal mask
and end-of-text pooling make the cut exact and it saves most of the text cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn

from model.errors import WeightsFormatError
from model.weights_source import TINY_MODEL_NAME, BackboneSpec, ResolvedWeights, resolve_weights

POS_EMBED_RESIZE = "bilinear-runtime"
RANDOM_WEIGHTS_SEED = 0
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class VisualFeatures:
    """Outputs of one vision forward pass over B images.

    Attributes:
        patch_tokens: per tapped layer, (B, N, D) unit-norm projected patch tokens,
            N = grid_h * grid_w, D = joint embedding width.
        layer_class_tokens: per tapped layer, (B, W) class token after ``ln_post`` (W = vision width).
        global_embedding: (B, D) unit-norm image embedding (final class token, projected).
        grid: (grid_h, grid_w) patch grid.
        layers: the 1-based blocks the lists above hold, in order.
        final_class_token: (B, W) the last block's class token *before* ``ln_post`` (the
            published ViP2-CLIP projects it without ``ln_post`` for its global embedding).
    """

    patch_tokens: list[torch.Tensor]
    layer_class_tokens: list[torch.Tensor]
    global_embedding: torch.Tensor
    grid: tuple[int, int]
    layers: tuple[int, ...]
    final_class_token: torch.Tensor

    def take(self, rows: torch.Tensor) -> VisualFeatures:
        """The same pass restricted to some images of the batch. rows: (K,) batch indices."""
        return VisualFeatures(
            [tokens[rows] for tokens in self.patch_tokens],
            [tokens[rows] for tokens in self.layer_class_tokens],
            self.global_embedding[rows],
            self.grid,
            self.layers,
            final_class_token=self.final_class_token[rows],
        )

    def select(self, layers: Sequence[int]) -> VisualFeatures:
        """The same pass restricted to a subset of its layers (for detectors sharing a pass)."""
        positions = [self.layers.index(layer) for layer in layers]
        return VisualFeatures(
            [self.patch_tokens[i] for i in positions],
            [self.layer_class_tokens[i] for i in positions],
            self.global_embedding,
            self.grid,
            tuple(layers),
            final_class_token=self.final_class_token,
        )


def default_layers(num_blocks: int) -> tuple[int, ...]:
    """Quarter points of the vision tower, 1-based: 24 blocks -> (6, 12, 18, 24)."""
    return tuple(sorted({max(1, round(num_blocks * q / 4)) for q in (1, 2, 3, 4)}))


def resized_positional_embedding(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh*gw, W) positional embedding of ``visual``, bilinearly resized on the patch grid."""
    pos = visual.positional_embedding.detach()
    class_pos, grid_pos = pos[:1], pos[1:]
    native = visual.grid_size
    if tuple(grid) != tuple(native):
        grid_pos = grid_pos.reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos.float(), size=grid, mode="bilinear", align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([class_pos, grid_pos.to(class_pos.dtype)], dim=0)


class VisionRuntime(ABC):
    """What runs the vision tower's transformer blocks: pixels in, block outputs out.

    Attributes:
        name: runtime name reported in the detector identity (``torch``, ``openvino``).
        precision: numeric precision of the blocks (``fp32``, ``int8``).
    """

    name: str
    precision: str

    @abstractmethod
    def hidden_states(self, pixels: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the blocks, keeping the outputs of the tapped ones.

        Args:
            pixels: (B, 3, H, W) normalised images, H and W multiples of the patch size.
            layers: sorted, distinct 1-based blocks to tap.

        Returns:
            ``(block_outputs, final_class_token)``: per tapped layer, in order, the (B, 1 + N, W)
            block output (class token first, before ``ln_post``); and the (B, W) class token of
            the final block (before ``ln_post``). Tensors live on ``pixels``' device.
        """


class TorchVisionRuntime(VisionRuntime):
    """The blocks of an open_clip ``VisionTransformer`` run in torch (any device, any dtype)."""

    name = "torch"
    precision = "fp32"

    def __init__(self, visual: open_clip.transformer.VisionTransformer) -> None:
        self.visual = visual
        self._pos_embed_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def _positional_embedding(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (grid[0], grid[1], device, dtype)
        cached = self._pos_embed_cache.get(key)
        if cached is None:
            cached = resized_positional_embedding(self.visual, grid).to(device=device, dtype=dtype)
            self._pos_embed_cache[key] = cached
        return cached

    def hidden_states(self, pixels: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        visual = self.visual
        wanted = set(layers)
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([class_token, x], dim=1) + self._positional_embedding(grid, x.device, x.dtype)
        x = visual.ln_pre(x)
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index in wanted:
                outputs.append(x)
        return outputs, x[:, 0]


class ClipBackbone(nn.Module):
    """Frozen open_clip CLIP exposing layer taps and prompt-friendly text encoding."""

    def __init__(self, clip: open_clip.CLIP, spec: BackboneSpec, weights: ResolvedWeights) -> None:
        super().__init__()
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise WeightsFormatError(f"{spec.model_name}: only plain ViT CLIP backbones are supported")
        self.clip = clip
        self.spec = spec
        self.weights_label = weights.label
        self.quick_gelu = weights.quick_gelu
        self.tokenizer = open_clip.get_tokenizer(spec.model_name)
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.vision_runtime: VisionRuntime = TorchVisionRuntime(visual)
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.clip.eval()

    # ------------------------------------------------------------------ properties
    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def vision_width(self) -> int:
        return int(self.clip.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        return int(self.clip.token_embedding.embedding_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    @property
    def num_blocks(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.patch_size[0])

    @property
    def native_image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    def train(self, mode: bool = True) -> ClipBackbone:
        # The backbone is frozen: dropout / patch dropout stay off even while prompts train.
        super().train(False)
        return self

    # ------------------------------------------------------------------ vision
    def preprocess(self, images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
        """Resize (squash, bicubic) and normalise PIL images.

        Returns:
            (B, 3, image_size, image_size) float32 tensor on the backbone's device.
        """
        arrays = [
            np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (pixels - self.pixel_mean) / self.pixel_std

    def set_vision_runtime(self, runtime: VisionRuntime) -> None:
        """Run the vision blocks with ``runtime`` from now on (post-processing stays in torch)."""
        if not isinstance(runtime, VisionRuntime):
            raise TypeError(f"expected a VisionRuntime, got {type(runtime).__name__}")
        self.vision_runtime = runtime

    def release_torch_vision_blocks(self) -> int:
        """Free the torch weights that only the torch vision runtime uses, once another runtime
        runs the blocks: patch embedding, class and positional embeddings, ``ln_pre`` and every
        block move to the ``meta`` device (shapes kept, storage freed); ``ln_post`` and the
        projection stay (post-processing runs here whatever the runtime). Returns the bytes
        freed (about 1.2 GB for ViT-L-14-336). The torch vision runtime cannot run afterwards.

        Raises:
            RuntimeError: the torch runtime is still the one running the blocks.
        """
        if isinstance(self.vision_runtime, TorchVisionRuntime):
            raise RuntimeError("the torch vision runtime still runs the blocks: set another runtime first")
        visual = self.clip.visual
        freed = 0
        for module in (visual.conv1, visual.ln_pre, visual.transformer):
            freed += sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)
            module.to("meta")
        for name in ("class_embedding", "positional_embedding"):
            parameter = getattr(visual, name)
            if not parameter.is_meta:
                freed += parameter.numel() * parameter.element_size()
                setattr(visual, name, nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False))
        return freed

    def encode_image(self, pixels: torch.Tensor, layers: Sequence[int]) -> VisualFeatures:
        """One forward pass with taps after the given 1-based blocks.

        The blocks run in :attr:`vision_runtime`; ``ln_post``, the projection and the L2 norm
        run here in torch.

        Args:
            pixels: (B, 3, H, W) normalised images, H and W multiples of the patch size.
            layers: 1-based block indices to tap.
        """
        visual = self.clip.visual
        if pixels.shape[-1] % self.patch_size or pixels.shape[-2] % self.patch_size:
            raise ValueError(f"input size {tuple(pixels.shape[-2:])} is not a multiple of patch {self.patch_size}")
        wanted = tuple(sorted(set(layers)))
        if not wanted or wanted[0] < 1 or wanted[-1] > self.num_blocks:
            raise ValueError(f"layers {list(wanted)} outside 1..{self.num_blocks}")
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        block_outputs, final_class_token = self.vision_runtime.hidden_states(pixels, wanted)
        patch_tokens: list[torch.Tensor] = []
        layer_class_tokens: list[torch.Tensor] = []
        for x in block_outputs:
            normed = visual.ln_post(x)
            layer_class_tokens.append(normed[:, 0])
            patch_tokens.append(F.normalize(normed[:, 1:] @ visual.proj, dim=-1))
        global_embedding = F.normalize(visual.ln_post(final_class_token) @ visual.proj, dim=-1)
        return VisualFeatures(patch_tokens, layer_class_tokens, global_embedding, grid, wanted, final_class_token)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) token ids on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, text_width) token embeddings (frozen lookup)."""
        return self.clip.token_embedding(tokens)

    @staticmethod
    def end_of_text_positions(tokens: torch.Tensor) -> torch.Tensor:
        """(N,) index of the end-of-text token (the largest id in CLIP's vocabulary)."""
        return tokens.argmax(dim=-1)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """Encode caller-built token embeddings.

        Args:
            embeddings: (N, L, text_width) token embeddings (learned vectors allowed in any slot).
            eot_positions: (N,) end-of-text index of each sequence.

        Returns:
            (N, D) unit-norm text features. Only the first ``max(eot) + 1`` positions run
            through the transformer: later positions cannot influence earlier ones.
        """
        clip = self.clip
        length = int(eot_positions.max().item()) + 1
        cast_dtype = clip.transformer.get_cast_dtype()
        x = embeddings[:, :length].to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=attn_mask)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        projection = clip.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return F.normalize(pooled, dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm features of plain strings."""
        tokens = self.tokenize(texts)
        return self.encode_text_embeddings(self.embed_tokens(tokens), self.end_of_text_positions(tokens))


def _load_open_clip(spec: BackboneSpec, weights: ResolvedWeights) -> open_clip.CLIP:
    kwargs = {"force_quick_gelu": weights.quick_gelu} if spec.model_name != TINY_MODEL_NAME else {}
    if weights.path is None:
        return open_clip.create_model(spec.model_name, pretrained=None, **kwargs)
    try:
        return open_clip.create_model(spec.model_name, pretrained=str(weights.path), **kwargs)
    except Exception as error:
        hint = ""
        if "TorchScript" in str(error) or "weights_only" in str(error) or "jit" in str(error).lower():
            hint = (
                " It looks like the original OpenAI TorchScript archive (e.g. ViT-L-14-336px.pt), "
                "which torch refuses to unpickle safely; use the open_clip-format state dict "
                "(what open_clip's 'openai' tag downloads: open_clip_model.safetensors)."
            )
        raise WeightsFormatError(
            f"Cannot load backbone weights {weights.path} into {spec.model_name}: {error}.{hint}"
        ) from error


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> ClipBackbone:
    """Build the frozen backbone for a spec (see :func:`model.weights_source.resolve_weights`)."""
    if spec.model_name not in open_clip.list_models():
        raise WeightsFormatError(f"Unknown open_clip model {spec.model_name!r}")
    weights = resolve_weights(spec)
    if weights.path is None:
        # Random weights are drawn from a fixed seed, without touching the caller's RNG, so
        # every process that builds the same random backbone gets the same network (a prompt
        # checkpoint trained on it then scores the same in the service).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            clip = _load_open_clip(spec, weights)
    else:
        clip = _load_open_clip(spec, weights)
    return ClipBackbone(clip, spec, weights).to(device)
