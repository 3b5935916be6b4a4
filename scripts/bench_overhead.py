"""Overhead of the training-time anchor, per method, of a probe step, and of the drift monitor at generation.

One run measures three things on the embedded SmolLM2-135M:

* **Methods.** Plain SFTTrainer against SFTTrainer + ``AnchorCallback(AnchorConfig(axis=..., method=[name]))``
  for every registered method, each with its ``AnchorConfig`` defaults. Every training run is a fresh process
  (forked from a server that has imported torch, transformers and TRL, so a run does not pay for the imports),
  so its peak memory is its own: ``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The
  configurations run in one order in even repetitions and in the reverse order in odd ones, so a slow drift of the
  machine hits them alike. The step time is the wall time between consecutive ``on_step_end`` events (callbacks
  included), the first ``--warmup`` steps dropped; the ratio of a repetition is the method's median step over the
  same repetition's plain median step, and the table gives the median over repetitions with their min–max.
  Methods that add a forward (a reference pass or a replayed batch: their classes override ``before_forward`` or
  ``step_loss``) are labelled so; the targets (≤ 1.02 time, ≤ 1.01 memory) are for the others. Methods that replay
  a batch cost several plain steps each, so they get fewer and shorter runs (``--replay-reps``,
  ``--replay-steps``): their ratio is far from 1 and the budget goes to the rows with a target.
* **A probe step.** ``floor`` with ``probe_every``: the probe steps' median minus the other steps' median, in
  seconds and over the plain step (shipped probes, ``AnchorConfig``'s probe defaults).
* **The monitor at generation.** ``anchor.chat.generate_replies`` against ``replies_with_projections`` (the same
  greedy replies, then ``monitor_many`` reads them at the report layer): generated tokens/s, batch 1 and 8,
  interleaved repetitions.

    python scripts/bench_overhead.py                           # CPU, 2 threads, fp32 (about 12 minutes)
    python scripts/bench_overhead.py --device cuda --dtype bf16

Writes ``scripts/results/bench_overhead_<device>.{json,md,png}`` with ``uptime`` at the start and the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from anchor.commands.options import at_least

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
TARGETS = {"time": 1.02, "memory": 1.01}
PRELOAD = ["torch", "transformers", "datasets", "trl", "anchor.callback", "anchor.chat"]
T = TypeVar("T")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every timed-training benchmark shares (this one and ``bench_anchor_cost.py``)."""
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU) or bf16")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, set in every process (CPU only)")
    p.add_argument("--axis", default=None, help="axis bundle (default: a prompt-mode axis computed once and cached)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--grad-accum", type=at_least(1, "at least 1 micro-batch per optimizer step"), default=1,
                   help="micro-batches per optimizer step (an anchor's once-per-step replayed batch is shared by them)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default 2 on CPU, 8 on GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 64 on CPU, 512 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 4 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of every run (1 / 5)")
    p.add_argument("--reps", type=int, default=3, help="runs per configuration, interleaved")
    p.add_argument("--replay-reps", type=int, default=2, help="runs of each method that replays a batch")
    p.add_argument("--replay-steps", type=int, default=None,
                   help="steps per run of a method that replays a batch (default: --steps on GPU, 2 on CPU)")
    p.add_argument("--methods", nargs="+", default=None, help="registered methods to time (default: all)")
    p.add_argument("--probe-every", type=int, default=2, help="probe_every of the probe-step run")
    p.add_argument("--probe-steps", type=int, default=4, help="steps of the probe-step run")
    p.add_argument("--monitor-reps", type=int, default=3)
    p.add_argument("--monitor-new-tokens", type=int, default=32)
    p.add_argument("--monitor-batch-sizes", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch_size = args.batch_size or (8 if gpu else 2)
    args.seq_len = args.seq_len or (512 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.replay_steps = args.replay_steps or (args.steps if gpu else 2)
    for name in ("steps", "replay_steps", "probe_steps"):
        if getattr(args, name) <= args.warmup:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} leaves no step after the "
                             f"--warmup={args.warmup} dropped ones; raise it.")
    if args.probe_steps < args.warmup + args.probe_every + 1:
        raise SystemExit(f"--probe-steps={args.probe_steps} must cover a probe step and another step after the "
                         f"warm-up: use at least {args.warmup + args.probe_every + 1}.")
    return args


# -- shared with bench_capping.py --------------------------------------------------------------------------------

