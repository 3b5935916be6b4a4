"""Drift evaluation: does a model leave its Assistant persona over long conversations, and does capping help?

Lu et al. (2026) found that coding and writing conversations keep large models near their Assistant persona,
while therapy-like and philosophy-of-AI conversations pull them away over the turns. This module replays the
shipped multi-turn conversations (user turns only; the model writes every reply itself, greedily, with its own
replies kept in the history), once uncapped and once capped with the bundle's default setting, and reads each
finished conversation with :func:`anchor.monitor.monitor_many`: the mean projection of every assistant turn at
the report layer. The result is a domain × turn table (mean ± sem over conversations), JSON and plots.

The conversations of one turn are answered together in one batch that keeps its KV cache across turns
(:class:`anchor.chat.ConversationBatch`), so each turn costs only its new tokens, not the whole history again.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from anchor.axis import AssistantAxis
from anchor.chat import ConversationBatch, Intervention
from anchor.io import atomic_write, atomic_write_json, atomic_write_text, nan_to_none
from anchor.models import fingerprint, model_id
from anchor.monitor import Messages, default_band, monitor_many, plot_trajectories, resolve_layer
from anchor.personas import CONVERSATION_DOMAINS, Conversation, load_conversations

SETTINGS = ("uncapped", "capped")
REPORT_FILES = ("drift.md", "drift.json", "drift_by_domain.png", "drift_domains.png")
"""What :func:`write_report` writes into its directory."""


@dataclass(frozen=True)
class DriftSettings:
    """How much of the shipped conversation set to replay, and how."""

    conversations_per_domain: int = 12  # the first N of each domain, in the shipped order
    turns: int | None = None  # user turns played per conversation (None: all of them)
    max_new_tokens: int = 64
    batch_size: int = 48  # conversations answered together (per setting)
    cap: bool = True  # also replay capped, with the bundle's default cap setting
    layer: int | None = None  # read layer (None: the axis's report layer)

    def __post_init__(self) -> None:
        if self.conversations_per_domain < 1:
            raise ValueError(f"conversations_per_domain={self.conversations_per_domain} must be >= 1.")
        if self.turns is not None and self.turns < 1:
            raise ValueError(f"turns={self.turns} must be >= 1 (or None for every turn).")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1.")


@dataclass
class DriftReport:
    """Per-conversation projections of every setting, and their per-domain, per-turn summaries."""

    settings: DriftSettings
    layer: int
    band: tuple[float, float]
    domains: list[str]
    records: list[dict]  # one per (setting, conversation): id, domain, setting, per_turn, std_per_turn, replies
    metadata: dict = field(default_factory=dict)

    @property
    def setting_names(self) -> list[str]:
        return [s for s in SETTINGS if any(r["setting"] == s for r in self.records)]

    def _values(self, setting: str, domain: str) -> list[list[float]]:
        return [r["per_turn"] for r in self.records if r["setting"] == setting and r["domain"] == domain]

    def trajectory(self, setting: str, domain: str) -> list[tuple[float, float, int]]:
        """(mean, sem, n) over the domain's conversations at each turn; empty replies are left out."""
        rows = self._values(setting, domain)
        out = []
        for k in range(max(len(r) for r in rows)):
            out.append(_mean_sem([r[k] for r in rows if k < len(r)]))
        return out

    def domain_summary(self, setting: str, domain: str) -> dict[str, tuple[float, float, int]]:
        """Per-conversation mean over turns, first turn, last turn and last − first, each as (mean, sem, n)."""
        rows = [[v for v in r if not math.isnan(v)] for r in self._values(setting, domain)]
        rows = [r for r in rows if r]
        return {
            "mean": _mean_sem([sum(r) / len(r) for r in rows]),
            "first": _mean_sem([r[0] for r in rows]),
            "last": _mean_sem([r[-1] for r in rows]),
            "drift": _mean_sem([r[-1] - r[0] for r in rows if len(r) > 1]),
        }

    def to_json(self) -> dict:
        """JSON-ready; values that do not exist (NaN in memory: an empty reply, one conversation's sem) are None."""
        return nan_to_none({
            "settings": asdict(self.settings),
            "layer": self.layer,
            "default_band": list(self.band),
            "domains": self.domains,
            "trajectories": {
                s: {d: [dict(zip(("mean", "sem", "n"), t, strict=True)) for t in self.trajectory(s, d)]
                    for d in self.domains}
                for s in self.setting_names
            },
            "summary": {
                s: {d: {k: dict(zip(("mean", "sem", "n"), v, strict=True))
                        for k, v in self.domain_summary(s, d).items()} for d in self.domains}
                for s in self.setting_names
            },
            "metadata": self.metadata,
            "conversations": self.records,
        })

    def to_markdown(self) -> str:
        lo, hi = self.band
        n_turns = max(len(r["per_turn"]) for r in self.records)
        lines = [
            f"Mean projection of each assistant turn on the Assistant Axis at layer {self.layer} (mean ± sem over "
            f"conversations; default-Assistant band {lo:.2f}–{hi:.2f}).",
            "",
            "| domain | setting | " + " | ".join(f"turn {k + 1}" for k in range(n_turns)) + " |",
            "|---|---|" + "---|" * n_turns,
        ]
        for domain in self.domains:
            for setting in self.setting_names:
                cells = [_pm(m, s) for m, s, _ in self.trajectory(setting, domain)]
                cells += [""] * (n_turns - len(cells))
                lines.append(f"| {domain} | {setting} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Per conversation, then mean ± sem over a domain's conversations: the mean over turns, the first and last "
            "turn, and the drift (last − first; negative = moving away from the Assistant).",
            "",
            "| domain | setting | n | mean over turns | first turn | last turn | drift (last − first) |",
            "|---|---|---|---|---|---|---|",
        ]
        for domain in self.domains:
            for setting in self.setting_names:
                s = self.domain_summary(setting, domain)
                lines.append(
                    f"| {domain} | {setting} | {s['mean'][2]} | {_pm(*s['mean'][:2])} | {_pm(*s['first'][:2])} | "
                    f"{_pm(*s['last'][:2])} | {_pm(*s['drift'][:2])} |"
                )
        return "\n".join(lines) + "\n"


