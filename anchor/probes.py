"""Probe drift: how far a model's default persona has moved, read on a fixed set of default-persona prompts.

An anchor must be judged by measures it does not read (an anchored layer can look fine while behaviour drifts), so
the probes differ from the training data and from the anchor's penalty in three ways: they are their own prompts
(``anchor.personas.load_probes()``: coding, writing, emotional and meta questions), their projections are read at
every layer, not only the anchored ones, and, where the frozen base model is at hand, a behavioural score asks
that model how role-like the current answers sound.

* **Drift** at a layer is the change of the mean answer projection since step 0, as a z-score: divided by the
  step-0 spread of per-probe projections in that domain. It is averaged over layers; negative means the default
  persona moved away from the Assistant.
* **Role-likeness** of an answer is the frozen base model's per-token NLL of it after the default prompt minus its
  NLL after a far-role system prompt (the axis's bottom roles), averaged over those roles: it rises as answers read
  more like the roles' than like the Assistant's.

Answers are token ids. In ``teacher_forced`` mode the base model's greedy answers from step 0 are re-read by the
current model; in ``generated`` mode the current model answers again each time.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anchor.axis import AssistantAxis
from anchor.batching import pad_rows
from anchor.extract import stop_ids
from anchor.hooks import ProjectionRecorder
from anchor.models import decoder_layers
from anchor.personas import load_probes, load_roles
from anchor.spans import encode_prompt

logger = logging.getLogger(__name__)



@dataclass
class ProbeSet:
    """Probe prompts as token ids (default persona: no system message), with their domains and texts."""

    domains: list[str]
    texts: list[str]
    prompts: list[list[int]]


def build_probe_set(tokenizer: object, probes: object = None, per_domain: int | None = None) -> ProbeSet:
    """Encode the shipped probes (or ``probes``, any source :func:`anchor.personas.load_probes` takes), keeping the
    first ``per_domain`` of each domain when given (every probe step runs a forward over all of them)."""
    records = load_probes(probes)
    if per_domain is not None:
        if per_domain < 1:
            raise ValueError(f"per_domain={per_domain}: keep at least one probe per domain, or None for all.")
        kept, count = [], dict.fromkeys((r.domain for r in records), 0)
        for r in records:
            count[r.domain] += 1
            if count[r.domain] <= per_domain:
                kept.append(r)
        records = kept
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": r.prompt}]) for r in records]
    return ProbeSet([r.domain for r in records], [r.prompt for r in records], prompts)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore every RNG training reads (torch CPU and CUDA, Python), so probing never perturbs training."""
    py_state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    sample: bool = False,
    seed: int = 0,
) -> list[list[int]]:
    """The model's answers (token ids, cut before the first stop token) to ``prompts``, greedy or sampled.

    Runs in eval mode under preserved RNG (sampling is seeded by ``seed``), so calling it mid-training changes
    neither the model's mode nor the training randomness.
    """
    stop = stop_ids(model, tokenizer)
    device = _device(model)
    answers: list[list[int]] = []
    with preserved_rng(), eval_mode(model):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_rows(prompts[start:start + batch_size], tokenizer.pad_token_id, side="left")
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=1.0 if sample else None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop),
            )
            for row in out[:, width:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                answers.append(row[:cut])
    return answers


def pack_answers(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer`` rows ``[N, T]``: input ids, attention mask and the answer positions."""
    ids, attention = pad_rows([list(p) + list(a) for p, a in zip(prompts, answers, strict=True)], pad_id)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        answer[i, len(p): len(p) + len(a)] = True
    return ids, attention, answer


def _answer_batches(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        yield (rows, *pack_answers(prompts[rows], answers[rows], pad_id))


@torch.no_grad()
def answer_projections(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    axis: AssistantAxis,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """Mean projection of each answer's tokens at each layer, teacher-forced: ``[n_probes, n_layers]`` (NaN for an
    empty answer). ``layers`` defaults to all."""
    layers = list(range(len(decoder_layers(model)))) if layers is None else list(layers)
    unit = axis.unit.float()
    out = torch.full((len(prompts), len(layers)), float("nan"))
    device = _device(model)
    for rows, ids, attention, answer in _answer_batches(prompts, answers, batch_size, pad_id):
        with eval_mode(model), ProjectionRecorder(model, unit, layers, to_cpu=True) as recorder:
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        m = answer.float()
        n = m.sum(dim=1)
        for j, layer in enumerate(layers):
            means = (recorder.proj[layer] * m).sum(dim=1) / n.clamp(min=1)
            out[rows, j] = torch.where(n > 0, means, torch.full_like(means, float("nan")))
    return out


def drift_scores(current: torch.Tensor, baseline: torch.Tensor, domains: Sequence[str]) -> dict[str, float]:
    """Z-scores of the mean probe projection against step 0, averaged over layers: ``{"": overall, domain: …}``.

    Each layer's change of the mean is divided by the step-0 standard deviation of per-probe projections in the
    same group, so 1.0 means "moved by one probe-to-probe spread". Empty answers (NaN) are left out.
    """
    groups = {"": list(range(len(domains)))}
    for i, d in enumerate(domains):
        groups.setdefault(d, []).append(i)
    overall = _nanstd(baseline)
    scores = {}
    for name, idx in groups.items():
        cur, base = current[idx], baseline[idx]
        spread = _nanstd(base)
        spread = torch.where(torch.isfinite(spread) & (spread > 0), spread, overall)  # too few probes: use all
        z = (cur.nanmean(dim=0) - base.nanmean(dim=0)) / spread.clamp(min=1e-12)
        scores[name] = float(z.nanmean())
    return scores


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation over dim 0 ignoring NaNs; NaN where fewer than two values."""
    n = (~x.isnan()).sum(dim=0)
    mean = x.nanmean(dim=0, keepdim=True)
    var = ((x - mean) ** 2).nansum(dim=0) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))