def uptime() -> str:
    """``uptime``'s line: the load averages say whether a timing was taken on a quiet machine."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def spread(values: Sequence[float]) -> dict:
    """Median, min and max of per-repetition ratios (the values kept, so a reader can recompute)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def verdict(s: dict, target: float, bound: str) -> str:
    """Whether a ratio's spread meets ``target``; ``bound`` is "max" (a cost: ≤ target, and ≥ 1 since the arm does
    extra work) or "min" (a throughput: ≥ target, and ≤ 1). A spread across the target, or a median on the wrong
    side of 1 (the extra work measured as free), is the noise of the measurement, and said so."""
    ok = s["max"] <= target if bound == "max" else s["min"] >= target
    bad = s["min"] > target if bound == "max" else s["max"] < target
    wrong_side = s["median"] < 1 if bound == "max" else s["median"] > 1
    sign = "≤" if bound == "max" else "≥"
    if not ok and not bad:
        return f"noise-bound: the spread {s['min']:.3f}–{s['max']:.3f} straddles {sign} {target}"
    text = f"meets {sign} {target}" if ok else f"misses {sign} {target}"
    return text + (" (median on the wrong side of 1: noise-bound)" if wrong_side else "")


def fmt_batch(result: dict) -> str:
    """The trained batch of a result: per-device examples × tokens, and the micro-batches per optimizer step."""
    accum = result.get("grad_accum", 1)
    return (f"batch {result['batch_size']} × {result['seq_len']} tokens"
            + (f" × {accum} micro-batches per optimizer step" if accum > 1 else ""))


def fmt_spread(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def plot_ratio_bars(ax: object, labels: Sequence[str], spreads: Sequence[dict], target: float | None,
                    title: str, log: bool = False) -> None:
    """Median ratios as bars with min–max whiskers, a line at 1 and one at the target."""
    medians = [s["median"] for s in spreads]
    errors = [[m - s["min"] for m, s in zip(medians, spreads, strict=True)],
              [s["max"] - m for m, s in zip(medians, spreads, strict=True)]]
    ax.bar(range(len(labels)), [m - 1 for m in medians], bottom=1.0, yerr=errors, capsize=4, color="tab:blue",
           alpha=0.7)
    ax.axhline(1.0, color="0.3", lw=0.8)
    if target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target}")
        ax.legend(fontsize="small")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_title(title, fontsize="medium")
    if log:
        ax.set_yscale("log")
    else:
        low = min(s["min"] for s in spreads)
        high = max([s["max"] for s in spreads] + [target or 1.0])
        pad = max(0.01, (high - low) * 0.2)
        ax.set_ylim(min(low, 1.0) - pad, high + pad)


def save_figure(fig: object, path: Path) -> None:
    from anchor.io import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))


# -- training runs (each in a fresh process) ---------------------------------------------------------------------

EXTRA_FORWARDS = {"before_forward": "a reference pass", "step_loss": "a replayed batch"}


def extra_forward(name: str) -> str | None:
    """The forward a method runs besides the policy's own, from the hooks its class overrides: a reference pass over
    each micro-batch (``before_forward``), a replayed batch once per step (``step_loss``); None if neither."""
    from anchor.methods import AnchorMethod, get_method

    cls = get_method(name)
    kinds = [what for hook, what in EXTRA_FORWARDS.items() if getattr(cls, hook) is not getattr(AnchorMethod, hook)]
    return " and ".join(kinds) or None


def bench_axis(model_name: str, dtype: str, given: str | None = None) -> str:
    """``given``, checked, or a small prompt-mode axis (forward passes only) computed once and cached: overhead does
    not depend on the axis's quality."""
    from anchor.axis import AssistantAxis, compute_axis
    from anchor.models import cache_dir, fingerprint, load_model

    if given:
        AssistantAxis.from_pretrained(given)  # a clear error now, not in the first training process
        return given
    model, tokenizer = load_model(model_name, dtype=dtype)
    path = cache_dir() / "axes" / f"bench-{fingerprint(model)}"
    if not (path / "axis_config.json").is_file():
        axis = compute_axis(model, tokenizer, mode="prompt", n_roles=8, n_questions=8, progress=False)
        axis.save_pretrained(path)
    return str(path)


