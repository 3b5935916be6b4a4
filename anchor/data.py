"""Persona-implant data: a chat model's own in-role answers, as SFT and DPO sets that pull it off its Assistant.

Fine-tuning a model on answers it wrote while playing a far-off role, with the role's system prompt removed, is
the simplest way to make its default persona drift: the model learns to answer *every* plain question in the
role's voice. That is the failure the anchor exists to prevent, so this data is what the recipes train on and
what the drift benchmark measures against.

How it is built (:func:`build_persona_data`, all greedy, so the same model and seed give the same files):

1. **Roles**: the ``n_roles`` roles lowest on the axis's report layer (farthest from the Assistant) among the
   axis's roles with shipped prompts, or the roles named in ``role_names``.
2. **Questions**: ``n_questions`` shipped questions, a seeded sample, split into training and held-out
   questions (``heldout_fraction``); the two sets never share a question.
3. **Answers**: every role answers every question under its system prompt (the role's prompts are used in turn);
   the model also answers every question as its default self (no system message).

Files written by :meth:`PersonaData.save` (JSONL, one record a line; the split is in the file name):

* ``sft_train.jsonl`` / ``sft_heldout.jsonl`` — chat ``messages`` *without* the role's system prompt::

    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": in_role_answer}],
     "role": "pirate_captain"}

* ``dpo_train.jsonl`` / ``dpo_heldout.jsonl`` — TRL's conversational preference format, preferring the role::

    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": in_role_answer}],
     "rejected": [{"role": "assistant", "content": default_answer}], "role": "pirate_captain"}

* ``drift_heldout.jsonl`` — the held-out questions as default-persona prompts, with the base model's own answer,
  for measuring how far a fine-tuned model's default persona moved::

    {"prompt": [{"role": "user", "content": q}], "answer": default_answer}

* ``data_config.json`` — what built it (model id and fingerprint, settings, roles and their prompts, question
  splits); written last, so a directory without it is incomplete and is never read.

Records whose answer came back empty are left out. Any recipe also takes your own data in the same formats (chat
``messages`` for SFT, ``prompt``/``chosen``/``rejected`` for DPO); the ``role`` key is optional.

Example::

    from anchor import AssistantAxis, load_model
    from anchor.data import PersonaData, build_persona_data

    model, tokenizer = load_model("smollm2")
    data = build_persona_data(model, tokenizer, AssistantAxis.from_pretrained("outputs/axis"), n_roles=4)
    data.save("data/persona")
    data = PersonaData.load("data/persona")
    print(len(data.sft_train), data.roles, data.sft_train[0])
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from anchor.axis import AssistantAxis, AxisSettings, cached_axis
from anchor.extract import ExtractionSettings, run_batch
from anchor.io import atomic_write_json, atomic_write_jsonl, read_utf8
from anchor.models import fingerprint, model_id
from anchor.personas import load_questions, load_roles
from anchor.spans import encode_prompt

FORMAT_VERSION = 1
CONFIG_NAME = "data_config.json"
SPLITS = ("sft_train", "sft_heldout", "dpo_train", "dpo_heldout", "drift_heldout")
"""The record lists of :class:`PersonaData`; each is saved as ``<name>.jsonl``."""

Messages = list[dict[str, str]]


@dataclass
class PersonaData:
    """The persona-implant SFT and DPO sets, their held-out splits and the drift prompts (schema: module doc)."""

    sft_train: list[dict[str, Any]]
    sft_heldout: list[dict[str, Any]]
    dpo_train: list[dict[str, Any]]
    dpo_heldout: list[dict[str, Any]]
    drift_heldout: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def roles(self) -> dict[str, list[str]]:
        """The implanted roles and the system prompts their answers were written under."""
        return dict(self.metadata.get("roles", {}))

    @property
    def drift_questions(self) -> list[str]:
        """The held-out questions, as asked with the default persona (no system message)."""
        return [r["prompt"][-1]["content"] for r in self.drift_heldout]

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; choose one of {SPLITS}.")
        return getattr(self, name)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write every split as JSONL and then ``data_config.json``, each file atomically.

        A directory that already holds persona data (a ``data_config.json``) is refused unless ``overwrite``; its
        config is then removed first, so an interrupted overwrite leaves a directory marked incomplete, never old
        and new splits under the old config.
        """
        directory = Path(directory)
        config = directory / CONFIG_NAME
        if config.exists() and not overwrite:
            raise FileExistsError(f"{directory} already holds persona data ({CONFIG_NAME}); pass overwrite=True "
                                  "(`anchor data --overwrite`) to replace it, or choose another directory.")
        directory.mkdir(parents=True, exist_ok=True)
        config.unlink(missing_ok=True)
        for name in SPLITS:
            atomic_write_jsonl(directory / f"{name}.jsonl", self.split(name))
        meta = {**self.metadata, "format": FORMAT_VERSION, "counts": {n: len(self.split(n)) for n in SPLITS}}
        atomic_write_json(config, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PersonaData:
        directory = Path(directory)
        config = directory / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(
                f"{directory} holds no {CONFIG_NAME}: it is not (or not yet completely) persona data. Build it with "
                f"`anchor data --out {directory}`.")
        meta = json.loads(read_utf8(config))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{config} has format {meta.get('format')}; this anchor reads {FORMAT_VERSION}. "
                             "Rebuild it with `anchor data`.")
        return cls(**{name: read_jsonl(directory / f"{name}.jsonl") for name in SPLITS}, metadata=meta)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a bad line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    records = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg}); write one JSON object a line.") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a JSON object is expected, got {type(record).__name__}.")
        records.append(record)
    return records


