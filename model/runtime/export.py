"""The vision tower's blocks with their layer taps, exported to an OpenVINO model.

:class:`VisionTapModule` is what the IR computes: patch embedding, the positional embedding
resized to the serving grid (baked in as a constant), ``ln_pre`` and the transformer blocks,
returning every tapped block's output and the final class token, exactly what
:meth:`model.backbone.VisionRuntime.hidden_states` returns. ``ln_post``, the projection and the
L2 norm stay in torch (:meth:`model.backbone.ClipBackbone.encode_image`).

The export goes through ``torch.export`` (batch dimension dynamic, spatial size fixed) and
``openvino.convert_model``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import open_clip
import torch
from torch import nn

from model.backbone import ClipBackbone, resized_positional_embedding
from model.errors import RuntimeExportError

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
FINAL_CLASS_TOKEN_NAME = "final_class_token"
MAX_BATCH = 1024


def layer_output_name(layer: int) -> str:
    """Name of the IR output that holds block ``layer``'s (1-based) output."""
    return f"block_{layer}"


def output_names(layers: Sequence[int]) -> list[str]:
    """The IR's output names, in order: one per tapped layer, then the final class token."""
    return [*(layer_output_name(layer) for layer in layers), FINAL_CLASS_TOKEN_NAME]


class VisionTapModule(nn.Module):
    """The vision blocks at one resolution: (B, 3, S, S) -> tapped outputs + final class token.

    Args:
        visual: the open_clip vision tower (fp32, CPU).
        image_size: side S of the square input (a multiple of the patch size).
        layers: sorted, distinct 1-based blocks to tap.
    """

    def __init__(self, visual: open_clip.transformer.VisionTransformer, image_size: int, layers: Sequence[int]) -> None:
        super().__init__()
        patch = int(visual.patch_size[0])
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch}")
        grid = (image_size // patch, image_size // patch)
        self.visual = visual
        self.layers = tuple(layers)
        self.register_buffer("positional_embedding", resized_positional_embedding(visual, grid).float(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """pixels: (B, 3, S, S) -> per tapped layer (B, 1 + N, W), then the final (B, W) class token."""
        visual = self.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([class_token, x], dim=1) + self.positional_embedding
        x = visual.ln_pre(x)
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if index in self.layers:
                outputs.append(x)
        return (*outputs, x[:, 0])


def export_vision_model(backbone: ClipBackbone, image_size: int, layers: Sequence[int]) -> Any:
    """Export the vision blocks of ``backbone`` to an ``openvino.Model`` (fp32).

    Args:
        backbone: a CPU fp32 backbone.
        image_size: serving resolution S (static in the IR; the batch stays dynamic).
        layers: sorted, distinct 1-based blocks to tap.

    Returns:
        The model: input ``pixels`` (?, 3, S, S); outputs :func:`output_names` (``block_<l>``:
        (?, 1 + N, W); ``final_class_token``: (?, W)).

    Raises:
        RuntimeExportError: the tower could not be traced or converted.
    """
    import openvino as ov

    if backbone.device.type != "cpu":
        raise RuntimeExportError(f"the OpenVINO export needs the backbone on the CPU, not {backbone.device}")
    module = VisionTapModule(backbone.clip.visual, image_size, layers).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    start = time.perf_counter()
    log.info("exporting %s vision tower to OpenVINO at %d px, layers %s", backbone.model_name, image_size, list(layers))
    try:
        with torch.no_grad():
            exported = torch.export.export(
                module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
            )
            model = ov.convert_model(exported)
            # torch.export leaves every dimension symbolic in the converted model: pin the spatial
            # ones (static shapes compile to faster kernels), keep the batch dynamic.
            model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, image_size, image_size])})
    except Exception as error:  # torch.export / conversion failures come in many types
        raise RuntimeExportError(
            f"Exporting the {backbone.model_name} vision tower to OpenVINO at {image_size} px failed: "
            f"{type(error).__name__}: {error}. Run with GENCLIP_RUNTIME=torch meanwhile."
        ) from error
    names = output_names(layers)
    if len(model.outputs) != len(names):
        raise RuntimeExportError(f"the exported model has {len(model.outputs)} outputs, expected {len(names)}")
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for output, name in zip(model.outputs, names):
        output.get_tensor().set_names({name})
    log.info("exported in %.1f s", time.perf_counter() - start)
    return model
