"""``anchor eval drift``: replay the shipped multi-turn conversations and measure persona drift, uncapped and capped."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_axis_options, add_model_options, load_model_and_axis


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluation suites (drift)", description="Evaluation suites.")
    suites = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    d = suites.add_parser(
        "drift", help="per-domain, per-turn drift over multi-turn conversations, uncapped vs capped",
        description=(
            "The model answers every user turn of the shipped conversations (coding, writing, emotional, "
            "philosophy) in order, keeping its own replies, uncapped and capped with the bundle's default setting. "
            "Writes drift.md (domain × turn table, mean ± sem), drift.json and plots into --out."
        ),
    )
    add_model_options(d)
    add_axis_options(d)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--out", default="outputs/eval_drift", help="report directory (default outputs/eval_drift)")
    d.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    d.add_argument("--conversations", type=int, default=12, metavar="N_PER_DOMAIN",
                   help="conversations per domain, the first N in file order (default 12: all)")
    d.add_argument("--turns", type=int, default=None, help="user turns played per conversation (default: all)")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--batch-size", type=int, default=48, help="conversations answered together")
    d.add_argument("--layer", type=int, default=None, help="layer to read (default: the axis's report layer)")
    d.add_argument("--no-cap", action="store_true", help="skip the capped replay")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.evaluate import REPORT_FILES, DriftSettings, eval_drift, write_report
    from anchor.io import check_output_dir

    settings = DriftSettings(
        conversations_per_domain=args.conversations, turns=args.turns, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, cap=not args.no_cap, layer=args.layer,
    )
    check_output_dir(args.out, REPORT_FILES, "--out", args.overwrite)
    model, tokenizer, axis = load_model_and_axis(args)
    report = eval_drift(model, tokenizer, axis, settings, progress=not args.quiet,
                        check_weights=not args.no_check_weights)
    paths = write_report(report, args.out)
    print(report.to_markdown())
    print(f"Finished in {report.metadata['seconds']:.0f} s. Wrote {', '.join(str(p) for p in paths)}")
    return 0
