"""Screening training data before fine-tuning: which examples would pull the model off its Assistant persona.

Persona-vector work (Chen et al. 2025, arXiv 2507.21509) found that how far a training answer sits along a trait
direction, compared with the model's own answer to the same prompt, predicts how far fine-tuning on it shifts
the model. :func:`screen` measures that on the Assistant Axis:

1. Every assistant turn of every example is read teacher-forced (:func:`anchor.probes.answer_projections`), and
   its content tokens' projections are averaged: per example, the mean over all its assistant tokens, at the
   axis's report layer and at the capping band (the layers where :func:`anchor.cap` acts).
2. That is compared with a **reference**:

   * ``"band"`` (cheap, no generation): the median projection of the model's own default answers, stored in the
     bundle when the axis was computed;
   * ``"own"``: the model's own greedy answer to the same prompt, generated once and cached.

3. The **score** at a layer is ``(example − reference) / gap``, where ``gap = ‖axis[l]‖`` is the default-to-role
   distance at that layer: 0 is Assistant-like, −1 is as far from the Assistant as the average role. The band
   score is the mean over the band's layers. Low scores are the examples to look at, or to drop.

Rows may be chat ``messages``, TRL prompt–completion (``prompt``, ``completion``) or TRL preference data
(``prompt``, ``chosen``, ``rejected``: the ``chosen`` answer is screened, since that is what training pulls
toward). A prompt or answer given as a string is a user or assistant message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anchor.axis import AssistantAxis
from anchor.capping import default_cap_layers
from anchor.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    check_output_dir,
    read_utf8,
)
from anchor.models import cache_dir, fingerprint
from anchor.monitor import check_context
from anchor.probes import answer_projections, generate_answers
from anchor.spans import encode_chat, encode_prompt

Messages = list[dict[str, str]]
REFERENCES = ("band", "own")
OUTPUT_FILES = ("scores.jsonl", "histogram.png", "summary.md", "summary.json", "filtered.jsonl")


def read_rows(source: str | os.PathLike | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows from a JSONL file, a JSON file holding a list, or any iterable of dicts (a ``datasets.Dataset``)."""
    if not isinstance(source, (str, os.PathLike)):
        return [dict(row) for row in source]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.suffix.lower() == ".json":
        rows = json.loads(read_utf8(path))
        if not isinstance(rows, list):
            raise ValueError(f"{path} holds a JSON {type(rows).__name__}; a .json dataset is a list of rows.")
        return rows
    from anchor.data import read_jsonl

    return read_jsonl(path)


