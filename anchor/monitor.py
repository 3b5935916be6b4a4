"""Drift monitoring: where each assistant turn of a conversation sits on the Assistant Axis.

A conversation (OpenAI-style ``messages``, any chat template) is fed to the model teacher-forced, and the output
of one decoder layer is projected on the unit axis at every assistant content token (template tokens, system and
user text excluded, located by :func:`anchor.spans.encode_chat`). The per-turn mean of those projections is the
drift trajectory: a falling curve means the model is moving out of its Assistant persona as the chat goes on.

Reading is done with a :class:`anchor.hooks.LayerHooks` function that returns ``None``, so it never changes the
model. Inside ``with anchor.capping.cap(...)`` the cap's hooks were registered first and run first, so the
monitor reads capped states. The forward stops right after the read layer: later layers and the vocabulary
projection (the largest single matrix of a small model) cannot change what is read, so they are not computed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from anchor.axis import AssistantAxis
from anchor.hooks import LayerHooks, check_layers
from anchor.io import atomic_write, nan_to_none, read_utf8
from anchor.models import unwrap
from anchor.spans import ChatEncoding, encode_chat

Messages = list[dict[str, str]]


@dataclass
class DriftTrace:
    """Per-token and per-turn axis projections of one conversation's assistant turns at one layer.

    ``per_token[k]`` holds the projections of assistant turn ``k``'s content tokens (in order), ``tokens[k]``
    those tokens decoded one by one, and ``per_turn[k]`` their mean (NaN for an empty reply). Higher is more
    Assistant-like; compare with the default band, :func:`default_band`.
    """

    per_turn: list[float]
    per_token: list[torch.Tensor]
    layer: int
    tokens: list[list[str]]

    @property
    def n_turns(self) -> int:
        return len(self.per_turn)

    @property
    def std_per_turn(self) -> list[float]:
        """Spread of the token projections within each turn (population std; NaN for an empty reply)."""
        return [float(t.std(correction=0)) if t.numel() else math.nan for t in self.per_token]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the per-turn values of an empty reply (NaN in memory) become None (JSON ``null``)."""
        return nan_to_none({
            "layer": self.layer,
            "per_turn": self.per_turn,
            "std_per_turn": self.std_per_turn,
            "n_tokens": [int(t.numel()) for t in self.per_token],
            "per_token": [t.tolist() for t in self.per_token],
            "tokens": self.tokens,
        })


class _Stop(Exception):
    """Raised by the reading hook to end the forward once the read layer has run."""


def resolve_layer(axis: AssistantAxis, layer: int | None) -> int:
    """The layer to read: ``layer`` if given and valid for the axis, else the axis's report layer."""
    if layer is None:
        return axis.report_layer
    return check_layers([layer], axis.n_layers)[0]


class ContextLengthError(ValueError):
    """A conversation is longer than the model's context (``max_position_embeddings``)."""


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was trained on (``max_position_embeddings``), or None if its config says not."""
    config = getattr(unwrap(model), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


def check_context(model: nn.Module, lengths: Sequence[int], what: str = "conversation") -> None:
    """Refuse, before any forward, sequences longer than the model's context: positions past it were never
    trained, so what the model reads or writes there means nothing."""
    limit = context_length(model)
    over = [(i, n) for i, n in enumerate(lengths) if limit is not None and n > limit]
    if over:
        i, n = over[0]
        more = f" ({len(over) - 1} more {what}s too)" if len(over) > 1 else ""
        raise ContextLengthError(f"{what} {i} needs {n} tokens, past the model's context of {limit} "
                         f"(max_position_embeddings){more}; shorten it or split it into parts.")


def default_band(axis: AssistantAxis, layer: int) -> tuple[float, float]:
    """The 25th and 75th percentiles of the axis's default-answer projections at ``layer``: ordinary Assistant."""
    return axis.tau(layer, 25.0), axis.tau(layer, 75.0)


@torch.no_grad()
def _read_layer(model: nn.Module, axis: AssistantAxis, rows: Sequence[Sequence[int]], layer: int) -> torch.Tensor:
    """Projections ``[B, T]`` at ``layer`` for right-padded ``rows``.

    Right padding keeps every real token at its own position with nothing after it that it can see, so each row
    reads exactly what it would read alone.
    """
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    read: dict[str, torch.Tensor] = {}

    def hook(_layer: int, hidden: torch.Tensor) -> None:
        read["projection"] = axis.project(hidden.detach().float(), layer).cpu()
        raise _Stop

    was_training = model.training
    model.eval()
    try:
        with LayerHooks(model, [layer], hook, axis.metadata.get("layers_path")):
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        model.train(was_training)
    return read["projection"]


def _encode(tokenizer: object, messages: Messages, index: int) -> ChatEncoding:
    encoding = encode_chat(tokenizer, messages)
    if encoding.n_turns == 0:
        raise ValueError(
            f"conversation {index} has no assistant turns: the monitor reads the model's replies, so add at least "
            "one {'role': 'assistant', 'content': ...} message (or use `anchor generate` to have the model write them)."
        )
    return encoding


