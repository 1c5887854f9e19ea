"""``genclip convert-backbone SOURCE --out FILE``: CLIP weights users hold -> open_clip safetensors.

SOURCE is OpenAI's original archive (``ViT-L-14-336px.pt``, TorchScript: needs
``--trust-torchscript``, because loading it runs code from the file), an OpenAI-layout plain
state dict, or a Hugging Face transformers CLIP folder (``openai/clip-vit-large-patch14-336``).
The result is checked against the open_clip model ``--backbone`` (default: the configured
``GENCLIP_BACKBONE``) and written with QuickGELU recorded; point
``GENCLIP_BACKBONE_WEIGHTS`` at it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli_settings import settings_from_args, add_settings_flags


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert-backbone",
        help="convert OpenAI .pt / Hugging Face CLIP weights to an open_clip safetensors file (one time)",
        description="Convert CLIP weights to open_clip's format: OpenAI's TorchScript .pt (with --trust-torchscript), "
        "an OpenAI-layout state dict, or a Hugging Face transformers CLIP folder.",
    )
    parser.add_argument("source", type=Path, help="OpenAI .pt file or Hugging Face model folder")
    parser.add_argument("--out", type=Path, required=True, help="the open_clip .safetensors file to write")
    parser.add_argument("--trust-torchscript", action="store_true",
                        help="allow loading a TorchScript archive (it runs code from the file): only for files you trust")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    add_settings_flags(parser, ("backbone",))
    parser.set_defaults(func=main_convert)


def main_convert(args: argparse.Namespace) -> int:
    from model.conversion import convert_backbone
    from model.errors import WeightsFormatError

    settings = settings_from_args(args)
    output: Path = args.out
    if output.suffix != ".safetensors":
        print(f"genclip convert-backbone: --out must end in .safetensors, got {output}", file=sys.stderr)
        return 2
    if output.exists() and not args.force:
        print(f"genclip convert-backbone: {output} already exists (pass --force to replace it)", file=sys.stderr)
        return 2
    try:
        metadata = convert_backbone(args.source, output, settings.backbone, args.trust_torchscript)
    except WeightsFormatError as error:
        print(f"genclip convert-backbone: {error}", file=sys.stderr)
        return 2
    quick = "QuickGELU" if metadata["quick_gelu"] == "true" else "GELU"
    print(
        f"wrote {output}: open_clip {metadata['backbone']} ({metadata['architecture']}), {quick}, from "
        f"{metadata['source_kind']}. Use it: GENCLIP_BACKBONE={metadata['backbone']} GENCLIP_BACKBONE_WEIGHTS={output}",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(output), **metadata}))
    return 0
