"""``anchor screen``: score a training set's examples by how far they would pull the model off its Assistant."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_axis_options, add_model_options, load_model_and_axis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "screen", help="score training examples by how far they sit from the Assistant, before fine-tuning",
        description=(
            "Teacher-force each example's assistant turns, read their mean projection on the Assistant Axis at the "
            "report layer and the capping band, and compare it with the model's default answers (--reference band, "
            "cheap) or with its own answer to the same prompt (--reference own, generated once and cached). "
            "Writes scores.jsonl, histogram.png, summary.md/json and, with --drop-below, filtered.jsonl."
        ),
    )
    p.add_argument("data", help="JSONL (or JSON list) of chat 'messages', prompt/completion or prompt/chosen/rejected")
    p.add_argument("--out", required=True, help="directory for the report")
    p.add_argument("--reference", choices=("band", "own"), default="band",
                   help="band: the median of the bundle's default answers (default); own: the model's own answer")
    p.add_argument("--drop-below", type=float, metavar="P",
                   help="write filtered.jsonl without the examples whose projection is below the P-th percentile "
                        "of the model's default answers at the report layer")
    p.add_argument("--worst", type=int, default=10, help="examples listed in summary.md (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of the model's own answers (--reference own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    add_model_options(p)
    add_axis_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.io import check_output_dir
    from anchor.screening import OUTPUT_FILES, conversation, read_rows, screen, write_report

    if args.drop_below is not None and not 0 <= args.drop_below <= 100:
        raise ValueError(f"--drop-below {args.drop_below} must be a percentile within 0..100.")
    check_output_dir(args.out, OUTPUT_FILES, overwrite=args.overwrite)
    rows = read_rows(args.data)
    for i, row in enumerate(rows):
        conversation(row, i)  # an unreadable row is refused before the model loads
    model, tokenizer, axis = load_model_and_axis(args)
    report = screen(model, tokenizer, axis, rows, args.reference, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, check_weights=not args.no_check_weights)
    paths = write_report(report, rows, args.out, axis, args.drop_below, args.worst, args.overwrite)
    print(f"Screened {len(rows)} examples: median score {float(report.scores.median()):+.3f} at layer "
          f"{report.report_layer}. Wrote {', '.join(p.name for p in paths)} to {args.out}")
    return 0
