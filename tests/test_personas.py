"""Tests for the shipped persona data and its validating loaders (anchor.personas)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import anchor.personas as personas
from anchor.personas import (
    CONVERSATION_DOMAINS,
    PROBE_DOMAINS,
    QUESTION_KINDS,
    ROLE_CATEGORIES,
    Conversation,
    PersonaDataError,
    Probe,
    Question,
    Role,
    load_conversations,
    load_default_prompts,
    load_probes,
    load_question_records,
    load_questions,
    load_role_records,
    load_roles,
)

REQUIRED_ROLES = (
    "assistant",
    "analyst",
    "moderator",
    "reviewer",
    "bard",
    "ghost",
    "demon",
    "leviathan",
    "eldritch",
)


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_jsonl(path: Path, items: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Shipped data
# --------------------------------------------------------------------------------------------------


def test_shipped_files_have_version_1():
    for path in (personas.ROLES_FILE, personas.QUESTIONS_FILE, personas.DEFAULTS_FILE):
        assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1, path.name


def test_shipped_roles_counts_and_quality():
    records = load_role_records()
    assert len(records) >= 200
    assert all(isinstance(r, Role) for r in records)
    names = [r.name for r in records]
    assert len(set(names)) == len(names)
    for role in records:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", role.name)
        assert role.description.strip() and "\n" not in role.description
        assert role.category in ROLE_CATEGORIES
        assert len(role.system_prompts) >= 3, role.name
        assert len(set(role.system_prompts)) == len(role.system_prompts), role.name
        for prompt in role.system_prompts:
            assert prompt == prompt.strip() and prompt, role.name
            # Second person: addressed to the model ("You are ...") or an imperative ("Speak as ...").
            second_person = re.search(r"\byour?\b", prompt, re.IGNORECASE) or prompt.startswith(
                ("Speak as ", "Act as ")
            )
            assert second_person, f"{role.name}: not second person: {prompt}"
            assert 1 <= len(re.findall(r"[.!?](?:\s|$)", prompt)) <= 3, (
                f"{role.name}: 1-3 sentences: {prompt}"
            )
    # No wording reused across roles either: every prompt should pin down exactly one role.
    all_prompts = [p for r in records for p in r.system_prompts]
    assert len(set(all_prompts)) == len(all_prompts)


def test_shipped_roles_cover_every_category_and_required_names():
    records = load_role_records()
    per_category = Counter(r.category for r in records)
    assert set(per_category) == set(ROLE_CATEGORIES)
    assert min(per_category.values()) >= 15, per_category
    names = {r.name for r in records}
    missing = [n for n in REQUIRED_ROLES if n not in names]
    assert not missing
    by_name = {r.name: r for r in records}
    assert by_name["assistant"].category == "assistant-like"
    assert by_name["leviathan"].category == "cosmic"
    assert by_name["eldritch"].category == "cosmic"


def test_load_roles_matches_records_in_order():
    roles = load_roles()
    records = load_role_records()
    assert list(roles) == [r.name for r in records]
    assert all(roles[r.name] == list(r.system_prompts) for r in records)
    assert all(isinstance(v, list) for v in roles.values())


def test_shipped_defaults():
    prompts = load_default_prompts()
    assert len(prompts) >= 5
    assert prompts[0] == ""
    assert all(p.strip() for p in prompts[1:])
    assert len(set(prompts)) == len(prompts)


def test_shipped_questions():
    records = load_question_records()
    assert len(records) >= 200
    assert all(isinstance(q, Question) for q in records)
    texts = [q.text for q in records]
    assert len(set(texts)) == len(texts)
    assert all(0 < len(t) < 200 for t in texts)
    kinds = Counter(q.kind for q in records)
    assert set(kinds) == set(QUESTION_KINDS)
    assert min(kinds.values()) >= 25, kinds
    assert load_questions() == texts


def test_shipped_conversations():
    if not personas.CONVERSATIONS_FILE.is_file():
        pytest.skip("conversations.jsonl not shipped yet")
    conversations = load_conversations()
    assert conversations
    assert all(isinstance(c, Conversation) for c in conversations)
    assert all(len(c.turns) >= 6 for c in conversations)
    assert {c.domain for c in conversations} <= set(CONVERSATION_DOMAINS)
    assert len({c.id for c in conversations}) == len(conversations)


def test_shipped_probes():
    if not personas.PROBES_FILE.is_file():
        pytest.skip("probes.json not shipped yet")
    probes = load_probes()
    assert probes
    assert all(isinstance(p, Probe) for p in probes)
    assert {p.domain for p in probes} <= set(PROBE_DOMAINS)


def test_loaders_return_fresh_lists():
    roles = load_roles()
    roles["assistant"].append("mutated")
    assert "mutated" not in load_roles()["assistant"]


# --------------------------------------------------------------------------------------------------
# User data that should load
# --------------------------------------------------------------------------------------------------


def test_roles_from_mapping_keep_order_and_get_custom_category():
    mapping = {"zeta_role": ["You are Z."], "alpha_role": ("You are A.", "Speak as A.")}
    assert load_roles(mapping) == {"zeta_role": ["You are Z."], "alpha_role": ["You are A.", "Speak as A."]}
    records = load_role_records(mapping)
    assert records[0] == Role("zeta_role", "", "custom", ("You are Z.",))


def test_roles_from_json_file_with_optional_fields(tmp_path):
    path = _write_json(
        tmp_path / "my_roles.json",
        {
            "version": 1,
            "roles": [
                {"name": "pirate", "system_prompts": ["You are a pirate."]},
                {
                    "name": "sage",
                    "description": "wise",
                    "category": "mystic",
                    "system_prompts": ["You are wise."],
                },
            ],
        },
    )
    records = load_role_records(path)
    assert [r.name for r in records] == ["pirate", "sage"]
    assert records[0].category == "custom" and records[0].description == ""
    assert records[1].category == "mystic" and records[1].description == "wise"
    assert load_roles(str(path)) == {"pirate": ["You are a pirate."], "sage": ["You are wise."]}


def test_roles_from_jsonl_file(tmp_path):
    path = _write_jsonl(
        tmp_path / "roles.jsonl",
        [
            {"name": "cat", "system_prompts": ["You are a cat.", "Speak as a cat."]},
            {"name": "dog", "category": "non-human", "system_prompts": ["You are a dog."]},
        ],
    )
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n   \n")  # blank lines are skipped
    assert load_roles(path) == {"cat": ["You are a cat.", "Speak as a cat."], "dog": ["You are a dog."]}


def test_questions_from_list_and_question_objects():
    assert load_questions(["Why?", "How?"]) == ["Why?", "How?"]
    records = load_question_records(["Why?", Question("Who?", "meta"), {"text": "When?", "kind": "factual"}])
    assert records == [Question("Why?", "custom"), Question("Who?", "meta"), Question("When?", "factual")]


def test_questions_from_json_schema_and_plain_list(tmp_path):
    schema = _write_json(
        tmp_path / "q.json",
        {"version": 1, "questions": [{"text": "A?", "kind": "opinion"}, {"text": "B?"}, "C?"]},
    )
    assert load_question_records(schema) == [
        Question("A?", "opinion"),
        Question("B?", "custom"),
        Question("C?", "custom"),
    ]
    plain = _write_json(tmp_path / "plain.json", ["One?", "Two?"])
    assert load_questions(plain) == ["One?", "Two?"]


def test_questions_from_jsonl_and_txt(tmp_path):
    jsonl = _write_jsonl(tmp_path / "q.jsonl", [{"text": "X?", "kind": "values"}, "Y?"])
    assert load_question_records(jsonl) == [Question("X?", "values"), Question("Y?", "custom")]
    txt = tmp_path / "q.txt"
    txt.write_text("  First question?\n\nSecond question?  \n", encoding="utf-8")
    assert load_questions(txt) == ["First question?", "Second question?"]


def test_default_prompts_from_list_and_files(tmp_path):
    assert load_default_prompts(["You help.", ""]) == ["You help.", ""]
    schema = _write_json(tmp_path / "d.json", {"version": 1, "system_prompts": ["", "Be useful."]})
    assert load_default_prompts(schema) == ["", "Be useful."]
    plain = _write_json(tmp_path / "plain.json", ["Be kind."])
    assert load_default_prompts(plain) == ["Be kind."]


def test_conversations_from_jsonl_json_and_list(tmp_path):
    turns = [f"turn {i}" for i in range(6)]
    jsonl = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": "coding-01", "domain": "coding", "turns": turns}, {"id": "mine", "turns": ["hi", "hi"]}],
    )
    got = load_conversations(jsonl)
    assert got == [
        Conversation("coding-01", "coding", tuple(turns)),
        Conversation("mine", "custom", ("hi", "hi")),
    ]
    as_json = _write_json(
        tmp_path / "c.json",
        {"version": 1, "conversations": [{"id": "w", "domain": "writing", "turns": ["a"]}]},
    )
    assert load_conversations(as_json) == [Conversation("w", "writing", ("a",))]
    assert (
        load_conversations([{"id": "p", "domain": "philosophy", "turns": ["why?"]}])[0].domain == "philosophy"
    )


def test_probes_from_json_jsonl_and_list(tmp_path):
    as_json = _write_json(
        tmp_path / "p.json",
        {
            "version": 1,
            "probes": [{"domain": "meta", "prompt": "Who are you?"}, {"prompt": "Write a haiku."}],
        },
    )
    assert load_probes(as_json) == [Probe("meta", "Who are you?"), Probe("custom", "Write a haiku.")]
    jsonl = _write_jsonl(tmp_path / "p.jsonl", [{"domain": "coding", "prompt": "Fix this bug."}])
    assert load_probes(jsonl) == [Probe("coding", "Fix this bug.")]
    assert load_probes(["Hello?", Probe("emotional", "I am sad.")]) == [
        Probe("custom", "Hello?"),
        Probe("emotional", "I am sad."),
    ]


# --------------------------------------------------------------------------------------------------
# Malformed data: every problem raises PersonaDataError naming the file, the entry and the fix
# --------------------------------------------------------------------------------------------------

_GOOD_ROLE = {"name": "bard", "system_prompts": ["You are a bard."]}


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ([{"name": "bard"}], ["roles[0]", "missing required key 'system_prompts'"]),
        ([{"name": "bard", "system_prompts": []}], ["role 'bard' has 0 system prompts", "at least 1"]),
        (
            [{"name": "bard", "system_prompts": "You are a bard."}],
            ["role 'bard'", "single string", "wrap it"],
        ),
        ([{"name": "bard", "system_prompts": ["You are a bard.", "  "]}], ["system prompts[1]", "empty"]),
        ([{"name": "bard", "system_prompts": ["x", 3]}], ["system prompts[1]", "must be a string"]),
        ([{"name": "bard", "system_prompts": ["x", "x"]}], ["role 'bard'", "twice", "duplicate"]),
        (
            [{"name": "Wandering Bard", "system_prompts": ["x"]}],
            ["'Wandering Bard'", "snake_case", "'wandering_bard'"],
        ),
        ([{"name": 7, "system_prompts": ["x"]}], ["roles[0] name", "must be a string"]),
        (
            [_GOOD_ROLE, {"name": "bard", "system_prompts": ["y"]}],
            ["'bard' appears twice", "roles[0]", "roles[1]"],
        ),
        ([{**_GOOD_ROLE, "category": "wizardly"}], ["role 'bard'", "category 'wizardly'", "mystic"]),
        ([{**_GOOD_ROLE, "catgory": "mystic"}], ["roles[0]", "unknown key", "catgory", "'category'"]),
        ([{**_GOOD_ROLE, "description": 5}], ["role 'bard' description", "string"]),
        (["bard"], ["roles[0]", "JSON string", "expected an object"]),
        ([], ["no roles"]),
    ],
)
def test_malformed_role_entries(tmp_path, roles, expected):
    path = _write_json(tmp_path / "bad_roles.json", {"version": 1, "roles": roles})
    with pytest.raises(PersonaDataError) as info:
        load_roles(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"roles": [_GOOD_ROLE]}, ["missing top-level 'version'", '"version": 1']),
        ({"version": 2, "roles": [_GOOD_ROLE]}, ["'version' is 2", "version 1 only"]),
        ({"version": "1", "roles": [_GOOD_ROLE]}, ["'version' is '1'"]),
        ({"version": 1}, ["missing top-level key 'roles'"]),
        ({"version": 1, "roles": {"bard": ["x"]}}, ["'roles' is a JSON object", "must be a list"]),
        ({"version": 1, "roles": [_GOOD_ROLE], "extra": 1}, ["unknown top-level key", "extra"]),
        ([_GOOD_ROLE], ["top level is a JSON list", '"roles"']),
    ],
)
def test_malformed_role_documents(tmp_path, document, expected):
    path = _write_json(tmp_path / "roles.json", document)
    with pytest.raises(PersonaDataError) as info:
        load_role_records(path)
    for fragment in expected:
        assert fragment in str(info.value)


def test_invalid_json_and_jsonl_name_the_location(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "roles": [\n  {"name": "bard",}\n]}', encoding="utf-8")
    with pytest.raises(PersonaDataError, match=r"broken\.json: invalid JSON at line 2"):
        load_roles(broken)
    jsonl = tmp_path / "roles.jsonl"
    jsonl.write_text(json.dumps(_GOOD_ROLE) + "\n{not json}\n", encoding="utf-8")
    with pytest.raises(PersonaDataError, match=r"roles\.jsonl: line 2 is not valid JSON"):
        load_roles(jsonl)
    bad_entry = _write_jsonl(tmp_path / "entry.jsonl", [_GOOD_ROLE, {"name": "ghost", "system_prompts": []}])
    with pytest.raises(PersonaDataError, match=r"entry\.jsonl: role 'ghost' has 0 system prompts"):
        load_roles(bad_entry)
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes('{"version": 1, "roles": ["caf\xe9"]}'.encode("latin-1"))
    with pytest.raises(PersonaDataError, match="UTF-8"):
        load_roles(not_utf8)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({}, ["roles mapping", "empty"]),
        ({"Bard": ["x"]}, ["roles mapping", "'Bard'", "snake_case", "'bard'"]),
        ({"bard": "You are a bard."}, ["role 'bard'", "single string", "wrap it in a list"]),
        ({"bard": []}, ["role 'bard' has 0 system prompts", "at least 1"]),
        ({"bard": [""]}, ["role 'bard' system prompts[0] is empty"]),
        ({"bard": None}, ["role 'bard'", "list of strings"]),
    ],
)
def test_malformed_role_mappings(mapping, expected):
    with pytest.raises(PersonaDataError) as info:
        load_roles(mapping)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (["Why?", "Why?"], ["item 1 repeats item 0", "'Why?'", "unique"]),
        (["Why?", ""], ["item 1 is empty"]),
        (["Why?", 42], ["item 1", "JSON number", "expected an object with keys 'text'"]),
        ([{"text": "Why?", "kind": "trivia"}], ["item 0 has kind 'trivia'", "factual", "meta"]),
        ([{"question": "Why?"}], ["item 0 is missing required key 'text'"]),
        ([], ["questions list", "no questions"]),
    ],
)
def test_malformed_question_lists(source, expected):
    with pytest.raises(PersonaDataError) as info:
        load_questions(source)
    for fragment in expected:
        assert fragment in str(info.value)


def test_malformed_question_files(tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("Same?\nOther?\nSame?\n", encoding="utf-8")
    with pytest.raises(PersonaDataError, match=r"dup\.txt: line 3 repeats line 1"):
        load_questions(dup)
    bad_kind = _write_json(
        tmp_path / "q.json", {"version": 1, "questions": [{"text": "A?", "kind": "Factual"}]}
    )
    with pytest.raises(PersonaDataError, match=r"q\.json: questions\[0\] has kind 'Factual'; use one of"):
        load_questions(bad_kind)
    bad_version = _write_json(tmp_path / "v.json", {"version": 0, "questions": ["A?"]})
    with pytest.raises(PersonaDataError, match="'version' is 0"):
        load_questions(bad_version)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (["", "  "], ["item 1 is only whitespace", '""']),
        (["Be nice.", "Be nice."], ["item 1 repeats an earlier prompt"]),
        (["Be nice.", None], ["item 1 must be a string", "null"]),
        ([], ["no system prompts"]),
    ],
)
def test_malformed_default_prompts(source, expected):
    with pytest.raises(PersonaDataError) as info:
        load_default_prompts(source)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"id": "c1", "domain": "coding", "turns": []}], ["conversation 'c1' has 0 turns", "at least 1"]),
        (
            [{"id": "c1", "domain": "cooking", "turns": ["hi"]}],
            ["conversation 'c1' has domain 'cooking'", "coding"],
        ),
        ([{"id": "c1", "turns": "hi"}], ["conversation 'c1' turns must be a list", "JSON string"]),
        ([{"id": "c1", "turns": ["hi", ""]}], ["conversation 'c1' turns[1] is empty"]),
        ([{"domain": "coding", "turns": ["hi"]}], ["line 1 is missing required key 'id'"]),
        (
            [{"id": "c1", "turns": ["a"]}, {"id": "c1", "turns": ["b"]}],
            ["conversation 'c1' id appears twice", "line 1", "line 2"],
        ),
    ],
)
def test_malformed_conversations(tmp_path, entries, expected):
    path = _write_jsonl(tmp_path / "convs.jsonl", entries)
    with pytest.raises(PersonaDataError) as info:
        load_conversations(path)
    message = str(info.value)
    assert "convs.jsonl" in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ([{"domain": "philosophy", "prompt": "Why?"}], ["probes[0] has domain 'philosophy'", "meta"]),
        (
            [{"domain": "meta", "prompt": "Who?"}, {"domain": "meta", "prompt": "Who?"}],
            ["probes[1] repeats probes[0]"],
        ),
        ([{"domain": "meta", "prompt": "   "}], ["probes[0] prompt is empty"]),
        ([{"domain": "meta", "text": "Who?"}], ["probes[0] is missing required key 'prompt'"]),
    ],
)
def test_malformed_probes(tmp_path, probes, expected):
    path = _write_json(tmp_path / "my_probes.json", {"version": 1, "probes": probes})
    with pytest.raises(PersonaDataError) as info:
        load_probes(path)
    message = str(info.value)
    assert "my_probes.json" in message
    for fragment in expected:
        assert fragment in message


# --------------------------------------------------------------------------------------------------
# Shipped files are validated strictly (labels required, defaults start with "")
# --------------------------------------------------------------------------------------------------


def test_shipped_roles_require_category_and_description(tmp_path, monkeypatch):
    path = _write_json(tmp_path / "roles.json", {"version": 1, "roles": [_GOOD_ROLE]})
    monkeypatch.setattr(personas, "ROLES_FILE", path)
    with pytest.raises(
        PersonaDataError, match=r"^roles\.json: roles\[0\] is missing required key 'description'"
    ):
        load_roles()
    _write_json(path, {"version": 1, "roles": [{**_GOOD_ROLE, "description": "d", "category": "custom"}]})
    with pytest.raises(PersonaDataError, match="category 'custom'"):
        load_roles()


def test_shipped_defaults_must_start_with_empty_prompt(tmp_path, monkeypatch):
    path = _write_json(tmp_path / "defaults.json", {"version": 1, "system_prompts": ["You help.", ""]})
    monkeypatch.setattr(personas, "DEFAULTS_FILE", path)
    with pytest.raises(PersonaDataError, match=r"defaults\.json: the first system prompt must be \"\""):
        load_default_prompts()


def test_shipped_conversations_need_six_turns(tmp_path, monkeypatch):
    path = _write_jsonl(
        tmp_path / "conversations.jsonl", [{"id": "c", "domain": "coding", "turns": ["a"] * 5}]
    )
    monkeypatch.setattr(personas, "CONVERSATIONS_FILE", path)
    with pytest.raises(
        PersonaDataError, match="conversation 'c' has 5 turns; each conversation needs at least 6"
    ):
        load_conversations()


def test_shipped_questions_need_kind(tmp_path, monkeypatch):
    path = _write_json(tmp_path / "questions.json", {"version": 1, "questions": [{"text": "A?"}]})
    monkeypatch.setattr(personas, "QUESTIONS_FILE", path)
    with pytest.raises(PersonaDataError, match=r"questions\[0\] is missing required key 'kind'"):
        load_questions()


# --------------------------------------------------------------------------------------------------
# Wrong kinds of source
# --------------------------------------------------------------------------------------------------


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="roles file not found"):
        load_roles(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="pass a list of strings"):
        load_questions("What is love?")


def test_unsupported_source_types_raise_type_error():
    with pytest.raises(TypeError, match="roles source"):
        load_roles(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="questions source"):
        load_questions(3.5)  # type: ignore[arg-type]


def test_persona_data_error_is_value_error():
    assert issubclass(PersonaDataError, ValueError)


def test_probe_set_keeps_the_first_probes_of_each_domain(tiny_tokenizer):
    from anchor.probes import build_probe_set

    every = build_probe_set(tiny_tokenizer)
    two = build_probe_set(tiny_tokenizer, per_domain=2)
    domains = sorted(set(every.domains))
    assert sorted(two.domains) == sorted(domains * 2)
    for d in domains:
        assert [t for t, dd in zip(two.texts, two.domains, strict=True) if dd == d] == \
            [t for t, dd in zip(every.texts, every.domains, strict=True) if dd == d][:2]
    with pytest.raises(ValueError, match="at least one probe"):
        build_probe_set(tiny_tokenizer, per_domain=0)
