"""Extraction: mean residual-stream activations over a model's response tokens, per layer.

For each (persona, system prompt, question) the model answers, and we keep the mean output of every decoder
layer over the tokens it generated (template tokens and the end-of-turn token excluded). Activations are
captured *during* generation: at decode step ``t`` the layer hooks see the hidden state of generated token
``t-1``, which is exactly what a teacher-forced forward over the response would compute, so no second pass is
paid for. ``mode="prompt"`` skips generation and averages the prompt-end tokens (the template's generation
prompt, e.g. ``<|im_start|>assistant\\n``): fast, and it keeps the role ordering but not the direction.

Where the compute goes on a CPU, and what is done about it:

- **Shared prompt heads.** Every question a role answers starts with the same tokens (the system message and
  the user header). Each distinct head is run once per batch and its KV cache is shared by the rows that start
  with it, so only the question and the answer are paid per sample. Rows keep their true positions (the head's
  length plus their own offset), so the numbers equal a plain run over the whole prompt.
- **Batches across personas.** Personas are grouped into units of work of at least one batch, and a unit's
  samples are sorted by the length of what is left after the head, so few padding tokens are computed.
- **No logits over the prompt.** Only the last position's logits are computed (``logits_to_keep=1``).

Results stream to ``out_dir/shards`` (one safetensors file per persona, written atomically once its unit is
done), so an interrupted run resumes at the first unfinished unit and a half-written shard is never read back.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from anchor.hooks import LayerHooks
from anchor.io import atomic_write, atomic_write_json
from anchor.models import decoder_layers, fingerprint, unwrap
from anchor.spans import encode_prompt, render_chat

if TYPE_CHECKING:
    from anchor.axis import AxisSettings

DEFAULT_KEY = "default"
MODES = ("generate", "prompt")


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that changes what an extraction computes; a resumed run must match it exactly."""

    mode: str = "generate"
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 means greedy decoding
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}.")
        if self.max_new_tokens < 2 and self.mode == "generate":
            raise ValueError("max_new_tokens must be >= 2 in generate mode (the last token is never fed back).")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1.")
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy).")


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
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


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


class _Recorder:
    """Hook function that sums, per sample and layer, the hidden states (and their norms) of the last
    ``last`` positions of each forward call while ``rows`` says which samples the batch rows are."""

    def __init__(self, n_samples: int, n_layers: int):
        self.n_samples, self.n_layers = n_samples, n_layers
        self.rows: torch.Tensor | None = None  # None: this forward is not recorded
        self.last = 1
        self.sums: torch.Tensor | None = None  # [n_samples, n_layers, hidden], allocated on first use
        self.norms: torch.Tensor | None = None  # [n_samples, n_layers]

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        if self.rows is None:
            return
        h = hidden[self.rows, -self.last:].detach().float()  # batch row i is sample i
        if self.sums is None:
            self.sums = h.new_zeros(self.n_samples, self.n_layers, h.shape[-1])
            self.norms = h.new_zeros(self.n_samples, self.n_layers)
        self.sums[:, layer].index_add_(0, self.rows, h.sum(dim=1))
        self.norms[:, layer].index_add_(0, self.rows, h.norm(dim=-1).sum(dim=1))


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: DynamicCache) -> torch.Tensor:
    """One cached forward; returns the last position's logits. ``mask`` covers the cache plus ``ids``."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{_cache_kwarg(model): cache})
    return out.logits[:, -1]


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away)."""
    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


