"""Generation throughput with capping over without, on the embedded SmolLM2-135M.

Greedy generation of exactly ``--new-tokens`` tokens (min = max, so both arms produce the same token count) at
batch sizes 1 and 8. Capped and uncapped runs alternate within each repetition (and swap order every
repetition) so machine noise hits both arms alike; the reported ratio is the median over repetitions of
capped tokens/s ÷ uncapped tokens/s, with the min–max of those paired ratios. Target: >= 0.95. Capping only adds
work, so a ratio above 1 is noise, and the note says so.

    python scripts/bench_capping.py [--axis DIR] [--reps 6] [--new-tokens 64] [--threads 2]

Without ``--axis`` it uses the cached prompt-mode axis of ``bench_overhead.py`` (computed once): throughput does
not depend on the axis's quality. Writes ``scripts/results/bench_capping.{json,md,png}`` with ``uptime`` at the
start and the end.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_overhead import (
    bench_axis,
    fmt_spread,
    interleaved,
    plot_ratio_bars,
    save_figure,
    spread,
    uptime,
    verdict,
)

from anchor.axis import AssistantAxis
from anchor.capping import attach_cap
from anchor.io import atomic_write_json, atomic_write_text
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
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}: the arms would differ.")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--axis", help="axis bundle for the embedded model (default: bench_overhead's cached one)")
    parser.add_argument("--reps", type=int, default=6, help="repetitions (even: each arm goes first equally often)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.reps < 2:
        raise SystemExit(f"--reps={args.reps}: use at least 2, so each arm goes first once.")

    started_at = uptime()
    started = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    axis = AssistantAxis.from_pretrained(bench_axis("smollm2", "fp32", args.axis))
    model, tokenizer = load_model("smollm2", device=args.device)
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
        for _, arm in interleaved(("uncapped", "capped"), args.reps):
            handle = attach_cap(model, axis) if arm == "capped" else None
            wall, used = _generate(model, tokenizer, ids, mask, args.new_tokens)
            times[arm].append(wall)
            cpu[arm].append(used)
            if handle:
                handle.detach()
        tokens = batch * args.new_tokens
        ratio = spread([u / c for u, c in zip(times["uncapped"], times["capped"], strict=True)])
        rows.append({
            "batch_size": batch,
            "uncapped_tok_s": tokens / statistics.median(times["uncapped"]),
            "capped_tok_s": tokens / statistics.median(times["capped"]),
            "ratio": ratio,
            "cpu_ratio": spread([u / c for u, c in zip(cpu["uncapped"], cpu["capped"], strict=True)]),
            "verdict": verdict(ratio, TARGET, "min"),
            "times_s": times,
            "cpu_s": cpu,
        })
        print(f"batch {batch}: ratio {fmt_spread(ratio)}; CPU-time ratio {fmt_spread(rows[-1]['cpu_ratio'])}; "
              f"{rows[-1]['verdict']}", flush=True)

    result = {
        "command": "python " + " ".join(["scripts/bench_capping.py", *sys.argv[1:]]),
        "uptime_at_start": started_at, "uptime_at_end": uptime(), "seconds": round(time.perf_counter() - started, 1),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "capped_layers": layers, "percentile": percentile, "new_tokens": args.new_tokens, "reps": args.reps,
        "target_ratio": TARGET, "rows": rows,
    }
    write(result)


def write(result: dict) -> None:
    atomic_write_json(RESULTS / "bench_capping.json", result)
    rows = result["rows"]
    layers = result["capped_layers"]
    table = [
        "| batch | uncapped tok/s | capped tok/s | ratio: median of paired (min–max) | CPU-time ratio (min–max) | "
        "verdict |", "|---|---|---|---|---|---|",
        *(f"| {r['batch_size']} | {r['uncapped_tok_s']:.1f} | {r['capped_tok_s']:.1f} | {fmt_spread(r['ratio'])} | "
          f"{fmt_spread(r['cpu_ratio'])} | {r['verdict']} |" for r in rows),
    ]
    noisy = [str(r["batch_size"]) for r in rows if "noise-bound" in r["verdict"]]
    lines = [
        "# Capping throughput (capped ÷ uncapped tokens/s)", "",
        f"`{result['command']}`, {result['seconds']} s. Uptime at start: `{result['uptime_at_start']}`; at end: "
        f"`{result['uptime_at_end']}`.", "",
        f"SmolLM2-135M-Instruct fp32 on {result['device']} ({result['threads']} torch threads), greedy, "
        f"{result['new_tokens']} new tokens, capped layers {layers[0]}–{layers[-1]} at percentile "
        f"{result['percentile']:g}, {result['reps']} interleaved repetitions (the order swapped every repetition); "
        f"each repetition gives one paired ratio. Target ratio ≥ {result['target_ratio']}. The CPU-time ratio "
        "(process CPU seconds, uncapped ÷ capped) is less sensitive to other load on a shared machine than "
        "wall-clock throughput.", "",
        *table, "",
    ]
    if noisy:
        lines += [f"**Noise-bound** at batch {', '.join(noisy)}: capping only adds work, so a ratio above 1, or a "
                  "spread across the target, is this machine's noise and not a measured cost or gain.", ""]
    lines.append("Plot: `bench_capping.png`.")
    atomic_write_text(RESULTS / "bench_capping.md", "\n".join(lines) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    plot_ratio_bars(ax, [f"batch {r['batch_size']}" for r in rows], [r["ratio"] for r in rows],
                    result["target_ratio"], "capped ÷ uncapped tok/s (min–max)")
    save_figure(fig, RESULTS / "bench_capping.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