def _mean_sem(values: Sequence[float]) -> tuple[float, float, int]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    t = torch.tensor(values, dtype=torch.float64)
    sem = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(t.mean()), sem, len(values)


def _pm(mean: float, sem: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(sem) else f"{mean:.2f} ± {sem:.2f}"


def select_conversations(per_domain: int, source: object = None) -> list[Conversation]:
    """The first ``per_domain`` conversations of each domain, in file order (so runs with more are supersets)."""
    chosen, counts = [], {}
    for conversation in load_conversations(source):
        if counts.get(conversation.domain, 0) < per_domain:
            counts[conversation.domain] = counts.get(conversation.domain, 0) + 1
            chosen.append(conversation)
    return chosen


def play(
    model: nn.Module,
    tokenizer: object,
    conversations: Sequence[Conversation],
    turns: int | None,
    max_new_tokens: int,
    batch_size: int,
    bar: tqdm | None = None,
) -> list[Messages]:
    """Have the model answer every user turn of each conversation in order; return the finished message lists.

    Conversations are answered ``batch_size`` at a time, one turn for the whole batch at a time; a conversation
    with fewer turns sits the remaining turns out.
    """
    finished: list[Messages] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        scripts = [list(c.turns[:turns]) for c in chunk]
        batch = ConversationBatch(model, tokenizer, len(chunk))
        for k in range(max(len(s) for s in scripts)):
            batch.answer([s[k] if k < len(s) else None for s in scripts], max_new_tokens)
            if bar is not None:
                bar.update(1)
        finished.extend(batch.messages)
    return finished


def eval_drift(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    settings: DriftSettings = DriftSettings(),
    progress: bool = True,
    conversations: Sequence[Conversation] | None = None,
    check_weights: bool = True,
) -> DriftReport:
    """Replay conversations uncapped (and capped) and read every assistant turn's projection.

    Capped conversations are read with the cap on, as the capped model runs; at a layer below the capped band
    (the report layer, with the default band) that equals reading the capped model's text uncapped.
    ``conversations`` replaces the shipped selection; ``check_weights=False`` accepts a fine-tune of the axis's model.
    """
    axis.check_compatible(model, check_weights=check_weights)
    layer = resolve_layer(axis, settings.layer)
    chosen = list(conversations) if conversations is not None else select_conversations(
        settings.conversations_per_domain)
    interventions = {"uncapped": Intervention()} | ({"capped": Intervention(cap=True)} if settings.cap else {})
    n_batches = math.ceil(len(chosen) / settings.batch_size)
    steps = sum(
        max(len(c.turns[:settings.turns]) for c in chosen[b * settings.batch_size:(b + 1) * settings.batch_size])
        for b in range(n_batches)
    )
    records: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=steps * len(interventions), desc="eval drift", unit="turn", disable=not progress) as bar:
        for name, intervention in interventions.items():
            bar.set_postfix_str(name)
            with intervention.apply(model, axis, check_weights):
                finished = play(model, tokenizer, chosen, settings.turns, settings.max_new_tokens,
                                settings.batch_size, bar)
                traces = monitor_many(model, tokenizer, axis, finished, layer, 8, check_weights)
            for conversation, messages, trace in zip(chosen, finished, traces, strict=True):
                records.append({
                    "id": conversation.id, "domain": conversation.domain, "setting": name,
                    "per_turn": trace.per_turn, "std_per_turn": trace.std_per_turn,
                    "n_tokens": [int(t.numel()) for t in trace.per_token],
                    "replies": [m["content"] for m in messages if m["role"] == "assistant"],
                })
    domains = [d for d in CONVERSATION_DOMAINS if any(c.domain == d for c in chosen)]
    domains += sorted({c.domain for c in chosen} - set(domains))
    metadata = {
        "model_id": model_id(model), "fingerprint": fingerprint(model), "axis": _axis_summary(axis),
        "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
        "cap": _cap_summary(axis) if settings.cap else None,
    }
    return DriftReport(settings, layer, default_band(axis, layer), domains, records, metadata)


