"""``anchor generate``: batch replies to conversations in a JSONL file, each with its Assistant-Axis projection."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anchor.commands.monitor import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="reply to each conversation of a JSONL file (optionally capped or steered)",
        description=(
            "Each input line is {\"messages\": [...]} (other fields are kept) or a bare messages list ending with a "
            "user turn. Each output line adds \"reply\" (greedy) and \"projection\": the reply's mean projection on "
            "the Assistant Axis at the report layer, read under the same cap or steering."
        ),
    )
    p.add_argument("--in", dest="input", required=True, help="input JSONL of conversations")
    p.add_argument("--out", required=True, help="output JSONL")
    add_model_args(p)
    p.add_argument("--cap", action="store_true", help="cap with the bundle's default setting")
    p.add_argument("--steer", type=float, default=None, metavar="C",
                   help="steer by C × the layer's mean residual norm (positive: toward the Assistant)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.chat import Intervention, replies_with_projections
    from anchor.commands.monitor import load_model_and_axis
    from anchor.monitor import read_conversations

    records = read_conversations(args.input)
    model, tokenizer, axis = load_model_and_axis(args)
    intervention = Intervention(cap=args.cap, steer=args.steer)
    results = replies_with_projections(
        model, tokenizer, axis, [r["messages"] for r in records], intervention, args.max_new_tokens,
        args.batch_size, not args.no_check_weights, progress=not args.quiet,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record, (reply, projection) in zip(records, results, strict=True):
            f.write(json.dumps({**record, "reply": reply, "projection": projection}, ensure_ascii=False) + "\n")
    print(f"{len(records)} replies ({intervention.label}) written to {out}")
    return 0