def _as_messages(value: Any, role: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def conversation(row: dict[str, Any], index: int) -> Messages:
    """The conversation a row trains on, in any of the formats the module doc lists."""
    if "messages" in row:
        return list(row["messages"])
    answer = next((row[k] for k in ("completion", "chosen") if k in row), None)
    if "prompt" in row and answer is not None:
        return _as_messages(row["prompt"], "user") + _as_messages(answer, "assistant")
    raise ValueError(
        f"row {index} has keys {sorted(row)}: give chat 'messages', or 'prompt' with 'completion' (SFT) or with "
        "'chosen'/'rejected' (preference data)."
    )


@dataclass(frozen=True)
class Turn:
    """One assistant turn, ready to teacher-force: the ids before its content, and the content's ids."""

    example: int
    prefix: list[int]
    answer: list[int]
    prompt: list[int]  # the generation prompt of the messages before this turn (for the model's own answer)


def split_turns(tokenizer: object, rows: Sequence[dict[str, Any]]) -> list[Turn]:
    """Every assistant turn of every row; a row with no assistant content is refused, naming it."""
    turns = []
    for i, row in enumerate(rows):
        messages = conversation(row, i)
        encoding = encode_chat(tokenizer, messages)
        assistant_at = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistant_at:
            raise ValueError(f"row {i} has no assistant message; there is nothing it would train on to screen.")
        if encoding.n_turns != len(assistant_at):
            raise ValueError(f"row {i}: the chat template renders {encoding.n_turns} of its {len(assistant_at)} "
                             "assistant messages, so their tokens cannot be told apart; screen it as single turns.")
        for turn, at in zip(range(encoding.n_turns), assistant_at, strict=True):
            positions = [p for p, inside in enumerate(encoding.mask(turn)) if inside]
            if not positions:
                raise ValueError(f"row {i}: assistant message {turn} is empty; drop it or fill it in.")
            start, end = positions[0], positions[-1] + 1
            turns.append(Turn(i, encoding.input_ids[:start], encoding.input_ids[start:end],
                              encode_prompt(tokenizer, messages[:at])))
    return turns


@dataclass
class ScreenReport:
    """Per-example projections and scores (see the module doc), and how they were measured.

    ``projections[i, j]`` is example ``i``'s mean projection at ``layers[j]``; ``reference`` the same for the
    reference (one row for ``"band"``, one per example for ``"own"``); ``scores`` are at the report layer and
    ``band_scores`` the mean over the band.
    """

    layers: list[int]
    report_layer: int
    band: list[int]
    projections: torch.Tensor  # [n_examples, len(layers)]
    reference: torch.Tensor  # [1 or n_examples, len(layers)]
    scores: torch.Tensor  # [n_examples]
    band_scores: torch.Tensor  # [n_examples]
    n_tokens: list[int]
    default_band: tuple[float, float]  # 25th and 75th percentiles of default answers at the report layer
    settings: dict[str, Any] = field(default_factory=dict)

    def projection(self, layer: int | None = None) -> torch.Tensor:
        """Each example's mean projection at ``layer`` (default: the report layer)."""
        return self.projections[:, self.layers.index(self.report_layer if layer is None else layer)]

    def worst(self, k: int) -> list[int]:
        """The ``k`` lowest-scoring examples, lowest first."""
        return torch.argsort(self.scores)[:k].tolist()

    def keep(self, axis: AssistantAxis, drop_below: float) -> list[int]:
        """Examples whose report-layer projection is at least the ``drop_below`` percentile of default answers."""
        threshold = axis.tau(self.report_layer, drop_below)
        return [i for i, p in enumerate(self.projection().tolist()) if p >= threshold]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per example, in dataset order."""
        at = self.layers.index(self.report_layer)
        reference = self.reference.expand_as(self.projections)
        return [{"index": i, "score": float(self.scores[i]), "band_score": float(self.band_scores[i]),
                 "projection": float(self.projections[i, at]), "reference": float(reference[i, at]),
                 "n_tokens": self.n_tokens[i]} for i in range(len(self.n_tokens))]


def _token_means(turns: Sequence[Turn], per_turn: torch.Tensor, n_examples: int) -> tuple[torch.Tensor, list[int]]:
    """Per-example mean over all assistant tokens: turn means weighted by their token counts."""
    sums = torch.zeros(n_examples, per_turn.shape[1], dtype=torch.float64)
    counts = [0] * n_examples
    for turn, row in zip(turns, per_turn.double(), strict=True):
        sums[turn.example] += row * len(turn.answer)
        counts[turn.example] += len(turn.answer)
    return (sums / torch.tensor(counts, dtype=torch.float64)[:, None]).float(), counts


def own_answers(model: nn.Module, tokenizer: object, prompts: Sequence[list[int]], max_new_tokens: int,
                batch_size: int, cache: Path | None) -> list[list[int]]:
    """The model's greedy answers to ``prompts``, read from and added to the JSONL ``cache`` (keyed by prompt)."""
    key = [hashlib.sha256(json.dumps(p).encode()).hexdigest()[:24] for p in prompts]
    stored: dict[str, list[int]] = {}
    if cache is not None and cache.is_file():
        stored = {r["key"]: r["answer"] for r in map(json.loads, read_utf8(cache).splitlines()) if r}
    missing = sorted({k: i for i, k in enumerate(key) if k not in stored}.values())
    if missing:
        fresh = generate_answers(model, tokenizer, [prompts[i] for i in missing], max_new_tokens, batch_size)
        stored.update({key[i]: a for i, a in zip(missing, fresh, strict=True)})
        if cache is not None:
            atomic_write_jsonl(cache, [{"key": k, "answer": a} for k, a in stored.items()])
    return [stored[k] for k in key]


def default_cache(model: nn.Module, max_new_tokens: int) -> Path:
    """Where the own-answer cache of ``model`` lives: one file per model fingerprint and answer length."""
    return cache_dir() / "screen" / f"{fingerprint(model)}-{max_new_tokens}.jsonl"


def screen(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    dataset: str | os.PathLike | Iterable[dict[str, Any]],
    reference: str = "band",
    band: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    cache: str | os.PathLike | None = "default",
    check_weights: bool = True,
) -> ScreenReport:
    """Score every example of ``dataset`` by how far its assistant answers sit from the Assistant; see the module.

    ``band`` defaults to the bundle's capping layers. ``reference="own"`` generates the model's greedy answer
    (``max_new_tokens``) to each prompt; ``cache`` is the JSONL file those answers are kept in ("default": one
    per model under :func:`anchor.models.cache_dir`; None: not kept).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r} must be one of {REFERENCES}.")
    axis.check_compatible(model, check_weights=check_weights)
    rows = read_rows(dataset)
    if not rows:
        raise ValueError("the dataset has no rows.")
    band = sorted(set(default_cap_layers(axis) if band is None else band))
    layers = sorted({axis.report_layer, *band})
    gaps = torch.tensor([axis.gap(i) for i in layers])
    if reference == "band":  # read the stored statistics first: an imported bundle has none, and says so at once
        ref = torch.tensor([[axis.tau(i, 50.0) for i in layers]])
    default_band = (axis.tau(axis.report_layer, 25.0), axis.tau(axis.report_layer, 75.0))
    turns = split_turns(tokenizer, rows)
    check_context(model, [len(t.prefix) + max(len(t.answer), max_new_tokens if reference == "own" else 0)
                          for t in turns], what="assistant turn")
    pad = tokenizer.pad_token_id
    per_turn = answer_projections(model, [t.prefix for t in turns], [t.answer for t in turns], axis, layers,
                                  batch_size, pad)
    projections, n_tokens = _token_means(turns, per_turn, len(rows))
    if reference == "own":
        store = default_cache(model, max_new_tokens) if cache == "default" else (Path(cache) if cache else None)
        prompts = [t.prompt for t in turns]
        answers = own_answers(model, tokenizer, prompts, max_new_tokens, batch_size, store)
        empty = [i for i, a in enumerate(answers) if not a]
        if empty:
            raise ValueError(f"the model's own answer to the prompt of row {turns[empty[0]].example} is empty "
                             f"({len(empty)} in all); screen with reference='band', or raise max_new_tokens.")
        own = answer_projections(model, prompts, answers, axis, layers, batch_size, pad)
        ref, _ = _token_means([Turn(t.example, t.prompt, a, t.prompt) for t, a in zip(turns, answers, strict=True)],
                              own, len(rows))
    scores_by_layer = (projections - ref) / gaps
    if not torch.isfinite(scores_by_layer).all():
        raise ValueError("non-finite projections: the model produced NaN or inf activations on this data.")
    band_at = [layers.index(i) for i in band]
    return ScreenReport(
        layers=layers, report_layer=axis.report_layer, band=band, projections=projections, reference=ref,
        scores=scores_by_layer[:, layers.index(axis.report_layer)], band_scores=scores_by_layer[:, band_at].mean(1),
        n_tokens=n_tokens, default_band=default_band,
        settings={"reference": reference, "max_new_tokens": max_new_tokens if reference == "own" else None,
                  "n_examples": len(rows), "n_turns": len(turns), "model_id": axis.metadata.get("model_id")},
    )


def _snippet(messages: Messages, role: str, width: int = 90) -> str:
    text = next((m["content"] for m in messages if m.get("role") == role), "")
    text = " ".join(str(text).split()).replace("|", "\\|")  # one line, and no column break in a markdown table
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_histogram(report: ScreenReport, path: Path, drop_threshold: float | None = None) -> Path:
    """Histogram of report-layer projections, the default band shaded, the own answers overlaid if measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    values = report.projection().numpy()
    ax.hist(values, bins=min(40, max(10, len(values) // 4)), color="slateblue", alpha=0.8, label="examples")
    if report.reference.shape[0] > 1:
        own = report.reference[:, report.layers.index(report.report_layer)].numpy()
        ax.hist(own, bins=min(40, max(10, len(own) // 4)), color="goldenrod", alpha=0.5,
                label="model's own answers")
    lo, hi = report.default_band
    ax.axvspan(lo, hi, color="goldenrod", alpha=0.25, label="default answers, 25th–75th pct")
    if drop_threshold is not None:
        ax.axvline(drop_threshold, color="crimson", lw=1.5, ls="--", label="drop below")
    ax.set_xlabel(f"mean projection on the Assistant Axis, layer {report.report_layer}")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def write_report(report: ScreenReport, rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike,
                 axis: AssistantAxis, drop_below: float | None = None, worst: int = 10,
                 overwrite: bool = False) -> list[Path]:
    """``scores.jsonl``, ``histogram.png``, ``summary.md``, ``summary.json`` and, with ``drop_below`` (a
    percentile of default answers at the report layer), ``filtered.jsonl``: the rows kept, unchanged."""
    out = check_output_dir(out_dir, OUTPUT_FILES, overwrite=overwrite)
    threshold = None if drop_below is None else axis.tau(report.report_layer, drop_below)
    keep = report.keep(axis, drop_below) if drop_below is not None else list(range(len(rows)))
    records = report.records()
    kept = set(keep)
    for record in records:
        record["dropped"] = record["index"] not in kept
    scores = report.scores
    summary = {
        **report.settings, "report_layer": report.report_layer, "band": report.band,
        "default_band": list(report.default_band), "score_mean": float(scores.mean()),
        "score_median": float(scores.median()), "share_below_default_band": float(
            (report.projection() < report.default_band[0]).float().mean()),
        "drop_below_percentile": drop_below, "drop_threshold": threshold, "n_kept": len(keep),
        "worst": [records[i] for i in report.worst(worst)],
    }
    paths = [atomic_write_jsonl(out / "scores.jsonl", records),
             plot_histogram(report, out / "histogram.png", threshold), atomic_write_json(out / "summary.json", summary)]
    lines = [
        f"# Screening: {summary['n_examples']} examples ({summary['n_turns']} assistant turns)",
        "",
        f"Reference: **{report.settings['reference']}**. Score = (example − reference) / ‖axis‖ at layer "
        f"{report.report_layer}: 0 is Assistant-like, −1 is as far as the average role.",
        "",
        f"- median score {summary['score_median']:+.3f}, mean {summary['score_mean']:+.3f}",
        f"- below the default band (25th percentile of default answers): {summary['share_below_default_band']:.0%}",
    ]
    if drop_below is not None:
        lines.append(f"- kept {len(keep)} of {len(rows)} (dropped projections below the {drop_below:g}th "
                     f"percentile of default answers, {threshold:+.3f})")
    lines += ["", f"## The {worst} lowest-scoring examples", "", "| row | score | band score | user | assistant |",
              "|---|---|---|---|---|"]
    for i in report.worst(worst):
        messages = conversation(rows[i], i)
        lines.append(f"| {i} | {scores[i]:+.3f} | {report.band_scores[i]:+.3f} | "
                     f"{_snippet(messages, 'user')} | {_snippet(messages, 'assistant')} |")
    paths.append(atomic_write_text(out / "summary.md", "\n".join(lines) + "\n"))
    if drop_below is not None:
        paths.append(atomic_write_jsonl(out / "filtered.jsonl", [rows[i] for i in keep]))
    return paths


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the area under the ROC curve."""
    if not positive or not negative:
        raise ValueError("auc needs at least one score in each group.")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    value = wins / (len(positive) * len(negative))
    if not math.isfinite(value):
        raise ValueError("non-finite AUC")
    return value
