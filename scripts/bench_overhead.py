"""Overhead of the training-time anchor: step time and peak memory of anchored vs plain SFTTrainer runs.

Same model, data, batch and settings; the only difference is the AnchorCallback (``floor`` at its default layers,
no probes). Runs alternate plain / anchored inside one process, several repetitions each, and the first steps of
every run are dropped as warm-up. The step time is the wall time between consecutive ``on_step_end`` events, so it
covers everything the trainer does per step, callbacks included. Peak memory is ``torch.cuda.max_memory_allocated``
per run on a GPU; on the CPU it is the peak RSS (``ru_maxrss``) of a fresh subprocess per run, since RSS never
goes down within a process.

    python scripts/bench_overhead.py                           # CPU, embedded SmolLM2-135M, fp32
    python scripts/bench_overhead.py --device cuda --dtype bf16

Writes ``scripts/results/bench_overhead_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
TARGETS = {"time": 1.02, "memory": 1.01}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU) or bf16")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default 1 on CPU, 8 on GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 32 on CPU, 512 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of every run (1 / 5)")
    p.add_argument("--reps", type=int, default=3, help="runs per configuration, interleaved")
    p.add_argument("--method", default="floor")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--axis", default=None, help="axis bundle (default: a prompt-mode axis computed once and cached)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--memory-worker", choices=("plain", "anchored"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch_size = args.batch_size or (8 if gpu else 1)
    args.seq_len = args.seq_len or (512 if gpu else 32)
    args.steps = args.steps or (20 if gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def bench_axis(args: argparse.Namespace, model, tokenizer) -> str:
    """A small prompt-mode axis (forward passes only): overhead does not depend on the axis's quality."""
    from anchor.axis import AssistantAxis, compute_axis
    from anchor.models import cache_dir, fingerprint

    if args.axis:
        return args.axis
    path = cache_dir() / "axes" / f"bench-{fingerprint(model)}"
    if not (path / "axis_config.json").is_file():
        axis = compute_axis(model, tokenizer, mode="prompt", n_roles=8, n_questions=8, progress=False)
        axis.save_pretrained(path)
    AssistantAxis.from_pretrained(path)
    return str(path)


def dataset(tokenizer, seq_len: int, n: int):
    """Identical examples of about ``seq_len`` tokens, so every step has the same shapes."""
    from datasets import Dataset

    answer = "The capital of France is Paris, a city on the Seine known for its museums and cafes. "
    text = answer * max(1, seq_len // 16)
    return Dataset.from_list([{"messages": [{"role": "user", "content": "Tell me about Paris."},
                                            {"role": "assistant", "content": text}]}] * n)


class StepClock:
    """Wall time between consecutive ``on_step_end`` events (the first is measured from ``on_train_begin``)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, *a, **k):
                clock.last = time.perf_counter()

            def on_step_end(self, *a, **k):
                if clock.sync is not None:
                    clock.sync()
                now = time.perf_counter()
                clock.times.append(now - clock.last)
                clock.last = now

        self.callback = _Callback()
        self.times: list[float] = []
        self.last = 0.0
        self.sync = None


def run_once(args: argparse.Namespace, anchored: bool, axis_path: str) -> dict:
    """Train ``args.steps`` steps; return step times and peak memory of this run."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from anchor import load_model
    from anchor.callback import AnchorCallback, AnchorConfig

    gpu = args.device.startswith("cuda")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    clock = StepClock()
    clock.sync = torch.cuda.synchronize if gpu else None
    callbacks = [clock.callback]
    if anchored:
        callbacks.append(AnchorCallback(AnchorConfig(axis=axis_path, method=args.method, weight=1.0)))
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-5,
            logging_steps=10, report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
            use_cpu=not gpu, bf16=args.dtype == "bf16", max_length=args.seq_len, seed=0,
        )
        trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks,
                             train_dataset=dataset(tokenizer, args.seq_len, args.steps * args.batch_size))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if gpu else None
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    return {"anchored": anchored, "step_times": clock.times[args.warmup:], "peak_bytes": peak}


