"""``anchor axis``: compute a model's Assistant Axis, save the bundle and write its report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("axis", help="compute the Assistant Axis of a model and write a report",
                       description="Compute the Assistant Axis bundle of a model and a persona-space report.")
    p.add_argument("--model", default="smollm2", help="hub id, local directory, or 'smollm2' (embedded, default)")
    p.add_argument("--out", default="outputs/axis", help="bundle directory; the report goes to OUT/report")
    p.add_argument("--roles", type=int, default=None, help="number of shipped roles to sample (default: all)")
    p.add_argument("--questions", type=int, default=None, help="number of shipped questions (default: all)")
    p.add_argument("--roles-file", default=None, help="your own roles (JSON/JSONL in the shipped schema)")
    p.add_argument("--questions-file", default=None, help="your own questions (JSON, JSONL or .txt)")
    p.add_argument("--prompts-per-role", type=int, default=None, help="system prompts used per role (default all)")
    p.add_argument("--mode", choices=("generate", "prompt"), default="generate")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anchor import compute_axis, load_model
    from anchor.space import summary, write_report

    out = Path(args.out)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    axis = compute_axis(
        model, tokenizer, roles=args.roles_file, questions=args.questions_file, mode=args.mode,
        n_roles=args.roles, n_questions=args.questions, max_new_tokens=args.max_new_tokens, seed=args.seed,
        out_dir=out / "extraction", prompts_per_role=args.prompts_per_role, batch_size=args.batch_size,
    )
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
