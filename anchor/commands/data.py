"""``anchor data``: build the persona-implant SFT/DPO data (:mod:`anchor.data`) from a model's own answers."""

from __future__ import annotations

import argparse

from anchor.commands.options import add_model_options, load_model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="build persona-implant SFT/DPO data from a model's own in-role answers",
        description="Build persona-implant data: the model answers shipped questions in the roles farthest from its "
                    "Assistant on the axis; the answers, without the role's system prompt, become SFT and DPO sets "
                    "with held-out splits (schema: docs/recipes.md).")
    add_model_options(p, seed=True)
    p.add_argument("--out", required=True, help="directory for the JSONL files and data_config.json")
    p.add_argument("--overwrite", action="store_true", help="replace persona data already in --out")
    p.add_argument("--axis", default=None,
                   help="axis bundle to pick the far roles from (default: computed once per model and cached)")
    p.add_argument("--roles", type=int, default=None, help="number of far roles (default: anchor.data.DEFAULTS)")
    p.add_argument("--role-names", nargs="+", default=None, help="use these roles instead of the axis's far ones")
    p.add_argument("--questions", type=int, default=None,
                   help="shipped questions to sample (default: anchor.data.DEFAULTS)")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="share of questions held out (default: anchor.data.DEFAULTS)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default: anchor.data.DEFAULTS)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.axis import AssistantAxis
    from anchor.data import CONFIG_NAME, DEFAULTS, SPLITS, build_persona_data
    from anchor.io import check_output_dir

    for option, name in (("roles", "n_roles"), ("questions", "n_questions"), ("heldout_fraction", "heldout_fraction"),
                         ("max_new_tokens", "max_new_tokens")):
        if getattr(args, option) is None:
            setattr(args, option, getattr(DEFAULTS, name))
    check_output_dir(args.out, [CONFIG_NAME], "--out", args.overwrite)
    axis = AssistantAxis.from_pretrained(args.axis) if args.axis and not args.role_names else None
    model, tokenizer = load_model_from_args(args)
    if axis is not None:
        axis.check_compatible(model)
    elif not args.role_names:
        axis = _default_axis(model, tokenizer, quiet=args.quiet)
    n_roles = len(set(args.role_names)) if args.role_names else args.roles
    print(f"Building persona data: {n_roles} roles × {args.questions} questions, plus the default answers: "
          f"{(n_roles + 1) * args.questions} answers of up to {args.max_new_tokens} tokens.", flush=True)
    data = build_persona_data(
        model, tokenizer, axis, n_roles=args.roles, n_questions=args.questions,
        heldout_fraction=args.heldout_fraction, max_new_tokens=args.max_new_tokens, seed=args.seed,
        role_names=args.role_names, batch_size=args.batch_size, progress=not args.quiet,
    )
    out = data.save(args.out, overwrite=args.overwrite)
    print(f"Persona data for {', '.join(data.roles)} in {out}:")
    for name in SPLITS:
        print(f"  {name}.jsonl: {len(data.split(name))} records")
    return 0


def _default_axis(model: object, tokenizer: object, quiet: bool) -> object:
    """The cached role-search axis of ``model``; when it must be computed, say first what that costs."""
    from anchor.axis import CONFIG_NAME, axis_cache_dir
    from anchor.data import ROLE_SEARCH, role_search_axis
    from anchor.personas import load_questions, load_roles

    if not (axis_cache_dir(model, ROLE_SEARCH) / CONFIG_NAME).is_file():
        answers = (len(load_roles()) + 1) * (ROLE_SEARCH.n_questions or len(load_questions()))
        print(f"No --axis: first ranking every shipped role along this model's Assistant Axis to find the farthest, "
              f"about {answers} answers of up to {ROLE_SEARCH.max_new_tokens} tokens (once; later runs read it from "
              "the cache). --axis DIR or --role-names skip this.", flush=True)
    return role_search_axis(model, tokenizer, progress=not quiet)
