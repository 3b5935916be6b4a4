"""``anchor generate``: batch replies to conversations in a JSONL file, each with its Assistant-Axis projection."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_axis_options, add_model_options, load_model_and_axis


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_options(p)
    add_axis_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cap", action="store_true", help="cap with the bundle's default setting")
    p.add_argument("--steer", type=float, default=None, metavar="C",
                   help="steer by C × the layer's mean residual norm (positive: toward the Assistant)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.chat import Intervention, replies_with_projections
    from anchor.io import atomic_write_jsonl, check_output_file, nan_to_none
    from anchor.monitor import read_conversations

    check_output_file(args.out, "--out", args.overwrite)
    records = read_conversations(args.input)
    model, tokenizer, axis = load_model_and_axis(args)
    intervention = Intervention(cap=args.cap, steer=args.steer)
    results = replies_with_projections(
        model, tokenizer, axis, [r["messages"] for r in records], intervention, args.max_new_tokens,
        args.batch_size, not args.no_check_weights, progress=not args.quiet,
    )
    rows = [{**record, "reply": reply, "projection": projection}
            for record, (reply, projection) in zip(records, results, strict=True)]
    atomic_write_jsonl(args.out, nan_to_none(rows))  # an empty reply has no projection: null
    print(f"{len(records)} replies ({intervention.label}) written to {args.out}")
    return 0
