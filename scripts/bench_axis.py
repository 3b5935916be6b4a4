"""Benchmark: what an Assistant Axis costs on this machine, and how close a cheap one gets to the full one.

The reference is the full generate-mode axis of the embedded SmolLM2 (all 225 roles × 246 questions, 32 tokens),
computed once on a GPU and shipped in ``scripts/results/reference_axis``. Every number below is a cosine to it,
per layer, summarised over the middle third of the layers (mean and minimum), plus the Spearman correlation of the
role ordering at the report layer. Stages, each writing ``scripts/results/bench_axis_<stage>.json`` and ``.md``
(and a PNG where there is a plot):

    python scripts/bench_axis.py speed              # this extraction path against the previous one (git --base)
    python scripts/bench_axis.py pool               # per-answer means of a role pool × every question (resumable)
    python scripts/bench_axis.py variants           # timed real runs of named settings, interleaved repeats
    python scripts/bench_axis.py frontier           # cos vs seconds over roles × questions × tokens × mode
    python scripts/bench_axis.py reference --device cuda --out DIR   # the full axis (hours on a CPU)

``pool`` answers every shipped question for a seeded pool of roles and the default Assistant once, keeping each
answer's layer means after 3, 7, 15 and 31 fed tokens (what ``max_new_tokens`` 4, 8, 16 and 32 record: greedy
answers share their first tokens) and in prompt mode. ``frontier`` then draws many random subsets of roles and
questions from the pool, so every point has a spread over seeds, not one lucky draw, and prices each point with a
cost model fitted to the ``variants`` timings. Run timings only on an idle machine; each result records
``uptime`` and the process's CPU use per run (about 2 of 2 cores when nothing else ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import ClassVar
from unittest import mock

import torch
from bench_overhead import interleaved

import anchor.extract as ex
from anchor import AssistantAxis, compute_axis, load_model
from anchor.axis import _sample
from anchor.io import atomic_write, atomic_write_json, atomic_write_text
from anchor.personas import load_questions, load_roles
from anchor.spans import encode_prompt

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_DIR = RESULTS / "reference_axis"
REFERENCE = {"n_roles": None, "n_questions": None, "prompts_per_role": 1, "max_new_tokens": 32}
POOL_TOKENS = (4, 8, 16, 32)  # max_new_tokens values the pool answers stand for
BATCH = 128  # decoding SmolLM2 on 2 cores gains little past it (see the speed results)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    return {"host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "uptime_at_start": uptime()}


def timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    """``fn``'s result, wall seconds, and the cores it kept busy (process CPU seconds / wall seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    wall = time.perf_counter() - wall
    return out, wall, (time.process_time() - cpu) / wall


def middle(n_layers: int) -> range:
    return range(n_layers // 3, 2 * n_layers // 3)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def score(axis: torch.Tensor, role_vectors: torch.Tensor, roles: list[str], ref: AssistantAxis) -> dict:
    """Cosines of an axis ``[L, H]`` to the reference, and the role-order Spearman at the report layer."""
    cos = torch.nn.functional.cosine_similarity(axis.double(), ref.axis.double(), dim=-1)
    mid = cos[middle(ref.n_layers)]
    layer = ref.report_layer
    mine = role_vectors[:, layer].double() @ axis[layer].double()
    theirs = ref.role_projections(layer)[[ref.role_names.index(r) for r in roles]].double()
    return {"cos_middle_mean": round(float(mid.mean()), 4), "cos_middle_min": round(float(mid.min()), 4),
            "role_order_spearman": round(spearman(mine, theirs), 4) if len(roles) >= 3 else None,
            "cos_per_layer": [round(float(c), 4) for c in cos]}


# -- speed: this extraction path against the previous one -----------------------------------------------------


def previous_extract(base: str) -> types.ModuleType:
    """``anchor/extract.py`` as it was at git revision ``base``, importable beside the current one."""
    source = subprocess.run(["git", "show", f"{base}:anchor/extract.py"], capture_output=True, text=True,
                            check=True, cwd=RESULTS.parent.parent).stdout
    module = types.ModuleType(f"extract_{base}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{base}:anchor/extract.py", "exec"), module.__dict__)  # our own git history
    return module


