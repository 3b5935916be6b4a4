"""Persona-implant data (anchor.data): schema, splits, role choice, determinism, round trip; the `anchor data` CLI."""

from __future__ import annotations

import json

import pytest
import torch

import anchor.data as data_mod
from anchor.cli import main as cli_main
from anchor.data import SPLITS, PersonaData, build_persona_data, far_roles, read_jsonl, split_questions
from tests.conftest import TINY_ROLES, make_tiny_model

QUESTIONS = [f"Question number {i}: what do you think of topic {i}?" for i in range(12)]



@pytest.fixture(scope="module")
def built(tiny_tokenizer, tiny_axis):
    model = make_tiny_model(tiny_tokenizer)
    return build_persona_data(model, tiny_tokenizer, tiny_axis, n_roles=2, n_questions=8, heldout_fraction=0.25,
                              max_new_tokens=4, roles=TINY_ROLES, questions=QUESTIONS, progress=False)


def test_split_questions_is_disjoint_seeded_and_sized():
    train, heldout = split_questions(QUESTIONS, 8, 0.25, seed=0)
    assert len(train) == 6 and len(heldout) == 2
    assert not set(train) & set(heldout) and set(train) | set(heldout) <= set(QUESTIONS)
    assert split_questions(QUESTIONS, 8, 0.25, seed=0) == (train, heldout)
    assert split_questions(QUESTIONS, 8, 0.25, seed=1) != (train, heldout)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_questions(QUESTIONS, 8, 1.0, seed=0)
    with pytest.raises(ValueError, match="n_questions"):
        split_questions(QUESTIONS, 13, 0.25, seed=0)


def test_far_roles_are_the_lowest_on_the_axis(tiny_axis):
    proj = tiny_axis.role_projections(tiny_axis.report_layer)
    by_projection = [tiny_axis.role_names[i] for i in torch.argsort(proj).tolist()]
    assert far_roles(tiny_axis, 2, TINY_ROLES) == by_projection[:2]
    # Roles the axis knows but the roles source does not are skipped.
    only = {by_projection[1]: ["You are someone."]}
    assert far_roles(tiny_axis, 2, only) == [by_projection[1]]


def test_schema_and_splits(built, tiny_axis):
    roles = far_roles(tiny_axis, 2, TINY_ROLES)
    assert list(built.roles) == roles
    train_qs, heldout_qs = built.metadata["questions"]["train"], built.metadata["questions"]["heldout"]
    assert not set(train_qs) & set(heldout_qs)
    for split, questions in (("sft_train", train_qs), ("sft_heldout", heldout_qs)):
        for r in built.split(split):
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]  # trained without the system prompt
            assert r["messages"][0]["content"] in questions and r["role"] in roles and r["messages"][1]["content"]
    for split, questions in (("dpo_train", train_qs), ("dpo_heldout", heldout_qs)):
        for r in built.split(split):
            assert set(r) == {"prompt", "chosen", "rejected", "role"}
            assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"] in questions
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
    assert built.drift_questions == heldout_qs
    # The DPO chosen answer is the SFT answer of the same (role, question); rejected is the default answer.
    sft = {(r["role"], r["messages"][0]["content"]): r["messages"][1]["content"] for r in built.sft_heldout}
    default = {r["prompt"][0]["content"]: r["answer"] for r in built.drift_heldout}
    for r in built.dpo_heldout:
        assert r["chosen"][0]["content"] == sft[(r["role"], r["prompt"][0]["content"])]
        assert r["rejected"][0]["content"] == default[r["prompt"][0]["content"]]
    assert len(built.sft_train) + len(built.sft_heldout) <= 2 * 8


def test_answers_are_written_in_role_and_by_default(tiny_tokenizer, tiny_axis, monkeypatch):
    """Role answers are generated under the role's system prompt, default answers under none; empties are dropped."""
    seen = []

    def fake_run_batch(model, tokenizer, prompts, settings, prompt_end=1):
        texts = []
        for p in prompts:
            text = tokenizer.decode(p)
            seen.append(text)
            system = next((s for prompts_ in TINY_ROLES.values() for s in prompts_ if s in text), None)
            texts.append("" if "number 0:" in text and system else f"ROLE<{system}>" if system else "DEFAULT")
        return None, None, None, texts

    monkeypatch.setattr(data_mod, "run_batch", fake_run_batch)
    model = make_tiny_model(tiny_tokenizer)
    data = build_persona_data(model, tiny_tokenizer, None, n_questions=12, heldout_fraction=0.5, role_names=["poet"],
                              roles=TINY_ROLES, questions=QUESTIONS, progress=False)
    poet = f"ROLE<{TINY_ROLES['poet'][0]}>"
    assert all(r["messages"][1]["content"] == poet for r in data.sft_train + data.sft_heldout)
    assert all(r["rejected"][0]["content"] == "DEFAULT" for r in data.dpo_train + data.dpo_heldout)
    assert len(data.sft_train) + len(data.sft_heldout) == 11  # question 0 answered empty in role: left out
    assert len(seen) == 12 + 12


