"""Persona data for building the Assistant Axis: role prompts, questions, defaults, conversations, probes.

The axis is estimated by prompting a chat model to play many character roles, answering the same
questions, and comparing those activations with its default-Assistant activations.  This module ships
that data as JSON files next to it and loads it (or a user's own data) into plain Python objects.

Every loader validates its input and raises :class:`PersonaDataError` naming the file, the entry and
what to fix, because a typo in a hand-written data file otherwise surfaces hours later as a silently
skewed axis (a role with no prompts, a duplicated question counted twice, a mislabelled category).

Shipped data is validated strictly (every label present and from the fixed vocabulary).  User data is
validated for structure, but labels may be omitted or set to ``"custom"``, because a user who brings
their own roles or questions rarely fits our taxonomy.

Only the standard library is used, so the data can be inspected without torch installed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONVERSATIONS_FILE",
    "CONVERSATION_DOMAINS",
    "CUSTOM_LABEL",
    "DATA_DIR",
    "DEFAULTS_FILE",
    "MIN_SHIPPED_CONVERSATION_TURNS",
    "PROBES_FILE",
    "PROBE_DOMAINS",
    "QUESTIONS_FILE",
    "QUESTION_KINDS",
    "ROLES_FILE",
    "ROLE_CATEGORIES",
    "SCHEMA_VERSION",
    "Conversation",
    "PersonaDataError",
    "Probe",
    "Question",
    "Role",
    "load_conversations",
    "load_default_prompts",
    "load_probes",
    "load_question_records",
    "load_questions",
    "load_role_records",
    "load_roles",
]

DATA_DIR = Path(__file__).resolve().parent
"""Folder holding the shipped data files (installed as package data)."""

ROLES_FILE = DATA_DIR / "roles.json"
QUESTIONS_FILE = DATA_DIR / "questions.json"
DEFAULTS_FILE = DATA_DIR / "defaults.json"
CONVERSATIONS_FILE = DATA_DIR / "conversations.jsonl"
PROBES_FILE = DATA_DIR / "probes.json"

SCHEMA_VERSION = 1
"""The only file-format version this loader understands; bumped when a schema changes incompatibly."""

ROLE_CATEGORIES: tuple[str, ...] = (
    "assistant-like",
    "professional",
    "teacher",
    "artist",
    "mystic",
    "trickster",
    "villain",
    "non-human",
    "cosmic",
)
"""Role categories, ordered roughly from closest to the Assistant to farthest from it."""

QUESTION_KINDS: tuple[str, ...] = ("factual", "opinion", "personal", "values", "emotional", "meta")
CONVERSATION_DOMAINS: tuple[str, ...] = ("coding", "writing", "emotional", "philosophy")
PROBE_DOMAINS: tuple[str, ...] = ("coding", "writing", "emotional", "meta")

CUSTOM_LABEL = "custom"
"""Label given to user entries that carry no category/kind/domain (and accepted when written explicitly)."""

MIN_SHIPPED_CONVERSATION_TURNS = 6
"""Shipped conversations must be long enough to show persona drift; user ones need only one turn."""

_SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")

PathSource = str | os.PathLike[str]


class PersonaDataError(ValueError):
    """Persona data is malformed.  The message names the file, the entry and what to change."""


@dataclass(frozen=True)
class Role:
    """One character role: the model is asked to play it through any of ``system_prompts``."""

    name: str
    description: str
    category: str
    system_prompts: tuple[str, ...]


@dataclass(frozen=True)
class Question:
    """A question every persona can answer in a few sentences; ``kind`` says what it probes."""

    text: str
    kind: str


@dataclass(frozen=True)
class Conversation:
    """A scripted multi-turn chat: only the user turns are stored, the model writes the replies."""

    id: str
    domain: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Probe:
    """A single user prompt used to check the persona of a model after training or steering."""

    domain: str
    prompt: str


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------

# An entry together with a human-readable location ("roles[3]", "line 4") for error messages.
_Located = tuple[str, Any]


def _label(path: Path, shipped: bool) -> str:
    return path.name if shipped else str(path)


def _resolve(source: PathSource, what: str, hint: str = "") -> Path:
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}{hint}")
    return path


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PersonaDataError(f"{label}: not valid UTF-8 ({exc}); save the file as UTF-8") from exc


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


def _parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaDataError(
            f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            " (one JSON object per line belongs in a .jsonl file)"
        ) from exc


def _parse_jsonl(text: str, label: str) -> list[_Located]:
    entries: list[_Located] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PersonaDataError(
                f"{label}: line {lineno} is not valid JSON ({exc.msg}); each line must hold exactly one "
                "complete JSON value"
            ) from exc
    return entries


def _check_version(doc: Mapping[str, Any], label: str) -> None:
    if "version" not in doc:
        raise PersonaDataError(f"{label}: missing top-level 'version'; add \"version\": {SCHEMA_VERSION}")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise PersonaDataError(
            f"{label}: 'version' is {version!r}; this loader understands version {SCHEMA_VERSION} only"
        )


def _schema_entries(doc: Any, label: str, key: str, allow_plain_list: bool) -> list[_Located]:
    """Entries of a ``{"version": 1, key: [...]}`` document (or of a bare list where allowed)."""
    if isinstance(doc, list) and allow_plain_list:
        return [(f"item {i}", item) for i, item in enumerate(doc)]
    if not isinstance(doc, dict):
        shape = (
            f'a JSON list or an object {{"version": 1, "{key}": [...]}}'
            if allow_plain_list
            else f'an object {{"version": 1, "{key}": [...]}}'
        )
        raise PersonaDataError(f"{label}: top level is a JSON {_json_type(doc)}; expected {shape}")
    _check_version(doc, label)
    unknown = sorted(set(doc) - {"version", key})
    if unknown:
        raise PersonaDataError(
            f"{label}: unknown top-level key(s) {unknown}; only 'version' and '{key}' are allowed"
        )
    if key not in doc:
        raise PersonaDataError(f"{label}: missing top-level key '{key}' (a list)")
    items = doc[key]
    if not isinstance(items, list):
        raise PersonaDataError(f"{label}: '{key}' is a JSON {_json_type(items)}; it must be a list")
    return [(f"{key}[{i}]", item) for i, item in enumerate(items)]


def _file_entries(path: Path, label: str, key: str, allow_plain_list: bool) -> list[_Located]:
    text = _read_text(path, label)
    if _is_jsonl(path):
        return _parse_jsonl(text, label)
    return _schema_entries(_parse_json(text, label), label, key, allow_plain_list)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Field checks shared by all entry kinds
# --------------------------------------------------------------------------------------------------


def _check_keys(entry: Any, where: str, label: str, required: Iterable[str], optional: Iterable[str]) -> None:
    required, optional = tuple(required), tuple(optional)
    if not isinstance(entry, Mapping):
        keys = ", ".join(repr(k) for k in required)
        raise PersonaDataError(
            f"{label}: {where} is a JSON {_json_type(entry)}; expected an object with keys {keys}"
        )
    for key in required:
        if key not in entry:
            raise PersonaDataError(f"{label}: {where} is missing required key '{key}'")
    unknown = sorted(set(entry) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(repr(k) for k in (*required, *optional))
        raise PersonaDataError(f"{label}: {where} has unknown key(s) {unknown}; allowed keys are {allowed}")


def _text(value: Any, what: str, label: str) -> str:
    if not isinstance(value, str):
        raise PersonaDataError(f"{label}: {what} must be a string, got a JSON {_json_type(value)}")
    if not value.strip():
        raise PersonaDataError(f"{label}: {what} is empty; write some text or remove the entry")
    return value


def _label_value(
    value: Any, what: str, label: str, allowed: tuple[str, ...], strict: bool, field: str
) -> str:
    """A category/kind/domain: from ``allowed`` (shipped) or also ``"custom"`` (user data)."""
    if not isinstance(value, str):
        raise PersonaDataError(f"{label}: {what} {field} must be a string, got a JSON {_json_type(value)}")
    choices = allowed if strict else (*allowed, CUSTOM_LABEL)
    if value not in choices:
        raise PersonaDataError(f"{label}: {what} has {field} {value!r}; use one of: {', '.join(choices)}")
    return value


def _text_list(value: Any, what: str, label: str, noun: str, minimum: int, owner: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise PersonaDataError(
            f"{label}: {what} {noun} is a single string; wrap it in a list: [{_short(value)!r}]"
        )
    if not isinstance(value, list | tuple):
        raise PersonaDataError(f"{label}: {what} {noun} must be a list of strings, got {_json_type(value)}")
    if len(value) < minimum:
        raise PersonaDataError(
            f"{label}: {what} has {len(value)} {noun}; each {owner} needs at least {minimum}"
        )
    seen: set[str] = set()
    for i, item in enumerate(value):
        text = _text(item, f"{what} {noun}[{i}]", label)
        if text in seen:
            raise PersonaDataError(
                f"{label}: {what} lists {noun}[{i}] twice ({_short(text)!r}); remove the duplicate"
            )
        seen.add(text)
    return tuple(value)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------------

RoleSource = PathSource | Mapping[str, Sequence[str]] | None


def _role_name(value: Any, where: str, label: str) -> str:
    if not isinstance(value, str):
        raise PersonaDataError(f"{label}: {where} name must be a string, got a JSON {_json_type(value)}")
    if not _SNAKE_CASE.fullmatch(value):
        suggestion = re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")
        hint = f", e.g. {suggestion!r}" if _SNAKE_CASE.fullmatch(suggestion) else ""
        raise PersonaDataError(
            f"{label}: {where} name {value!r} is not snake_case; use lowercase letters, digits and "
            f"single underscores, starting with a letter{hint}"
        )
    return value


def _role_from_entry(entry: Any, where: str, label: str, strict: bool) -> Role:
    required = ("name", "description", "category", "system_prompts") if strict else ("name", "system_prompts")
    optional = () if strict else ("description", "category")
    _check_keys(entry, where, label, required, optional)
    name = _role_name(entry["name"], where, label)
    what = f"role {name!r}"
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise PersonaDataError(
            f"{label}: {what} description must be a string, got a JSON {_json_type(description)}"
        )
    if strict:
        _text(description, f"{what} description", label)
    category = _label_value(
        entry.get("category", CUSTOM_LABEL), what, label, ROLE_CATEGORIES, strict, "category"
    )
    prompts = _text_list(entry["system_prompts"], what, label, "system prompts", minimum=1, owner="role")
    return Role(name=name, description=description.strip(), category=category, system_prompts=prompts)


def _unique_roles(roles: list[Role], wheres: list[str], label: str) -> list[Role]:
    first: dict[str, str] = {}
    for role, where in zip(roles, wheres, strict=True):
        if role.name in first:
            raise PersonaDataError(
                f"{label}: role name {role.name!r} appears twice ({first[role.name]} and {where}); "
                "role names must be unique"
            )
        first[role.name] = where
    return roles


def load_role_records(source: RoleSource = None) -> list[Role]:
    """Load roles with their description and category, in file order.

    ``source`` is ``None`` (the shipped ``roles.json``), a path to a JSON file in the ``roles.json``
    schema (``{"version": 1, "roles": [{"name", "system_prompts", "description"?, "category"?}]}``),
    a path to a ``.jsonl`` file with one such role object per line, or a mapping
    ``name -> [system prompts]`` (given ``description=""`` and ``category="custom"``).  Categories help
    report where along the persona spectrum each role falls, which is why records keep them.
    """
    if source is None:
        return _load_role_file(ROLES_FILE, shipped=True)
    if isinstance(source, Mapping):
        return _roles_from_mapping(source)
    if isinstance(source, str | os.PathLike):
        return _load_role_file(_resolve(source, "roles"), shipped=False)
    raise TypeError(
        "roles source must be None, a path to a .json/.jsonl file, or a mapping name -> list of "
        f"system prompts; got {type(source).__name__}"
    )


def load_roles(source: RoleSource = None) -> dict[str, list[str]]:
    """Load roles as ``{name: [system prompt, ...]}`` in file order.

    This is the shape the axis-building code needs: each role's activations are averaged over all of
    its prompts, so that no single wording defines the role.  See :func:`load_role_records` for the
    accepted ``source`` values.
    """
    return {role.name: list(role.system_prompts) for role in load_role_records(source)}


def _load_role_file(path: Path, shipped: bool) -> list[Role]:
    label = _label(path, shipped)
    located = _file_entries(path, label, "roles", allow_plain_list=False)
    if not located:
        raise PersonaDataError(f"{label}: contains no roles; add at least one")
    roles = [_role_from_entry(entry, where, label, strict=shipped) for where, entry in located]
    return _unique_roles(roles, [where for where, _ in located], label)


def _roles_from_mapping(source: Mapping[Any, Any]) -> list[Role]:
    label = "roles mapping"
    if not source:
        raise PersonaDataError(f"{label}: is empty; give at least one role name -> list of system prompts")
    roles = []
    for key, prompts in source.items():
        name = _role_name(key, "role", label)
        roles.append(
            Role(
                name=name,
                description="",
                category=CUSTOM_LABEL,
                system_prompts=_text_list(
                    prompts, f"role {name!r}", label, "system prompts", minimum=1, owner="role"
                ),
            )
        )
    return roles  # mapping keys are unique by construction


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------

QuestionSource = PathSource | Sequence[str | Question | Mapping[str, Any]] | None


def load_question_records(source: QuestionSource = None) -> list[Question]:
    """Load questions with their kind, in order.

    ``source`` is ``None`` (the shipped ``questions.json``); a path to a ``.json`` file (the
    ``{"version": 1, "questions": [{"text", "kind"?}]}`` schema, or a plain JSON list of strings or
    such objects); a ``.jsonl`` file (an object with ``"text"`` or a plain string per line); a ``.txt``
    file (one question per line, blank lines skipped); or a Python list of strings.  Entries without
    a kind get ``"custom"``.  Kinds let callers check the axis is not driven by one type of question.
    """
    if source is None:
        return _load_question_file(QUESTIONS_FILE, shipped=True)
    if isinstance(source, str | os.PathLike):
        hint = " (a str is read as a path; pass a list of strings for literal questions)"
        return _load_question_file(_resolve(source, "questions", hint), shipped=False)
    if isinstance(source, Sequence):
        located = [(f"item {i}", q) for i, q in enumerate(source)]
        return _questions_from_entries(located, "questions list", strict=False)
    raise TypeError(
        "questions source must be None, a path to a .json/.jsonl/.txt file, or a list of strings; "
        f"got {type(source).__name__}"
    )


def load_questions(source: QuestionSource = None) -> list[str]:
    """Load question texts in order; every role answers the same questions so their activations compare.

    See :func:`load_question_records` for the accepted ``source`` values.
    """
    return [question.text for question in load_question_records(source)]


def _load_question_file(path: Path, shipped: bool) -> list[Question]:
    label = _label(path, shipped)
    if path.suffix.lower() == ".txt":
        text = _read_text(path, label)
        located: list[_Located] = [
            (f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()
        ]
    else:
        located = _file_entries(path, label, "questions", allow_plain_list=not shipped)
    return _questions_from_entries(located, label, strict=shipped)


def _questions_from_entries(located: list[_Located], label: str, strict: bool) -> list[Question]:
    if not located:
        raise PersonaDataError(f"{label}: contains no questions; add at least one")
    questions: list[Question] = []
    first: dict[str, str] = {}
    for where, entry in located:
        if isinstance(entry, Question):
            entry = {"text": entry.text, "kind": entry.kind}
        if isinstance(entry, str) and not strict:
            question = Question(text=_text(entry, where, label), kind=CUSTOM_LABEL)
        else:
            required = ("text", "kind") if strict else ("text",)
            _check_keys(entry, where, label, required, () if strict else ("kind",))
            text = _text(entry["text"], f"{where} text", label)
            kind = _label_value(entry.get("kind", CUSTOM_LABEL), where, label, QUESTION_KINDS, strict, "kind")
            question = Question(text=text, kind=kind)
        if question.text in first:
            raise PersonaDataError(
                f"{label}: {where} repeats {first[question.text]} ({_short(question.text)!r}); "
                "question texts must be unique"
            )
        first[question.text] = where
        questions.append(question)
    return questions


# --------------------------------------------------------------------------------------------------
# Default-Assistant system prompts
# --------------------------------------------------------------------------------------------------

DefaultsSource = PathSource | Sequence[str] | None


def load_default_prompts(source: DefaultsSource = None) -> list[str]:
    """Load the neutral system prompts that define the default Assistant, the axis's reference point.

    ``""`` means "no system message at all" (the model's own default) and is the only string allowed
    to be empty; the shipped file lists it first.  ``source`` is ``None`` (the shipped
    ``defaults.json``), a path to a JSON file (``{"version": 1, "system_prompts": [...]}`` or a plain
    JSON list of strings), or a Python list of strings.
    """
    if source is None:
        return _defaults_from_entries(
            _file_entries(DEFAULTS_FILE, DEFAULTS_FILE.name, "system_prompts", allow_plain_list=False),
            DEFAULTS_FILE.name,
            strict=True,
        )
    if isinstance(source, str | os.PathLike):
        path = _resolve(source, "default prompts", " (a str is read as a path; pass a list of strings)")
        label = _label(path, shipped=False)
        return _defaults_from_entries(
            _file_entries(path, label, "system_prompts", allow_plain_list=True), label, strict=False
        )
    if isinstance(source, Sequence):
        located = [(f"item {i}", p) for i, p in enumerate(source)]
        return _defaults_from_entries(located, "default prompts list", strict=False)
    raise TypeError(
        f"default prompts source must be None, a path or a list of strings; got {type(source).__name__}"
    )


def _defaults_from_entries(located: list[_Located], label: str, strict: bool) -> list[str]:
    if not located:
        raise PersonaDataError(f'{label}: contains no system prompts; add at least "" (no system message)')
    prompts: list[str] = []
    for where, entry in located:
        if not isinstance(entry, str):
            raise PersonaDataError(f"{label}: {where} must be a string, got a JSON {_json_type(entry)}")
        if entry and not entry.strip():
            raise PersonaDataError(
                f"{label}: {where} is only whitespace; use \"\" for 'no system message' or write a prompt"
            )
        if entry in prompts:
            raise PersonaDataError(f"{label}: {where} repeats an earlier prompt ({_short(entry)!r})")
        prompts.append(entry)
    if strict and prompts[0] != "":
        raise PersonaDataError(
            f'{label}: the first system prompt must be "" (no system message, the model\'s own default)'
        )
    return prompts


# --------------------------------------------------------------------------------------------------
# Conversations and probes
# --------------------------------------------------------------------------------------------------

ConversationSource = PathSource | Sequence[Conversation | Mapping[str, Any]] | None
ProbeSource = PathSource | Sequence[Probe | Mapping[str, Any] | str] | None


def load_conversations(source: ConversationSource = None) -> list[Conversation]:
    """Load scripted multi-turn conversations used to measure persona drift over a chat.

    ``source`` is ``None`` (the shipped ``conversations.jsonl``), a path to a ``.jsonl`` file with one
    ``{"id", "domain", "turns"}`` object per line, a path to a ``.json`` file
    ``{"version": 1, "conversations": [...]}``, or a Python list of such mappings.  Shipped conversations
    need at least 6 user turns (drift needs a long chat to show); user ones need at least 1.  A user
    entry may omit ``domain`` (it becomes ``"custom"``).
    """
    if source is None:
        path = CONVERSATIONS_FILE
        entries = _load_conversation_file(path, path.name, shipped=True)
        return _conversations_from_entries(entries, path.name, strict=True)
    if isinstance(source, str | os.PathLike):
        path = _resolve(source, "conversations")
        label = _label(path, shipped=False)
        entries = _load_conversation_file(path, label, shipped=False)
        return _conversations_from_entries(entries, label, strict=False)
    if isinstance(source, Sequence):
        located = [(f"item {i}", c) for i, c in enumerate(source)]
        return _conversations_from_entries(located, "conversations list", strict=False)
    raise TypeError(f"conversations source must be None, a path or a list; got {type(source).__name__}")


def _load_conversation_file(path: Path, label: str, shipped: bool) -> list[_Located]:
    if not path.is_file():
        raise FileNotFoundError(f"conversations file not found: {str(path)!r}")
    return _file_entries(path, label, "conversations", allow_plain_list=not shipped)


def _conversations_from_entries(located: list[_Located], label: str, strict: bool) -> list[Conversation]:
    if not located:
        raise PersonaDataError(f"{label}: contains no conversations; add at least one")
    conversations: list[Conversation] = []
    first: dict[str, str] = {}
    min_turns = MIN_SHIPPED_CONVERSATION_TURNS if strict else 1
    for where, entry in located:
        if isinstance(entry, Conversation):
            entry = {"id": entry.id, "domain": entry.domain, "turns": list(entry.turns)}
        required = ("id", "domain", "turns") if strict else ("id", "turns")
        _check_keys(entry, where, label, required, () if strict else ("domain",))
        conv_id = _text(entry["id"], f"{where} id", label)
        what = f"conversation {conv_id!r}"
        if conv_id in first:
            raise PersonaDataError(
                f"{label}: {what} id appears twice ({first[conv_id]} and {where}); ids must be unique"
            )
        first[conv_id] = where
        domain = _label_value(
            entry.get("domain", CUSTOM_LABEL), what, label, CONVERSATION_DOMAINS, strict, "domain"
        )
        turns = _conversation_turns(entry["turns"], what, label, min_turns)
        conversations.append(Conversation(id=conv_id, domain=domain, turns=turns))
    return conversations


def _conversation_turns(value: Any, what: str, label: str, minimum: int) -> tuple[str, ...]:
    # Repeated user turns are legitimate in a chat ("continue"), so only type and emptiness are checked.
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise PersonaDataError(
            f"{label}: {what} turns must be a list of user-message strings, got a JSON {_json_type(value)}"
        )
    if len(value) < minimum:
        raise PersonaDataError(
            f"{label}: {what} has {len(value)} turns; each conversation needs at least {minimum}"
        )
    return tuple(_text(turn, f"{what} turns[{i}]", label) for i, turn in enumerate(value))


def load_probes(source: ProbeSource = None) -> list[Probe]:
    """Load single-turn probe prompts used to spot-check a model's persona.

    ``source`` is ``None`` (the shipped ``probes.json``), a path to a JSON file
    ``{"version": 1, "probes": [{"domain", "prompt"}]}``, a ``.jsonl`` file with one such object per
    line, or a Python list of such mappings or of plain strings (domain ``"custom"``).
    """
    if source is None:
        path = PROBES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"probes file not found: {str(path)!r}")
        entries = _file_entries(path, path.name, "probes", allow_plain_list=False)
        return _probes_from_entries(entries, path.name, strict=True)
    if isinstance(source, str | os.PathLike):
        path = _resolve(source, "probes", " (a str is read as a path; pass a list of strings)")
        label = _label(path, shipped=False)
        return _probes_from_entries(
            _file_entries(path, label, "probes", allow_plain_list=True), label, strict=False
        )
    if isinstance(source, Sequence):
        located = [(f"item {i}", p) for i, p in enumerate(source)]
        return _probes_from_entries(located, "probes list", strict=False)
    raise TypeError(f"probes source must be None, a path or a list; got {type(source).__name__}")


def _probes_from_entries(located: list[_Located], label: str, strict: bool) -> list[Probe]:
    if not located:
        raise PersonaDataError(f"{label}: contains no probes; add at least one")
    probes: list[Probe] = []
    first: dict[str, str] = {}
    for where, entry in located:
        if isinstance(entry, Probe):
            entry = {"domain": entry.domain, "prompt": entry.prompt}
        if isinstance(entry, str) and not strict:
            probe = Probe(domain=CUSTOM_LABEL, prompt=_text(entry, where, label))
        else:
            required = ("domain", "prompt") if strict else ("prompt",)
            _check_keys(entry, where, label, required, () if strict else ("domain",))
            prompt = _text(entry["prompt"], f"{where} prompt", label)
            domain = _label_value(
                entry.get("domain", CUSTOM_LABEL), where, label, PROBE_DOMAINS, strict, "domain"
            )
            probe = Probe(domain=domain, prompt=prompt)
        if probe.prompt in first:
            raise PersonaDataError(
                f"{label}: {where} repeats {first[probe.prompt]} ({_short(probe.prompt)!r}); "
                "probe prompts must be unique"
            )
        first[probe.prompt] = where
        probes.append(probe)
    return probes