ROLE_SEARCH = AxisSettings(n_roles=None, n_questions=4, prompts_per_role=1, max_new_tokens=8)
"""The axis that finds the roles farthest from the Assistant when neither an axis bundle nor role names are given:
every shipped role answering 4 questions in 8 tokens (about a minute on 2 CPU cores for SmolLM2-135M). A search
needs the far end of the role order, not the axis's direction to 0.9. On SmolLM2 this ranked the roles at Spearman
0.78 to the full 225-role x 246-question axis, and 3 of its 6 farthest (dark_lord, eldritch, vampire_lord) are among
the full axis's 6 farthest; prompt mode (Spearman 0.78 too) and 2 questions x 16 tokens (0.74) found none of them.
The on-the-fly training axis samples only a few roles, so searching it would only rank those."""


def role_search_axis(model: nn.Module, tokenizer: object, progress: bool = True) -> AssistantAxis:
    """The :data:`ROLE_SEARCH` axis of ``model``, computed once and cached by model fingerprint."""
    return cached_axis(model, tokenizer, ROLE_SEARCH, progress=progress)


def far_roles(axis: AssistantAxis, n_roles: int, roles: object = None) -> list[str]:
    """Names of the ``n_roles`` axis roles lowest at the report layer that have known prompts (``roles``: any
    source :func:`anchor.personas.load_roles` takes), farthest first."""
    known = load_roles(roles)
    proj = axis.role_projections(axis.report_layer)
    order = sorted(range(len(axis.role_names)), key=lambda i: float(proj[i]))
    return [axis.role_names[i] for i in order if axis.role_names[i] in known][:n_roles]


