"""Where backbone weights come from: a pretrained tag in the local cache, a file, or nothing.

Factories are usually offline, so the default never touches the network: a pretrained tag
(``openai``) is looked up in the open_clip / Hugging Face cache, and when it is missing the
error names the exact file to provide. Downloading happens only when the operator allows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
from open_clip import pretrained as open_clip_pretrained

from model.errors import WeightsFormatError, WeightsNotFoundError

RANDOM_WEIGHTS = "random"
TINY_MODEL_NAME = "tiny-clip-random"

# open_clip's HF checkpoint names, newest format first (it prefers safetensors too).
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP to run and where its weights come from.

    Attributes:
        model_name: open_clip architecture name (``ViT-L-14-336``), or ``tiny-clip-random``,
            the built-in random test config.
        weights: a pretrained tag (``openai``), a local checkpoint path (open_clip state dict,
            plain, ``{'state_dict': ...}`` or ``.safetensors``), or ``random`` / ``None``
            for random initialisation (tests and demos only).
        cache_dir: open_clip / Hugging Face cache directory to search (and download into).
        allow_download: fetch missing pretrained weights from the hub.
        quick_gelu: force QuickGELU; ``None`` decides from the weights (OpenAI weights need it).
    """

    model_name: str = "ViT-L-14-336"
    weights: str | None = "openai"
    cache_dir: str | None = None
    allow_download: bool = False
    quick_gelu: bool | None = None


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights source made concrete: a file to load (or none) and how to label it."""

    path: Path | None
    label: str
    quick_gelu: bool


def is_random(spec: BackboneSpec) -> bool:
    """Random initialisation: ``random`` / no weights, or the tiny test model with anything but
    an existing file (it has no pretrained tag; a converted tiny file loads, for tests)."""
    if spec.weights in (None, "", RANDOM_WEIGHTS):
        return True
    return spec.model_name == TINY_MODEL_NAME and not Path(str(spec.weights)).expanduser().is_file()


def recorded_file_facts(path: Path) -> dict[str, str]:
    """The metadata ``genclip convert-backbone`` writes into a ``.safetensors`` file (``quick_gelu``,
    ``backbone``...); empty for other files."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsFormatError(f"{path} is not a readable safetensors file: {error}") from error


def _model_config_uses_quick_gelu(model_name: str) -> bool:
    return model_name.endswith("-quickgelu") or bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu"))


def _local_file(spec: BackboneSpec, path: Path) -> ResolvedWeights:
    """A local weight file; QuickGELU as recorded in the file (converted files), else as
    :func:`_quick_gelu_for` decides."""
    facts = recorded_file_facts(path)
    recorded_backbone = facts.get("backbone")
    if recorded_backbone and recorded_backbone != spec.model_name:
        raise WeightsFormatError(
            f"{path} was converted for open_clip's {recorded_backbone}, but the backbone is {spec.model_name}: "
            f"set GENCLIP_BACKBONE={recorded_backbone} (or convert again with --backbone {spec.model_name})"
        )
    recorded = facts.get("quick_gelu")
    if recorded is None or spec.quick_gelu is not None:
        return ResolvedWeights(path=path, label=str(path), quick_gelu=_quick_gelu_for(spec, None))
    quick_gelu = recorded == "true"
    if not quick_gelu and _model_config_uses_quick_gelu(spec.model_name):
        raise WeightsFormatError(
            f"{path} records GELU (quick_gelu=false) but open_clip's {spec.model_name} config uses QuickGELU: "
            "use the config without QuickGELU"
        )
    # ``quick_gelu`` here means "force it on": not needed where the config already has it.
    return ResolvedWeights(path=path, label=str(path), quick_gelu=quick_gelu and not _model_config_uses_quick_gelu(spec.model_name))


def _default_cache_dirs(cache_dir: str | None) -> list[Path | None]:
    """Cache roots to search: the configured one, then the Hugging Face default."""
    roots: list[Path | None] = []
    if cache_dir:
        roots.append(Path(cache_dir).expanduser())
    roots.append(None)  # huggingface_hub's own default (HF_HOME / HF_HUB_CACHE)
    return roots