def _prefill_heads(model: nn.Module, heads: Sequence[tuple[int, ...]], pad_id: int,
                   device: torch.device) -> tuple[DynamicCache, torch.Tensor]:
    """Run each distinct prompt head once and give every row its head's KV cache and attention mask.

    Heads are left-padded, so a row's head ends where its remaining prompt begins; the padded slots are masked.
    """
    cache = DynamicCache(config=unwrap(model).config)
    if not any(heads):
        return cache, torch.zeros(len(heads), 0, dtype=torch.long, device=device)
    distinct = {head: i for i, head in enumerate(dict.fromkeys(heads))}
    ids, mask = left_pad(list(distinct), pad_id, device)
    _forward(model, ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0), cache)
    index = torch.tensor([distinct[h] for h in heads], device=device)
    cache.batch_select_indices(index)
    return cache, mask[index]


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def run_batch(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[Sequence[int]],
    settings: ExtractionSettings,
    prompt_end: int = 1,
    shared: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Answer a batch of prompts; return per-sample layer means ``[B, L, H]``, token counts, mean token norms
    ``[B, L]`` and the decoded answers.

    ``shared[i]`` is how many leading tokens of ``prompts[i]`` other rows may share (its system message, say):
    rows with the same head have it computed once. Heads never reach into the tokens that are recorded.
    ``generator`` seeds sampling when ``settings.temperature > 0``.
    """
    device = next(model.parameters()).device
    n_layers = len(decoder_layers(model))
    keep = prompt_end if settings.mode == "prompt" else 1
    if any(len(p) < keep for p in prompts):
        raise ValueError(f"Every prompt needs at least {keep} tokens; got an empty or shorter one.")
    cuts = [min(s, len(p) - keep) for s, p in zip(shared or [0] * len(prompts), prompts, strict=True)]
    cache, head_mask = _prefill_heads(model, [tuple(p[:c]) for p, c in zip(prompts, cuts, strict=True)],
                                      tokenizer.pad_token_id, device)
    ids, tail_mask = left_pad([p[c:] for p, c in zip(prompts, cuts, strict=True)], tokenizer.pad_token_id, device)
    mask = torch.cat([head_mask, tail_mask], dim=1)
    positions = (head_mask.sum(dim=1, keepdim=True) + tail_mask.cumsum(dim=1) - 1).clamp(min=0)
    recorder = _Recorder(len(prompts), n_layers)
    with LayerHooks(model, range(n_layers), recorder):
        if settings.mode == "prompt":
            recorder.rows, recorder.last = torch.arange(len(prompts), device=device), prompt_end
            _forward(model, ids, mask, positions, cache)
            counts = torch.full((len(prompts),), prompt_end, dtype=torch.long)
            answers = [[] for _ in prompts]
        else:
            answers, counts = _decode(model, tokenizer, ids, mask, positions, cache, settings, recorder, generator)
    scale = counts.clamp(min=1).float()
    means = recorder.sums.cpu() / scale[:, None, None]
    norms = recorder.norms.cpu() / scale[:, None]
    return means, counts, norms, tokenizer.batch_decode(answers, skip_special_tokens=True)


def _decode(
    model: nn.Module,
    tokenizer: object,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
    settings: ExtractionSettings,
    recorder: _Recorder,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy (or sampled) decoding that records each fed answer token's layer outputs.

    A row stops at its first stop token, which is neither fed, recorded nor kept in its answer; the last of the
    ``max_new_tokens`` tokens is never fed, so it has no activation. Finished rows keep being fed (and are not
    recorded) until every row is done, so the batch keeps its shape.
    """
    stop = torch.tensor(sorted(stop_ids(model, tokenizer)), device=ids.device)
    n = ids.shape[0]
    answers: list[list[int]] = [[] for _ in range(n)]
    counts = torch.zeros(n, dtype=torch.long)
    live = torch.ones(n, dtype=torch.bool, device=ids.device)
    logits = _forward(model, ids, mask, positions, cache)
    position = positions[:, -1:]
    for step in range(settings.max_new_tokens):
        token = _next_token(logits, settings.temperature, generator)
        live &= ~torch.isin(token, stop)
        for row in live.nonzero().squeeze(1).tolist():
            answers[row].append(int(token[row]))
        if step == settings.max_new_tokens - 1 or not live.any():
            break
        recorder.rows = live.nonzero().squeeze(1)
        counts[recorder.rows.cpu()] += 1
        mask = torch.cat([mask, live[:, None].long()], dim=1)
        position = position + 1
        logits = _forward(model, token[:, None], mask, position, cache)
    return answers, counts


def save_shard(shard: Shard, path: Path) -> None:
    meta = {"persona": shard.persona, "items": shard.items, "texts": shard.texts}
    tensors = {"means": shard.means.contiguous(), "counts": shard.counts, "norms": shard.norms.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"anchor": json.dumps(meta)}))


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
    atomic_write_json(path, manifest)


