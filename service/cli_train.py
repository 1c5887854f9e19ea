"""``genclip train``: learn prompts on auxiliary data (zero-shot protocol: train on the *other*
data set's test split: VisA to test on MVTec AD and vice versa). Backbone settings come from
``GENCLIP_*``; flags override. ``--eval-root`` names the data the prompts will be evaluated on:
training there is not zero-shot, and the command says so before it starts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli_settings import BACKBONE_SETTINGS, add_settings_flags, settings_from_args


def register(subparsers: Any) -> None:
    from model.data.registry import DATASET_KINDS

    parser = subparsers.add_parser(
        "train",
        help="train GenCLIP / ViP2-CLIP prompts on auxiliary data",
        description="Train prompts on a frozen CLIP and write weights/<name>.safetensors + .json sidecar.",
    )
    parser.add_argument("--detector", dest="train_detector", choices=["genclip", "vip2clip"], default="genclip")
    parser.add_argument("--data", required=True, choices=DATASET_KINDS, help="data-set layout")
    parser.add_argument("--root", required=True, type=Path, help="data-set folder")
    parser.add_argument("--categories", nargs="*", default=None, help="categories to train on (default all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (ViP2-CLIP: the prompts; its FGP module trains at lr / 100)")
    parser.add_argument("--train-image-size", dest="train_image_size", type=int, default=518)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="1-based blocks (default quarter points)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="checkpoint name (default <detector>_<data>)")
    parser.add_argument("--output", type=Path, default=None, help="checkpoint path (default weights/<name>.safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of the same output")
    parser.add_argument("--eval-root", type=Path, default=None,
                        help="the data set these prompts will be evaluated on: warns when it is the training data")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loading processes (default: 4 on GPU, 0 on CPU)")
    parser.add_argument("--no-progress", action="store_true")
    add_settings_flags(parser, BACKBONE_SETTINGS)
    parser.set_defaults(func=main_train)


def main_train(args: argparse.Namespace) -> int:
    from model.backbone import load_backbone
    from model.data.errors import DatasetError
    from model.data.registry import read_dataset
    from model.errors import ResumeError, WeightsFormatError, WeightsNotFoundError
    from model.evaluation import same_data_root
    from model.factory import resolve_device
    from model.training import TrainingConfig, resume_path, train

    settings = settings_from_args(args)
    spec = settings.detector_config().backbone
    try:
        samples = read_dataset(args.data, args.root, args.categories)
        backbone = load_backbone(spec, resolve_device(settings.device))
    except (DatasetError, WeightsNotFoundError, WeightsFormatError) as error:
        print(f"genclip train: {error}", file=sys.stderr)
        return 2
    if args.eval_root is not None and same_data_root(args.root, args.eval_root):
        print(
            f"genclip train: warning: training on {args.root}, the data you will evaluate on ({args.eval_root}): "
            "that is not zero-shot. The protocol trains on the other data set's test split "
            "(VisA to evaluate on MVTec AD, MVTec AD to evaluate on VisA).",
            file=sys.stderr,
        )
    name = args.name or f"{args.train_detector}_{args.data}"
    output = args.output or Path("weights") / f"{name}.safetensors"
    config = TrainingConfig(
        detector=args.train_detector,
        output=output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        image_size=args.train_image_size,
        layers=tuple(args.layers) if args.layers else None,
        seed=args.seed,
        resume=args.resume,
        max_steps_per_epoch=args.max_steps_per_epoch,
        data_description={"data": args.data, "root": str(args.root)},
        data_workers=args.workers if args.workers is not None else (4 if backbone.device.type == "cuda" else 0),
    )
    print(
        f"training {config.detector} on {len(samples)} {args.data} images "
        f"({len({s.category for s in samples})} categories), backbone {backbone.model_name} "
        f"[{backbone.weights_label}] on {backbone.device}",
        file=sys.stderr,
    )
    def resumed(state_file: Path, done: int, losses: list[float]) -> None:
        history = ", ".join(f"{loss:.4f}" for loss in losses)
        print(f"resuming from {state_file}: {done} of {config.epochs} epochs done (losses {history})", file=sys.stderr)

    if args.resume and not resume_path(output).is_file():
        print(f"genclip train: nothing to resume at {resume_path(output)}: starting at epoch 1", file=sys.stderr)
    try:
        result = train(backbone, samples, config, progress=not args.no_progress,
                       on_epoch_end=lambda epoch, loss: print(f"epoch {epoch}: loss {loss:.4f}", file=sys.stderr),
                       on_resume=resumed)
    except (DatasetError, ResumeError) as error:
        print(f"genclip train: {error}", file=sys.stderr)
        return 2
    summary = {"checkpoint": str(result.checkpoint), "digest": result.digest, "epoch_losses": result.epoch_losses}
    print(json.dumps(summary))
    if backbone.weights_label == "random":
        print("note: trained on a random backbone: a pipeline check, not a usable checkpoint.", file=sys.stderr)
    return 0
