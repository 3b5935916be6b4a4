"""Talking to a model, uncapped, capped or steered, and watching where each reply sits on the Assistant Axis.

Three layers, each used by the next:

* :class:`TurnDecoder`: greedy decoding for a batch of conversations that grow turn by turn. It keeps one KV
  cache for the batch, so a new turn costs only its new tokens: the history is never fed again. Each row's new
  tokens are left-padded within the turn, so padding can sit in the middle of a row; the attention mask hides it
  and positions are counted over real tokens only, which is what one conversation fed alone would compute.
* :class:`ConversationBatch`: conversations as ``messages`` lists on top of it. Each new turn is rendered with
  the chat template and only the text after what the model has already seen is fed. A template that rewrites
  earlier turns (the new rendering does not extend the old one) gets the whole batch re-fed from scratch.
* :func:`generate_replies` (``anchor generate``) and :class:`ChatSession` / :func:`chat_loop` (``anchor chat``).

Interventions (:class:`Intervention`) are the hooks of :mod:`anchor.capping`, entered around every forward of a
conversation, so its cache holds states computed under the same intervention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from anchor.axis import AssistantAxis
from anchor.capping import cap, steer
from anchor.extract import left_pad, stop_ids
from anchor.monitor import (
    ContextLengthError,
    Messages,
    check_context,
    context_length,
    default_band,
    monitor,
    monitor_many,
    resolve_layer,
)
from anchor.spans import encode_prompt, render_chat


@dataclass(frozen=True)
class Intervention:
    """What runs on top of the model: nothing, the bundle's default cap, a steering push, or both."""

    cap: bool = False
    steer: float | None = None

    @property
    def label(self) -> str:
        parts = (["capped"] if self.cap else []) + ([f"steered {self.steer:+g}"] if self.steer is not None else [])
        return " + ".join(parts) or "uncapped"

    @contextlib.contextmanager
    def apply(self, model: nn.Module, axis: AssistantAxis | None, check_weights: bool = True) -> Iterator[None]:
        """Attach the hooks for the duration of a ``with`` block."""
        if (self.cap or self.steer is not None) and axis is None:
            raise ValueError("capping and steering need an axis bundle; pass --axis DIR (or let anchor compute one).")
        with contextlib.ExitStack() as stack:
            if self.cap:
                stack.enter_context(cap(model, axis, check_weights=check_weights))
            if self.steer is not None:
                stack.enter_context(steer(model, axis, self.steer, check_weights=check_weights))
            yield


