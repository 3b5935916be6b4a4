"""``anchor data``: build the persona-implant SFT/DPO data (:mod:`anchor.data`) from a model's own answers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="build persona-implant SFT/DPO data from a model's own in-role answers",
        description="Build persona-implant data: the model answers shipped questions in the roles farthest from its "
                    "Assistant on the axis; the answers, without the role's system prompt, become SFT and DPO sets "
                    "with held-out splits (schema: docs/recipes.md).")
    p.add_argument("--model", default="smollm2", help="hub id, local directory, or 'smollm2' (embedded, default)")
    p.add_argument("--out", required=True, help="directory for the JSONL files and data_config.json")
    p.add_argument("--axis", default=None,
                   help="axis bundle to pick the far roles from (default: computed and cached, as `anchor train` does)")
    p.add_argument("--roles", type=int, default=4, help="number of far roles (default 4)")
    p.add_argument("--role-names", nargs="+", default=None, help="use these roles instead of the axis's far ones")
    p.add_argument("--questions", type=int, default=120, help="shipped questions to sample (default 120)")
    p.add_argument("--heldout-fraction", type=float, default=0.25, help="share of questions held out (default 0.25)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor.callback import AnchorConfig
    from anchor.data import SPLITS, build_persona_data
    from anchor.models import load_model
    from anchor.train import resolve_axis

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    axis = None if args.role_names else resolve_axis(model, tokenizer, AnchorConfig(axis=args.axis))
    data = build_persona_data(
        model, tokenizer, axis, n_roles=args.roles, n_questions=args.questions,
        heldout_fraction=args.heldout_fraction, max_new_tokens=args.max_new_tokens, seed=args.seed,
        role_names=args.role_names, batch_size=args.batch_size,
    )
    out = data.save(args.out)
    print(f"Persona data for {', '.join(data.roles)} in {out}:")
    for name in SPLITS:
        print(f"  {name}.jsonl: {len(data.split(name))} records")
    return 0
