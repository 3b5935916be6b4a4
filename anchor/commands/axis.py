"""``anchor axis``: compute a model's Assistant Axis, save the bundle and write its report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from anchor.commands.options import add_model_options, at_least, load_model_from_args

SAMPLING = ("roles", "questions", "prompts_per_role", "max_new_tokens", "mode")
"""The options ``--budget-s`` chooses."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("axis", help="compute the Assistant Axis of a model and write a report",
                       description="Compute the Assistant Axis bundle of a model and a persona-space report. "
                                   "Interrupted runs resume from OUT/extraction when re-run with the same options.")
    add_model_options(p, seed=True)
    p.add_argument("--out", default="outputs/axis", help="bundle directory; the report goes to OUT/report")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    p.add_argument("--budget-s", type=_seconds, default=None,
                   help="choose roles, questions, tokens and mode to fit about this many seconds (the frontier "
                        "measured by scripts/bench_axis.py, scaled by a short speed probe of this model here)")
    p.add_argument("--roles", type=at_least(2, "an axis compares at least 2 roles"), default=None,
                   help="number of shipped roles to sample (default: all)")
    p.add_argument("--questions", type=at_least(1, "ask at least 1 question"), default=None,
                   help="number of shipped questions (default: all)")
    p.add_argument("--roles-file", default=None, help="your own roles (JSON/JSONL in the shipped schema)")
    p.add_argument("--questions-file", default=None, help="your own questions (JSON, JSONL or .txt)")
    p.add_argument("--prompts-per-role", type=at_least(1, "1 uses each role's first system prompt"), default=None,
                   help="system prompts used per role (default all)")
    p.add_argument("--mode", choices=("generate", "prompt"), default=None, help="default generate")
    p.add_argument("--max-new-tokens", type=at_least(2, "the last generated token is never fed back"), default=None,
                   help="tokens generated per answer (default 32)")
    p.add_argument("--batch-size", type=at_least(1, "a batch holds at least 1 answer"), default=128)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _sampling(args: argparse.Namespace, model: object, tokenizer: object) -> dict:
    """compute_axis's sampling arguments: from the options, or chosen for ``--budget-s``."""
    if args.budget_s is None:
        return {"n_roles": args.roles, "n_questions": args.questions, "prompts_per_role": args.prompts_per_role,
                "max_new_tokens": args.max_new_tokens or 32, "mode": args.mode or "generate"}
    from anchor.extract import relative_speed, settings_for_budget

    speed = relative_speed(model, tokenizer)
    settings = settings_for_budget(args.budget_s, speed)
    print(f"--budget-s {args.budget_s:g}: this model runs at {speed:.2g}× the benchmark's speed here, so: "
          f"{settings.n_roles} roles × {settings.n_questions} questions, {settings.mode} mode"
          + (f", {settings.max_new_tokens} new tokens" if settings.mode == "generate" else ""), flush=True)
    return {"n_roles": settings.n_roles, "n_questions": settings.n_questions,
            "prompts_per_role": settings.prompts_per_role, "max_new_tokens": settings.max_new_tokens,
            "mode": settings.mode}


def run(args: argparse.Namespace) -> int:
    from anchor import compute_axis
    from anchor.axis import CONFIG_NAME, WEIGHTS_NAME
    from anchor.io import check_output_dir
    from anchor.space import summary, write_report

    given = [f"--{name.replace('_', '-')}" for name in SAMPLING if getattr(args, name) is not None]
    if args.budget_s is not None and given:
        raise ValueError(f"--budget-s chooses {', '.join(given)} itself; give either --budget-s or those options.")
    out = Path(args.out)
    check_output_dir(out, [WEIGHTS_NAME, CONFIG_NAME], "--out", args.overwrite)
    model, tokenizer = load_model_from_args(args)
    work = out / "extraction"
    start = time.perf_counter()
    try:
        axis = compute_axis(model, tokenizer, roles=args.roles_file, questions=args.questions_file, seed=args.seed,
                            out_dir=work, batch_size=args.batch_size, progress=not args.quiet,
                            **_sampling(args, model, tokenizer))
    except KeyboardInterrupt:
        print(f"\nanchor axis: interrupted. The answers finished so far are kept in {work}; run the same command "
              "again to resume from them.", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    axis.save_pretrained(out)
    page = write_report(axis, out / "report")
    s = summary(axis)
    layer = s["layer"]
    print(f"Axis of {s['model_id']}: {s['n_roles']} roles, {s['n_answers']} answers in {seconds:.0f} s")
    print(f"  layer {layer}: cosine(axis, PC1) = {s['pc1_cosine'][layer]:.3f}, PC1 explains "
          f"{s['explained'][0]:.1%}, default above {s['default_above_roles']:.0%} of roles")
    print(f"  most Assistant-like:  {', '.join(n for n, _ in s['top_roles'][:6])}")
    print(f"  least Assistant-like: {', '.join(n for n, _ in s['bottom_roles'][:6])}")
    print(f"Bundle: {out}\nReport: {page}")
    return 0
