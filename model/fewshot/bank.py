"""The good-patch memory bank of one product, and its byte format.

A bank holds, per tapped layer, unit-norm patch tokens of a product's good images (float16,
coreset-capped) and, per patch, the index of the good image it came from (so calibration can
score each good image against a bank without it). Its bytes are a safetensors file: tensors
``patches.<layer>`` (M_l, D) float16 and ``sources.<layer>`` (M_l,) int32, and the header's
metadata records the format, the layers, the image count and the detector identity it was built
with. Nothing is pickled: a database row holding these bytes can be loaded safely.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.fewshot.errors import ReferenceError, ReferenceMismatchError

if TYPE_CHECKING:  # model.detector imports this package at run time
    from model.detector import DetectorIdentity

FORMAT_NAME = "genclip-reference-bank"
FORMAT_VERSION = 1
# DetectorIdentity fields a bank must match, with the words its mismatch errors use.
IDENTITY_FIELDS: dict[str, str] = {
    "name": "detector",
    "backbone": "backbone",
    "backbone_weights": "backbone_weights",
    "image_size": "image_size",
    "layers": "layers",
    "checkpoint": "checkpoint",
}
# Unit norm is checked with this tolerance (float16 rounding of a unit vector stays far inside).
_NORM_TOLERANCE = 1e-2
_MAX_HEADER_BYTES = 1 << 20


def bank_identity(identity: DetectorIdentity) -> dict[str, Any]:
    """The subset of a detector identity a bank records (runtime and precision do not matter)."""
    data = identity.as_dict()
    return {key: data[key] for key in IDENTITY_FIELDS}


@dataclass(eq=False)
class ReferenceBank:
    """Good-patch memory bank of one product.

    Attributes:
        layers: tapped 1-based blocks (the scorer's layers, same order as ``VisualFeatures.layers``).
        patches: per layer, (M_l, D) float16 unit-norm patch tokens (coreset-subsampled, capped).
        sources: per layer, (M_l,) int32 index of the good image each patch came from (for
            leave-one-out calibration).
        image_count: number of good images the bank was built from.
        identity: what it was built with: ``name`` (detector), ``backbone``,
            ``backbone_weights``, ``image_size``, ``layers``, ``checkpoint`` (a subset of
            ``DetectorIdentity.as_dict()``).
    """

    layers: tuple[int, ...]
    patches: list[torch.Tensor]
    sources: list[torch.Tensor]
    image_count: int
    identity: dict[str, Any]
    _device_copies: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers)
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        problems: list[str] = []
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            problems.append(f"layers {list(self.layers)} must be distinct, increasing and >= 1")
        if len(self.patches) != len(self.layers) or len(self.sources) != len(self.layers):
            problems.append(
                f"{len(self.layers)} layers but {len(self.patches)} patch and {len(self.sources)} source tensors"
            )
        if self.image_count < 1:
            problems.append(f"image_count {self.image_count} < 1")
        missing = [key for key in IDENTITY_FIELDS if key not in self.identity]
        if missing:
            problems.append(f"identity lacks {missing}")
        elif [int(layer) for layer in self.identity["layers"]] != list(self.layers):
            problems.append(f"identity layers {self.identity['layers']} != bank layers {list(self.layers)}")
        widths = set()
        for layer, patches, sources in zip(self.layers, self.patches, self.sources):
            if patches.dtype != torch.float16 or patches.dim() != 2 or patches.shape[0] < 1:
                problems.append(f"layer {layer}: patches must be a non-empty (M, D) float16 tensor, "
                                f"got {patches.dtype} {tuple(patches.shape)}")
                continue
            widths.add(int(patches.shape[1]))
            if sources.dtype != torch.int32 or tuple(sources.shape) != (patches.shape[0],):
                problems.append(f"layer {layer}: sources must be ({patches.shape[0]},) int32, "
                                f"got {sources.dtype} {tuple(sources.shape)}")
            elif int(sources.min()) < 0 or int(sources.max()) >= self.image_count:
                problems.append(f"layer {layer}: source indices outside 0..{self.image_count - 1}")
            norms = patches.float().norm(dim=1)
            if not bool(torch.isfinite(norms).all()) or float((norms - 1.0).abs().max()) > _NORM_TOLERANCE:
                problems.append(f"layer {layer}: patch tokens are not unit-norm")
        if len(widths) > 1:
            problems.append(f"layers disagree on the token width: {sorted(widths)}")
        if problems:
            raise ReferenceError("Invalid reference bank: " + "; ".join(problems))

    def check_compatible(self, identity: DetectorIdentity) -> None:
        """Refuse to run this bank on a detector it was not built with.

        Compares detector name, backbone, backbone weights, input size, layers and prompt
        checkpoint digest; fields such as the runtime or the numeric precision do not change
        what a patch token means and are ignored.

        Raises:
            ReferenceMismatchError: naming every field that differs, built vs running.
        """
        running = bank_identity(identity)
        differences = []
        for key, word in IDENTITY_FIELDS.items():
            built, now = self.identity.get(key), running[key]
            if key == "layers":
                built, now = [int(layer) for layer in built or []], [int(layer) for layer in now]
            if built != now:
                differences.append(f"{word} {built!r} (running {now!r})")
        if differences:
            raise ReferenceMismatchError(
                "The product reference does not fit this detector: "
                + "; ".join(differences)
                + ". Rebuild the reference from the product's good images."
            )

    # ------------------------------------------------------------------ sizes
    @property
    def width(self) -> int:
        """D, the token width."""
        return int(self.patches[0].shape[1])

    @property
    def patches_per_layer(self) -> list[int]:
        return [int(patches.shape[0]) for patches in self.patches]

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (patches and sources), what the bank costs in memory."""
        return sum(t.numel() * t.element_size() for t in (*self.patches, *self.sources))

    def patches_on(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per layer (M_l, D) patches on ``device`` in ``dtype``, converted once and cached.

        CPU matrix products in float16 are slow, so the CPU path uses a float32 copy.
        """
        key = (torch.device(device), dtype)
        cached = self._device_copies.get(key)
        if cached is None:
            cached = [patches.to(device=device, dtype=dtype).contiguous() for patches in self.patches]
            self._device_copies[key] = cached
        return cached

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        """safetensors bytes; the header's metadata holds format, layers, image count, identity."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, patches, sources in zip(self.layers, self.patches, self.sources):
            tensors[f"patches.{layer}"] = patches.detach().to("cpu", torch.float16).contiguous()
            tensors[f"sources.{layer}"] = sources.detach().to("cpu", torch.int32).contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layers": json.dumps(list(self.layers)),
            "image_count": str(self.image_count),
            "identity": json.dumps(self.identity, sort_keys=True),
        }
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceBank:
        """Parse :meth:`to_bytes` output.

        Raises:
            ReferenceError: the bytes are not a reference bank of this format version, or
                its tensors are inconsistent (wrong dtype, shape, norm, source indices).
        """
        metadata = _read_metadata(data)
        if metadata.get("format") != FORMAT_NAME:
            raise ReferenceError(f"Not a reference bank (format {metadata.get('format')!r}, expected {FORMAT_NAME!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ReferenceError(
                f"Reference bank format version {metadata.get('format_version')!r} is not supported "
                f"(expected {FORMAT_VERSION}); rebuild the reference"
            )
        try:
            layers = tuple(int(layer) for layer in json.loads(metadata["layers"]))
            image_count = int(metadata["image_count"])
            identity = json.loads(metadata["identity"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReferenceError(f"Reference bank metadata is malformed: {error!r}") from error
        if not isinstance(identity, dict):
            raise ReferenceError("Reference bank metadata is malformed: identity is not an object")
        try:
            tensors = load_safetensors(bytes(data))
        except Exception as error:  # safetensors raises SafetensorError, OSError or ValueError
            raise ReferenceError(f"Reference bank tensors are unreadable: {error}") from error
        expected = {f"{kind}.{layer}" for layer in layers for kind in ("patches", "sources")}
        if set(tensors) != expected:
            raise ReferenceError(
                f"Reference bank tensors {sorted(tensors)} do not match its layers {list(layers)}"
            )
        return cls(
            layers=layers,
            patches=[tensors[f"patches.{layer}"] for layer in layers],
            sources=[tensors[f"sources.{layer}"] for layer in layers],
            image_count=image_count,
            identity=identity,
        )


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length, then JSON)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ReferenceError(f"Reference bank must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise ReferenceError(f"Reference bank is truncated ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ReferenceError(f"Reference bank header length {length} does not fit its {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReferenceError(f"Reference bank header is not JSON: {error}") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ReferenceError("Reference bank header has no metadata (not a reference bank)")
    return metadata
