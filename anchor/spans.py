"""Render conversations with a chat template and locate assistant message content at token level.

The persona axis is read from residual-stream activations averaged over the *assistant response*
tokens only, so every consumer needs an exact per-token map of where each assistant message's
content sits in the rendered conversation. Template tokens (BOS, role headers, end-of-turn
markers), system prompts and user turns must never leak into that average.

The method works for any chat template without per-family rules: render the conversation to
text, find each message's content in that text with a cursor that only moves forward, tokenize
the text with character offsets, and assign each non-special token overlapping an assistant
content span to that turn.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ROLES = ("system", "user", "assistant")

PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {% elif m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
    "{{ m['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""A plain-text framing for a model with no chat template (a pre-trained base model): ``System: …``, ``User: …``
and ``Assistant: …`` paragraphs after the BOS token. Set it with ``tokenizer.chat_template = PLAIN_CHAT_TEMPLATE``;
everything that renders a conversation then works unchanged."""


@dataclass(frozen=True)
class ChatEncoding:
    """A tokenized conversation and, per token, which assistant turn's content it belongs to.

    ``turn_index[i]`` is ``k`` when token ``i`` lies inside the content of the ``k``-th assistant
    message (0-based among assistant messages) and ``-1`` for everything else: template, role and
    end-of-turn tokens, system and user text.
    """

    input_ids: list[int]
    turn_index: list[int]
    n_turns: int

    def mask(self, turn: int | None = None) -> list[bool]:
        """Tokens of assistant turn ``turn`` (negative counts from the end), or of all assistant turns.

        Returned as a plain list so callers can build a tensor on whatever device they need.
        """
        if turn is None:
            return [k >= 0 for k in self.turn_index]
        if not -self.n_turns <= turn < self.n_turns:
            raise IndexError(f"turn {turn} out of range for {self.n_turns} assistant turns")
        turn %= self.n_turns
        return [k == turn for k in self.turn_index]