def speed(args: argparse.Namespace) -> None:
    """Same personas, questions and settings through each path; arms interleaved so load hits them alike."""
    model, tokenizer = load_model("smollm2", device=args.device)
    roles = load_roles()
    names = _sample(list(roles), args.roles, 0, "roles")
    personas = [ex.Persona(ex.DEFAULT_KEY, ("",)), *[ex.Persona(n, (roles[n][0],)) for n in names]]
    questions = _sample(load_questions(), args.questions, 0, "questions")
    old = previous_extract(args.base)
    no_heads = mock.patch.object(ex, "_shared_head", lambda prompts: 0)
    arms = {
        f"previous ({args.base}), batch {args.old_batch}": (old.extract, old.ExtractionSettings, args.old_batch, None),
        f"new, batch {args.old_batch}": (ex.extract, ex.ExtractionSettings, args.old_batch, None),
        f"new without shared heads, batch {BATCH}": (ex.extract, ex.ExtractionSettings, BATCH, no_heads),
        f"new, batch {BATCH}": (ex.extract, ex.ExtractionSettings, BATCH, None),
        f"new, batch {2 * BATCH}": (ex.extract, ex.ExtractionSettings, 2 * BATCH, None),
    }
    result = {**machine(), "personas": len(personas), "questions": len(questions),
              "max_new_tokens": args.max_new_tokens, "answers": len(personas) * len(questions), "runs": {}}
    means = {}
    for _, name in interleaved(list(arms), args.repeats):
        run, settings_type, batch, patch = arms[name]
        settings = settings_type("generate", args.max_new_tokens, 0.0, batch, 0)
        with tempfile.TemporaryDirectory() as tmp, patch or contextlib.nullcontext():
            paths, wall, cores = timed(run, model, tokenizer, personas, questions, tmp, settings, progress=False)
            means[name] = torch.cat([ex.load_shard(p).means for p in paths])
        result["runs"].setdefault(name, []).append({"seconds": round(wall, 2), "cores": round(cores, 2)})
        print(f"{name:45s} {wall:6.1f} s  {cores:.2f} cores", flush=True)
    first = next(iter(means.values()))
    result["max_abs_diff_to_previous"] = max(float((m - first).abs().max()) for m in means.values())
    result["uptime_at_end"] = uptime()
    rows = [f"| {name} | {statistics.median(r['seconds'] for r in runs):.1f} | "
            f"{min(r['seconds'] for r in runs):.1f}–{max(r['seconds'] for r in runs):.1f} | "
            f"{result['answers'] / statistics.median(r['seconds'] for r in runs):.1f} | "
            f"{statistics.median(r['cores'] for r in runs):.2f} |" for name, runs in result["runs"].items()]
    md = [f"# bench_axis speed ({result['host']}, {result['threads']} threads)", "",
          f"`{' '.join(sys.argv)}`; uptime at start: `{result['uptime_at_start']}`.", "",
          f"{result['answers']} answers ({len(personas)} personas × {len(questions)} questions, "
          f"{args.max_new_tokens} new tokens), {args.repeats} interleaved repeats. Largest difference of any answer "
          f"mean from the previous path's: {result['max_abs_diff_to_previous']:.2e}.", "",
          "| path | median s | range | answers/s | cores busy |", "|---|---|---|---|---|", *rows]
    write(result, md, "speed")


# -- pool: per-answer means of a role pool × every question ---------------------------------------------------


class _Snapshots(ex._Recorder):
    """The extraction recorder, also keeping its running sums after 3, 7 and 15 recorded decode steps."""

    made: ClassVar[list[_Snapshots]] = []

    def __init__(self, n_samples: int, n_layers: int):
        super().__init__(n_samples, n_layers)
        self.steps, self.snaps = 0, {}
        _Snapshots.made.append(self)

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        super().__call__(layer, hidden)
        if self.rows is not None and layer == self.n_layers - 1:
            self.steps += 1
            if self.steps + 1 in POOL_TOKENS:
                self.snaps[self.steps + 1] = self.sums.clone()


def pool_answers(model, tokenizer, system: str, questions: list[str]) -> dict[str, torch.Tensor]:
    """One persona's pool entry: generate-mode means at each of POOL_TOKENS, their counts, prompt-mode means."""
    prompts = [encode_prompt(tokenizer, ex._messages(system, q)) for q in questions]
    shared = [ex._shared_head(prompts)] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    prompt_end = ex._generation_prompt_length(tokenizer)
    shape = (model.config.num_hidden_layers, model.config.hidden_size)
    gen = torch.zeros(len(prompts), len(POOL_TOKENS), *shape)
    counts = torch.zeros(len(prompts), len(POOL_TOKENS), dtype=torch.long)
    prompt = torch.zeros(len(prompts), *shape)
    for chunk in ex._even_batches(order, BATCH):
        batch, heads = [prompts[i] for i in chunk], [shared[i] for i in chunk]
        with mock.patch.object(ex, "_Recorder", _Snapshots):
            _, final_counts, _, _ = ex.run_batch(model, tokenizer, batch, ex.ExtractionSettings(max_new_tokens=32),
                                                 shared=heads)
        rec = _Snapshots.made.pop()
        for k, tokens in enumerate(POOL_TOKENS):
            sums = rec.snaps.get(tokens, rec.sums)  # every row stopped before this step: the final sums are it
            n = final_counts.clamp(max=tokens - 1)
            gen[chunk, k] = sums.cpu() / n.clamp(min=1)[:, None, None]
            counts[chunk, k] = n
        means, *_ = ex.run_batch(model, tokenizer, batch, ex.ExtractionSettings(mode="prompt"), prompt_end, heads)
        prompt[chunk] = means
    return {"generate": gen.half(), "counts": counts, "prompt": prompt.half()}


def pool(args: argparse.Namespace) -> None:
    """Fill ``--pool`` one persona file at a time; stops after ``--max-seconds`` so other jobs can take turns."""
    from safetensors.torch import save_file

    model, tokenizer = load_model("smollm2", device=args.device)
    roles = load_roles()
    names = _sample(list(roles), args.roles, args.seed, "roles")
    questions = load_questions()
    out = Path(args.pool)
    atomic_write_json(out / "pool.json", {"roles": names, "questions": len(questions), "tokens": list(POOL_TOKENS)})
    start = time.perf_counter()
    for name, system in [(ex.DEFAULT_KEY, ""), *[(n, roles[n][0]) for n in names]]:
        path = out / f"{name}.safetensors"
        if path.exists():
            continue
        tensors, wall, cores = timed(pool_answers, model, tokenizer, system, questions)
        atomic_write(path, lambda tmp, t=tensors: save_file(t, tmp))
        print(f"{name:28s} {wall:6.1f} s  {cores:.2f} cores", flush=True)
        if time.perf_counter() - start > args.max_seconds:
            return
    print("pool complete")


# -- variants: timed real runs ----------------------------------------------------------------------------------

VARIANTS = {
    "gen-r4-q24-t16": {"n_roles": 4, "n_questions": 24, "max_new_tokens": 16},  # the best cheap variant before
    "gen-r8-q246-t4": {"n_roles": 8, "n_questions": None, "max_new_tokens": 4},  # very short answers, all questions
    "gen-r8-q128-t8": {"n_roles": 8, "n_questions": 128, "max_new_tokens": 8},
    "gen-r16-q32-t16": {"n_roles": 16, "n_questions": 32, "max_new_tokens": 16},
    "gen-r4-q48-t32": {"n_roles": 4, "n_questions": 48, "max_new_tokens": 32},
    "gen-r6-q48-t32": {"n_roles": 6, "n_questions": 48, "max_new_tokens": 32},
    "gen-r4-q64-t32": {"n_roles": 4, "n_questions": 64, "max_new_tokens": 32},
    "gen-r8-q32-t32": {"n_roles": 8, "n_questions": 32, "max_new_tokens": 32},
    "gen-r8-q64-t32": {"n_roles": 8, "n_questions": 64, "max_new_tokens": 32},
    "gen-r8-q32-t8-p3": {"n_roles": 8, "n_questions": 32, "max_new_tokens": 8, "prompts_per_role": 3},
    "prompt-r16-q246": {"mode": "prompt", "n_roles": 16, "n_questions": None},  # prompt mode, all questions
}