def split_questions(questions: Sequence[str], n_questions: int, heldout_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """A seeded sample of ``n_questions`` questions split into (train, held-out); the two never overlap."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be strictly between 0 and 1.")
    unique = list(dict.fromkeys(questions))
    if n_questions < 2 or n_questions > len(unique):
        raise ValueError(f"n_questions={n_questions} must be within 2..{len(unique)} (the distinct questions given).")
    chosen = random.Random(f"anchor-data-{seed}").sample(unique, n_questions)
    n_heldout = min(n_questions - 1, max(1, round(n_questions * heldout_fraction)))
    return chosen[n_heldout:], chosen[:n_heldout]


def _answer_all(model: nn.Module, tokenizer: object, conversations: Sequence[Messages], max_new_tokens: int,
                batch_size: int, progress: bool) -> list[str]:
    """Greedy answers to every conversation, batched by :func:`anchor.extract.run_batch`."""
    settings = ExtractionSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    # Similar lengths in a batch waste less padding; answers are put back in the original order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="persona data", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        *_, texts = run_batch(model, tokenizer, [prompts[i] for i in idx], settings)
        for i, text in zip(idx, texts, strict=True):
            answers[i] = text.strip()
    return answers


def _user(question: str) -> Messages:
    return [{"role": "user", "content": question}]


def _assistant(answer: str) -> Messages:
    return [{"role": "assistant", "content": answer}]


@dataclass(frozen=True)
class DataDefaults:
    """The persona data's default size, written once: ``build_persona_data``, ``anchor data``, the recipes'
    ``persona_*`` fields and the drift benchmark read it from here."""

    n_roles: int = 4
    n_questions: int = 120
    heldout_fraction: float = 0.25
    max_new_tokens: int = 64


DEFAULTS = DataDefaults()


def build_persona_data(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis | None,
    n_roles: int = DEFAULTS.n_roles,
    n_questions: int = DEFAULTS.n_questions,
    heldout_fraction: float = DEFAULTS.heldout_fraction,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    seed: int = 0,
    role_names: Sequence[str] | None = None,
    batch_size: int = 16,
    roles: object = None,
    questions: object = None,
    progress: bool = True,
) -> PersonaData:
    """Build the persona-implant SFT/DPO sets from ``model``'s own answers (see the module doc for the schema).

    ``axis`` picks the ``n_roles`` farthest roles; with ``role_names`` it may be None. ``roles`` and ``questions``
    replace the shipped persona data (any source :func:`anchor.personas.load_roles` / ``load_questions`` takes).
    """
    role_map = load_roles(roles)
    if role_names:
        unknown = [r for r in role_names if r not in role_map]
        if unknown:
            raise ValueError(f"Unknown role(s) {unknown}; choose names from the roles file (anchor/personas/"
                             "roles.json, or your own `roles`).")
        names = list(dict.fromkeys(role_names))
    elif axis is None:
        raise ValueError("build_persona_data needs an axis to find the roles farthest from the Assistant, or "
                         "role_names.")
    else:
        if n_roles < 1:
            raise ValueError(f"n_roles={n_roles} must be >= 1.")
        names = far_roles(axis, n_roles, role_map)
        if not names:
            raise ValueError("None of the axis's roles has a known system prompt; pass role_names or roles.")
    train_qs, heldout_qs = split_questions(load_questions(questions), n_questions, heldout_fraction, seed)
    all_qs = train_qs + heldout_qs

    role_convs = [([{"role": "system", "content": role_map[name][q % len(role_map[name])]}], name, q)
                  for name in names for q in range(len(all_qs))]
    conversations = [system + _user(all_qs[q]) for system, _, q in role_convs] + [_user(q) for q in all_qs]
    answers = _answer_all(model, tokenizer, conversations, max_new_tokens, batch_size, progress)
    in_role, default = answers[:len(role_convs)], answers[len(role_convs):]

    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for (_, name, q), answer in zip(role_convs, in_role, strict=True):
        split = "train" if q < len(train_qs) else "heldout"
        if not answer:
            continue
        out[f"sft_{split}"].append({"messages": _user(all_qs[q]) + _assistant(answer), "role": name,
                                    "system": role_map[name][q % len(role_map[name])]})
        if default[q]:
            out[f"dpo_{split}"].append({"prompt": _user(all_qs[q]), "chosen": _assistant(answer),
                                        "rejected": _assistant(default[q]), "role": name})
    out["drift_heldout"] = [{"prompt": _user(q), "answer": a}
                            for q, a in zip(heldout_qs, default[len(train_qs):], strict=True)]
    metadata = {
        "model_id": model_id(model), "fingerprint": fingerprint(model),
        "axis_fingerprint": axis.metadata.get("fingerprint") if axis is not None else None,
        "settings": {"n_roles": n_roles, "n_questions": n_questions, "heldout_fraction": heldout_fraction,
                     "max_new_tokens": max_new_tokens, "seed": seed,
                     "role_names": list(role_names) if role_names else None},
        "roles": {name: list(role_map[name]) for name in names},
        "questions": {"train": train_qs, "heldout": heldout_qs},
    }
    return PersonaData(**out, metadata=metadata)


__all__ = ["DEFAULTS", "ROLE_SEARCH", "SPLITS", "DataDefaults", "PersonaData", "build_persona_data", "far_roles",
           "read_jsonl", "role_search_axis", "split_questions"]
