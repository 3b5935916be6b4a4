"""Generation throughput with capping over without, on the embedded SmolLM2-135M.

Greedy generation of exactly ``--new-tokens`` tokens (min = max, so both arms produce the same token count) at
batch sizes 1 and 8. Capped and uncapped runs alternate within each repetition (and swap order every
repetition) so machine noise hits both arms alike; the reported ratio is the median over repetitions of
capped tokens/s ÷ uncapped tokens/s. Target: >= 0.95.

    python scripts/bench_capping.py [--axis DIR] [--reps 5] [--new-tokens 64]

Without ``--axis`` a quick axis is computed (4 roles × 4 questions): throughput does not depend on its quality.
Writes ``scripts/results/bench_capping.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from anchor.axis import AssistantAxis, compute_axis
from anchor.capping import attach_cap
from anchor.models import load_model
from anchor.personas import load_probes
from anchor.spans import encode_prompt

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95


def _generate(model, tokenizer, ids, mask, new_tokens: int) -> tuple[float, float]:
    """Wall and process-CPU seconds for one greedy generation of exactly ``new_tokens`` tokens per row."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if ids.is_cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert out.shape[1] - ids.shape[1] == new_tokens
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--axis", help="axis bundle for the embedded model (default: compute a quick one)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2", device=args.device)
    if args.axis:
        axis = AssistantAxis.from_pretrained(args.axis)
    else:
        axis = compute_axis(model, tokenizer, n_roles=4, n_questions=4, max_new_tokens=8, prompts_per_role=1)
    probes = [p.prompt for p in load_probes() if p.domain in ("coding", "writing")]
    handle = attach_cap(model, axis)  # default band and floor, exactly what `cap(model, axis)` installs
    layers, percentile = handle.layers, handle.percentile
    handle.detach()

    rows = []
    for batch in args.batch_sizes:
        prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in probes[:batch]]
        padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(model.device)
        ids, mask = padded["input_ids"], padded["attention_mask"]
        _generate(model, tokenizer, ids, mask, 8)  # warm-up
        times: dict[str, list[float]] = {"uncapped": [], "capped": []}
        cpu: dict[str, list[float]] = {"uncapped": [], "capped": []}
        for rep in range(args.reps):
            order = ("uncapped", "capped") if rep % 2 == 0 else ("capped", "uncapped")
            for arm in order:
                handle = attach_cap(model, axis) if arm == "capped" else None
                wall, used = _generate(model, tokenizer, ids, mask, args.new_tokens)
                times[arm].append(wall)
                cpu[arm].append(used)
                if handle:
                    handle.detach()
        tokens = batch * args.new_tokens
        ratios = [u / c for u, c in zip(times["uncapped"], times["capped"], strict=True)]
        cpu_ratios = [u / c for u, c in zip(cpu["uncapped"], cpu["capped"], strict=True)]
        rows.append({
            "batch_size": batch,
            "uncapped_tok_s": tokens / statistics.median(times["uncapped"]),
            "capped_tok_s": tokens / statistics.median(times["capped"]),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "cpu_ratios": cpu_ratios,
            "times_s": times,
            "cpu_s": cpu,
        })
        print(f"batch {batch}: ratio {rows[-1]['ratio_median']:.3f} ({', '.join(f'{r:.3f}' for r in ratios)}); "
              f"CPU-time ratio {rows[-1]['cpu_ratio_median']:.3f}")

    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "capped_layers": layers, "percentile": percentile, "new_tokens": args.new_tokens, "reps": args.reps,
        "target_ratio": TARGET, "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_capping.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Capping throughput (capped ÷ uncapped tokens/s)", "",
        f"SmolLM2-135M-Instruct fp32 on {result['device']} ({result['threads']} threads), greedy, "
        f"{args.new_tokens} new tokens, capped layers {layers[0]}–{layers[-1]} at percentile {percentile:g}, "
        f"{args.reps} interleaved repetitions, medians. Target ratio >= {TARGET}.",
        "The CPU-time ratio (process CPU seconds, uncapped ÷ capped) is less sensitive to other load on a shared",
        "machine than wall-clock throughput.", "",
        "| batch | uncapped tok/s | capped tok/s | ratio (median of paired) | range | CPU-time ratio | meets target |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['batch_size']} | {r['uncapped_tok_s']:.2f} | {r['capped_tok_s']:.2f} | {r['ratio_median']:.3f} | "
              f"{min(r['ratios']):.3f}–{max(r['ratios']):.3f} | {r['cpu_ratio_median']:.3f} | "
              f"{'yes' if r['ratio_median'] >= TARGET else 'no'} |" for r in rows]
    (RESULTS / "bench_capping.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