def variant_settings(name: str) -> dict:
    """A named variant's compute_axis arguments; ``budget-N`` is what ``settings_for_budget(N)`` picks."""
    if name.startswith("budget-"):
        chosen = ex.settings_for_budget(float(name.split("-", 1)[1]))
        return {"mode": chosen.mode, "n_roles": chosen.n_roles, "n_questions": chosen.n_questions,
                "max_new_tokens": chosen.max_new_tokens, "prompts_per_role": chosen.prompts_per_role}
    return {"prompts_per_role": 1, **VARIANTS[name]}


def variants(args: argparse.Namespace) -> None:
    """Each variant's full compute_axis, timed; repeats interleaved (and reversed every other time), each repetition
    opening with a speed probe of the machine."""
    model, tokenizer = load_model("smollm2", device=args.device)
    ref = AssistantAxis.from_pretrained(REFERENCE_DIR)
    ref.check_compatible(model)
    names = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: first calls pay for lazy initialisation
        compute_axis(model, tokenizer, n_roles=2, n_questions=2, max_new_tokens=2, out_dir=tmp, progress=False)
    result = {**machine(), "batch_size": BATCH, "reference": str(REFERENCE_DIR.relative_to(RESULTS.parent.parent)),
              "middle_layers": [middle(ref.n_layers).start, middle(ref.n_layers).stop - 1], "variants": {}}
    earlier = RESULTS / "bench_axis_variants.json"
    if earlier.is_file():  # rows not re-timed now keep their earlier runs (each run records its own uptime)
        kept = json.loads(earlier.read_text())["variants"]
        result["earlier"] = {name: row for name, row in kept.items() if name not in names}
    probes: list[float] = result.setdefault("probe_seconds", [])
    for rep, name in interleaved(names, args.repeats):
        if len(probes) == rep:  # each repetition opens with a speed probe of the machine
            probes.append(round(ex.PROBE_SECONDS / ex.relative_speed(model, tokenizer), 3))
            print(f"speed probe {probes[-1]:.2f} s", flush=True)
        settings = variant_settings(name)
        with tempfile.TemporaryDirectory() as tmp:
            axis, wall, cores = timed(compute_axis, model, tokenizer, out_dir=tmp, batch_size=BATCH,
                                      progress=False, seed=args.seed, **settings)
        row = result["variants"].setdefault(name, {
            "settings": settings, "n_answers": axis.metadata["n_answers"],
            **score(axis.axis, axis.role_vectors, axis.role_names, ref), "runs": []})
        row["runs"].append({"seconds": round(wall, 2), "cores": round(cores, 2), "uptime": uptime()})
        print(f"{name:20s} {wall:6.1f} s  {cores:.2f} cores  cos(middle) {row['cos_middle_mean']:.3f}", flush=True)
    for row in result["variants"].values():
        row["seconds"] = round(statistics.median(r["seconds"] for r in row["runs"]), 1)
    result["uptime_at_end"] = uptime()
    md = [f"# bench_axis variants ({result['host']}, {result['threads']} threads, batch {BATCH})", "",
          f"`{' '.join(sys.argv)}`; uptime at start: `{result['uptime_at_start']}`, at end: "
          f"`{result['uptime_at_end']}`.", "",
          f"Cosine to the full reference axis (`{result['reference']}`) over the middle third of the layers "
          f"({result['middle_layers'][0]}–{result['middle_layers'][1]}). Seconds: median of {args.repeats} "
          "interleaved runs of `compute_axis` (model loaded, extraction and bundle included). The speed probe of "
          f"`anchor.extract.relative_speed` took {statistics.median(result['probe_seconds']):.2f} s (median of "
          f"{result['probe_seconds']}).", "",
          "| variant | seconds (median) | range | cores busy | answers | cos middle mean | cos middle min | "
          "role-order Spearman |", "|---|---|---|---|---|---|---|---|"]
    rows = {**{f"{name} (earlier run)": row for name, row in result.get("earlier", {}).items()},
            **result["variants"]}
    for name, row in rows.items():
        secs = [r["seconds"] for r in row["runs"]]
        md.append(f"| {name} | {row['seconds']} | {min(secs):.1f}–{max(secs):.1f} | "
                  f"{statistics.median(r['cores'] for r in row['runs']):.2f} | {row['n_answers']} | "
                  f"{row['cos_middle_mean']:.3f} | {row['cos_middle_min']:.3f} | {row['role_order_spearman']} |")
    write(result, md, "variants", _scatter(result["variants"]))


def _scatter(rows: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in rows.items():
        ax.scatter(row["seconds"], row["cos_middle_mean"], color="C1" if "prompt" in name else "C0")
        ax.annotate(name, (row["seconds"], row["cos_middle_mean"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.axvline(60, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds (2-core CPU, model loaded)")
    ax.set_ylabel("cos to the full axis, middle-third mean")
    fig.tight_layout()
    return fig


# -- frontier: cos vs seconds from the pool -----------------------------------------------------------------------


def cost_model(rows: dict) -> tuple[list[float], str]:
    """Least-squares fit of seconds = c0 + answers × (a + b × (tokens − 1)) (generate) or + answers × p (prompt)
    to the timed variants; returns the coefficients [c0, a, b, p] and the formula with them."""
    features, seconds = [], []
    for row in rows.values():
        n, s = row["n_answers"], row["settings"]
        gen = s.get("mode", "generate") == "generate"
        features.append([1.0, n * gen, n * gen * (s.get("max_new_tokens", 32) - 1), n * (not gen)])
        seconds.append(row["seconds"])
    coef = torch.linalg.lstsq(torch.tensor(features, dtype=torch.float64),
                              torch.tensor(seconds, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
    text = (f"seconds ≈ {coef[0]:.1f} + answers × ({coef[1] * 1000:.1f} ms + {coef[2] * 1000:.2f} ms × (tokens − 1)) "
            f"in generate mode, {coef[0]:.1f} + answers × {coef[3] * 1000:.1f} ms in prompt mode")
    return coef, text


def predict(coef: list[float], mode: str, answers: int, tokens: int) -> float:
    if mode == "prompt":
        return coef[0] + answers * coef[3]
    return coef[0] + answers * (coef[1] + coef[2] * (tokens - 1))


def load_pool(path: Path) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor]:
    """Pool role names, means per mode ``[persona, question, L, H]`` (the default first) and generate counts."""
    from safetensors.torch import load_file

    meta = json.loads((path / "pool.json").read_text())
    names = [ex.DEFAULT_KEY, *meta["roles"]]
    missing = [n for n in names if not (path / f"{n}.safetensors").exists()]
    if missing:
        raise SystemExit(f"{path} lacks {len(missing)} personas ({', '.join(missing[:3])}, ...): run the pool stage.")
    entries = [load_file(str(path / f"{n}.safetensors")) for n in names]
    means = {f"t{t}": torch.stack([e["generate"][:, k] for e in entries]) for k, t in enumerate(meta["tokens"])}
    means["prompt"] = torch.stack([e["prompt"] for e in entries])
    counts = {f"t{t}": torch.stack([e["counts"][:, k] for e in entries]) for k, t in enumerate(meta["tokens"])}
    counts["prompt"] = torch.ones_like(counts[f"t{meta['tokens'][0]}"])
    return meta["roles"], means, counts


def frontier(args: argparse.Namespace) -> None:
    """Many random draws of roles and questions from the pool per grid point; seconds from the cost model."""
    ref = AssistantAxis.from_pretrained(REFERENCE_DIR)
    timed = json.loads((RESULTS / "bench_axis_variants.json").read_text())
    timed_rows = {**timed.get("earlier", {}), **timed["variants"]}
    coef, formula = cost_model(timed_rows)
    roles, means, counts = load_pool(Path(args.pool))
    gen = torch.Generator().manual_seed(args.seed)
    n_questions = means["prompt"].shape[1]
    points = []
    for key, x in means.items():
        x = x.float().flatten(2)  # [P, Q, L*H]
        valid = (counts[key] > 0).float()  # [P, Q]: empty answers are dropped, as build_axis does
        for q in [q for q in args.questions if q <= n_questions]:
            picks = torch.stack([torch.randperm(n_questions, generator=gen)[:q] for _ in range(args.draws)])
            chosen = torch.zeros(args.draws, n_questions).scatter_(1, picks, 1.0)  # [S, Q]
            weights = chosen[:, None] * valid[None]  # [S, P, Q]
            persona = torch.einsum("spq,pqd->spd", weights / weights.sum(-1, keepdim=True), x)
            persona = persona.view(args.draws, len(roles) + 1, ref.n_layers, -1)
            for r in [r for r in args.roles if r <= len(roles)]:
                stats = []
                for s in range(args.draws):
                    idx = torch.randperm(len(roles), generator=gen)[:r]
                    vectors = persona[s, 1 + idx]
                    stats.append(score(persona[s, 0] - vectors.mean(0), vectors, [roles[i] for i in idx], ref))
                mode, tokens = ("prompt", None) if key == "prompt" else ("generate", int(key[1:]))
                answers = (r + 1) * q
                cos = torch.tensor([st["cos_middle_mean"] for st in stats])
                points.append({
                    "mode": mode, "n_roles": r, "n_questions": q, "max_new_tokens": tokens, "answers": answers,
                    "seconds": round(predict(coef, mode, answers, tokens or 0), 1),
                    "cos_middle_mean_median": round(float(cos.median()), 4),
                    "cos_middle_mean_p10": round(float(cos.quantile(0.1)), 4),
                    "cos_middle_min_median": round(statistics.median(st["cos_middle_min"] for st in stats), 4),
                    "spearman_median": (round(statistics.median(st["role_order_spearman"] for st in stats), 4)
                                        if r >= 3 else None)})
            print(f"{key:6s} q={q:3d} done", flush=True)
    best = pareto(points)
    result = {**machine(), "pool": args.pool, "pool_roles": len(roles), "draws": args.draws, "cost_model": formula,
              "cost_coefficients": coef, "points": points, "frontier": best}
    md = [f"# bench_axis frontier ({args.draws} random draws of roles and questions per point)", "",
          f"`{' '.join(sys.argv)}`. Pool: the default and {len(roles)} seeded roles × all {n_questions} questions "
          f"(`{args.pool}`). Seconds come from the cost model fitted to the timed variants: {formula}. cos = "
          "cosine to the full reference axis, mean over the middle third of layers; p10 = its 10th percentile over "
          "draws, what 9 seeds in 10 reach or beat.", "",
          "The frontier (no cheaper point has a higher p10):", "",
          "| mode | roles | questions | tokens | answers | seconds | cos median | cos p10 | cos min-layer median | "
          "Spearman median |", "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {p['mode']} | {p['n_roles']} | {p['n_questions']} | {p['max_new_tokens'] or '–'} | {p['answers']} | "
           f"{p['seconds']} | {p['cos_middle_mean_median']:.3f} | {p['cos_middle_mean_p10']:.3f} | "
           f"{p['cos_middle_min_median']:.3f} | {p['spearman_median']} |" for p in best]
    md += ["", "What `anchor.extract.settings_for_budget(seconds)` picks (its rows, `BUDGET_FRONTIER`), with this "
           "frontier's estimate and the timed run of the same settings (seed 0):", "",
           "| budget s | settings | predicted s | cos median (p10) | timed s | timed cos middle mean / min |",
           "|---|---|---|---|---|---|"]
    for budget, settings in ex.BUDGET_FRONTIER:
        full = {"mode": "generate", "prompts_per_role": 1, **settings}
        point = next((p for p in points if all(p.get(k) == full[k] for k in
                                               ("mode", "n_roles", "n_questions", "max_new_tokens"))), None)
        run = next((r for r in timed_rows.values() if {"mode": "generate", **r["settings"]} == full), None)
        md.append(f"| {budget:g} | {settings} | {point['seconds'] if point else '–'} | "
                  + (f"{point['cos_middle_mean_median']:.3f} ({point['cos_middle_mean_p10']:.3f})" if point else "–")
                  + f" | {run['seconds'] if run else '–'} | "
                  + (f"{run['cos_middle_mean']:.3f} / {run['cos_middle_min']:.3f} |" if run else "– |"))
    write(result, md, "frontier", _frontier_plot(points, best, timed_rows))


def pareto(points: list[dict]) -> list[dict]:
    best, top = [], -1.0
    for p in sorted(points, key=lambda p: (p["seconds"], -p["cos_middle_mean_p10"])):
        if p["cos_middle_mean_p10"] > top:
            best.append(p)
            top = p["cos_middle_mean_p10"]
    return best


def _frontier_plot(points: list[dict], best: list[dict], timed_rows: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {None: ("C1", "prompt"), 4: ("C0", "4 tokens"), 8: ("C2", "8 tokens"), 16: ("C3", "16 tokens"),
              32: ("C4", "32 tokens")}
    for tokens, (color, label) in styles.items():
        mine = [p for p in points if p["max_new_tokens"] == tokens]
        ax.scatter([p["seconds"] for p in mine], [p["cos_middle_mean_p10"] for p in mine], s=10, color=color,
                   alpha=0.5, label=f"{label} (p10 over draws)")
    ax.plot([p["seconds"] for p in best], [p["cos_middle_mean_p10"] for p in best], color="black", lw=1,
            label="frontier")
    ax.scatter([r["seconds"] for r in timed_rows.values()], [r["cos_middle_mean"] for r in timed_rows.values()],
               marker="*", s=120, color="gold", edgecolors="black", zorder=5, label="timed runs (seed 0)")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.axvline(60, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("seconds (2-core CPU, model loaded)")
    ax.set_ylabel("cos to the full axis, middle-third mean")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def reference(args: argparse.Namespace) -> None:
    """The full axis; hours on a CPU, minutes on a GPU."""
    model, tokenizer = load_model("smollm2", device=args.device)
    axis, wall, _ = timed(compute_axis, model, tokenizer, batch_size=args.batch_size, **REFERENCE)
    axis.save_pretrained(args.out)
    print(f"reference: {axis.metadata['n_answers']} answers in {wall:.0f} s, saved to {args.out}")


def write(result: dict, md: list[str], stage: str, figure=None) -> None:
    atomic_write_json(RESULTS / f"bench_axis_{stage}.json", result)
    atomic_write_text(RESULTS / f"bench_axis_{stage}.md", "\n".join(md) + "\n")
    if figure is not None:
        atomic_write(RESULTS / f"bench_axis_{stage}.png", lambda tmp: figure.savefig(tmp, dpi=110))
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("speed", help="this extraction path against the previous one")
    p.add_argument("--base", default="141ff0a", help="git revision of the previous anchor/extract.py")
    p.add_argument("--roles", type=int, default=8)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--old-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=speed)
    p = sub.add_parser("pool", help="per-answer means of a role pool × every shipped question")
    p.add_argument("--pool", default="outputs/axis-pool")
    p.add_argument("--roles", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=float("inf"))
    p.set_defaults(func=pool)
    p = sub.add_parser("variants", help="timed real runs of named settings")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS, or budget-N")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=variants)
    p = sub.add_parser("frontier", help="cos vs seconds over roles × questions × tokens × mode, from the pool")
    p.add_argument("--pool", default="outputs/axis-pool")
    p.add_argument("--roles", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12, 16, 24])
    p.add_argument("--questions", type=int, nargs="+", default=[8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 246])
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=frontier)
    p = sub.add_parser("reference", help="the full axis (use a GPU)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=reference)
    for p in sub.choices.values():
        p.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.func(args)


if __name__ == "__main__":
    random.seed(0)
    main()
