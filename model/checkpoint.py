"""Prompt checkpoints: ``<name>.safetensors`` (prompt tensors only) + ``<name>.json`` sidecar.

The sidecar records what the prompts were trained for (detector, backbone, weights, layers,
input size, positional-embedding resize mode, prompt sizes) and how (data, categories,
epochs, seed, final loss, code version). Loading checks it against the running backbone and
refuses a mismatch: prompts trained for one setting score silently wrong under another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.backbone import POS_EMBED_RESIZE, ClipBackbone
from model.errors import CheckpointError
from model.weights_source import RANDOM_WEIGHTS

FORMAT_VERSION = 1
REQUIRED_FIELDS = ("format_version", "detector", "backbone", "backbone_weights", "layers", "image_size", "prompt_sizes")


@dataclass(frozen=True)
class PromptCheckpoint:
    """A loaded checkpoint: tensors, sidecar metadata and the file digest."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    digest: str
    path: Path

    @property
    def detector(self) -> str:
        return str(self.metadata["detector"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(layer) for layer in self.metadata["layers"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def prompt_sizes(self) -> dict[str, Any]:
        return dict(self.metadata["prompt_sizes"])


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_metadata(backbone: ClipBackbone) -> dict[str, Any]:
    return {
        "backbone": backbone.model_name,
        "backbone_weights": backbone.weights_label,
        "quick_gelu": backbone.quick_gelu,
        "pos_embed_resize": POS_EMBED_RESIZE,
        "text_width": backbone.text_width,
        "vision_width": backbone.vision_width,
    }


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Write tensors + sidecar atomically enough (temp file, then rename). Returns the digest."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary))
    temporary.replace(path)
    sidecar = {"format_version": FORMAT_VERSION, **metadata}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n")
    return file_digest(path)


def read_checkpoint(path: Path) -> PromptCheckpoint:
    """Read tensors and sidecar; malformed files raise :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"Prompt checkpoint {path} does not exist")
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise CheckpointError(f"Prompt checkpoint {path} has no metadata sidecar {sidecar}")
    try:
        metadata = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Checkpoint sidecar {sidecar} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise CheckpointError(f"Checkpoint sidecar {sidecar} must hold a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in metadata]
    if missing:
        raise CheckpointError(f"Checkpoint sidecar {sidecar} lacks fields {missing}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {path}: format version {metadata['format_version']} (expected {FORMAT_VERSION})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"Prompt checkpoint {path} is not a readable safetensors file: {error}") from error
    return PromptCheckpoint(tensors=tensors, metadata=metadata, digest=file_digest(path), path=path)


def check_compatible(checkpoint: PromptCheckpoint, backbone: ClipBackbone, detector: str) -> None:
    """Refuse a checkpoint trained for another detector or backbone setting."""
    meta = checkpoint.metadata
    problems: list[str] = []
    if meta["detector"] != detector:
        problems.append(f"it holds {meta['detector']!r} prompts, not {detector!r}")
    running = backbone_metadata(backbone)
    if meta["backbone"] != running["backbone"]:
        problems.append(f"trained on backbone {meta['backbone']!r}, running {running['backbone']!r}")
    if (meta["backbone_weights"] == RANDOM_WEIGHTS) != (running["backbone_weights"] == RANDOM_WEIGHTS):
        problems.append(
            f"trained with backbone weights {meta['backbone_weights']!r}, running {running['backbone_weights']!r}"
        )
    for field in ("quick_gelu", "pos_embed_resize", "text_width", "vision_width"):
        if field in meta and meta[field] != running[field]:
            problems.append(f"{field} was {meta[field]!r}, running {running[field]!r}")
    if any(not 1 <= int(layer) <= backbone.num_blocks for layer in meta["layers"]):
        problems.append(f"layers {meta['layers']} do not exist in a {backbone.num_blocks}-block backbone")
    if problems:
        raise CheckpointError(f"Checkpoint {checkpoint.path} does not fit the running backbone: " + "; ".join(problems))


def load_prompt_tensors(module: torch.nn.Module, checkpoint: PromptCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into ``module``; keys and shapes must match ``expected`` exactly."""
    missing = sorted(set(expected) - set(checkpoint.tensors))
    unexpected = sorted(set(checkpoint.tensors) - set(expected))
    wrong_shape = [
        f"{name} {tuple(checkpoint.tensors[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in checkpoint.tensors and checkpoint.tensors[name].shape != tensor.shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"Checkpoint {checkpoint.path} does not match the {checkpoint.detector} prompt layout: "
            f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong_shape}"
        )
    module.load_state_dict(checkpoint.tensors, strict=False)
