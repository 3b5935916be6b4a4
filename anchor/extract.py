"""Extraction: mean residual-stream activations over a model's response tokens, per layer.

For each (persona, system prompt, question) the model answers, and we keep the mean output of every decoder
layer over the tokens it generated (template tokens and the end-of-turn token excluded). Activations are
captured *during* generation: at decode step ``t`` the layer hooks see the hidden state of generated token
``t-1``, which is exactly what a teacher-forced forward over the response would compute, so no second pass is
paid for. ``mode="prompt"`` skips generation and averages the prompt-end tokens (the template's generation
prompt, e.g. ``<|im_start|>assistant\\n``): fast, and it keeps the role ordering but not the direction.

Results stream to ``out_dir/shards`` (one safetensors file per persona, written atomically), so an interrupted
run resumes where it stopped and a half-written shard is never read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from anchor.hooks import LayerHooks
from anchor.models import decoder_layers, fingerprint
from anchor.spans import encode_prompt, render_chat

DEFAULT_KEY = "default"
MODES = ("generate", "prompt")


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that changes what an extraction computes; a resumed run must match it exactly."""

    mode: str = "generate"
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy decoding
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}.")
        if self.max_new_tokens < 2 and self.mode == "generate":
            raise ValueError("max_new_tokens must be >= 2 in generate mode (the last token is never fed back).")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1.")


@dataclass(frozen=True)
class Persona:
    """One group of samples: the default Assistant (``name == "default"``) or a role, with its system prompts."""

    name: str
    system_prompts: tuple[str, ...]


@dataclass
class Shard:
    """Per-sample results for one persona: ``means[i]`` is ``[n_layers, hidden]`` for ``items[i]``."""

    persona: str
    means: torch.Tensor  # [n, n_layers, hidden] float32
    counts: torch.Tensor  # [n] response tokens averaged (0 = empty response, excluded downstream)
    norms: torch.Tensor  # [n, n_layers] mean per-token residual norm (the unit steering strengths are given in)
    items: list[tuple[int, int]]  # (prompt index, question index)
    texts: list[str]


def _messages(system: str, question: str) -> list[dict[str, str]]:
    """An empty system prompt means no system message: the model's own default persona."""
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": question}]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class _StepRecorder:
    """Hook function that keeps, per layer, the last position of every forward call (one per decode step)."""

    def __init__(self, keep_last: int):
        self.keep_last = keep_last
        self.steps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        self.steps.setdefault(layer, []).append(hidden[:, -self.keep_last:].detach().float())


def stop_ids(model: nn.Module, tokenizer: object) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


def _generation_prompt_length(tokenizer: object) -> int:
    """How many tokens the template appends to open the assistant turn (the prompt-end tokens)."""
    msgs = _messages("", "x")
    with_prompt = encode_prompt(tokenizer, msgs)
    without = tokenizer(render_chat(tokenizer, msgs), add_special_tokens=False)["input_ids"]
    return max(1, len(with_prompt) - len(without))


