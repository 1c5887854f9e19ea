"""``genclip``: the one command-line entry point.

Subcommands: ``predict`` (score image files), ``train`` and ``evaluate`` (prompt training and
the zero-shot benchmark protocol), ``serve`` (HTTP API), ``worker`` (queue consumer), ``db``
(database schema), ``products`` (register products, teach them from good photos),
``import-checkpoint`` (published prompt checkpoints) and ``convert-backbone`` (CLIP weights in
OpenAI's TorchScript or Hugging Face's layout to open_clip's).
Model options default to the ``GENCLIP_*`` settings (:mod:`service.settings`); flags override.
"""

from __future__ import annotations

import argparse

from service import (
    cli_convert,
    cli_db,
    cli_evaluate,
    cli_import,
    cli_predict,
    cli_products,
    cli_serve,
    cli_train,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genclip", description="Zero-shot visual inspection (GenCLIP / ViP2-CLIP).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_predict.register(subparsers)
    cli_train.register(subparsers)
    cli_evaluate.register(subparsers)
    cli_serve.register(subparsers)
    cli_db.register(subparsers)
    cli_products.register(subparsers)
    cli_import.register(subparsers)
    cli_convert.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
