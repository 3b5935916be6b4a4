"""Small in-memory tokenizers with hand-written chat templates that mimic real model families.

The tests cannot reach the Hugging Face hub, so each family gets a BPE tokenizer trained on a few
sentences, its control tokens registered as special tokens, and a Jinja chat template written to
follow the family's published one. Byte-level BPE stands in for GPT-2/tiktoken-style vocabularies
(ChatML models, Llama 3); a Metaspace BPE stands in for SentencePiece ones (Gemma, Mistral).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, PythonBackend

CORPUS = [
    "You are a terse assistant. Answer yes or no when you can.",
    "Is Paris the capital of France? Paris is the capital and largest city of France.",
    "Reply with yes if you agree, otherwise explain why not.",
    "Name three primary colours: red, yellow and blue.",
    "Thanks, that is all. You are welcome, have a nice day!",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# SmolLM2-Instruct's template, verbatim: a default system prompt is injected when none is given.
SMOLLM2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template: content is trimmed, BOS written by the template.
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma-2-it's template: rejects a system role, calls the assistant "model", trims content.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.1 style: strict user/assistant alternation, so a system message raises.
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# Mixtral-Instruct style: the template itself folds the system prompt into the first user turn.
MISTRAL_FOLDING = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """A chat family: how to build its tokenizer, and the text around each assistant message."""

    name: str
    make: Callable[[], PreTrainedTokenizerFast]
    header: str  # decoded text that ends right before an assistant turn's first token
    footer: str  # decoded text that starts right after its last token


def _wrap(
    tokenizer: Tokenizer, chat_template: str | None, bos: str | None, eos: str, extra: list[str]
) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = chat_template
    return wrapped


@cache
def _trained(kind: str, specials: tuple[str, ...]) -> str:
    """Train once per (kind, specials) and cache the JSON, so every test gets a fresh mutable copy."""
    if kind == "byte":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)) | set("\n[]/▁") | set(string.ascii_letters))
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build(
    kind: str, chat_template: str | None, bos: str | None, eos: str, extra: list[str]
) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of ``kind`` ("byte" or "metaspace") with these special tokens and template."""
    specials = tuple(t for t in [bos, eos, *extra] if t is not None)
    if kind == "metaspace":
        specials = ("<unk>", *specials)
    return _wrap(Tokenizer.from_str(_trained(kind, specials)), chat_template, bos, eos, extra)


def chatml() -> PreTrainedTokenizerFast:
    return build("byte", CHATML, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"])


def smollm2() -> PreTrainedTokenizerFast:
    return build("byte", SMOLLM2, "<|im_start|>", "<|im_end|>", ["<|endoftext|>"])


def llama3() -> PreTrainedTokenizerFast:
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]
    return build("byte", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", extra)


def gemma() -> PreTrainedTokenizerFast:
    return build("metaspace", GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<pad>"])


def mistral() -> PreTrainedTokenizerFast:
    return build("metaspace", MISTRAL, "<s>", "</s>", [])


def mistral_folding() -> PreTrainedTokenizerFast:
    return build("metaspace", MISTRAL_FOLDING, "<s>", "</s>", [])


FAMILIES = [
    Family("chatml", chatml, "<|im_start|>assistant\n", "<|im_end|>"),
    Family("smollm2", smollm2, "<|im_start|>assistant\n", "<|im_end|>"),
    Family("llama3", llama3, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    Family("gemma", gemma, "<start_of_turn>model\n", "<end_of_turn>"),
    Family("mistral", mistral, " [/INST]", "</s>"),
    Family("mistral_folding", mistral_folding, " [/INST]", "</s>"),
]


class CharTokenizer(PythonBackend):
    """A minimal slow (pure-Python) tokenizer: one token per character, no offsets mapping."""

    def __init__(self, **kwargs: object) -> None:
        self._vocab = {c: i for i, c in enumerate(sorted(set("".join(CORPUS)) | set("\n<>|_")))}
        super().__init__(**kwargs)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def _tokenize(self, text: str) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return list(self._vocab)[index]


def slow_chatml() -> CharTokenizer:
    tokenizer = CharTokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer
