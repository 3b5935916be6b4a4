"""What a training run measured, as people read it: the before/after table, the drift shares, the probe-drift plot,
and the held-out measurement of the default persona behind them.

:func:`default_persona_drift` answers held-out questions with the base and the tuned model and reads where their
answers sit on the axis and how role-like they sound; :class:`RunSummary` is one run's record
(``<output_dir>/summary.json``); :func:`comparison_table`, :func:`drift_shares` and :func:`plot_probe_drift` put an
anchored run beside its unanchored twin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from anchor.axis import AssistantAxis
from anchor.io import atomic_write, atomic_write_json, nan_to_none
from anchor.probes import answer_projections, generate_answers, role_likeness
from anchor.reference import Reference
from anchor.spans import encode_prompt


def report_layers(n_layers: int) -> list[int]:
    """A quarter, half and three quarters deep, and the last layer."""
    return sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})


def _persona_measures(writer: Any, reference: Reference, tokenizer: object, axis: AssistantAxis,
                      questions: Sequence[str], role_prompts: Sequence[str], layers: list[int], max_new_tokens: int,
                      batch_size: int) -> dict[str, Any]:
    """``writer()`` yields the model that answers and reads its own answers; ``reference`` scores role-likeness."""
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    with writer() as model:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        proj = answer_projections(model, prompts, answers, axis, layers=layers, batch_size=batch_size,
                                  pad_id=tokenizer.pad_token_id).nanmean(dim=0)
    position = []
    for j, layer in enumerate(layers):
        position.append((float(proj[j]) - axis.default_projection(layer)) / axis.gap(layer))
    score = None
    if role_prompts:
        with reference.active() as judge:
            score = float(role_likeness(judge, tokenizer, questions, answers, role_prompts, batch_size).nanmean())
    return {"position": position, "role_likeness": score,
            "answer_tokens": sum(len(a) for a in answers) / max(1, len(answers)),
            "example": tokenizer.decode(answers[0], skip_special_tokens=True) if answers else ""}


def default_persona_drift(
    model: nn.Module,
    reference: Reference,
    tokenizer: object,
    axis: AssistantAxis,
    questions: Sequence[str],
    role_prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, Any]:
    """How Assistant-like the base (``reference``) and the tuned ``model`` answer questions with the default prompt.

    Both models answer every question greedily, with no system message. For each:

    * ``position[i]``: the mean projection of its answers at layer ``layers[i]``, read by the model that wrote them,
      relative to the axis's default mean, in units of the default-to-role gap: 0 is the Assistant, -1 the average
      role.
    * ``role_likeness``: the frozen base model's per-token NLL(answer | default prompt) − NLL(answer | role prompt),
      averaged over ``role_prompts`` and answers; it rises as answers read more like the roles'.

    Neither is what the anchor trains on (every reported layer, the model's own answers to unseen questions, and a
    judge that was never trained), which is how an anchor must be judged.
    """
    layers = list(layers) if layers is not None else report_layers(axis.n_layers)
    common = (reference, tokenizer, axis, questions, role_prompts, layers, max_new_tokens, batch_size)
    base = _persona_measures(reference.active, *common)
    tuned = _persona_measures(lambda: contextlib.nullcontext(model), *common)
    return {"layers": layers, "n_questions": len(questions), "base": base, "tuned": tuned}


# ---------------------------------------------------------------------------------------------------------------
# Log history → probe drift series and plot
# ---------------------------------------------------------------------------------------------------------------


def probe_drift_series(log_history: Sequence[Mapping[str, Any]], prefix: str = "anchor") -> dict[str, list]:
    """``{domain: [(step, z), ...]}`` from the callback's ``<prefix>/probe_drift[/<domain>]`` entries (``all`` for
    the overall score), starting at ``(0, 0.0)``: the drift is measured against step 0."""
    key = f"{prefix}/probe_drift"
    series: dict[str, list] = {}
    for entry in log_history:
        for name, value in entry.items():
            if name == key or name.startswith(key + "/"):
                domain = name[len(key) + 1:] or "all"
                series.setdefault(domain, [(0, 0.0)]).append((int(entry.get("step", 0)), float(value)))
    return series


def last_probe_drift(log_history: Sequence[Mapping[str, Any]], prefix: str = "anchor") -> dict[str, float]:
    return {domain: points[-1][1] for domain, points in probe_drift_series(log_history, prefix).items()}


def plot_probe_drift(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike,
                     prefix: str = "anchor") -> Path | None:
    """One panel per probe domain, one line per run: probe drift (z against step 0) over optimizer steps.

    Returns None (and writes nothing) when no run logged probe drift.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: probe_drift_series(h, prefix) for label, h in histories.items()}
    domains = list(dict.fromkeys(d for series in runs.values() for d in sorted(series, key=lambda d: d != "all")))
    if not domains:
        return None
    fig, axes = plt.subplots(1, len(domains), figsize=(3.4 * len(domains), 3.2), sharey=True, squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for label, series in runs.items():
            if domain in series:
                steps, values = zip(*series[domain], strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(domain)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("probe drift (z vs step 0)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Default-persona probe drift during training (negative = away from the Assistant)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Run summaries
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """What one run measured and where it wrote things; saved as ``<output_dir>/summary.json``."""

    label: str
    output_dir: str
    trainer: str
    peft: bool
    anchor: dict[str, Any] | None
    steps: int
    seconds: float
    train_loss: float | None
    heldout_loss: float | None
    probe_drift: dict[str, float]
    drift: dict[str, Any] | None
    paths: dict[str, str]

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, nan_to_none(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunSummary:
        return cls(**json.loads(Path(path).read_text()))

    def render(self) -> str:
        method = self.anchor and self.anchor["method"]
        anchor = ("off" if self.anchor is None else
                  f"{'+'.join(method) if isinstance(method, list) else method} λ={self.anchor['weight']:g} on layers "
                  f"{self.anchor['layers']}")
        lines = [f"== {self.label}: {self.trainer.upper()}{' + LoRA' if self.peft else ' (full)'}, anchor {anchor}, "
                 f"{self.steps} steps in {self.seconds:.0f} s ==",
                 f"task loss: train {_fmt(self.train_loss)}, held-out {_fmt(self.heldout_loss)}"]
        if self.probe_drift:
            lines.append("probe drift (z vs step 0, last probe): " + ", ".join(
                f"{d} {v:+.2f}" for d, v in self.probe_drift.items()))
        if self.drift:
            d = self.drift
            lines.append(f"held-out default persona ({d['n_questions']} questions), position in default-to-role gaps "
                         "(0 = Assistant, -1 = average role):")
            for who in ("base", "tuned"):
                pos = ", ".join(f"L{layer} {v:+.2f}" for layer, v in zip(d["layers"], d[who]["position"], strict=True))
                lines.append(f"  {who:5s}  {pos}; role-likeness {_fmt(d[who]['role_likeness'], '+.3f')}")
        lines += [f"{name}: {where}" for name, where in self.paths.items()]
        return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def comparison_table(runs: Mapping[str, RunSummary]) -> str:
    """A markdown before/after table: held-out default-persona position per layer, role-likeness, task loss."""
    first = next(iter(runs.values()))
    layers = first.drift["layers"] if first.drift else []
    head = ["model", *[f"L{layer}" for layer in layers], "role-likeness", "held-out loss", "probe drift (z)"]
    rows = []
    if first.drift:
        base = first.drift["base"]
        rows.append(["base (before)", *[f"{v:+.2f}" for v in base["position"]], _fmt(base["role_likeness"], "+.3f"),
                     "–", "0 (by definition)"])
    for label, run in runs.items():
        pos = run.drift["tuned"]["position"] if run.drift else [math.nan] * len(layers)
        rl = run.drift["tuned"]["role_likeness"] if run.drift else None
        rows.append([label, *[f"{v:+.2f}" for v in pos], _fmt(rl, "+.3f"), _fmt(run.heldout_loss),
                     _fmt(run.probe_drift.get("all"), "+.2f")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


MIN_DRIFT = 0.05
"""Below this mean drift (default-to-role gaps) the unanchored run barely moved, and a ratio would be noise."""


def drift_shares(runs: Mapping[str, RunSummary], anchored: str, unanchored: str) -> dict[str, float | None]:
    """The anchored run's drift from the base as a share of the unanchored run's, and its task-loss cost.

    ``projection``: mean over the reported layers of the position change; ``role_likeness``: the change of the
    behavioural score. Negative shares mean the anchored run overshot toward the Assistant. A share is None when a
    run was not measured or the unanchored run moved less than :data:`MIN_DRIFT` (a ratio would be noise).
    ``task_loss_change``: held-out loss relative to unanchored's (0.05 = 5% higher).
    """
    a, u = runs[anchored], runs[unanchored]
    shares: dict[str, float | None] = {"projection": None, "role_likeness": None, "task_loss_change": None}
    if a.drift and u.drift:
        base = u.drift["base"]
        moved_u = sum(t - b for t, b in zip(u.drift["tuned"]["position"], base["position"], strict=True))
        moved_a = sum(t - b for t, b in zip(a.drift["tuned"]["position"], base["position"], strict=True))
        n = len(base["position"])
        shares["projection"] = moved_a / moved_u if abs(moved_u) / n >= MIN_DRIFT else None
        rl = [r.drift["tuned"]["role_likeness"] for r in (a, u)]
        if base["role_likeness"] is not None and None not in rl and abs(rl[1] - base["role_likeness"]) >= MIN_DRIFT:
            shares["role_likeness"] = (rl[0] - base["role_likeness"]) / (rl[1] - base["role_likeness"])
    if a.heldout_loss is not None and u.heldout_loss:
        shares["task_loss_change"] = a.heldout_loss / u.heldout_loss - 1
    return shares


def shares_sentence(shares: Mapping[str, float | None]) -> str:
    """One line saying how much of the unanchored drift the anchored run kept, and at what task-loss cost."""
    labels = {"projection": "projection (mean over the reported layers)", "role_likeness": "role-likeness"}
    measured = {key: shares[key] for key in labels if shares[key] is not None}
    if not measured:
        return ""
    parts = ", ".join(f"{labels[key]} {value:.0%}" for key, value in measured.items())
    text = f"Anchored drift as a share of unanchored: {parts} (0% = stayed at the base model"
    text += ", negative = overshot toward the Assistant)." if min(measured.values()) < 0 else ")."
    if shares["task_loss_change"] is not None:
        text += f" Held-out task loss {shares['task_loss_change']:+.0%} vs unanchored."
    return text