def monitor_many(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    conversations: Sequence[Messages],
    layer: int | None = None,
    batch_size: int = 8,
    check_weights: bool = True,
    progress: bool = False,
) -> list[DriftTrace]:
    """:func:`monitor` for many conversations, batched (right-padded, similar lengths together)."""
    axis.check_compatible(model, check_weights=check_weights)
    layer = resolve_layer(axis, layer)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    encodings = [_encode(tokenizer, messages, i) for i, messages in enumerate(conversations)]
    check_context(model, [len(e.input_ids) for e in encodings])
    order = sorted(range(len(encodings)), key=lambda i: (len(encodings[i].input_ids), i))
    traces: list[DriftTrace | None] = [None] * len(encodings)
    for start in tqdm(range(0, len(order), batch_size), desc="monitor", unit="batch", disable=not progress):
        chunk = order[start:start + batch_size]
        projections = _read_layer(model, axis, [encodings[i].input_ids for i in chunk], layer)
        for row, i in enumerate(chunk):
            traces[i] = _trace(tokenizer, encodings[i], projections[row], layer)
    return traces


def _trace(tokenizer: object, encoding: ChatEncoding, projection: torch.Tensor, layer: int) -> DriftTrace:
    turn_index = torch.tensor(encoding.turn_index)
    ids = torch.tensor(encoding.input_ids)
    per_token, tokens = [], []
    for turn in range(encoding.n_turns):
        selected = turn_index == turn
        per_token.append(projection[: len(turn_index)][selected].clone())
        tokens.append(_token_strings(tokenizer, ids[selected].tolist()))
    per_turn = [float(t.mean()) if t.numel() else math.nan for t in per_token]
    return DriftTrace(per_turn=per_turn, per_token=per_token, layer=layer, tokens=tokens)


def _token_strings(tokenizer: object, ids: list[int]) -> list[str]:
    """Each token's text as it reads in context: SentencePiece and byte-level tokens keep their spaces, which
    decoding them one at a time would drop, so each piece is what it adds to the decoded prefix."""
    pieces, previous = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[: k + 1])
        pieces.append(text[len(os.path.commonprefix([previous, text])):])  # noqa: RUF071 (characters, as meant)
        previous = text
    return pieces


def monitor(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    messages: Messages,
    layer: int | None = None,
    check_weights: bool = True,
) -> DriftTrace:
    """Teacher-forced axis projections of every assistant turn of ``messages`` at ``layer`` (default: the axis's
    report layer). Works under :func:`anchor.capping.cap` (it then reads capped states)."""
    return monitor_many(model, tokenizer, axis, [messages], layer, batch_size=1, check_weights=check_weights)[0]


def read_conversations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Conversations from a file, each as a record with a ``"messages"`` list (other fields kept).

    A ``.json`` file holds one conversation: a messages list or ``{"messages": [...]}``. A ``.jsonl`` file holds
    one per line in either form; blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {str(path)!r}")
    text = read_utf8(path)
    if path.suffix.lower() == ".jsonl":
        lines = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        lines = [("file", text)]
    if not lines:
        raise ValueError(f"{path} contains no conversations.")
    records = []
    for where, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} {where}: not valid JSON ({err.msg}).") from None
        record = {"messages": value} if isinstance(value, list) else value
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ValueError(
                f"{path} {where}: expected a messages list or an object with a \"messages\" list, got "
                f"{type(value).__name__}."
            )
        records.append(record)
    return records


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def summary_table(traces: Sequence[DriftTrace], names: Sequence[str]) -> str:
    """A markdown table: one row per conversation (per-turn means, their mean, last minus first), then the mean."""
    n_turns = max(t.n_turns for t in traces)
    header = ["conversation", *(f"turn {k + 1}" for k in range(n_turns)), "mean", "last − first"]
    rows = []
    for name, trace in zip(names, traces, strict=True):
        values = [v for v in trace.per_turn if not math.isnan(v)]
        mean = sum(values) / len(values) if values else math.nan
        drift = values[-1] - values[0] if len(values) > 1 else math.nan
        cells = [_fmt(v) for v in trace.per_turn] + [""] * (n_turns - trace.n_turns)
        rows.append([name, *cells, _fmt(mean), _fmt(drift)])
    means = turn_means(traces)
    rows.append(["**mean**", *(_fmt(m) for m, _ in means), "", ""])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def turn_means(traces: Sequence[DriftTrace]) -> list[tuple[float, float]]:
    """Mean and standard error over conversations at each turn (conversations shorter than a turn are left out)."""
    n_turns = max(t.n_turns for t in traces)
    out = []
    for k in range(n_turns):
        values = torch.tensor([t.per_turn[k] for t in traces if k < t.n_turns and not math.isnan(t.per_turn[k])])
        mean = float(values.mean()) if values.numel() else math.nan
        sem = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan
        out.append((mean, sem))
    return out


def plot_trajectories(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    band: tuple[float, float],
    path: str | os.PathLike | None = None,
    title: str = "",
    ax: object | None = None,
    ylabel: str = "projection on the Assistant Axis",
) -> object:
    """Plot per-turn means with a spread band for each labelled series, over the shaded default-Assistant band.

    ``series[label] = (means, spreads)``. With ``path`` the figure is saved as PNG; with ``ax`` the plot is drawn
    into that matplotlib axes (for multi-panel figures). Returns the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhspan(*band, color="0.5", alpha=0.15, label="default Assistant (25–75%)")
    for label, (means, spreads) in series.items():
        x = list(range(1, len(means) + 1))
        line = ax.plot(x, means, marker="o", label=label)[0]
        lo = [m - (s if not math.isnan(s) else 0.0) for m, s in zip(means, spreads, strict=True)]
        hi = [m + (s if not math.isnan(s) else 0.0) for m, s in zip(means, spreads, strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)
    return ax
