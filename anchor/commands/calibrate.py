"""``anchor calibrate``: choose a capping setting for a model and store it in its axis bundle."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_model_options, load_model_from_args


def _band(text: str) -> tuple[int, int]:
    """``"21-25"`` (inclusive) or ``"21"`` (one layer)."""
    first, _, last = text.partition("-")
    try:
        return int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"band {text!r} must look like 21-25 (inclusive) or 21") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="sweep capping bands × percentiles and store the best setting in an axis bundle",
        description=(
            "Measure, for each capping band × percentile, how much capping lifts the axis projection on "
            "drift-inducing prompts and how much it changes next-token distributions (KL) on ordinary Assistant "
            "prompts; keep the largest lift within the KL budget and write it into the bundle's metadata, where "
            "`cap(model, axis)` picks it up by default. A sweep table (markdown, JSON) and a plot go to --out."
        ),
    )
    parser.add_argument("--axis", required=True, help="axis bundle directory (from `anchor axis`); updated in place")
    add_model_options(parser, seed=True)
    parser.add_argument("--layers-bands", nargs="+", type=_band, metavar="FIRST-LAST",
                        help="candidate layer bands, inclusive, e.g. 18-22 21-25 (default: 55-70%%, 70-85%%, "
                             "85-100%% of depth)")
    parser.add_argument("--percentiles", nargs="+", type=float, metavar="P",
                        help="candidate floors as percentiles of default-answer projections (default: 5 25 50 75)")
    parser.add_argument("--kl-budget", type=float, default=0.05,
                        help="largest mean KL(uncapped || capped) per token on ordinary answers, nats (default 0.05)")
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts per set, drift and ordinary (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="report directory (default: AXIS/calibration); a sweep where nothing fits the "
                                      "budget goes to OUT-no-fit instead, leaving the report behind the stored setting")
    parser.add_argument("--no-check-weights", action="store_true",
                        help="accept a fine-tune of the model the axis was computed on (shapes are still checked)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from anchor.axis import AssistantAxis
    from anchor.calibrate import DEFAULT_PERCENTILES, REPORT_FILES, CalibrationSettings, calibrate_bundle, no_fit_dir
    from anchor.io import check_output_dir

    settings = CalibrationSettings(
        bands=tuple(args.layers_bands) if args.layers_bands else None,
        percentiles=tuple(args.percentiles) if args.percentiles else DEFAULT_PERCENTILES,
        kl_budget=args.kl_budget, n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
    )
    AssistantAxis.from_pretrained(args.axis)  # a bad bundle is refused now, not after the model has loaded
    out = Path(args.out) if args.out else Path(args.axis) / "calibration"
    for directory in (out, no_fit_dir(out)):  # a sweep replaces its own report; only a file in the way is refused
        check_output_dir(directory, REPORT_FILES, "--out", overwrite=True)
    model, tokenizer = load_model_from_args(args)
    result = calibrate_bundle(args.axis, model, tokenizer, settings, args.out, progress=not args.quiet,
                              check_weights=not args.no_check_weights)
    chosen = result.chosen
    print(result.to_markdown())
    print(f"Stored layers {chosen.layers[0]}–{chosen.layers[-1]} at percentile {chosen.percentile:g} in {args.axis}.")
    return 0