def _axis_summary(axis: AssistantAxis) -> dict:
    keys = ("model_id", "n_roles", "n_questions", "prompts_per_role", "n_answers", "extraction", "report_layer")
    return {k: axis.metadata.get(k) for k in keys}


def _cap_summary(axis: AssistantAxis) -> dict:
    from anchor.capping import default_cap_layers, default_cap_percentile

    layers, percentile = default_cap_layers(axis), default_cap_percentile(axis)
    return {"layers": layers, "percentile": percentile, "tau": {i: axis.tau(i, percentile) for i in layers}}


def write_report(report: DriftReport, out_dir: str | os.PathLike) -> list[Path]:
    """Write :data:`REPORT_FILES` (``drift.md``, ``drift.json`` and two plots) into ``out_dir``, each atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in REPORT_FILES]
    atomic_write_text(paths[0], report.to_markdown())
    atomic_write_json(paths[1], report.to_json())
    title = f"layer {report.layer}; mean ± sem over conversations"

    cols = min(2, len(report.domains))
    rows = math.ceil(len(report.domains) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), sharey=True, squeeze=False)
    for ax, domain in zip(axes.flat, report.domains, strict=False):
        series = {s: _series(report.trajectory(s, domain)) for s in report.setting_names}
        plot_trajectories(series, report.band, title=domain, ax=ax)
    for ax in list(axes.flat)[len(report.domains):]:
        ax.set_visible(False)
    fig.suptitle(f"Drift by domain, uncapped vs capped ({title})")
    fig.tight_layout()
    atomic_write(paths[2], lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)

    names = report.setting_names
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.0), sharey=True, squeeze=False)
    for ax, setting in zip(axes.flat, names, strict=True):
        series = {d: _series(report.trajectory(setting, d)) for d in report.domains}
        plot_trajectories(series, report.band, title=setting, ax=ax)
    fig.suptitle(f"Drift by domain ({title})")
    fig.tight_layout()
    atomic_write(paths[3], lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return paths


def _series(trajectory: list[tuple[float, float, int]]) -> tuple[list[float], list[float]]:
    return [m for m, _, _ in trajectory], [s for _, s, _ in trajectory]
