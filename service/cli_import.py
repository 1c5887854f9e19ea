"""``genclip import-checkpoint --format vip2clip-official FILE --name NAME``: use published prompts.

Reads the ViP2-CLIP authors' ``.pth`` safely (``weights_only=True``), validates every key,
shape and dtype against the configured backbone (``GENCLIP_BACKBONE`` / ``--backbone`` and
its weights), and writes ``weights/NAME.safetensors`` + ``NAME.json`` with profile
``vip2clip-official``: served by ``genclip serve`` / ``predict`` as any other checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli_settings import BACKBONE_SETTINGS, add_settings_flags, settings_from_args


def register(subparsers: Any) -> None:
    from model.checkpoint_import import IMPORT_FORMATS

    parser = subparsers.add_parser(
        "import-checkpoint",
        help="import a published prompt checkpoint (the ViP2-CLIP authors' .pth files)",
        description="Validate a published prompt checkpoint against the configured backbone and write "
        "weights/NAME.safetensors + NAME.json (profile vip2clip-official: the published inference, exactly).",
    )
    parser.add_argument("--format", dest="import_format", required=True, choices=IMPORT_FORMATS,
                        help="format of FILE (vip2clip-official: models/{mvtec,visa}_train_epoch_10.pth)")
    parser.add_argument("file", type=Path, help="the checkpoint to import")
    parser.add_argument("--name", required=True, help="checkpoint name: writes <weights-dir>/<name>.safetensors + .json")
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"), help="output folder (default ./weights)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint of that name")
    add_settings_flags(parser, (*BACKBONE_SETTINGS, "image_size"))
    parser.set_defaults(func=main_import)


def main_import(args: argparse.Namespace) -> int:
    from model.backbone import load_backbone
    from model.checkpoint_import import import_official_checkpoint
    from model.errors import DETECTOR_LOAD_ERRORS
    from model.factory import resolve_device

    settings = settings_from_args(args)
    if "/" in args.name or args.name in ("", ".", ".."):
        print(f"genclip import-checkpoint: --name {args.name!r} must be a plain file name", file=sys.stderr)
        return 2
    output = args.weights_dir / f"{args.name}.safetensors"
    try:
        backbone = load_backbone(settings.detector_config().backbone, resolve_device(settings.device))
        result = import_official_checkpoint(args.file, backbone, output, settings.image_size, overwrite=args.force)
    except DETECTOR_LOAD_ERRORS as error:
        print(f"genclip import-checkpoint: {error}", file=sys.stderr)
        return 2
    metadata = result.metadata
    source = metadata["source"]
    print(
        f"imported {args.file} ({source['format']}) for {metadata['backbone']} [{metadata['backbone_weights']}]: "
        f"layers {metadata['layers']}, {metadata['image_size']} px; the normal prompt's stored state word is "
        f"{source['normal_prompt_state_word']!r}, the abnormal one's {source['abnormal_prompt_state_word']!r}.",
        file=sys.stderr,
    )
    if not result.token_rows_match_backbone:
        print(
            "warning: the checkpoint's stored token rows differ from this backbone's token embedding: the prompts "
            "were trained on other CLIP weights (the published ones need OpenAI ViT-L-14-336; see "
            "`genclip convert-backbone`). They will run, but score as on the wrong backbone.",
            file=sys.stderr,
        )
    print(
        f"serve it: GENCLIP_DETECTOR=vip2clip GENCLIP_VIP2CLIP_CHECKPOINT={result.checkpoint} genclip serve "
        f"(or genclip predict IMAGE --detector vip2clip --vip2clip-checkpoint {result.checkpoint})",
        file=sys.stderr,
    )
    print(json.dumps({"checkpoint": str(result.checkpoint), "digest": result.digest, "profile": metadata["profile"]}))
    return 0