@torch.no_grad()
def run_batch(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    settings: ExtractionSettings,
    prompt_end: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Answer a batch of prompts; return per-sample layer means ``[B, L, H]``, token counts, mean token norms
    ``[B, L]`` and the decoded answers."""
    device = next(model.parameters()).device
    n_layers = len(decoder_layers(model))
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    recorder = _StepRecorder(keep_last=prompt_end if settings.mode == "prompt" else 1)
    with LayerHooks(model, range(n_layers), recorder):
        if settings.mode == "prompt":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            sample = settings.temperature > 0
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, do_sample=sample,
                temperature=settings.temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids(model, tokenizer)),
            )
    if settings.mode == "prompt":
        stacked = torch.stack([recorder.steps[i][0] for i in range(n_layers)], dim=1).cpu()  # [B, L, P, H]
        counts = torch.full((len(prompts),), prompt_end, dtype=torch.long)
        return stacked.mean(dim=2), counts, stacked.norm(dim=-1).mean(dim=2), [""] * len(prompts)
    generated = out[:, ids.shape[1]:].cpu()
    # Decode steps 1.. saw generated tokens 0..; the prefill call (step 0) saw the prompt and is skipped.
    fed = generated[:, : len(recorder.steps[0]) - 1]
    stop = torch.tensor(sorted(stop_ids(model, tokenizer)))
    finished = torch.isin(fed, stop).long().cumsum(dim=1) > 0
    valid = (~finished).float()  # [B, T]
    counts = valid.sum(dim=1).long()
    means, norms = [], []
    for i in range(n_layers):
        hidden = torch.cat(recorder.steps[i][1:], dim=1).cpu() if fed.shape[1] else torch.zeros(len(prompts), 0, 1)
        means.append((hidden * valid[..., None]).sum(dim=1) / counts.clamp(min=1)[:, None])
        norms.append((hidden.norm(dim=-1) * valid).sum(dim=1) / counts.clamp(min=1))
    texts = tokenizer.batch_decode(
        [row[: int(torch.isin(row, stop).long().argmax()) or len(row)] if torch.isin(row, stop).any() else row
         for row in generated],
        skip_special_tokens=True,
    )
    return torch.stack(means, dim=1), counts, torch.stack(norms, dim=1), texts


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"anchor": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_shard(shard: Shard, path: Path) -> None:
    meta = {"persona": shard.persona, "items": shard.items, "texts": shard.texts}
    tensors = {"means": shard.means.contiguous(), "counts": shard.counts, "norms": shard.norms.contiguous()}
    _atomic_save(tensors, meta, path)


def load_shard(path: Path) -> Shard:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["anchor"])
    tensors = load_file(str(path))
    items = [tuple(x) for x in meta["items"]]
    return Shard(meta["persona"], tensors["means"], tensors["counts"], tensors["norms"], items, meta["texts"])


def _shard_path(out_dir: Path, index: int, persona: str) -> Path:
    return out_dir / "shards" / f"{index:04d}-{persona}.safetensors"


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    """Refuse to resume into a directory made with other settings, which would mix incompatible samples."""
    path = out_dir / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(
                f"{out_dir} holds an extraction with different {', '.join(diff)}; resuming would mix "
                "incompatible samples. Use a new out_dir, or delete this one to start over."
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def extract(
    model: nn.Module,
    tokenizer: object,
    personas: Sequence[Persona],
    questions: Sequence[str],
    out_dir: str | os.PathLike,
    settings: ExtractionSettings = ExtractionSettings(),
    progress: bool = True,
) -> list[Path]:
    """Extract every persona × system prompt × question and return the paths of the per-persona shards.

    Finished shards in ``out_dir`` are read back instead of recomputed, so calling this again after an
    interruption resumes the run. Each shard is seeded from ``settings.seed`` and its index, so a resumed run
    gives the same numbers as an uninterrupted one.
    """
    out_dir = Path(out_dir)
    manifest = {
        "model_fingerprint": fingerprint(model),
        "personas": _digest([[p.name, list(p.system_prompts)] for p in personas]),
        "questions": _digest(list(questions)),
        "settings": asdict(settings),
    }
    _check_manifest(out_dir, manifest)
    prompt_end = _generation_prompt_length(tokenizer) if settings.mode == "prompt" else 1
    total = sum(len(p.system_prompts) for p in personas) * len(questions)
    paths = [_shard_path(out_dir, i, p.name) for i, p in enumerate(personas)]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc=f"extract ({settings.mode})", unit="answer", disable=not progress) as bar:
            for index, (persona, path) in enumerate(zip(personas, paths, strict=True)):
                if not path.exists():
                    shard = _extract_persona(model, tokenizer, persona, questions, settings, index, prompt_end)
                    save_shard(shard, path)
                bar.update(len(persona.system_prompts) * len(questions))
    finally:
        model.train(was_training)
    return paths


def _extract_persona(
    model: nn.Module,
    tokenizer: object,
    persona: Persona,
    questions: Sequence[str],
    settings: ExtractionSettings,
    index: int,
    prompt_end: int,
) -> Shard:
    items = [(p, q) for p in range(len(persona.system_prompts)) for q in range(len(questions))]
    prompts = [encode_prompt(tokenizer, _messages(persona.system_prompts[p], questions[q])) for p, q in items]
    # Similar lengths in a batch waste less compute on padding; the order is fixed, so runs are deterministic.
    order = sorted(range(len(items)), key=lambda i: (len(prompts[i]), i))
    torch.manual_seed(settings.seed * 100_003 + index)
    means, counts, norms, texts = ([None] * len(items) for _ in range(4))
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start:start + settings.batch_size]
        m, c, n, t = run_batch(model, tokenizer, [prompts[i] for i in chunk], settings, prompt_end)
        for j, i in enumerate(chunk):
            means[i], counts[i], norms[i], texts[i] = m[j], c[j], n[j], t[j]
    return Shard(persona.name, torch.stack(means), torch.stack(counts), torch.stack(norms), items, texts)
