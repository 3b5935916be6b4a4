"""What the recommended anchor costs per optimizer step, and how the replayed batch's size and frequency buy it down.

The default anchor (``AnchorConfig()``: preventative steering plus KL to the base model) adds, once per optimizer
step, the forward and backward of a replayed batch: ``replay_batch_size`` answers the model sampled itself (up to
``replay_max_new_tokens`` tokens each, plus their prompts), and the base model's forward on them once per sample;
every ``replay_refresh_steps`` steps it samples them again. Steering itself adds no forward. So its cost over a plain
step is roughly the replayed tokens over the trained tokens, plus the sampling at its share, and falls with a
smaller ``replay_batch_size`` or a larger ``replay_every`` (the replayed batch on every Nth step only, counted N
times). The former default, preventative + LM replay, replays fixed answers and samples nothing during training;
it is timed beside it.

Each configuration below trains ``--steps`` steps in a fresh process (``bench_overhead.train_run``), interleaved,
the order reversed every other repetition. The step time is the **mean** over the steps after ``--warmup``, not
the median: with ``replay_every`` = N only one step in N carries the replayed batch, and only one in
``replay_refresh_steps`` samples, and a median would hide both. The timed steps (``--steps`` − ``--warmup``) must be
whole cycles of both (checked). The ratio of a repetition is the configuration's mean step over the same
repetition's plain mean step.

    python scripts/bench_anchor_cost.py                      # CPU: batch 4 × 128 tokens, about 25 minutes
    python scripts/bench_anchor_cost.py --grad-accum 4 --configs "default (KL on 8 answers every step)" --tag ga4
    python scripts/bench_anchor_cost.py --configs "default (KL on 8 answers every step)" replay_batch_size=4 \
        replay_every=2 --tag halved                    # the two ways to halve the replayed tokens per step
    python scripts/bench_anchor_cost.py --device cuda --batch-size 8 --seq-len 512

The replayed batch runs once per *optimizer* step, so gradient accumulation (``--grad-accum``) spreads it over more
trained tokens. Writes ``scripts/results/bench_anchor_cost_<device>[_<tag>].{json,md,png}`` with ``uptime`` at the
start and the end; a result of another batch shape, model or precision is not overwritten (pass ``--tag``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import (  # the shared timing helpers of the overhead benchmark
    add_run_args,
    bench_axis,
    fmt_batch,
    fmt_spread,
    fresh_process_runner,
    interleaved,
    plot_ratio_bars,
    save_figure,
    spread,
    train_run,
    uptime,
)

# label -> AnchorConfig fields on top of its defaults (None: plain training)
CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "default (KL on 8 answers every step)": {},
    "replay_batch_size=4": {"replay_batch_size": 4},
    "replay_every=2": {"replay_every": 2},
    "replay_batch_size=1": {"replay_batch_size": 1},
    "replay_every=5": {"replay_every": 5},
    "replay_every=10": {"replay_every": 10},
    "preventative + lm_replay": {"method": ["preventative", "lm_replay"]},
    "preventative + lm_replay, replay_every=10": {"method": ["preventative", "lm_replay"], "replay_every": 10},
}
TARGET = 1.2  # the recommended default should cost at most this many plain steps


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="per-device training batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training example")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every run")
    p.add_argument("--reps", type=int, default=2, help="runs per configuration, interleaved")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to time (plain is always included)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    timed = args.steps - args.warmup
    for label in args.configs:
        every = cycle(CONFIGS[label])
        if timed < every or timed % every:
            raise SystemExit(f"--steps {args.steps} - --warmup {args.warmup} = {timed} timed steps is not a whole "
                             f"number of replay cycles of {label!r}; use a multiple of {every}.")
    check_not_overwriting(args)
    return args


SHAPE = {"model": None, "dtype": None, "batch_size": None, "seq_len": None, "grad_accum": 1}
"""The settings a result is measured at, with the value a result written before the setting existed was run at."""


def device_kind(args: argparse.Namespace) -> str:
    return "cuda" if args.device.startswith("cuda") else "cpu"


def result_stem(args: argparse.Namespace) -> Path:
    return Path(args.out) / (f"bench_anchor_cost_{device_kind(args)}" + (f"_{args.tag}" if args.tag else ""))


def check_not_overwriting(args: argparse.Namespace) -> None:
    """Refuse, before any training, to replace a result measured at another batch shape, model or precision."""
    path = result_stem(args)
    if not path.with_suffix(".json").is_file():
        return
    earlier = json.loads(path.with_suffix(".json").read_text())
    differ = [k for k, unrecorded in SHAPE.items() if earlier.get(k, unrecorded) != getattr(args, k)]
    if differ:
        raise SystemExit(f"{path.with_suffix('.json')} was measured with other settings ({', '.join(differ)}) and "
                         "would be overwritten. Pass --tag NAME to write beside it, or --out DIR.")


def cycle(fields: dict | None) -> int:
    """Steps after which a configuration's per-step costs repeat: ``replay_every``, and for a method that samples
    its batch during training (kl, replay) the resampling period too."""
    if fields is None:
        return 1
    from anchor.config import AnchorConfig
    from anchor.methods import get_method
    from anchor.methods.base import OnPolicyMethod

    config = AnchorConfig(**fields)
    on_policy = any(issubclass(get_method(name), OnPolicyMethod) for name in config.method)
    return math.lcm(config.replay_every, config.replay_refresh_steps) if on_policy else config.replay_every


def mean_step(run: dict, warmup: int) -> float:
    """Mean step time after the warm-up (whole replay cycles, so the replayed steps count at their share)."""
    return statistics.fmean(run["step_times"][warmup:])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    labels = ["plain", *[c for c in args.configs if c != "plain"]]
    result: dict = {"command": "python " + " ".join([f"scripts/{Path(__file__).name}", *sys.argv[1:]]),
                    "uptime_at_start": uptime()}
    axis_path = bench_axis(args.model, args.dtype, args.axis)
    pool = fresh_process_runner()
    started = time.perf_counter()

    from anchor.config import AnchorConfig

    composition = "+".join(AnchorConfig().method)
    runs: list[dict] = []
    for rep, label in interleaved(labels, args.reps):
        fields = CONFIGS[label]
        run = pool(train_run, args, axis_path, None if fields is None else composition, args.steps, fields=fields)
        runs.append({"rep": rep, "label": label, **run})
        print(f"rep {rep} {label:32s} mean step {mean_step(run, args.warmup):.3f} s, set-up {run['setup_s']:.1f} s"
              f"  [{uptime()}]", flush=True)
    plain = {r["rep"]: r for r in runs if r["label"] == "plain"}
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        rows.append({
            "config": label, "fields": CONFIGS[label],
            "step_s": statistics.median(mean_step(r, args.warmup) for r in mine),
            "setup_s": statistics.median(r["setup_s"] for r in mine),
            "time_ratio": spread([mean_step(r, args.warmup) / mean_step(plain[r["rep"]], args.warmup) for r in mine]),
            "extra_tokens_ratio": mine[0].get("extra_tokens_ratio"),  # the same data and seed in every repetition
            "reps": len(mine),
        })
    import torch

    gpu = args.device.startswith("cuda")
    result.update({
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "threads": None if gpu else runs[0]["threads"], "torch": torch.__version__, "model": args.model,
        "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
        "steps": args.steps,
        "warmup": args.warmup, "reps": args.reps, "axis": axis_path, "target": TARGET, "rows": rows,
        "seconds": round(time.perf_counter() - started, 1), "uptime_at_end": uptime(),
        "runs": [{k: v for k, v in r.items() if k != "peak_bytes"} for r in runs],
    })
    write(result, result_stem(args), device_kind(args))
    return 0


def verdict(row: dict) -> str:
    s = row["time_ratio"]
    if row["fields"] is None:
        return "reference"
    if s["max"] <= TARGET:
        return f"meets ≤ {TARGET}"
    if s["min"] > TARGET:
        return f"misses ≤ {TARGET}"
    return f"noise-bound: {s['min']:.2f}–{s['max']:.2f} straddles {TARGET}"


def fmt_extra(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def write(result: dict, stem: Path, device: str) -> None:
    from anchor.config import AnchorConfig
    from anchor.io import atomic_write_json, atomic_write_text

    atomic_write_json(stem.with_suffix(".json"), result)
    default = AnchorConfig()
    table = ["| configuration | AnchorConfig fields | mean step (s) | time ratio: median (min–max) | anchor's tokens "
             "per trained token | set-up (s) | runs | verdict |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['config']} | {json.dumps(r['fields']) if r['fields'] is not None else '-'} | {r['step_s']:.3f} | "
              f"{fmt_spread(r['time_ratio'])} | {fmt_extra(r.get('extra_tokens_ratio'))} | {r['setup_s']:.1f} | "
              f"{r['reps']} | {verdict(r)} |" for r in result["rows"]]
    text = [
        f"# The recommended anchor's cost per step ({device})", "",
        f"`{result['command']}`, {result['seconds']} s. Uptime at start: `{result['uptime_at_start']}`; at end: "
        f"`{result['uptime_at_end']}`.", "",
        f"SFTTrainer on `{result['model']}` ({result['dtype']}), {fmt_batch(result)}, device {result['device']}"
        + (f", torch threads {result['threads']}" if result["threads"] else "")
        + f", torch {result['torch']}. Anchor: `AnchorConfig()` = {' + '.join(default.method)} (replay "
        f"{default.replay_batch_size} answers of ≤ {default.replay_max_new_tokens} tokens, steering k "
        f"{default.steer_coefficient}), with the fields shown changed. {result['reps']} interleaved runs of "
        f"{result['steps']} steps per configuration, each a fresh process; the step time is the mean after the first "
        f"{result['warmup']} step(s), so a replayed step counts at its share; ratios per repetition against the same "
        f"repetition's plain run. Target: ≤ {TARGET}× a plain step.", "",
        *table, "",
        "The cost is about the replayed tokens over the trained tokens per step (plus, for KL, one sampling of the "
        "replayed answers every `replay_refresh_steps` steps): it is larger for short training sequences (as here) "
        "than for long ones, and falls with `replay_every` = N. The anchor's tokens per trained token is the "
        "callback's `anchor/extra_tokens_ratio` over the run (— where the run predates it, or plain): a step "
        "costs about 1 + that, plus the sampling.", "",
        f"Plot: `{stem.with_suffix('.png').name}`.",
    ]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(text) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    anchored = [r for r in result["rows"] if r["fields"] is not None]
    plot_ratio_bars(ax, [r["config"] for r in anchored], [r["time_ratio"] for r in anchored], TARGET,
                    f"step time ÷ plain, {fmt_batch(result)} ({device})")
    save_figure(fig, stem.with_suffix(".png"))
    plt.close(fig)
    print("\n".join(table))


if __name__ == "__main__":
    raise SystemExit(main())