def _decode(tokenizer: object, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


class TurnDecoder:
    """Greedy decoding for ``n`` conversations at once, keeping their KV cache from one turn to the next."""

    def __init__(self, model: nn.Module, tokenizer: object, n: int):
        self.model, self.n = model, n
        self.context = context_length(model)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop = torch.tensor(sorted(stop_ids(model, tokenizer)), device=self.device)
        self.reset()

    def reset(self) -> None:
        """Forget every conversation (the next :meth:`reply` must feed each row its whole prompt)."""
        self._cache = None
        self._mask = torch.zeros((self.n, 0), dtype=torch.long, device=self.device)
        self._unfed: list[list[int]] = [[] for _ in range(self.n)]  # a last token generated but never fed back

    def _feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` [n, S] after everything fed so far; return next-token logits [n, vocab]."""
        self._mask = torch.cat([self._mask, mask], dim=1)
        positions = (self._mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(
            input_ids=ids, attention_mask=self._mask, position_ids=positions, past_key_values=self._cache,
            use_cache=True, logits_to_keep=1,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1].float()

    @torch.no_grad()
    def reply(self, segments: Sequence[Sequence[int] | None], max_new_tokens: int) -> list[list[int] | None]:
        """Feed each row its new tokens and answer greedily; ``None`` leaves a row idle (no tokens, no reply).

        Returns each answering row's generated ids without the stop token. A reply cut at ``max_new_tokens``
        leaves its last token unfed; it is fed at the start of that row's next segment.
        """
        if len(segments) != self.n:
            raise ValueError(f"got {len(segments)} segments for a batch of {self.n} conversations.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        active = torch.tensor([s is not None for s in segments], device=self.device)
        if not active.any():
            return [None] * self.n
        rows = [[*self._unfed[i], *s] if s is not None else [] for i, s in enumerate(segments)]
        if any(s is not None and not r for s, r in zip(segments, rows, strict=True)):
            raise ValueError("a conversation has nothing to answer: its new segment is empty.")
        fed = self._mask.sum(dim=1).tolist()
        check_context(self.model, [int(fed[i]) + len(r) + max_new_tokens if segments[i] is not None else 0
                                   for i, r in enumerate(rows)], "conversation (history + new turn + reply)")
        ids, mask = left_pad(rows, self.pad_id, self.device)
        for i, s in enumerate(segments):
            if s is not None:
                self._unfed[i] = []
        logits = self._feed(ids, mask)
        out: list[list[int]] = [[] for _ in range(self.n)]
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            active &= ~torch.isin(token, self.stop)
            for i in active.nonzero().flatten().tolist():
                out[i].append(int(token[i]))
            if step == max_new_tokens - 1 or not active.any():
                break
            fed = torch.where(active, token, torch.full_like(token, self.pad_id))
            logits = self._feed(fed[:, None], active[:, None].long())
        for i in active.nonzero().flatten().tolist():
            self._unfed[i] = [out[i][-1]]
        return [out[i] if s is not None else None for i, s in enumerate(segments)]


class ConversationBatch:
    """Conversations answered turn by turn in one batch; the model's own replies stay in each history."""

    def __init__(self, model: nn.Module, tokenizer: object, n: int, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self._decoder = TurnDecoder(model, tokenizer, n)
        self.reset()

    def reset(self) -> None:
        head = [{"role": "system", "content": self.system}] if self.system else []
        self.messages: list[Messages] = [list(head) for _ in range(self._decoder.n)]
        self._seen: list[str | None] = [None] * self._decoder.n  # rendered text each row's cache holds
        self._decoder.reset()

    def answer(self, user_turns: Sequence[str | None], max_new_tokens: int) -> list[str | None]:
        """Add each row's user turn (``None``: the row sits this turn out), answer them all, return the replies."""
        if len(user_turns) != self._decoder.n:
            raise ValueError(f"got {len(user_turns)} user turns for a batch of {self._decoder.n} conversations.")
        texts: list[str | None] = [None] * len(user_turns)
        for i, turn in enumerate(user_turns):
            if turn is not None:
                self.messages[i].append({"role": "user", "content": turn})
                texts[i] = render_chat(self.tokenizer, self.messages[i], add_generation_prompt=True)
        extends = all(t is None or s is None or t.startswith(s) for t, s in zip(texts, self._seen, strict=True))
        if not extends:  # the template rewrote earlier text: the caches no longer match, start over
            self._decoder.reset()
            self._seen = [None] * len(self._seen)
        segments = [
            None if t is None else self._tokens(t if s is None else t[len(s):])
            for t, s in zip(texts, self._seen, strict=True)
        ]
        try:
            answered = self._decoder.reply(segments, max_new_tokens)
        except ValueError:  # refused before any token was fed: take the unanswered user turns back out
            for i, turn in enumerate(user_turns):
                if turn is not None:
                    self.messages[i].pop()
            raise
        replies: list[str | None] = [None] * len(user_turns)
        for i, ids in enumerate(answered):
            if ids is not None:
                replies[i] = _decode(self.tokenizer, ids)
                self.messages[i].append({"role": "assistant", "content": replies[i]})
                self._seen[i] = texts[i] + replies[i]
        return replies

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_replies(
    model: nn.Module,
    tokenizer: object,
    conversations: Sequence[Messages],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to conversations that each end with a user message, batched by similar length."""
    for i, messages in enumerate(conversations):
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
            raise ValueError(
                f"conversation {i} ends with a {role!r} message; a reply answers a user turn, so end each "
                "conversation with a {'role': 'user', ...} message."
            )
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    check_context(model, [len(p) + max_new_tokens for p in prompts], "conversation (prompt + reply)")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    replies: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
        chunk = order[start:start + batch_size]
        decoder = TurnDecoder(model, tokenizer, len(chunk))
        for i, ids in zip(chunk, decoder.reply([prompts[i] for i in chunk], max_new_tokens), strict=True):
            replies[i] = _decode(tokenizer, ids)
    return replies


def projection_bar(value: float, axis: AssistantAxis, layer: int, width: int = 24) -> str:
    """A one-line gauge: ``=`` is the default-Assistant band (25th–75th percentile), ``#`` is ``value``.

    The scale runs from the 5th percentile of role answers to the 95th of default answers (widened to fit
    ``value``), so the band's place on it says how far apart the Assistant and the roles are on this axis.
    """
    band_lo, band_hi = default_band(axis, layer)
    if math.isnan(value):
        return "[" + " " * width + "] (empty reply)"
    lo = min(axis.tau(layer, 5.0, "roles"), band_lo, value)
    hi = max(axis.tau(layer, 95.0, "default"), band_hi, value)
    span = (hi - lo) or 1.0
    cells = ["=" if band_lo <= lo + span * (k + 0.5) / width <= band_hi else "-" for k in range(width)]
    cells[min(width - 1, int((value - lo) / span * width))] = "#"
    if value < band_lo:
        where = f"below the default band by {band_lo - value:.2f}"
    elif value > band_hi:
        where = f"above the default band by {value - band_hi:.2f}"
    else:
        where = "in the default band"
    return f"[{''.join(cells)}] {value:+.2f} ({where})"


@dataclass(frozen=True)
class ChatReply:
    label: str
    text: str
    projection: float  # mean over the reply's tokens at the report layer


class ChatSession:
    """One conversation with the model under one intervention: its history, its cache and its projections."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        axis: AssistantAxis,
        intervention: Intervention = Intervention(),
        max_new_tokens: int = 128,
        system: str | None = None,
        layer: int | None = None,
        check_weights: bool = True,
    ):
        axis.check_compatible(model, check_weights=check_weights)
        self.model, self.tokenizer, self.axis = model, tokenizer, axis
        self.intervention, self.max_new_tokens, self.check_weights = intervention, max_new_tokens, check_weights
        self.layer = resolve_layer(axis, layer)
        self._batch = ConversationBatch(model, tokenizer, 1, system)

    @property
    def messages(self) -> Messages:
        return self._batch.messages[0]

    def reset(self) -> None:
        self._batch.reset()

    def say(self, text: str) -> ChatReply:
        """Answer ``text`` and read the reply's projection, both under this session's intervention."""
        with self.intervention.apply(self.model, self.axis, self.check_weights):
            (reply,) = self._batch.answer([text], self.max_new_tokens)
            trace = monitor(self.model, self.tokenizer, self.axis, self.messages, self.layer, self.check_weights)
        return ChatReply(self.intervention.label, reply, trace.per_turn[-1])


def chat_loop(
    sessions: Sequence[ChatSession], lines: Iterable[str], write: Callable[[str], None] = print
) -> int:
    """Answer each input line in every session and print the replies with their projection gauges.

    ``/reset`` starts the conversations over, ``/quit`` (or the end of ``lines``) stops. Returns the number of
    user turns answered.
    """
    answered = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            for session in sessions:
                session.reset()
            write("(conversation reset)")
            continue
        for session in sessions:
            try:
                reply = session.say(text)
            except ContextLengthError as err:  # the history outgrew the model: say so, and /reset still works
                write(f"[{session.intervention.label}] (not answered: {err} /reset starts over.)")
                continue
            write(f"[{reply.label}] {reply.text}")
            write(f"  layer {session.layer}: {projection_bar(reply.projection, session.axis, session.layer)}")
        answered += 1
    return answered


def replies_with_projections(
    model: nn.Module,
    tokenizer: object,
    axis: AssistantAxis,
    conversations: Sequence[Messages],
    intervention: Intervention = Intervention(),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    check_weights: bool = True,
    progress: bool = False,
) -> list[tuple[str, float]]:
    """Replies to each conversation and the reply's mean projection at the report layer, under ``intervention``."""
    with intervention.apply(model, axis, check_weights):
        replies = generate_replies(model, tokenizer, conversations, max_new_tokens, batch_size, progress)
        finished = [[*m, {"role": "assistant", "content": r}] for m, r in zip(conversations, replies, strict=True)]
        traces = monitor_many(model, tokenizer, axis, finished, None, batch_size, check_weights, progress)
    return [(reply, trace.per_turn[-1]) for reply, trace in zip(replies, traces, strict=True)]