def units_of_work(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split personas (with ``sizes[i]`` answers each) into consecutive units of at least ``batch_size`` answers.

    A unit is batched as a whole and its shards are written when it is done, so it is what a kill can lose. The
    split depends only on the sizes and the batch size, so a resumed run batches every unit exactly as an
    uninterrupted one would and gets bit-identical numbers. A short tail joins the unit before it.
    """
    units: list[list[int]] = []
    for index in range(len(sizes)):
        if units and sum(sizes[i] for i in units[-1]) < batch_size:
            units[-1].append(index)
        else:
            units.append([index])
    if len(units) > 1 and sum(sizes[i] for i in units[-1]) < batch_size:
        tail = units.pop()
        units[-1] += tail
    return units


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
    interruption resumes the run at the first unit of work with a missing shard. Sampling (``temperature > 0``)
    is seeded from ``settings.seed`` and the unit, so a resumed run gives the same numbers as an uninterrupted one.
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
    sizes = [len(p.system_prompts) * len(questions) for p in personas]
    paths = [_shard_path(out_dir, i, p.name) for i, p in enumerate(personas)]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=sum(sizes), desc=f"extract ({settings.mode})", unit="answer", disable=not progress) as bar:
            for unit in units_of_work(sizes, settings.batch_size):
                if not all(paths[i].exists() for i in unit):
                    shards = _extract_unit(model, tokenizer, [personas[i] for i in unit], questions, settings,
                                           unit[0], prompt_end)
                    for i, shard in zip(unit, shards, strict=True):
                        save_shard(shard, paths[i])
                bar.update(sum(sizes[i] for i in unit))
    finally:
        model.train(was_training)
    return paths


def _shared_head(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``prompts``: the tokens their KV cache can share."""
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


def _even_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into the fewest batches of at most ``batch_size``, as equal in size as possible."""
    n_batches = -(-len(order) // batch_size)
    bounds = [round(k * len(order) / n_batches) for k in range(n_batches + 1)]
    return [list(order[a:b]) for a, b in itertools.pairwise(bounds)]


def _extract_unit(
    model: nn.Module,
    tokenizer: object,
    personas: Sequence[Persona],
    questions: Sequence[str],
    settings: ExtractionSettings,
    index: int,
    prompt_end: int,
) -> list[Shard]:
    """Answer every sample of a unit of personas in length-sorted batches; one shard per persona."""
    items = [(k, p, q) for k, persona in enumerate(personas) for p in range(len(persona.system_prompts))
             for q in range(len(questions))]
    prompts = [encode_prompt(tokenizer, _messages(personas[k].system_prompts[p], questions[q])) for k, p, q in items]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (k, p, _) in enumerate(items):
        groups.setdefault((k, p), []).append(i)
    heads = {key: _shared_head([prompts[i] for i in members]) for key, members in groups.items()}
    shared = [heads[item[:2]] for item in items]
    # Similar remaining lengths in a batch waste less compute on padding; the order is fixed, so runs repeat.
    order = sorted(range(len(items)), key=lambda i: (len(prompts[i]) - shared[i], i))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed * 100_003 + index)
    means, counts, norms, texts = ([None] * len(items) for _ in range(4))
    for chunk in _even_batches(order, settings.batch_size):
        m, c, n, t = run_batch(model, tokenizer, [prompts[i] for i in chunk], settings, prompt_end,
                               shared=[shared[i] for i in chunk], generator=generator)
        for j, i in enumerate(chunk):
            means[i], counts[i], norms[i], texts[i] = m[j], c[j], n[j], t[j]
    shards = []
    for k, persona in enumerate(personas):
        mine = [i for members in groups.values() if items[members[0]][0] == k for i in members]
        shards.append(Shard(persona.name, torch.stack([means[i] for i in mine]), torch.stack([counts[i] for i in mine]),
                            torch.stack([norms[i] for i in mine]), [items[i][1:] for i in mine],
                            [texts[i] for i in mine]))
    return shards


# -- choosing settings for a time budget ---------------------------------------------------------------------------

BUDGET_FRONTIER: tuple[tuple[float, dict], ...] = (
    (11.6, {"n_roles": 4, "n_questions": 8, "max_new_tokens": 16}),
    (15.6, {"n_roles": 4, "n_questions": 16, "max_new_tokens": 16}),
    (19.7, {"n_roles": 4, "n_questions": 24, "max_new_tokens": 16}),
    (27.0, {"n_roles": 6, "n_questions": 16, "max_new_tokens": 32}),
    (35.4, {"n_roles": 4, "n_questions": 32, "max_new_tokens": 32}),
    (49.3, {"n_roles": 4, "n_questions": 48, "max_new_tokens": 32}),
    (85.5, {"n_roles": 6, "n_questions": 64, "max_new_tokens": 32}),
    (107.7, {"n_roles": 8, "n_questions": 64, "max_new_tokens": 32}),
    (157.8, {"n_roles": 8, "n_questions": 96, "max_new_tokens": 32}),
    (244.1, {"n_roles": 16, "n_questions": 80, "max_new_tokens": 32}),
    (386.1, {"n_roles": 16, "n_questions": 128, "max_new_tokens": 32}),
    (703.4, {"n_roles": 24, "n_questions": 160, "max_new_tokens": 32}),
)
"""Seconds on the benchmark machine (2 CPU cores, SmolLM2-135M, batch 128) and the sampling settings that reach
the highest cosine to the full axis within them: points of the frontier measured by ``scripts/bench_axis.py``
(``scripts/results/bench_axis_frontier.md``), each the most accurate setting at its cost by the 10th-percentile
cosine over random role and question draws. Answers shorter than 16 tokens never make the list: they converge to a
different direction, so more of them does not help."""

PROBE_QUESTIONS = 32
PROBE_SECONDS = 1.75
"""What :func:`relative_speed`'s probe (the default Assistant answering the first PROBE_QUESTIONS shipped questions,
4 new tokens, one batch) takes on the benchmark machine, as timed by ``scripts/bench_axis.py variants``."""


def settings_for_budget(seconds: float, speed: float = 1.0) -> AxisSettings:
    """The sampling settings (an :class:`anchor.axis.AxisSettings`) that fit ``seconds`` on a machine ``speed``
    times as fast as the benchmark's for this model (see :func:`relative_speed`): the most accurate point of the
    measured frontier whose time fits. ``settings_for_budget(60)`` is the on-the-fly default."""
    from anchor.axis import AxisSettings

    if not (seconds > 0 and speed > 0) or seconds == float("inf"):
        raise ValueError(f"seconds={seconds} and speed={speed} must be finite numbers > 0.")
    fits = [settings for cost, settings in BUDGET_FRONTIER if cost / speed <= seconds]
    if not fits:
        cheapest = BUDGET_FRONTIER[0][0] / speed
        raise ValueError(f"{seconds:g} s is below the cheapest measured axis here (about {cheapest:.0f} s); give a "
                         f"budget of at least {cheapest:.0f} s, or choose the settings yourself.")
    return AxisSettings(**{"prompts_per_role": 1, "mode": "generate", **fits[-1]})


def relative_speed(model: nn.Module, tokenizer: object) -> float:
    """How many times faster than the benchmark machine this model extracts here, from a probe of about a second
    there: one batch of the default Assistant's answers. A bigger model or a slower machine gives a value below 1."""
    from anchor.personas import load_questions

    prompts = [encode_prompt(tokenizer, _messages("", q)) for q in load_questions()[:PROBE_QUESTIONS]]
    settings = ExtractionSettings(max_new_tokens=4, batch_size=PROBE_QUESTIONS)
    run_batch(model, tokenizer, prompts[:2], settings)  # warm-up: lazy initialisation is not speed
    start = time.perf_counter()
    run_batch(model, tokenizer, prompts, settings, shared=[_shared_head(prompts)] * len(prompts))
    return PROBE_SECONDS / (time.perf_counter() - start)