def _cached_tag_file(
    model_id: str, filenames: tuple[str, ...], cache_dir: str | None, url: str
) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for root in _default_cache_dirs(cache_dir) if model_id else []:
        for filename in filenames:
            found = try_to_load_from_cache(
                repo_id=model_id, filename=filename, cache_dir=str(root) if root else None
            )
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    # open_clip's URL downloads land as <cache>/<basename> (default ~/.cache/clip).
    if url:
        basename = os.path.basename(url)
        for root in [Path(cache_dir).expanduser() if cache_dir else None, Path.home() / ".cache" / "clip"]:
            if root is not None and (root / basename).is_file():
                return root / basename
    return None


def _quick_gelu_for(spec: BackboneSpec, tag_quick_gelu: bool | None) -> bool:
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    if spec.model_name.endswith("-quickgelu"):
        return False  # the config already uses it
    if tag_quick_gelu is not None:
        return tag_quick_gelu
    # A local file for an architecture OpenAI released is assumed to hold OpenAI weights,
    # which silently give wrong features without QuickGELU (DESIGN.md 5).
    return "openai" in open_clip.list_pretrained_tags_by_model(spec.model_name)


def resolve_weights(spec: BackboneSpec) -> ResolvedWeights:
    """Turn a spec into a file to load, never downloading unless ``allow_download``.

    Raises:
        WeightsNotFoundError: the file or tag cannot be found locally and download is off,
            the tag is unknown for this model, or the download failed.
    """
    if is_random(spec):
        return ResolvedWeights(path=None, label=RANDOM_WEIGHTS, quick_gelu=spec.quick_gelu or False)
    assert spec.weights is not None
    as_path = Path(spec.weights).expanduser()
    looks_like_path = as_path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or os.sep in spec.weights
    if as_path.is_file():
        return _local_file(spec, as_path)
    if looks_like_path:
        raise WeightsNotFoundError(
            f"Backbone weight file {as_path} does not exist. Put the open_clip state dict for "
            f"{spec.model_name} there, or set GENCLIP_BACKBONE_WEIGHTS to the right path."
        )

    tag = spec.weights
    cfg = open_clip_pretrained.get_pretrained_cfg(spec.model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(spec.model_name)
        raise WeightsNotFoundError(
            f"Unknown pretrained tag {tag!r} for {spec.model_name}; open_clip knows {known or 'none'}. "
            "Use one of those, a local checkpoint path, or 'random'."
        )
    # open_clip writes hub entries as 'org/repo/' (default file names) or 'org/repo/file'.
    model_id, hub_filename = os.path.split(cfg.get("hf_hub", ""))
    filenames = (hub_filename,) if hub_filename else _HF_WEIGHT_FILES
    cached = _cached_tag_file(model_id, filenames, spec.cache_dir, cfg.get("url", ""))
    quick_gelu = _quick_gelu_for(spec, cfg.get("quick_gelu"))
    if cached is not None:
        return ResolvedWeights(path=cached, label=tag, quick_gelu=quick_gelu)
    if not spec.allow_download:
        where = spec.cache_dir or "the Hugging Face cache (HF_HOME)"
        raise WeightsNotFoundError(
            f"Backbone weights {spec.model_name}/{tag} are not in {where}, and downloading is off. "
            f"Provide the file '{filenames[0]}' of the "
            f"Hugging Face repo '{model_id}' in that cache, or point GENCLIP_BACKBONE_WEIGHTS at a "
            "local open_clip checkpoint, or set GENCLIP_ALLOW_DOWNLOAD=true to fetch it once."
        )
    try:
        downloaded = open_clip_pretrained.download_pretrained(cfg, cache_dir=spec.cache_dir)
    except Exception as error:  # network, auth, disk: all mean "not available"
        raise WeightsNotFoundError(f"Downloading {spec.model_name}/{tag} failed: {error}") from error
    return ResolvedWeights(path=Path(downloaded), label=tag, quick_gelu=quick_gelu)
