"""Benchmark: how cheaply can an Assistant Axis be estimated, and how close is it to the full one?

The reference is the full generate-mode axis (every shipped role, every shipped question). Each variant is a
cheaper run (fewer roles, questions, tokens; or prompt mode without generation); we report its seconds and its
cosine to the reference at every layer, summarised over the middle third of the network.

The reference takes hours on a 2-core CPU, so it is usually computed once on a GPU and passed in:

    python scripts/bench_axis.py --device cuda --save-reference outputs/reference-axis      # on a GPU
    python scripts/bench_axis.py --reference outputs/reference-axis                         # variants, timed here

Results go to scripts/results/bench_axis_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from anchor import AssistantAxis, compute_axis, load_model

REFERENCE = {"n_roles": None, "n_questions": None, "prompts_per_role": 1, "max_new_tokens": 32}
VARIANTS = {
    "gen-r4-q24-t16": {"n_roles": 4, "n_questions": 24, "prompts_per_role": 1, "max_new_tokens": 16},
    "gen-r8-q24-t16": {"n_roles": 8, "n_questions": 24, "prompts_per_role": 1, "max_new_tokens": 16},
    "gen-r8-q40-t16": {"n_roles": 8, "n_questions": 40, "prompts_per_role": 1, "max_new_tokens": 16},
    "gen-r16-q32-t24": {"n_roles": 16, "n_questions": 32, "prompts_per_role": 1, "max_new_tokens": 24},
    "gen-r32-q64-t32": {"n_roles": 32, "n_questions": 64, "prompts_per_role": 1, "max_new_tokens": 32},
    "gen-all-q16-t32": {"n_roles": None, "n_questions": 16, "prompts_per_role": 1, "max_new_tokens": 32},
    "prompt-all-qall": {"mode": "prompt", "n_roles": None, "n_questions": None, "prompts_per_role": 1},
    "prompt-r32-q64": {"mode": "prompt", "n_roles": 32, "n_questions": 64, "prompts_per_role": 1},
}


def cosines(a: AssistantAxis, b: AssistantAxis) -> list[float]:
    return [round(float(c), 4) for c in torch.nn.functional.cosine_similarity(a.axis, b.axis, dim=-1)]


def role_order_agreement(a: AssistantAxis, ref: AssistantAxis, layer: int) -> float | None:
    """Spearman correlation of the shared roles' projections (ordering kept, even if the direction is not)."""
    shared = [n for n in a.role_names if n in ref.role_names]
    if len(shared) < 3:
        return None
    pa = a.role_projections(layer)[[a.role_names.index(n) for n in shared]]
    pr = ref.role_projections(layer)[[ref.role_names.index(n) for n in shared]]
    ra, rr = pa.argsort().argsort().float(), pr.argsort().argsort().float()
    return round(float(torch.corrcoef(torch.stack([ra, rr]))[0, 1]), 4)


def timed_axis(model, tokenizer, settings: dict, batch_size: int, seed: int) -> tuple[AssistantAxis, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        axis = compute_axis(model, tokenizer, out_dir=tmp, batch_size=batch_size, seed=seed, progress=False,
                            **settings)
        return axis, time.perf_counter() - start


def write_results(args: argparse.Namespace, reference: AssistantAxis, ref_seconds: float | None, middle: range,
                  rows: list[dict]) -> None:
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "host": platform.node(), "threads": torch.get_num_threads(), "middle_layers": [middle.start, middle.stop - 1],
        "reference": {"settings": REFERENCE, "seconds": ref_seconds and round(ref_seconds, 1),
                      "n_answers": reference.metadata.get("n_answers"), "n_roles": len(reference.role_names),
                      "n_questions": reference.metadata.get("n_questions"),
                      "pc1_cosine": [round(float(c), 4) for c in reference.pc1_cosine()],
                      "default_above_roles_report_layer": round(float(
                          (reference.role_projections(reference.report_layer)
                           < reference.default_projection(reference.report_layer)).float().mean()), 4)},
        "variants": rows,
    }
    tag = "cpu" if args.device == "cpu" else "gpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_axis_{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# bench_axis ({result['device']}, {result['threads']} threads)", "",
             f"Reference: {result['reference']['n_roles']} roles × {result['reference']['n_questions']} questions, "
             f"{result['reference']['n_answers']} answers. Middle third = layers {middle.start}–{middle.stop - 1}.", "",
             "| variant | seconds | answers | cos to reference (middle mean) | (middle min) | role-order Spearman |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['seconds']} | {r['n_answers']} | {r['cos_middle_mean']:.3f} | "
              f"{r['cos_middle_min']:.3f} | {r['role_order_spearman']} |" for r in rows]
    (out / f"bench_axis_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="a saved reference bundle (skips computing it)")
    parser.add_argument("--save-reference", help="where to save the reference bundle once computed")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="scripts/results")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2", device=args.device)
    if args.reference:
        reference, ref_seconds = AssistantAxis.from_pretrained(args.reference), None
    else:
        reference, ref_seconds = timed_axis(model, tokenizer, REFERENCE, max(args.batch_size, 256), args.seed)
        if args.save_reference:
            reference.save_pretrained(args.save_reference)
    reference.check_compatible(model)
    n = reference.n_layers
    middle = range(n // 3, 2 * n // 3)
    rows = []
    for name in args.variants.split(","):
        axis, seconds = timed_axis(model, tokenizer, VARIANTS[name], args.batch_size, args.seed)
        cos = cosines(axis, reference)
        mid = [cos[i] for i in middle]
        rows.append({
            "name": name, "settings": VARIANTS[name], "seconds": round(seconds, 1),
            "n_answers": axis.metadata["n_answers"],
            "cos_middle_mean": round(sum(mid) / len(mid), 4), "cos_middle_min": min(mid), "cos_per_layer": cos,
            "role_order_spearman": role_order_agreement(axis, reference, reference.report_layer),
            "pc1_cosine_report_layer": round(float(axis.pc1_cosine()[axis.report_layer]), 4),
        })
        print(f"{name:18s} {seconds:7.1f} s  cos(middle) mean {rows[-1]['cos_middle_mean']:.3f} min {min(mid):.3f}")
        write_results(args, reference, ref_seconds, middle, rows)


if __name__ == "__main__":
    main()
