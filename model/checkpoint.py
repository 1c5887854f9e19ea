"""Prompt checkpoints: ``<name>.safetensors`` (prompt tensors only) + ``<name>.json`` sidecar.

The sidecar records what the prompts were trained for (detector, profile, the detector's
whole config, backbone, weights, layers, input size, positional-embedding resize mode) and how
(data, categories, epochs, seed, final loss, code version; or the imported file). Loading
checks it against the running backbone and refuses a mismatch: prompts trained for one
setting score silently wrong under another. Tensors holding NaN or Inf are refused too.

Format 2 (this one) stores ``detector_config`` whole and ``profile``; format 1 stored only
``prompt_sizes`` and is refused with a message saying what to do (no format-1 checkpoint was
ever published).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.backbone import POS_EMBED_RESIZE, ClipBackbone
from model.errors import CheckpointError
from model.weights_source import RANDOM_WEIGHTS

FORMAT_VERSION = 2
REQUIRED_FIELDS = (
    "format_version", "detector", "profile", "detector_config", "backbone", "backbone_weights", "layers", "image_size",
)


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
    def profile(self) -> str:
        return str(self.metadata["profile"])

    @property
    def detector_config(self) -> dict[str, Any]:
        return dict(self.metadata["detector_config"])


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("genclip-inspect")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package}+{commit}" if commit else package


def backbone_metadata(backbone: ClipBackbone) -> dict[str, Any]:
    return {
        "backbone": backbone.model_name,
        "backbone_weights": backbone.weights_label,
        "quick_gelu": backbone.quick_gelu,
        "pos_embed_resize": POS_EMBED_RESIZE,
        "text_width": backbone.text_width,
        "vision_width": backbone.vision_width,
    }


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return sorted(
        name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    )


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
    if metadata.get("format_version") == 1:
        raise CheckpointError(
            f"Checkpoint {path} is in format 1 (written before the sidecar recorded the detector's whole "
            "config and profile, and before ViP2-CLIP's class-slot bias moved after the slot MLPs, as the "
            "published code has it). Retrain it with `genclip train` (same options), or for the authors' "
            "ViP2-CLIP checkpoints use `genclip import-checkpoint --format vip2clip-official`."
        )
    missing = [name for name in REQUIRED_FIELDS if name not in metadata]
    if missing:
        raise CheckpointError(f"Checkpoint sidecar {sidecar} lacks fields {missing}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"Checkpoint {path}: format version {metadata['format_version']} (expected {FORMAT_VERSION})")
    if not isinstance(metadata["detector_config"], dict):
        raise CheckpointError(f"Checkpoint sidecar {sidecar}: detector_config must be a JSON object")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"Prompt checkpoint {path} is not a readable safetensors file: {error}") from error
    broken = non_finite_tensors(tensors)
    if broken:
        raise CheckpointError(f"Prompt checkpoint {path} holds NaN or Inf in {broken}: refusing to serve it")
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


def check_prompt_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Keys, shapes and dtypes of ``tensors`` must match ``expected`` exactly.

    Raises:
        CheckpointError: naming every missing, unexpected, wrongly shaped or typed tensor.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{name} {tuple(tensors[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in tensors and tensors[name].shape != tensor.shape
    ]
    wrong_dtype = [
        f"{name} {tensors[name].dtype} != {tensor.dtype}"
        for name, tensor in expected.items()
        if name in tensors and tensors[name].dtype != tensor.dtype
    ]
    if missing or unexpected or wrong_shape or wrong_dtype:
        raise CheckpointError(
            f"{where} does not match the prompt layout: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong_shape}, wrong dtypes {wrong_dtype}"
        )


def load_prompt_tensors(module: torch.nn.Module, checkpoint: PromptCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into ``module``; keys, shapes and dtypes must match ``expected``."""
    check_prompt_tensors(checkpoint.tensors, expected, f"Checkpoint {checkpoint.path} ({checkpoint.detector})")
    module.load_state_dict(checkpoint.tensors, strict=False)
