"""One-time conversion of the CLIP weights users already hold into open_clip's format.

Two sources (``genclip convert-backbone SOURCE --out FILE``):

- OpenAI's original archives (``ViT-L-14-336px.pt``): TorchScript programs whose state dict
  uses the very key names of open_clip's ``CLIP`` (open_clip mirrors OpenAI's layout), plus
  three metadata entries; weights partly in fp16. Loading TorchScript runs code from the file,
  so it happens only when the caller says it trusts the file
  (:mod:`model.conversion.openai_archive`). A plain (non-TorchScript) state dict in the same
  layout is read with ``weights_only=True``.
- A Hugging Face transformers CLIP folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), mapped key by key onto open_clip's layout
  (:mod:`model.conversion.hf_transformers`).

Either way the result is checked against the named open_clip architecture (every key, every
shape, the attention heads where the source records them), cast to float32 (exact for fp16
sources) and written as an open_clip-format ``.safetensors`` whose metadata records the
activation (``quick_gelu``), the architecture and the source. ``GENCLIP_BACKBONE_WEIGHTS=FILE``
loads it, honouring the recorded QuickGELU (:mod:`model.weights_source`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from model.errors import WeightsFormatError

METADATA_FORMAT = "open_clip"


@dataclass(frozen=True)
class ConvertedWeights:
    """An open_clip state dict and what to record about it.

    Attributes:
        state_dict: open_clip ``CLIP`` keys -> tensors (any float dtype; written as float32).
        quick_gelu: whether the network was trained with QuickGELU (OpenAI's models were).
        source_kind: ``openai-torchscript``, ``openai-state-dict`` or ``hf-transformers``.
        heads: attention heads the source records, ``{"vision": n, "text": n}`` (HF), or empty.
        details: extra facts for the metadata (source checksum...).
    """

    state_dict: dict[str, torch.Tensor]
    quick_gelu: bool
    source_kind: str
    heads: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)


def architecture_state_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of open_clip's ``model_name`` state dict, built on the meta device (no memory).

    Raises:
        WeightsFormatError: unknown model, or not a plain OpenAI-layout ``CLIP``.
    """
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise WeightsFormatError(f"Unknown open_clip model {model_name!r}")
    if config.get("custom_text") or "timm_model_name" in config.get("vision_cfg", {}) or "hf_model_name" in config.get("text_cfg", {}):
        raise WeightsFormatError(f"{model_name} is not an OpenAI-layout CLIP: only those can be converted")
    with torch.device("meta"):
        model = open_clip.model.CLIP(**config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def architecture_heads(model_name: str) -> dict[str, int]:
    """Attention heads of open_clip's ``model_name`` (vision: width / head_width; text: heads)."""
    config = open_clip.get_model_config(model_name) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return {
        "vision": int(vision.get("width", 768)) // int(vision.get("head_width", 64)),
        "text": int(text.get("heads", 8)),
    }


def check_against_architecture(converted: ConvertedWeights, model_name: str) -> None:
    """Every key and shape of the converted state dict must be open_clip's ``model_name``'s.

    Raises:
        WeightsFormatError: naming the missing, unexpected and wrongly shaped keys, and the
            heads, with the architecture the source looks like.
    """
    expected = architecture_state_shapes(model_name)
    found = {key: tuple(value.shape) for key, value in converted.state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{key} {found[key]} != {expected[key]}" for key in sorted(set(found) & set(expected)) if found[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
    heads = architecture_heads(model_name)
    for tower, count in converted.heads.items():
        if heads.get(tower) != count:
            problems.append(f"{tower} attention heads {count} != {heads.get(tower)}")
    if problems:
        raise WeightsFormatError(
            f"The {converted.source_kind} weights do not fit open_clip's {model_name} ({describe(found)}): "
            + "; ".join(problems) + ". Pass --backbone with the matching open_clip model name."
        )


def _blocks(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})


def describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """A one-line architecture summary of an open_clip-layout state dict."""
    try:
        vision_width, _, patch, _ = shapes["visual.conv1.weight"]
        grid = round((shapes["visual.positional_embedding"][0] - 1) ** 0.5)
        return (
            f"vision width {vision_width}, {_blocks(shapes, 'visual.transformer.resblocks.')} blocks, patch {patch}, "
            f"{patch * grid} px; text width {shapes['ln_final.weight'][0]}, {_blocks(shapes, 'transformer.resblocks.')} blocks; "
            f"embed dim {shapes['text_projection'][1]}"
        )
    except (KeyError, ValueError, IndexError):
        return "unrecognised layout"


def write_open_clip_safetensors(converted: ConvertedWeights, model_name: str, output: Path) -> dict[str, str]:
    """Check ``converted`` against ``model_name`` and write it (float32) with its metadata.

    Returns:
        the safetensors metadata written.
    """
    from model.checkpoint import code_version

    check_against_architecture(converted, model_name)
    tensors = {
        key: (value.float() if value.is_floating_point() else value).contiguous()
        for key, value in converted.state_dict.items()
    }
    metadata = {
        "format": METADATA_FORMAT,
        "backbone": model_name,
        "quick_gelu": "true" if converted.quick_gelu else "false",
        "source_kind": converted.source_kind,
        "architecture": describe({k: tuple(v.shape) for k, v in tensors.items()}),
        "converted_by": code_version(),
        **converted.details,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(output)
    return metadata


def read_source(source: Path, trust_torchscript: bool = False) -> ConvertedWeights:
    """Read any supported source (see the module docstring).

    Raises:
        WeightsFormatError: unsupported or unreadable source, or a TorchScript archive without
            ``trust_torchscript``.
    """
    from model.conversion.hf_transformers import read_hf_clip_folder
    from model.conversion.openai_archive import read_openai_file

    source = Path(source)
    if source.is_dir():
        return read_hf_clip_folder(source)
    if source.is_file():
        return read_openai_file(source, trust_torchscript)
    raise WeightsFormatError(f"{source} does not exist")


def convert_backbone(source: Path, output: Path, model_name: str, trust_torchscript: bool = False) -> dict[str, Any]:
    """Read ``source``, check it against ``model_name`` and write ``output``; returns the metadata."""
    return write_open_clip_safetensors(read_source(source, trust_torchscript), model_name, output)
