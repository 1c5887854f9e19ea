"""Turn a published prompt checkpoint into this project's checkpoint format.

One format today: ``vip2clip-official``, the ViP2-CLIP authors' ``.pth`` files
(:mod:`model.vip2clip.official`). The import reads the file safely (``weights_only=True``),
validates every key, shape, dtype and value against the running backbone's widths, maps the
keys onto a ViP2-CLIP scorer in profile ``vip2clip-official`` (the published inference,
exactly), checks them against that scorer's own state dict (a second, independent check of
the layout) and writes
``<output>.safetensors`` + ``.json``, which the factory then loads like any other checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.backbone import ClipBackbone, default_layers
from model.checkpoint import backbone_metadata, check_prompt_tensors, code_version, file_digest, save_checkpoint
from model.errors import CheckpointError
from model.vip2clip import VIP2CLIP, VIP2CLIPConfig
from model.vip2clip.official import (
    FGP_ENTRY,
    OFFICIAL_FORMAT,
    PROMPT_ENTRY,
    OfficialLayout,
    read_official_checkpoint,
    to_prompt_tensors,
    validate_official_checkpoint,
)
from model.vip2clip.prompt_learner import STATE_WORDS

IMPORT_FORMATS = (OFFICIAL_FORMAT,)
# Stored token rows are fp32 copies of the backbone's token embedding (fp16-rounded for the
# OpenAI weights): a tolerance far below the spread of CLIP's embeddings (~1e-2).
_ROW_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote: the checkpoint, its digest, its sidecar and the row check."""

    checkpoint: Path
    digest: str
    metadata: dict[str, Any]
    token_rows_match_backbone: bool


def _row_words(prompt: dict[str, torch.Tensor], backbone: ClipBackbone, layout: OfficialLayout) -> dict[str, Any]:
    """Which state word each prompt's stored middle row holds, and whether the stored prefix
    and suffix rows equal the running backbone's token embedding (they do when the backbone is
    the one the prompts were trained on)."""
    with torch.no_grad():
        ids = backbone.tokenize(list(STATE_WORDS))[:, 1]
        words = backbone.embed_tokens(ids).float().cpu()  # (2, W)
        matches = True
        report: dict[str, Any] = {}
        for suffix, role in (("pos", "normal"), ("neg", "abnormal")):
            tokens = prompt[f"tokenized_prompts_{suffix}"].long().to(backbone.device)
            rows = backbone.embed_tokens(tokens).float().cpu()[0]  # (C, W)
            after_slots = layout.end_of_text  # suffix rows start at the end-of-text token
            for name, stored, fresh in (
                ("prefix", prompt[f"token_prefix_{suffix}"][0], rows[:1]),
                ("suffix", prompt[f"token_suffix_{suffix}"][0], rows[after_slots:]),
            ):
                matches &= bool(torch.allclose(stored, fresh, atol=_ROW_TOLERANCE, rtol=0))
            middle = prompt[f"token_middle_{suffix}"][0, 0]
            distances = (words - middle).abs().amax(dim=-1)
            best = int(distances.argmin())
            report[f"{role}_prompt_state_word"] = STATE_WORDS[best] if float(distances[best]) <= _ROW_TOLERANCE else "unknown"
    report["token_rows_match_backbone"] = bool(matches)
    return report


def import_official_checkpoint(
    source: Path, backbone: ClipBackbone, output: Path, image_size: int | None = None, overwrite: bool = False
) -> ImportResult:
    """Import a published ViP2-CLIP checkpoint for ``backbone``.

    Args:
        source: the ``.pth`` file (``torch.save`` of ``{'prompt_learner': ..., 'Zero_try': ...}``).
        backbone: the backbone it will run on: every shape is checked against its widths.
        output: ``<name>.safetensors`` to write (the ``.json`` sidecar goes beside it).
        image_size: model input side to record (default: 518; the tiny test backbone: 64).
        overwrite: replace an existing output.

    Raises:
        CheckpointError: unreadable, unsafe or malformed file (every problem named), or the
            output exists and ``overwrite`` is false.
    """
    from model.factory import default_image_size

    source, output = Path(source), Path(output).with_suffix(".safetensors")
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output} already exists (pass --force to replace it)")
    data = read_official_checkpoint(source)
    layout = OfficialLayout.from_backbone(backbone)
    validate_official_checkpoint(data, layout, str(source))
    tensors = to_prompt_tensors(data, layout)
    config = VIP2CLIPConfig.for_profile(
        OFFICIAL_FORMAT, context_tokens=layout.context_tokens, class_slots=layout.class_slots
    )
    scorer = VIP2CLIP(backbone, default_layers(backbone.num_blocks), image_size or default_image_size(backbone), config)
    check_prompt_tensors(tensors, scorer.prompt_state_dict(), f"{source} (mapped onto ViP2-CLIP)")
    rows = _row_words(data[PROMPT_ENTRY], backbone, layout)
    metadata = {
        **scorer.checkpoint_metadata(),
        **backbone_metadata(backbone),
        "source": {
            "format": OFFICIAL_FORMAT,
            "file": str(source),
            "sha256": file_digest(source),
            "unused": {"prompt_temp_l1": float(data[FGP_ENTRY]["prompt_temp_l1"])},
            **rows,
        },
        "code_version": code_version(),
    }
    digest = save_checkpoint(output, tensors, metadata)
    return ImportResult(output, digest, metadata, rows["token_rows_match_backbone"])
