"""OpenAI's original CLIP files: a TorchScript archive (``ViT-L-14-336px.pt``) or a plain state dict.

The archive's state dict uses open_clip's ``CLIP`` key names (open_clip mirrors OpenAI's
layout) plus ``input_resolution``, ``context_length`` and ``vocab_size``, which are dropped; the
weights are partly fp16 (cast to float32 on writing: exact). OpenAI's models use QuickGELU.

open_clip's own helpers were considered: ``open_clip.openai.load_openai_model`` falls back to an
unrestricted ``torch.load`` when ``torch.jit.load`` fails, and
``open_clip.model.build_model_from_openai_state_dict`` rounds every weight through fp16 and
infers the heads as ``width // 64``; for a one-time, exact conversion the state dict is taken
as it is and checked against the named open_clip config instead.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from model.conversion import ConvertedWeights
from model.errors import WeightsFormatError

_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_SHA256_IN_URL = re.compile(r"/([0-9a-f]{64})/")


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled code), not a plain
    ``torch.save`` file (a zip of ``data.pkl`` and tensors only)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def known_openai_release(digest: str) -> str | None:
    """The open_clip model whose OpenAI release has this sha256 (OpenAI puts it in the URL)."""
    from open_clip import pretrained

    for model_name in pretrained.list_pretrained_models_by_tag("openai"):
        url = pretrained.get_pretrained_url(model_name, "openai") or ""
        match = _SHA256_IN_URL.search(url)
        if match and match.group(1) == digest:
            return model_name
    return None


def read_openai_file(path: Path, trust_torchscript: bool) -> ConvertedWeights:
    """Read an OpenAI CLIP file into an open_clip-layout state dict.

    Raises:
        WeightsFormatError: a TorchScript archive without ``trust_torchscript``, or a file
            torch cannot read as plain tensors.
    """
    from model.checkpoint import file_digest

    digest = file_digest(path)
    release = known_openai_release(digest)
    details = {"source_file": path.name, "source_sha256": digest}
    if release:
        details["openai_release"] = release
    if is_torchscript_archive(path):
        if not trust_torchscript:
            provenance = (
                f"its sha256 matches OpenAI's published {release} file"
                if release
                else "its sha256 matches no OpenAI release known to open_clip"
            )
            raise WeightsFormatError(
                f"{path} is a TorchScript archive (OpenAI's original .pt format). Loading a TorchScript archive "
                f"runs code stored in the file, so genclip does not load it unless told to: rerun with "
                f"--trust-torchscript if you trust where it came from ({provenance}; sha256 {digest})."
            )
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as error:
            raise WeightsFormatError(f"{path}: torch cannot load this TorchScript archive: {error}") from error
        kind = "openai-torchscript"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
            raise WeightsFormatError(
                f"{path} is neither a TorchScript archive nor a plain-tensor state dict torch reads safely "
                f"(weights_only=True): {str(error).splitlines()[0]}"
            ) from error
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
        kind = "openai-state-dict"
    tensors = {
        (key[len("module."):] if key.startswith("module.") else key): value
        for key, value in state.items()
        if key not in _OPENAI_METADATA_KEYS and isinstance(value, torch.Tensor)
    }
    if "visual.proj" not in tensors:
        raise WeightsFormatError(f"{path} is not an OpenAI ViT CLIP state dict (no visual.proj)")
    return ConvertedWeights(tensors, quick_gelu=True, source_kind=kind, details=details)