@torch.no_grad()
def answer_nll(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each answer after its prompt, ``[n]`` (NaN for an empty answer)."""
    out = torch.full((len(prompts),), float("nan"))
    device = _device(model)
    for rows, ids, attention, answer in _answer_batches(prompts, answers, batch_size, pad_id):
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        m = answer[:, 1:].float()
        n = m.sum(dim=1)
        means = (nll * m).sum(dim=1) / n.clamp(min=1)
        out[rows] = torch.where(n > 0, means, torch.full_like(means, float("nan")))
    return out


def far_role_prompts(axis: AssistantAxis, n_roles: int, roles: object = None) -> list[str]:
    """System prompts of the ``n_roles`` roles farthest from the Assistant on the axis (at its report layer).

    Role prompts come from the shipped roles (or ``roles``); axis roles with no known prompt are skipped.
    """
    known = load_roles(roles)
    proj = axis.role_projections(axis.report_layer)
    order = sorted(range(len(axis.role_names)), key=lambda i: float(proj[i]))
    names = [axis.role_names[i] for i in order if axis.role_names[i] in known][:n_roles]
    return [known[name][0] for name in names]


def role_likeness(
    reference: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    answers: Sequence[Sequence[int]],
    role_prompts: Sequence[str],
    batch_size: int = 16,
) -> torch.Tensor:
    """NLL(answer | default prompt) − mean over roles of NLL(answer | role prompt), per answer, under ``reference``."""
    pad = tokenizer.pad_token_id
    default = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    base = answer_nll(reference, default, answers, batch_size, pad)
    roles = []
    for system in role_prompts:
        prompted = [encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": t}])
                    for t in texts]
        roles.append(answer_nll(reference, prompted, answers, batch_size, pad))
    return base - torch.stack(roles).mean(dim=0)


def domain_means(values: torch.Tensor, domains: Sequence[str]) -> dict[str, float]:
    """``{"": overall mean, domain: mean}`` of a per-probe score, NaNs left out."""
    out = {"": float(values.nanmean())}
    for d in dict.fromkeys(domains):
        idx = [i for i, x in enumerate(domains) if x == d]
        out[d] = float(values[idx].nanmean())
    return out


class ProbeMonitor:
    """Probe drift during training: the probe set, the base model's step-0 answers and baselines, and the
    measurement at later steps (with role-likeness where a frozen ``reference`` is at hand).

    ``tokenizer`` needs a chat template. ``role_prompts`` are the far roles' system prompts for role-likeness
    (empty: off). The state (:meth:`state_dict`) is what a resume needs to keep measuring against step 0.
    """

    def __init__(self, axis: AssistantAxis, tokenizer: object, mode: str, max_new_tokens: int, batch_size: int,
                 reference: object = None, role_prompts: Sequence[str] = ()):
        self.axis, self.tokenizer, self.mode = axis, tokenizer, mode
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.reference, self.role_prompts = reference, list(role_prompts) if reference is not None else []
        self.probes: ProbeSet | None = None
        self.answers: list[list[int]] | None = None
        self.baseline: torch.Tensor | None = None
        self.role_baseline: torch.Tensor | None = None
        self.rows: list[dict] = []

    def start(self, model: nn.Module, probes: object = None, per_domain: int | None = None) -> None:
        """Answer the probes with the base ``model`` and read the step-0 baselines."""
        tok = self.tokenizer
        self.probes = build_probe_set(tok, probes, per_domain)
        start = time.perf_counter()
        logger.info("anchor: answering %d probes with the base model for the step-0 baseline...",
                    len(self.probes.prompts))
        self.answers = generate_answers(model, tok, self.probes.prompts, self.max_new_tokens, self.batch_size)
        self.baseline = answer_projections(model, self.probes.prompts, self.answers, self.axis,
                                           batch_size=self.batch_size, pad_id=tok.pad_token_id)
        if self.role_prompts:
            with self.reference.active() as ref:
                self.role_baseline = role_likeness(ref, tok, self.probes.texts, self.answers, self.role_prompts,
                                                   self.batch_size)
        logger.info("anchor: probe baseline ready in %.0f s.", time.perf_counter() - start)

    def measure(self, model: nn.Module, answers_table: bool = False) -> dict[str, float]:
        """Probe drift (and role-likeness where a reference exists) of ``model`` now, as ``{metric: value}``.

        With ``answers_table`` the model answers afresh even in teacher-forced mode, and :attr:`rows` holds one row
        per probe (domain, prompt, the fresh answer, its projection change since step 0 averaged over layers, its
        role-likeness), for a person to read the text drifting.
        """
        tok, probes = self.tokenizer, self.probes
        answers, fresh = self.answers, None
        if self.mode == "generated" or self.role_prompts or answers_table:
            fresh = generate_answers(model, tok, probes.prompts, self.max_new_tokens, self.batch_size)
            if self.mode == "generated":
                answers = fresh
        current = answer_projections(model, probes.prompts, answers, self.axis, batch_size=self.batch_size,
                                     pad_id=tok.pad_token_id)
        out = {}
        for name, z in drift_scores(current, self.baseline, probes.domains).items():
            out["probe_drift" + (f"/{name}" if name else "")] = z
        score = None
        if self.role_prompts:
            with self.reference.active() as ref:
                score = role_likeness(ref, tok, probes.texts, fresh, self.role_prompts, self.batch_size)
            for name, value in domain_means(score, probes.domains).items():
                out["role_likeness" + (f"/{name}" if name else "")] = value
        if answers_table:
            change = (current - self.baseline).nanmean(dim=1)
            self.rows = [{"domain": d, "prompt": t, "answer": tok.decode(a, skip_special_tokens=True),
                          "projection_change": float(c), "role_likeness": None if score is None else float(r)}
                         for d, t, a, c, r in zip(probes.domains, probes.texts, fresh, change,
                                                  score if score is not None else change, strict=True)]
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"probe_baseline": self.baseline}
        if self.role_baseline is not None:
            tensors["role_baseline"] = self.role_baseline
        p = self.probes
        return tensors, {"domains": p.domains, "texts": p.texts, "prompts": p.prompts, "answers": self.answers}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.probes = ProbeSet(meta["domains"], meta["texts"], meta["prompts"])
        self.answers = meta["answers"]
        self.baseline = tensors["probe_baseline"]
        self.role_baseline = tensors.get("role_baseline")
