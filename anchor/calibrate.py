"""Choosing a capping setting (layer band × percentile floor) for one model from measurements.

The paper published capping settings for two models only. A band or floor that suits one model can leave
another drifting, or flatten its ordinary answers, so each candidate is measured on two prompt sets, with
answers the *uncapped* model wrote and then read back teacher-forced, uncapped and capped:

* **Lift** on drift-inducing prompts (emotionally loaded and AI-introspective probes, plus questions asked under
  far-from-Assistant role prompts): how far capping raises the mean projection on the axis over response tokens,
  as a fraction of the default-to-role gap ``|axis[l]|`` at each layer (so layers of different scale compare),
  averaged over the capped layers. Lifts at the report layer and at the last layer are recorded too.
* **Cost** on ordinary Assistant prompts (coding and writing probes, no system prompt): the mean per-token
  ``KL(uncapped ‖ capped)`` of next-token distributions over the model's own default answers, in nats.

Selection rule: the candidate with the largest lift whose cost is within ``kl_budget`` (ties go to the lower
cost). The chosen setting is written into the bundle's ``metadata["cap"]``, which :func:`anchor.capping.cap`
then uses by default.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from anchor.axis import AssistantAxis
from anchor.capping import DEFAULT_BAND, Cap, band_layers
from anchor.extract import ExtractionSettings, run_batch
from anchor.hooks import ProjectionRecorder, check_layers
from anchor.io import atomic_write, atomic_write_json, atomic_write_text, nan_to_none
from anchor.models import fingerprint, model_id
from anchor.personas import load_probes, load_questions, load_role_records
from anchor.spans import encode_chat, encode_prompt

DEFAULT_BAND_FRACTIONS = ((0.55, 0.70), DEFAULT_BAND, (0.85, 1.0))
"""Candidate bands as fractions of depth: below, at and above the paper's band."""
DEFAULT_PERCENTILES = (5.0, 25.0, 50.0, 75.0)
REPORT_FILES = ("sweep.json", "sweep.md", "sweep.png")
"""What :func:`write_report` writes into its directory."""
DRIFT_DOMAINS = ("emotional", "meta")
ORDINARY_DOMAINS = ("coding", "writing")
FAR_ROLE_CATEGORIES = ("mystic", "trickster", "villain", "non-human", "cosmic")
"""Role categories far from the Assistant, whose prompts make the model drift the most."""

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class CalibrationSettings:
    """What to sweep and how much to measure. ``bands`` are inclusive ``(first, last)`` layer ranges."""

    bands: tuple[tuple[int, int], ...] | None = None  # None: DEFAULT_BAND_FRACTIONS of the model's depth
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    kl_budget: float = 0.05  # nats per token on ordinary answers
    n_prompts: int = 16  # per prompt set (drift, ordinary)
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.percentiles or any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles {list(self.percentiles)} must be non-empty and each within 0..100.")
        if not self.kl_budget > 0:
            raise ValueError(f"kl_budget={self.kl_budget} must be > 0 (nats per token).")
        if self.n_prompts < 2:
            raise ValueError("n_prompts must be >= 2 (the drift set is half probes, half role-prompted questions).")
        if self.max_new_tokens < 2 or self.batch_size < 1:
            raise ValueError("max_new_tokens must be >= 2 and batch_size >= 1.")
        for band in self.bands or ():
            if len(band) != 2 or band[0] > band[1]:
                raise ValueError(f"band {band} must be (first, last) with first <= last, e.g. (21, 25).")