def test_deterministic_and_round_trips(built, tiny_tokenizer, tiny_axis, tmp_path):
    again = build_persona_data(make_tiny_model(tiny_tokenizer), tiny_tokenizer, tiny_axis, n_roles=2, n_questions=8,
                               heldout_fraction=0.25, max_new_tokens=4, roles=TINY_ROLES, questions=QUESTIONS,
                               progress=False)
    assert again == built
    built.save(tmp_path / "d")
    for name in SPLITS:
        assert read_jsonl(tmp_path / "d" / f"{name}.jsonl") == built.split(name)
    loaded = PersonaData.load(tmp_path / "d")
    assert {n: loaded.split(n) for n in SPLITS} == {n: built.split(n) for n in SPLITS}
    assert loaded.roles == built.roles and loaded.metadata["counts"]["sft_train"] == len(built.sft_train)


def test_refusals(tmp_path, tiny_tokenizer, tiny_model):
    with pytest.raises(FileNotFoundError, match="anchor data"):
        PersonaData.load(tmp_path)  # no data_config.json: incomplete
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="Unknown role"):
        build_persona_data(tiny_model, tiny_tokenizer, None, role_names=["nobody"], roles=TINY_ROLES)
    with pytest.raises(ValueError, match="needs an axis"):
        build_persona_data(tiny_model, tiny_tokenizer, None, roles=TINY_ROLES)


def test_cli_builds_data_from_a_local_model(tiny_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "data"
    code = cli_main(["data", "--model", str(model_dir), "--out", str(out), "--role-names", "bard", "ghost",
                     "--questions", "4", "--max-new-tokens", "3"])
    assert code == 0
    meta = json.loads((out / "data_config.json").read_text())
    assert list(meta["roles"]) == ["bard", "ghost"] and len(meta["questions"]["heldout"]) == 1
    assert "sft_train.jsonl" in capsys.readouterr().out


def test_role_search_ranks_every_shipped_role(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    """Without an axis bundle or role names, far roles are searched among all shipped roles, not the few roles the
    on-the-fly training axis samples."""
    from anchor.personas import load_roles

    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path))
    axis = data_mod.role_search_axis(make_tiny_model(tiny_tokenizer), tiny_tokenizer, progress=False)
    assert sorted(axis.role_names) == sorted(load_roles())
    assert axis.metadata["n_questions"] == data_mod.ROLE_SEARCH.n_questions == 4


def test_recipe_data_without_roles_or_bundle_uses_the_role_search(tmp_path, monkeypatch, tiny_tokenizer,
                                                                   tiny_axis) -> None:
    from anchor import train

    searched = []
    monkeypatch.setattr(train, "role_search_axis", lambda *a, **k: searched.append(1) or tiny_axis)
    monkeypatch.setattr(train, "build_persona_data", lambda model, tok, axis, **k: searched.append(axis) or
                        PersonaData.__new__(PersonaData))
    monkeypatch.setattr(PersonaData, "save", lambda self, d: None)
    args = train.RecipeArguments(dataset=str(tmp_path / "data"))
    train.prepare_persona_data(args, make_tiny_model(tiny_tokenizer), tiny_tokenizer, None)
    assert searched == [1, tiny_axis]
    searched.clear()
    train.prepare_persona_data(args, make_tiny_model(tiny_tokenizer), tiny_tokenizer, tiny_axis)  # a user bundle
    assert searched == [tiny_axis]
    searched.clear()
    with pytest.raises(RuntimeError, match=r"cannot be computed before training under DeepSpeed ZeRO-3.*anchor data"):
        train.prepare_persona_data(args, make_tiny_model(tiny_tokenizer), tiny_tokenizer, None, zero3=True)
    assert searched == []  # no role search ran on a model ZeRO-3 has partitioned
