"""``anchor train``: run a training recipe (``anchor.train``) in this process, without accelerate."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    # Every argument goes to trl.TrlParser (recipe fields and overrides), so this parser takes them all as they are.
    p = sub.add_parser(
        "train", add_help=False, prefix_chars="+",
        help="fine-tune with a recipe (SFT/DPO, LoRA or full) and the anchor; --compare adds the unanchored twin",
        description="anchor train --config recipes/X.yaml [--field value ...] [--compare]")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="--config recipes/X.yaml, overrides as --field value, --compare; --help lists every field")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.train import main

    return main(args.args)