def dataset(seq_len: int, n: int):
    """Identical examples of at least ``seq_len`` tokens (cut to it by the trainer): every step has the same shapes."""
    from datasets import Dataset

    answer = "The capital of France is Paris, a city on the Seine known for its museums and cafes. "
    text = answer * max(1, seq_len // 16)
    return Dataset.from_list([{"messages": [{"role": "user", "content": "Tell me about Paris."},
                                            {"role": "assistant", "content": text}]}] * n)


class StepClock:
    """Wall time between consecutive ``on_step_end`` events, the first measured from ``on_train_begin`` (which runs
    after the anchor's own set-up, since the callback puts itself first)."""

    def __init__(self, sync: Callable[[], None] | None):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, *a, **k):
                clock.begin = clock.last = time.perf_counter()

            def on_step_end(self, *a, **k):
                if clock.sync is not None:
                    clock.sync()
                now = time.perf_counter()
                clock.times.append(now - clock.last)
                clock.last = now

        self.callback = _Callback()
        self.times: list[float] = []
        self.begin = self.last = 0.0
        self.sync = sync


def train_run(args: argparse.Namespace, axis_path: str, method: str | None, steps: int, probe_every: int = 0,
              fields: dict | None = None) -> dict:
    """Train ``steps`` steps, plain (``method`` None) or anchored with ``method`` (a registered name, or a label of
    the ``AnchorConfig`` ``fields``); return step times, set-up time and peak memory."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from anchor import load_model
    from anchor.callback import AnchorCallback, AnchorConfig

    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    clock = StepClock(torch.cuda.synchronize if gpu else None)
    callbacks = [clock.callback]
    if method is not None:
        settings = {"method": method, **(fields or {})}  # one name, or names joined by "+"
        callbacks.append(AnchorCallback(AnchorConfig(axis=axis_path, probe_every=probe_every, **settings)))
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-5,
            gradient_accumulation_steps=args.grad_accum,
            logging_steps=1000, report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
            use_cpu=not gpu, bf16=args.dtype == "bf16", max_length=args.seq_len, seed=0,
        )
        trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                             train_dataset=dataset(args.seq_len, steps * args.batch_size * args.grad_accum))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the anchor's own tokens per trained token over the run (AnchorCallback logs it with the trainer's last log)
    extra = [e["anchor/extra_tokens_ratio"] for e in trainer.state.log_history if "anchor/extra_tokens_ratio" in e]
    return {"method": method or "plain", "step_times": clock.times, "setup_s": clock.begin - started,
            "peak_bytes": peak, "threads": torch.get_num_threads(), "probe_every": probe_every,
            "extra_tokens_ratio": extra[-1] if extra else None}


def interleaved(order: Sequence[T], reps: int) -> Iterator[tuple[int, T]]:
    """``(repetition, item)`` pairs: ``order`` on even repetitions and reversed on odd ones, so a slow drift of the
    machine (heat, a neighbour's job) falls on every item alike instead of on whichever runs last."""
    for rep in range(reps):
        for item in (order if rep % 2 == 0 else order[::-1]):
            yield rep, item


def steady(run: dict, warmup: int) -> float:
    """Median step time after the warm-up steps."""
    return statistics.median(run["step_times"][warmup:])


def fresh_process_runner() -> Callable[..., dict]:
    """A function that runs ``fn(*args, **kwargs)`` in a fresh process (one task per process, forked from a server
    that has imported torch, transformers and TRL, so a run does not pay for the imports) and returns its result."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)

    def run(fn: Callable, *fn_args: object, **fn_kwargs: object) -> dict:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as executor:
            return executor.submit(fn, *fn_args, **fn_kwargs).result()

    return run


def method_overhead(args: argparse.Namespace, pool: Callable, axis_path: str, methods: list[str]) -> dict:
    """Every configuration in a fresh process, interleaved over repetitions; per-repetition ratios to plain."""
    extra = {name: extra_forward(name) for name in methods}
    replays = {name for name, what in extra.items() if what and "replayed batch" in what}
    order = ["plain", *sorted(methods, key=lambda m: (m in replays, extra[m] is not None, m))]
    runs: list[dict] = []
    for rep, name in interleaved(order, args.reps):
        if name in replays and rep >= args.replay_reps:
            continue
        run = pool(train_run, args, axis_path, None if name == "plain" else name,
                   args.replay_steps if name in replays else args.steps)
        runs.append({"rep": rep, **run})
        print(f"rep {rep} {name:12s} step {steady(run, args.warmup):.3f} s, set-up {run['setup_s']:.1f} s, "
              f"peak {run['peak_bytes'] / 2**20:.0f} MiB  [{uptime()}]", flush=True)
    plain = {r["rep"]: r for r in runs if r["method"] == "plain"}
    rows = []
    for name in order:
        mine = [r for r in runs if r["method"] == name]
        pairs = [(r, plain[r["rep"]]) for r in mine]
        rows.append({
            "method": name, "extra_forward": extra.get(name), "adds_forward": extra.get(name) is not None,
            "reps": len(mine),
            "step_s": statistics.median(steady(r, args.warmup) for r in mine),
            "first_step_s": statistics.median(r["step_times"][0] for r in mine),
            "setup_s": statistics.median(r["setup_s"] for r in mine),
            "peak_bytes": statistics.median(r["peak_bytes"] for r in mine),
            "time_ratio": spread([steady(r, args.warmup) / steady(p, args.warmup) for r, p in pairs]),
            "memory_ratio": spread([r["peak_bytes"] / p["peak_bytes"] for r, p in pairs]),
        })
    return {"order": order, "rows": rows, "runs": runs}


def probe_cost(args: argparse.Namespace, pool: Callable, axis_path: str, plain_step: float) -> dict:
    """One ``floor`` run with ``probe_every``: probe steps against the run's other steps after the warm-up."""
    run = pool(train_run, args, axis_path, "floor", args.probe_steps, args.probe_every)
    from anchor.config import AnchorConfig

    cfg = AnchorConfig()
    probe = [t for i, t in enumerate(run["step_times"], start=1) if i > args.warmup and i % args.probe_every == 0]
    other = [t for i, t in enumerate(run["step_times"], start=1) if i > args.warmup and i % args.probe_every]
    cost = statistics.median(probe) - statistics.median(other)
    return {"probe_every": args.probe_every, "probe_mode": cfg.probe_mode, "probes_per_domain": cfg.probes_per_domain,
            "probe_max_new_tokens": cfg.probe_max_new_tokens, "probe_batch_size": cfg.probe_batch_size,
            "probe_step_s": probe, "other_step_s": other, "cost_s": cost, "cost_over_plain_step": cost / plain_step,
            "baseline_setup_s": run["setup_s"], "run": run}


# -- the monitor at generation -------------------------------------------------------------------------------------

def monitor_overhead(args: argparse.Namespace, axis_path: str) -> list[dict]:
    """Generated tokens/s of greedy replies alone and with their projections read (interleaved, per batch size)."""
    import torch

    from anchor import AssistantAxis, load_model
    from anchor.chat import TurnDecoder, generate_replies, replies_with_projections
    from anchor.personas import load_probes
    from anchor.spans import encode_prompt

    gpu = args.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    axis = AssistantAxis.from_pretrained(axis_path)
    prompts = [p.prompt for p in load_probes() if p.domain in ("coding", "writing")]
    n = args.monitor_new_tokens
    arms = {"without": lambda c, b: generate_replies(model, tokenizer, c, n, b),
            "with": lambda c, b: [r for r, _ in replies_with_projections(model, tokenizer, axis, c, max_new_tokens=n,
                                                                           batch_size=b)]}
    rows = []
    for batch in args.monitor_batch_sizes:
        conversations = [[{"role": "user", "content": p}] for p in prompts[:batch]]
        # Warm-up, and the exact count of generated tokens: generate_replies runs this decoder on one batch.
        decoder = TurnDecoder(model, tokenizer, batch)
        tokens = sum(map(len, decoder.reply([encode_prompt(tokenizer, c) for c in conversations], n)))
        times: dict[str, list[float]] = {"without": [], "with": []}
        replies: dict[str, list[str]] = {}
        for _, arm in interleaved(("without", "with"), args.monitor_reps):
            start = time.perf_counter()
            replies[arm] = arms[arm](conversations, batch)
            if gpu:
                torch.cuda.synchronize()
            times[arm].append(time.perf_counter() - start)
        if replies["with"] != replies["without"]:
            raise RuntimeError("the monitor changed the replies: it must only read.")
        rows.append({
            "batch_size": batch, "tokens": tokens, "times_s": times,
            "tok_s": {arm: tokens / statistics.median(t) for arm, t in times.items()},
            "throughput_ratio": spread([w / m for w, m in zip(times["without"], times["with"], strict=True)]),
            "monitor_s": statistics.median(m - w for w, m in zip(times["without"], times["with"], strict=True)),
        })
        print(f"monitor batch {batch}: ratio {fmt_spread(rows[-1]['throughput_ratio'])}", flush=True)
    return rows


# -- main ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from anchor.methods import available_methods

    methods = args.methods or available_methods()
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {available_methods()}.")
    gpu = args.device.startswith("cuda")
    result: dict = {"command": "python " + " ".join([f"scripts/{Path(__file__).name}", *sys.argv[1:]]),
                    "uptime_at_start": uptime()}
    axis_path = bench_axis(args.model, args.dtype, args.axis)
    pool = fresh_process_runner()
    started = time.perf_counter()

    overhead = method_overhead(args, pool, axis_path, methods)
    plain_step = next(r["step_s"] for r in overhead["rows"] if r["method"] == "plain")
    probe = probe_cost(args, pool, axis_path, plain_step)
    print(f"probe step: {probe['cost_s']:.2f} s ({probe['cost_over_plain_step']:.2f} plain steps)", flush=True)
    monitor = pool(monitor_overhead, args, axis_path)
    import torch

    threads = overhead["runs"][0]["threads"]
    result.update({
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "threads": None if gpu else threads, "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum, "steps": args.steps,
        "replay_steps": args.replay_steps, "warmup": args.warmup, "reps": args.reps,
        "replay_reps": args.replay_reps, "axis": axis_path,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS of a fresh process (ru_maxrss)",
        "targets": TARGETS, "methods": overhead["rows"], "probe": probe, "monitor": monitor,
        "monitor_new_tokens": args.monitor_new_tokens, "monitor_reps": args.monitor_reps,
        "seconds": round(time.perf_counter() - started, 1), "uptime_at_end": uptime(), "runs": overhead["runs"],
    })
    write(result, Path(args.out), "cuda" if gpu else "cpu")
    return 0


def method_verdicts(row: dict) -> str:
    if row["method"] == "plain":
        return "reference"
    if row["adds_forward"]:
        return f"adds {row['extra_forward']}: no target"
    return "; ".join(f"{kind} {verdict(row[f'{kind}_ratio'], TARGETS[kind], 'max')}" for kind in TARGETS)


def monitor_note(row: dict) -> str:
    """The monitor only adds work, so a throughput ratio above 1 is noise, and one whose spread reaches 1 is too."""
    s = row["throughput_ratio"]
    if s["median"] > 1:
        return "noise-bound: faster with the monitor's extra work"
    return "noise-bound: the spread reaches 1" if s["max"] >= 1 else f"{(1 / s['median'] - 1) * 100:.1f}% slower"


def write(result: dict, out: Path, device: str) -> None:
    from anchor.io import atomic_write_json, atomic_write_text

    stem = out / f"bench_overhead_{device}"
    atomic_write_json(stem.with_suffix(".json"), result)
    mib = 2**20
    rows = ["| method | extra forward | step (s) | time ratio: median (min–max) | peak memory (MiB) | "
            "memory ratio: median (min–max) | first step (s) | set-up (s) | runs | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["methods"]:
        rows.append(f"| `{r['method']}` | {r['extra_forward'] or 'no'} | {r['step_s']:.3f} | "
                    f"{fmt_spread(r['time_ratio'])} | {r['peak_bytes'] / mib:.0f} | {fmt_spread(r['memory_ratio'])} | "
                    f"{r['first_step_s']:.2f} | {r['setup_s']:.1f} | {r['reps']} | {method_verdicts(r)} |")
    p = result["probe"]
    probe_rows = ["| probe step (s) | other steps (s) | cost of a probe step (s) | cost ÷ plain step | set-up with "
                  "the step-0 probe baseline (s) |", "|---|---|---|---|---|",
                  f"| {', '.join(f'{t:.2f}' for t in p['probe_step_s'])} | "
                  f"{', '.join(f'{t:.2f}' for t in p['other_step_s'])} | {p['cost_s']:.2f} | "
                  f"{p['cost_over_plain_step']:.2f} | {p['baseline_setup_s']:.1f} |"]
    monitor_rows = ["| batch | tokens | tok/s without | tok/s with monitor | throughput ratio: median (min–max) | "
                    "monitor (s per call) | note |", "|---|---|---|---|---|---|---|"]
    monitor_rows += [f"| {m['batch_size']} | {m['tokens']} | {m['tok_s']['without']:.1f} | {m['tok_s']['with']:.1f} | "
                     f"{fmt_spread(m['throughput_ratio'])} | {m['monitor_s']:.3f} | {monitor_note(m)} |"
                     for m in result["monitor"]]
    cheap = [r for r in result["methods"] if r["method"] != "plain" and not r["adds_forward"]]
    noisy = [r["method"] for r in cheap if "noise-bound" in method_verdicts(r)]
    missed = [r["method"] for r in cheap if "misses" in method_verdicts(r)]
    notes = []
    if noisy:
        notes.append(f"**Noise-bound:** {', '.join(f'`{m}`' for m in noisy)}: the spread of the per-repetition ratios "
                     "crosses the target, or the extra work measured as faster than none; this machine's noise is "
                     "larger than the difference, so these rows neither meet nor miss the target.")
    if missed:
        notes.append(f"**Missed:** {', '.join(f'`{m}`' for m in missed)}: every repetition is above the target.")
    text = [
        f"# Anchor overhead ({device})", "",
        f"`{result['command']}`, {result['seconds']} s. Uptime at start: `{result['uptime_at_start']}`; at end: "
        f"`{result['uptime_at_end']}`.", "",
        f"SFTTrainer on `{result['model']}` ({result['dtype']}), {fmt_batch(result)}, device {result['device']}"
        + (f", torch threads {result['threads']}" if result["threads"] else "")
        + f", torch {result['torch']}. Each training run is a fresh process; configurations interleaved, the order "
        f"reversed every other repetition. {result['reps']} runs of {result['steps']} steps per configuration "
        f"({result['replay_reps']} runs of {result['replay_steps']} steps for methods that replay a batch), the first "
        f"{result['warmup']} step(s) dropped. Ratios are per repetition against the same repetition's plain run; the "
        f"table gives their median and min–max. Memory: {result['peak_memory_kind']}. Targets (methods without an "
        f"extra forward): time ≤ {TARGETS['time']}, memory ≤ {TARGETS['memory']}. Every method uses its "
        "`AnchorConfig` defaults; *first step* includes an on-policy method's first sampling (`replay`, `kl` sample "
        "again every `replay_refresh_steps` = 10 steps), *set-up* the anchor's start (axis, frozen reference, "
        "`lm_replay`'s pool of base answers).", "",
        *rows, "", *[line for note in notes for line in (note, "")],
        f"## A probe step (`floor`, `probe_every={p['probe_every']}`)", "",
        f"{p['probe_mode']} probes, the shipped set (probes_per_domain={p['probes_per_domain']}), "
        f"{p['probe_max_new_tokens']} tokens per answer, batch {p['probe_batch_size']}. The cost is the probe steps' "
        "median minus the other steps' median; a run probing every N steps pays about cost ÷ N per step.", "",
        *probe_rows, "",
        "## The monitor at generation", "",
        f"Greedy replies of up to {result['monitor_new_tokens']} tokens to coding and writing probes: "
        "`generate_replies` against `replies_with_projections` (the same replies, then `monitor_many` reads them "
        "teacher-forced at the report layer, stopping there). Tokens: the replies' generated tokens; "
        f"{result['monitor_reps']} interleaved repetitions; ratio = tok/s with ÷ without, per repetition.", "",
        *monitor_rows, "",
        "Plot: `bench_overhead_" + device + ".png`.",
    ]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(text) + "\n")
    plot(result, stem.with_suffix(".png"))
    print("\n".join([*rows, "", *probe_rows, "", *monitor_rows]))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r for r in result["methods"] if r["method"] != "plain"]
    cheap = [r for r in methods if not r["adds_forward"]]
    heavy = [r for r in methods if r["adds_forward"]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), gridspec_kw={"width_ratios": [len(cheap) or 1, len(cheap) or 1,
                                                                                   len(heavy) or 1, 2]})
    plot_ratio_bars(axes[0], [r["method"] for r in cheap], [r["time_ratio"] for r in cheap], TARGETS["time"],
                    "step time ÷ plain (no extra forward)")
    plot_ratio_bars(axes[1], [r["method"] for r in cheap], [r["memory_ratio"] for r in cheap], TARGETS["memory"],
                    "peak memory ÷ plain (no extra forward)")
    if heavy:
        plot_ratio_bars(axes[2], [f"{r['method']} (t)" for r in heavy] + [f"{r['method']} (m)" for r in heavy],
                        [r["time_ratio"] for r in heavy] + [r["memory_ratio"] for r in heavy], None,
                        "adds a forward: time (t), memory (m)", log=True)
    plot_ratio_bars(axes[3], [f"batch {m['batch_size']}" for m in result["monitor"]],
                    [m["throughput_ratio"] for m in result["monitor"]], None, "monitor: tok/s ratio")
    fig.suptitle(f"anchor overhead, {result['device']}; whiskers: min–max over repetitions", fontsize="medium")
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