@dataclass
class Candidate:
    """One capping setting and what it measured (NaN until measured)."""

    layers: list[int]
    percentile: float
    tau: dict[int, float]
    lift: float = math.nan  # mean over capped layers of (capped − uncapped projection) / |axis|, drift tokens
    lift_report: float = math.nan  # the same at the report layer (0 when the band lies after it)
    lift_last: float = math.nan  # the same at the last layer: what reaches the output
    kl: float = math.nan  # mean per-token KL(uncapped ‖ capped) on ordinary answers, nats
    touched_drift: float = math.nan  # share of drift tokens below the floor at the first capped layer
    touched_ordinary: float = math.nan  # the same on ordinary answers
    lift_by_layer: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        first, last = self.layers[0], self.layers[-1]
        band = f"L{first}" if first == last else f"L{first}-{last}"
        return f"{band} p{self.percentile:g}"


@dataclass
class Calibration:
    """The sweep, the rule's choice (None when nothing fits the budget) and how it was measured."""

    candidates: list[Candidate]
    chosen: Candidate | None
    settings: CalibrationSettings
    n_drift: int
    n_ordinary: int
    report_layer: int
    model: dict

    def setting(self) -> dict:
        """The ``metadata["cap"]`` entry for the chosen candidate (JSON keys are strings, hence ``str(layer)``)."""
        if self.chosen is None:
            raise RuntimeError(self.no_choice_message())
        c = self.chosen
        measured = {k: getattr(c, k) for k in ("lift", "lift_report", "lift_last", "kl", "touched_drift",
                                               "touched_ordinary")}
        measured.update(kl_budget=self.settings.kl_budget, n_drift=self.n_drift, n_ordinary=self.n_ordinary,
                        max_new_tokens=self.settings.max_new_tokens, n_candidates=len(self.candidates), **self.model)
        return {"layers": c.layers, "percentile": c.percentile, "tau": {str(k): v for k, v in c.tau.items()},
                "measured": measured}

    def no_choice_message(self) -> str:
        best = min(self.candidates, key=lambda c: c.kl)
        return (
            f"No candidate kept the KL on ordinary answers within kl_budget={self.settings.kl_budget} nats/token "
            f"(lowest: {best.label} at {best.kl:.4f}). Raise the budget, or add lower percentiles or later bands."
        )

    def to_json(self) -> dict:
        return {
            "settings": asdict(self.settings), "n_drift": self.n_drift, "n_ordinary": self.n_ordinary,
            "report_layer": self.report_layer, "model": self.model,
            "chosen": self.chosen.label if self.chosen else None,
            "candidates": [{"label": c.label, **asdict(c), "tau": {str(k): v for k, v in c.tau.items()}}
                           for c in self.candidates],
        }

    def to_markdown(self) -> str:
        budget = self.settings.kl_budget
        lines = [
            f"# Capping calibration: {self.model.get('model_id') or 'model'}",
            "",
            f"Drift prompts: {self.n_drift}; ordinary prompts: {self.n_ordinary}; answers of up to "
            f"{self.settings.max_new_tokens} tokens. Lift is the projection gain on drift answers as a fraction "
            f"of the default-to-role gap; KL is nats/token on ordinary answers; budget {budget}. "
            f"Report layer {self.report_layer}.",
            "",
            "| setting | layers | percentile | lift (capped layers) | lift (report layer) | lift (last layer) "
            "| KL ordinary | touched drift | touched ordinary | within budget |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.candidates:
            mark = "**chosen**" if c is self.chosen else ("yes" if c.kl <= budget else "no")
            lines.append(
                f"| {c.label} | {c.layers[0]}–{c.layers[-1]} | {c.percentile:g} | {c.lift:.4f} | "
                f"{c.lift_report:.4f} | {c.lift_last:.4f} | {c.kl:.5f} | {c.touched_drift:.1%} | "
                f"{c.touched_ordinary:.1%} | {mark} |"
            )
        lines += ["", f"Chosen: {self.chosen.label}." if self.chosen else self.no_choice_message(), ""]
        return "\n".join(lines)


def select(candidates: Sequence[Candidate], kl_budget: float) -> Candidate | None:
    """The largest lift among candidates whose KL on ordinary answers is within ``kl_budget``; ties: lower KL."""
    within = [c for c in candidates if c.kl <= kl_budget]
    return max(within, key=lambda c: (c.lift, -c.kl)) if within else None


def candidate_bands(axis: AssistantAxis, settings: CalibrationSettings) -> list[list[int]]:
    """Explicit bands, validated, or :data:`DEFAULT_BAND_FRACTIONS` of depth (duplicates dropped)."""
    if settings.bands:
        bands = [check_layers(range(first, last + 1), axis.n_layers) for first, last in settings.bands]
    else:
        bands = [band_layers(axis.n_layers, lo, hi) for lo, hi in DEFAULT_BAND_FRACTIONS]
    return [b for i, b in enumerate(bands) if b not in bands[:i]]


def drift_prompts(n: int, seed: int) -> list[Messages]:
    """Half emotional/meta probes, half shipped questions asked under far-from-Assistant role prompts."""
    rng = random.Random(f"{seed}-calibrate-drift")
    probes = [p.prompt for p in load_probes() if p.domain in DRIFT_DOMAINS]
    roles = [r for r in load_role_records() if r.category in FAR_ROLE_CATEGORIES]
    questions = load_questions()
    n_roles = min(n // 2, len(roles), len(questions))
    chosen = [[{"role": "user", "content": p}] for p in rng.sample(probes, min(n - n // 2, len(probes)))]
    for role, question in zip(rng.sample(roles, n_roles), rng.sample(questions, n_roles), strict=True):
        chosen.append([{"role": "system", "content": role.system_prompts[0]}, {"role": "user", "content": question}])
    return chosen


def ordinary_prompts(n: int, seed: int) -> list[Messages]:
    """Coding and writing probes with no system prompt: the model's everyday Assistant work."""
    rng = random.Random(f"{seed}-calibrate-ordinary")
    probes = [p.prompt for p in load_probes() if p.domain in ORDINARY_DOMAINS]
    return [[{"role": "user", "content": p}] for p in rng.sample(probes, min(n, len(probes)))]


@dataclass
class _Answers:
    """Teacher-forcing batches: right-padded ids, attention mask and the response-token mask, per batch."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    count: int


def _answer(
    model: nn.Module, tokenizer: object, prompts: list[Messages], settings: CalibrationSettings, bar: tqdm
) -> _Answers:
    """Let the uncapped model answer greedily, then re-encode each conversation with exact response masks."""
    extraction = ExtractionSettings("generate", settings.max_new_tokens, 0.0, settings.batch_size, settings.seed)
    encoded = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start:start + settings.batch_size]
        _, _, _, texts = run_batch(model, tokenizer, [encode_prompt(tokenizer, m) for m in chunk], extraction)
        for messages, text in zip(chunk, texts, strict=True):
            if text.strip():
                chat = encode_chat(tokenizer, [*messages, {"role": "assistant", "content": text}])
                if any(chat.mask(-1)):
                    encoded.append((chat.input_ids, chat.mask(-1)))
        bar.update(len(chunk))
    if not encoded:
        raise RuntimeError("The model gave no non-empty answers to the calibration prompts; check its chat template.")
    encoded.sort(key=lambda e: len(e[0]))  # similar lengths per batch waste less compute on padding
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(encoded), settings.batch_size):
        chunk = encoded[start:start + settings.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        response = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (row, mask) in enumerate(chunk):  # right padding: real tokens keep positions 0..n-1
            ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
            response[i, :len(row)] = torch.tensor(mask)
        batches.append((ids.to(device), attention.to(device), response.to(device)))
    return _Answers(batches, len(encoded))


@torch.no_grad()
def _forward(
    model: nn.Module, axis: AssistantAxis, batch: tuple[torch.Tensor, ...], candidate: Candidate | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer projections ``[B, T, L]`` and logits, with ``candidate``'s cap attached (None: uncapped)."""
    ids, attention, _ = batch
    cap = Cap(model, axis, candidate.tau, candidate.percentile) if candidate else None
    try:  # registered after the cap, the recorder reads its result
        with ProjectionRecorder(model, axis.unit, range(axis.n_layers), axis.metadata.get("layers_path")) as reader:
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    finally:
        if cap is not None:
            cap.detach()
    return torch.stack([reader.proj[i] for i in sorted(reader.proj)], dim=-1), logits  # [B, T, L]


def _next_token_logprobs(logits: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at the positions that predict a response token (``[N, vocab]``, float32)."""
    predicts = torch.zeros_like(response)
    predicts[:, :-1] = response[:, 1:]
    return torch.log_softmax(logits[predicts].float(), dim=-1)


def calibrate(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    settings: CalibrationSettings = CalibrationSettings(),
    progress: bool = True,
    check_weights: bool = True,
) -> Calibration:
    """Measure every band × percentile candidate and pick one by the rule in the module docstring.

    Does not modify ``axis``; write the result with ``axis.metadata["cap"] = result.setting()`` or use
    :func:`calibrate_bundle`. ``check_weights=False`` calibrates a fine-tune of the bundle's model.
    """
    axis.check_compatible(model, check_weights=check_weights)
    candidates = [
        Candidate(band, float(p), {i: axis.tau(i, p) for i in band})
        for band in candidate_bands(axis, settings) for p in settings.percentiles
    ]
    drift = drift_prompts(settings.n_prompts, settings.seed)
    ordinary = ordinary_prompts(settings.n_prompts, settings.seed)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(drift) + len(ordinary), desc="calibrate: answers", unit="answer",
                  disable=not progress) as bar:
            drift_answers = _answer(model, tokenizer, drift, settings, bar)
            ordinary_answers = _answer(model, tokenizer, ordinary, settings, bar)
        n_forwards = (len(drift_answers.batches) + len(ordinary_answers.batches)) * (len(candidates) + 1)
        with tqdm(total=n_forwards, desc="calibrate: sweep", unit="forward", disable=not progress) as bar:
            _measure_lift(model, axis, drift_answers, candidates, bar)
            _measure_cost(model, axis, ordinary_answers, candidates, bar)
    finally:
        model.train(was_training)
    return Calibration(
        candidates, select(candidates, settings.kl_budget), settings, drift_answers.count, ordinary_answers.count,
        axis.report_layer, {"model_id": model_id(model), "fingerprint": fingerprint(model)},
    )


def _measure_lift(model: nn.Module, axis: AssistantAxis, answers: _Answers, candidates: list[Candidate],
                  bar: tqdm) -> None:
    gap = axis.axis.norm(dim=-1)  # the default-to-role gap along the unit axis, per layer
    lift_sum = torch.zeros(len(candidates), axis.n_layers, dtype=torch.float64)
    touched = torch.zeros(len(candidates), dtype=torch.float64)
    n_tokens = 0
    for batch in answers.batches:  # batches outside, candidates inside: one batch's uncapped results in memory
        response = batch[2]
        base, _ = _forward(model, axis, batch, None)
        bar.update(1)
        base = base[response].double().cpu()  # [N, L]
        n_tokens += base.shape[0]
        for k, c in enumerate(candidates):
            capped, _ = _forward(model, axis, batch, c)
            lift_sum[k] += (capped[response].double().cpu() - base).sum(dim=0)
            touched[k] += float((base[:, c.layers[0]] < c.tau[c.layers[0]]).sum())
            bar.update(1)
    for k, c in enumerate(candidates):
        lift = (lift_sum[k] / n_tokens / gap.double()).tolist()
        c.lift_by_layer = lift
        c.lift = sum(lift[i] for i in c.layers) / len(c.layers)
        c.lift_report, c.lift_last = lift[axis.report_layer], lift[-1]
        c.touched_drift = float(touched[k]) / n_tokens


def _measure_cost(model: nn.Module, axis: AssistantAxis, answers: _Answers, candidates: list[Candidate],
                  bar: tqdm) -> None:
    kl_sum = torch.zeros(len(candidates), dtype=torch.float64)
    touched = torch.zeros(len(candidates), dtype=torch.float64)
    n_tokens = 0
    for batch in answers.batches:
        response = batch[2]
        base_proj, base_logits = _forward(model, axis, batch, None)
        bar.update(1)
        base_lp = _next_token_logprobs(base_logits, response)
        base_proj = base_proj[response]
        n_tokens += base_lp.shape[0]
        for k, c in enumerate(candidates):
            _, logits = _forward(model, axis, batch, c)
            capped_lp = _next_token_logprobs(logits, response)
            kl_sum[k] += float((base_lp.exp() * (base_lp - capped_lp)).sum())
            touched[k] += float((base_proj[:, c.layers[0]] < c.tau[c.layers[0]]).sum())
            bar.update(1)
    for k, c in enumerate(candidates):
        c.kl = max(float(kl_sum[k]) / n_tokens, 0.0)  # a KL is >= 0; float noise can dip a hair below
        c.touched_ordinary = float(touched[k]) / n_tokens


def write_report(result: Calibration, out_dir: str | os.PathLike) -> list[Path]:
    """Write :data:`REPORT_FILES`: ``sweep.json``, ``sweep.md`` and ``sweep.png`` (lift against KL, one labelled
    point per candidate), each atomically."""
    paths = [Path(out_dir) / name for name in REPORT_FILES]
    atomic_write_json(paths[0], nan_to_none(result.to_json()), indent=2)
    atomic_write_text(paths[1], result.to_markdown())
    _plot(result, paths[2])
    return paths


def no_fit_dir(out_dir: str | os.PathLike) -> Path:
    """Where a sweep in which nothing fits the budget is written: beside ``out_dir``, never over it, since the report
    in ``out_dir`` is the evidence behind the setting already stored in the bundle."""
    out = Path(out_dir)
    return out.with_name(out.name + "-no-fit")


def _plot(result: Calibration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for c in result.candidates:
        chosen = c is result.chosen
        ax.scatter(c.kl, c.lift, s=70 if chosen else 30, color="tab:red" if chosen else "tab:blue", zorder=3)
        ax.annotate(c.label + (" (chosen)" if chosen else ""), (c.kl, c.lift), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axvline(result.settings.kl_budget, color="gray", linestyle="--", label="KL budget")
    ax.set_xlabel("KL(uncapped ‖ capped) on ordinary answers, nats/token")
    ax.set_ylabel("lift on drift answers (fraction of default-to-role gap)")
    ax.set_title(f"Capping calibration: {result.model.get('model_id') or 'model'}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def calibrate_bundle(
    axis_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer: object,
    settings: CalibrationSettings = CalibrationSettings(),
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    check_weights: bool = True,
) -> Calibration:
    """Calibrate the bundle in ``axis_dir``, write the sweep report (default ``axis_dir/calibration``) and
    save the chosen setting into the bundle.

    When no candidate fits the budget, the bundle and the report in ``out_dir`` (the one behind the setting it
    holds) are left as they were: the sweep goes to :func:`no_fit_dir` instead, and RuntimeError says where.
    """
    axis = AssistantAxis.from_pretrained(axis_dir)
    result = calibrate(model, tokenizer, axis, settings, progress, check_weights)
    out = Path(axis_dir) / "calibration" if out_dir is None else Path(out_dir)
    if result.chosen is None:
        rejected = no_fit_dir(out)
        write_report(result, rejected)
        raise RuntimeError(f"{result.no_choice_message()} This sweep is in {rejected}; the bundle and its report in "
                           f"{out} were not changed.")
    write_report(result, out)
    axis.metadata["cap"] = result.setting()
    axis.save_pretrained(axis_dir)
    return result