def cpu_peak_rss(args: argparse.Namespace, anchored: bool, axis_path: str) -> int:
    """Peak RSS in bytes of a fresh process that loads the model and trains (one configuration)."""
    command = [sys.executable, __file__, "--memory-worker", "anchored" if anchored else "plain", "--axis", axis_path,
               "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(max(3, args.steps // 2)),
               "--method", args.method]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        run_once(args, args.memory_worker == "anchored", args.axis)
        print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return 0

    from anchor import load_model
    from anchor.loss import default_layers

    gpu = args.device.startswith("cuda")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    axis_path = bench_axis(args, model, tokenizer)
    from anchor.axis import AssistantAxis

    layers = default_layers(AssistantAxis.from_pretrained(axis_path))
    del model
    started = time.perf_counter()
    runs = []
    for rep in range(args.reps):
        for anchored in ((False, True) if rep % 2 == 0 else (True, False)):  # alternate who goes first
            runs.append({"rep": rep, **run_once(args, anchored, axis_path)})
            label = "anchored" if anchored else "plain"
            print(f"rep {rep} {label:8s} median step {statistics.median(runs[-1]['step_times']):.4f} s", flush=True)
    if not gpu:
        for run in runs:
            run["peak_bytes"] = None
        memory = {"plain": [], "anchored": []}
        for rep in range(2):
            for anchored in ((False, True) if rep % 2 == 0 else (True, False)):
                memory["anchored" if anchored else "plain"].append(cpu_peak_rss(args, anchored, axis_path))
        peak = {k: min(v) for k, v in memory.items()}
    else:
        peak = {k: max(r["peak_bytes"] for r in runs if r["anchored"] == (k == "anchored"))
                for k in ("plain", "anchored")}

    def times(anchored: bool) -> list[float]:
        return [t for r in runs if r["anchored"] == anchored for t in r["step_times"]]

    per_rep = [statistics.median(a["step_times"]) / statistics.median(p["step_times"])
               for a in runs if a["anchored"] for p in runs if not p["anchored"] and p["rep"] == a["rep"]]
    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                           f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.model, "dtype": args.dtype, "method": args.method, "layers": layers,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "reps": args.reps, "seconds": round(time.perf_counter() - started, 1),
        "median_step_s": {"plain": statistics.median(times(False)), "anchored": statistics.median(times(True))},
        "time_ratio": statistics.median(times(True)) / statistics.median(times(False)),
        "time_ratio_per_rep": per_rep,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS of a fresh process (ru_maxrss)",
        "memory_ratio": peak["anchored"] / peak["plain"],
        "targets": TARGETS,
        "runs": runs,
    }
    write(result, Path(args.out), "cuda" if gpu else "cpu")
    return 0


def write(result: dict, out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_overhead_{device}.json").write_text(json.dumps(result, indent=1))
    ok = {k: result[f"{k}_ratio"] <= v for k, v in TARGETS.items()}
    rows = [
        "| | plain | anchored | ratio | target |",
        "|---|---|---|---|---|",
        f"| median step time (s) | {result['median_step_s']['plain']:.4f} | {result['median_step_s']['anchored']:.4f} "
        f"| {result['time_ratio']:.3f} | ≤ {TARGETS['time']} {'✓' if ok['time'] else '✗'} |",
        f"| peak memory (MiB) | {result['peak_memory_bytes']['plain'] / 2**20:.0f} | "
        f"{result['peak_memory_bytes']['anchored'] / 2**20:.0f} | {result['memory_ratio']:.3f} | "
        f"≤ {TARGETS['memory']} {'✓' if ok['memory'] else '✗'} |",
    ]
    text = [
        f"# Anchor overhead ({device})", "",
        f"SFTTrainer on `{result['model']}` ({result['dtype']}), batch {result['batch_size']} × {result['seq_len']} "
        f"tokens, method `{result['method']}` at layers {result['layers']}; {result['reps']} interleaved runs per "
        f"configuration, {result['steps']} steps each, first {result['warmup']} dropped. Device: {result['device']}, "
        f"torch {result['torch']}. Per-repetition time ratios: "
        f"{', '.join(f'{r:.3f}' for r in result['time_ratio_per_rep'])}. Memory: {result['peak_memory_kind']}.", "",
        *rows, "",
        f"Written by `scripts/bench_overhead.py` in {result['seconds']} s.",
    ]
    (out / f"bench_overhead_{device}.md").write_text("\n".join(text) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