@dataclass(frozen=True)
class _Rendered:
    """Rendered text plus the messages exactly as the template saw them (after any system folding)."""

    text: str
    messages: list[dict[str, str]]
    source_index: list[int]  # index in the caller's list of each message in ``messages``


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    *,
    fold_system: bool = False,
) -> str:
    """Render ``messages`` to text with the tokenizer's chat template.

    Templates that reject a system role (Gemma, early Mistral) get the system prompt folded into
    the first user message as ``"{system}\\n\\n{user}"``, the convention newer Gemma and Mistral
    templates apply themselves, so persona prompts still reach those models. ``fold_system=True``
    forces folding for templates that accept a system role but move it where it cannot be located.
    """
    return _render(tokenizer, messages, add_generation_prompt, fold_system).text


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    *,
    fold_system: bool = False,
) -> ChatEncoding:
    """Tokenize a rendered conversation and mark which tokens carry each assistant message's content.

    The ids are those of the rendered text tokenized without extra special tokens, so they equal
    what ``apply_chat_template(tokenize=True)`` feeds the model. Needs a fast tokenizer, whose
    character offsets map tokens back to the text.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"encode_chat needs a fast (Rust-backed) tokenizer for character offsets, got "
            f"{type(tokenizer).__name__}; load the model's fast tokenizer (AutoTokenizer's default)."
        )
    rendered = _render(tokenizer, messages, add_generation_prompt, fold_system)
    spans = _assistant_spans(tokenizer, rendered)
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    turn_index = _turn_index(input_ids, encoded["offset_mapping"], spans, _special_ids(tokenizer))
    return ChatEncoding(input_ids=input_ids, turn_index=turn_index, n_turns=len(spans))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    fold_system: bool = False,
) -> list[int]:
    """Token ids of ``messages`` followed by the assistant header: the input to ``generate()``.

    Rendered and tokenized the same way as ``encode_chat``, so a generated answer appended to
    these ids lines up with the ids ``encode_chat`` gives for the finished conversation.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt=True, fold_system=fold_system)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _validate(messages: Any) -> None:
    """Reject malformed conversations up front; a template would otherwise fail obscurely or render junk."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {kind}")
        if message.get("role") not in _ROLES:
            raise ValueError(f"message {i} has role {message.get('role')!r}; expected one of {_ROLES}")
        if not isinstance(message.get("content"), str):
            content_type = type(message.get("content")).__name__
            raise ValueError(f"message {i} content must be a str, got {content_type}")


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    fold_system: bool,
) -> _Rendered:
    """Render, folding the system prompt into the first user turn if forced or if the template rejects it."""
    _validate(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template: set tokenizer.chat_template to a Jinja "
            "template, to anchor.spans.PLAIN_CHAT_TEMPLATE for a base model, or pass a tokenizer that ships one "
            "(an instruct/chat model's tokenizer)."
        )
    has_system = any(m["role"] == "system" for m in messages)
    if not (fold_system and has_system):
        try:
            text = _apply(tokenizer, messages, add_generation_prompt)
            return _Rendered(text, messages, list(range(len(messages))))
        except TemplateError:
            # Gemma raises "System role not supported", early Mistral "roles must alternate": fold and retry.
            if not has_system:
                raise
    folded, source_index = _fold_system(messages)
    return _Rendered(_apply(tokenizer, folded, add_generation_prompt), folded, source_index)


def _apply(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    """The template's own rendering as text: BOS and the like appear only where the template writes them."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _fold_system(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
    """Merge a leading system message into the following user message (or make it one).

    Only a leading system prompt has an unambiguous place to go; any other system message is an error.
    Returns the folded messages and, for each, its index in ``messages``.
    """
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("only a leading system message can be folded into the first user message")
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        merged = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        return [merged, *rest[1:]], list(range(1, len(messages)))
    return [{"role": "user", "content": system}, *rest], list(range(len(messages)))


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, rendered: _Rendered) -> list[tuple[int, int]]:
    """Character span of each assistant message's content in ``rendered.text``, in order.

    Each message's (stripped, since templates often trim) content is searched from a cursor that
    moves past every earlier message, so text repeated earlier (an injected default system prompt,
    a user turn quoting the answer) is never mistaken for it. The cursor also starts no earlier than
    the end of the rendering of the preceding messages whenever that rendering is a prefix of the
    full text, which rules out matches inside template-injected text before the message.
    """
    text, spans, cursor = rendered.text, [], 0
    for i, message in enumerate(rendered.messages):
        cursor = max(cursor, _prefix_end(tokenizer, rendered, i))
        content = message["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise ValueError(
                f"message {rendered.source_index[i]} ({message['role']}) content not found in the rendered "
                f"conversation after character {cursor}: the chat template alters, reorders or drops message "
                "content (e.g. strips reasoning, moves the system prompt), so its tokens cannot be located. "
                "Pass fold_system=True if it moves the system prompt, or pre-process the messages the way "
                "the template does."
            )
        cursor = start + len(content)
        if message["role"] == "assistant":
            spans.append((start, cursor))
    return spans


def _prefix_end(tokenizer: PreTrainedTokenizerBase, rendered: _Rendered, i: int) -> int:
    """Length of the rendering of the messages before ``i`` if it is a prefix of the full text, else 0."""
    if i == 0:
        return 0
    try:
        prefix = _apply(tokenizer, rendered.messages[:i], add_generation_prompt=False)
    except TemplateError:
        return 0
    return len(prefix) if rendered.text.startswith(prefix) else 0


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of special tokens, including added control tokens (role headers) not listed as named specials."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def _turn_index(
    input_ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    special: set[int],
) -> list[int]:
    """Assign each non-special token overlapping an assistant content span to that span's turn.

    Overlap (not containment) keeps tokens that merge content with adjacent whitespace, such as a
    SentencePiece "▁answer" after "[/INST]". Offsets are non-decreasing, so a bisect on token ends
    finds each span's first token.
    """
    turn_index = [-1] * len(input_ids)
    ends = [end for _, end in offsets]
    for turn, (span_start, span_end) in enumerate(spans):
        i = bisect_right(ends, span_start)
        while i < len(input_ids) and offsets[i][0] < span_end:
            start, end = offsets[i]
            if min(end, span_end) > max(start, span_start) and input_ids[i] not in special:
                turn_index[i] = turn
            i += 1
    return turn_index
