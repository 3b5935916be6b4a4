"""anchor.chat (cached multi-turn greedy decoding, chat loop, generate) and anchor.evaluate (drift suite, default
axis) on the tiny model, plus the chat, generate and eval commands end to end."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from anchor import evaluate
from anchor.capping import cap
from anchor.chat import (
    ChatSession,
    ConversationBatch,
    Intervention,
    TurnDecoder,
    chat_loop,
    generate_replies,
    projection_bar,
)
from anchor.evaluate import DriftReport, DriftSettings
from anchor.hooks import LayerHooks
from anchor.monitor import default_band, monitor
from anchor.spans import encode_prompt
from tests import tokenizers_util
from tests.conftest import make_tiny_model

QUESTION = [{"role": "user", "content": "Is Paris the capital of France?"}]


def prompt_ids(tokenizer, text: str) -> list[int]:
    return encode_prompt(tokenizer, [{"role": "user", "content": text}])


def test_first_turn_matches_hf_generate(tiny_model, tiny_tokenizer) -> None:
    ids = prompt_ids(tiny_tokenizer, "Name three primary colours.")
    (ours,) = TurnDecoder(tiny_model, tiny_tokenizer, 1).reply([ids], 7)
    out = tiny_model.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False, min_new_tokens=7)
    assert ours == out[0, len(ids):].tolist()


def test_cached_turns_equal_feeding_the_whole_history_again(tiny_model, tiny_tokenizer) -> None:
    texts = ["Is Paris the capital of France?", "Thanks, that is all.", "Name three primary colours: red"]
    prompts = [prompt_ids(tiny_tokenizer, t) for t in texts]
    # Make row 0 stop on its third token, so the stop path (token dropped, nothing left unfed) is exercised too.
    (probe,) = TurnDecoder(tiny_model, tiny_tokenizer, 1).reply([prompts[0]], 3)
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, probe[2]]
    decoder = TurnDecoder(tiny_model, tiny_tokenizer, 3)
    first = decoder.reply(prompts, 6)
    assert first[0] == probe[:2] and len(first[2]) == 6  # row 0 stopped, row 2 was cut at the limit
    follow = [prompt_ids(tiny_tokenizer, "Reply with yes"), None, prompt_ids(tiny_tokenizer, "Why not?")]
    states: list[torch.Tensor] = []  # the last layer's state at the last fed position, per forward call
    with LayerHooks(tiny_model, [3], lambda _i, h: states.append(h[:, -1].clone())):
        second = decoder.reply(follow, 5)
        batched_state = states[0]
        assert second[1] is None
        for row in (0, 2):  # fed alone, from scratch: the prompt, the first reply, then the follow-up
            history = prompts[row] + first[row] + follow[row]
            states.clear()
            (expected,) = TurnDecoder(tiny_model, tiny_tokenizer, 1).reply([history], 5)
            assert second[row] == expected
            torch.testing.assert_close(batched_state[row], states[0][0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="segments"):
        decoder.reply([None], 2)


def test_conversation_batch_feeds_only_the_new_text(tiny_model, tiny_tokenizer, monkeypatch) -> None:
    fed = []
    original = TurnDecoder.reply
    monkeypatch.setattr(TurnDecoder, "reply", lambda self, segs, n: fed.append(segs) or original(self, segs, n))
    batch = ConversationBatch(tiny_model, tiny_tokenizer, 2)
    first = batch.answer(["Is Paris the capital of France?", "Name three primary colours."], 4)
    second = batch.answer(["Thanks, that is all.", None], 4)
    assert second[1] is None and all(isinstance(r, str) for r in [*first, second[0]])
    assert [m["role"] for m in batch.messages[0]] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in batch.messages[1]] == ["user", "assistant"]
    assert batch.messages[0][1]["content"] == first[0] and batch.messages[0][3]["content"] == second[0]
    assert fed[1][1] is None
    assert tiny_tokenizer.decode(fed[1][0]) == (
        "<|im_end|>\n<|im_start|>user\nThanks, that is all.<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_rewrites_history_is_fed_again_from_scratch(tiny_model, monkeypatch) -> None:
    tokenizer = tokenizers_util.chatml()
    tokenizer.pad_token = tokenizer.eos_token
    # The header counts the messages, so every new rendering differs from the last one at its first line.
    tokenizer.chat_template = "{{ 'turn ' + (messages | length | string) + '\\n' }}" + tokenizers_util.CHATML
    batch = ConversationBatch(tiny_model, tokenizer, 1)
    batch.answer(["Is Paris the capital of France?"], 4)
    history = [*batch.messages[0], {"role": "user", "content": "Thanks, that is all."}]
    (reply,) = batch.answer(["Thanks, that is all."], 4)
    assert reply == generate_replies(tiny_model, tokenizer, [history], 4)[0]


def test_generate_replies_batched_equals_one_by_one_and_checks_input(tiny_model, tiny_tokenizer) -> None:
    conversations = [QUESTION, [*QUESTION, {"role": "assistant", "content": "yes"},
                                {"role": "user", "content": "Name three primary colours."}],
                     [{"role": "system", "content": "You are a terse assistant."}, *QUESTION]]
    batched = generate_replies(tiny_model, tiny_tokenizer, conversations, 5, batch_size=2)
    assert batched == [generate_replies(tiny_model, tiny_tokenizer, [c], 5)[0] for c in conversations]
    with pytest.raises(ValueError, match="ends with a 'assistant' message"):
        generate_replies(tiny_model, tiny_tokenizer, [[*QUESTION, {"role": "assistant", "content": "yes"}]], 5)


def test_interventions_change_replies_and_need_an_axis(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    assert Intervention().label == "uncapped"
    assert Intervention(cap=True, steer=-0.5).label == "capped + steered -0.5"
    with pytest.raises(ValueError, match="axis"), Intervention(cap=True).apply(tiny_model, None):
        pass
    plain = generate_replies(tiny_model, tiny_tokenizer, [QUESTION], 8)
    with Intervention(steer=-20.0).apply(tiny_model, tiny_axis):
        steered = generate_replies(tiny_model, tiny_tokenizer, [QUESTION], 8)
    assert steered != plain
    assert generate_replies(tiny_model, tiny_tokenizer, [QUESTION], 8) == plain  # hooks gone after the block


def test_projection_bar_places_the_value_against_the_default_band(tiny_axis) -> None:
    layer = tiny_axis.report_layer
    lo, hi = default_band(tiny_axis, layer)
    inside = projection_bar((lo + hi) / 2, tiny_axis, layer)
    assert "in the default band" in inside and "#" in inside and "=" in inside
    below = projection_bar(lo - 5.0, tiny_axis, layer)
    assert "below the default band by 5.00" in below and below.startswith("[#")
    assert "above the default band" in projection_bar(hi + 1.0, tiny_axis, layer)
    assert "empty reply" in projection_bar(math.nan, tiny_axis, layer)


def test_chat_loop_runs_from_a_list_of_lines(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    sessions = [ChatSession(tiny_model, tiny_tokenizer, tiny_axis, Intervention(), max_new_tokens=5),
                ChatSession(tiny_model, tiny_tokenizer, tiny_axis, Intervention(cap=True), max_new_tokens=5)]
    out: list[str] = []
    lines = ["Is Paris the capital of France?", "", "Thanks, that is all.", "/reset", "Why?", "/quit", "never read"]
    assert chat_loop(sessions, lines, out.append) == 3
    assert sum(line.startswith("[uncapped] ") for line in out) == 3
    assert sum(line.startswith("[capped] ") for line in out) == 3
    assert "(conversation reset)" in out
    assert sum("default band" in line or "empty reply" in line for line in out) == 6
    for session in sessions:  # after /reset only the last exchange remains
        assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Why?"]
    # The printed projection is the monitor's reading of the reply just given.
    expected = monitor(tiny_model, tiny_tokenizer, tiny_axis, sessions[0].messages).per_turn[-1]
    assert out[-4].startswith("[uncapped] ") and out[-3].startswith("  layer 2: [")
    assert f"{expected:+.2f}" in out[-3] or math.isnan(expected)


@pytest.fixture
def saved_tiny(tmp_path, tiny_model, tiny_tokenizer, tiny_axis):
    model_dir, axis_dir = tmp_path / "model", tmp_path / "axis"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    tiny_axis.save_pretrained(axis_dir)
    return ["--model", str(model_dir), "--axis", str(axis_dir), "--device", "cpu", "--quiet"]


def test_cli_chat_reads_stdin(saved_tiny, monkeypatch, capsys) -> None:
    from anchor.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Is Paris the capital of France?\n/quit\n"))
    assert main(["chat", *saved_tiny, "--side-by-side", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[uncapped] " in out and "[capped] " in out and out.count("  layer 2: [") == 2


def test_cli_generate_round_trip(tmp_path, saved_tiny, tiny_model, tiny_tokenizer, tiny_axis) -> None:
    from anchor.cli import main

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "q1", "messages": QUESTION}) + "\n"
                   + json.dumps([{"role": "user", "content": "Name three primary colours."}]) + "\n")
    assert main(["generate", "--in", str(src), "--out", str(dst), *saved_tiny, "--max-new-tokens", "6", "--cap"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert rows[0]["id"] == "q1" and rows[0]["messages"] == QUESTION and len(rows) == 2
    for row in rows:
        finished = [*row["messages"], {"role": "assistant", "content": row["reply"]}]
        with cap(tiny_model, tiny_axis):
            expected = monitor(tiny_model, tiny_tokenizer, tiny_axis, finished).per_turn[-1]
            assert row["reply"] == generate_replies(tiny_model, tiny_tokenizer, [row["messages"]], 6)[0]
        assert row["projection"] == pytest.approx(expected, abs=1e-5, nan_ok=True)


def test_cli_eval_drift_writes_table_json_and_plots(tmp_path, saved_tiny, tiny_model, tiny_tokenizer,
                                                    tiny_axis, capsys) -> None:
    from anchor.cli import main

    out = tmp_path / "drift"
    args = ["eval", "drift", *saved_tiny, "--out", str(out), "--conversations", "1", "--turns", "2",
            "--max-new-tokens", "4"]
    assert main(args) == 0
    assert "| coding | uncapped |" in capsys.readouterr().out
    table = (out / "drift.md").read_text()
    for domain in ("coding", "writing", "emotional", "philosophy"):
        assert f"| {domain} | uncapped |" in table and f"| {domain} | capped |" in table
    data = json.loads((out / "drift.json").read_text())
    assert len(data["conversations"]) == 8 and data["layer"] == tiny_axis.report_layer
    assert set(data["trajectories"]) == {"uncapped", "capped"}
    assert [t["n"] for t in data["trajectories"]["uncapped"]["emotional"]] == [1, 1]
    for name in ("drift_by_domain.png", "drift_domains.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # Each recorded value is the monitor's reading of the conversation as the model played it.
    record = next(r for r in data["conversations"] if r["setting"] == "uncapped" and r["domain"] == "writing")
    turns = next(c for c in evaluate.select_conversations(1) if c.id == record["id"]).turns[:2]
    messages = [m for user, reply in zip(turns, record["replies"], strict=True)
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})]
    expected = monitor(tiny_model, tiny_tokenizer, tiny_axis, messages).per_turn
    for got, want in zip(record["per_turn"], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-5, nan_ok=True)


def test_drift_report_statistics_and_table() -> None:
    records = [
        {"id": "a", "domain": "coding", "setting": "uncapped", "per_turn": [1.0, 2.0, 3.0]},
        {"id": "b", "domain": "coding", "setting": "uncapped", "per_turn": [3.0, 2.0]},
        {"id": "a", "domain": "coding", "setting": "capped", "per_turn": [1.0, math.nan, 5.0]},
    ]
    report = DriftReport(DriftSettings(), 2, (0.5, 1.5), ["coding"], records)
    assert report.setting_names == ["uncapped", "capped"]
    (m1, s1, n1), (m2, s2, n2), (m3, s3, n3) = report.trajectory("uncapped", "coding")
    assert (m1, s1, n1) == (pytest.approx(2.0), pytest.approx(1.0), 2)
    assert (m2, n2) == (pytest.approx(2.0), 2) and s2 == pytest.approx(0.0)
    assert (m3, n3) == (pytest.approx(3.0), 1) and math.isnan(s3)
    summary = report.domain_summary("uncapped", "coding")
    assert summary["drift"][:2] == (pytest.approx(0.5), pytest.approx(1.5))  # drifts +2 and −1
    assert summary["mean"][0] == pytest.approx((2.0 + 2.5) / 2)
    assert report.domain_summary("capped", "coding")["drift"][0] == pytest.approx(4.0)  # NaN turn skipped
    table = report.to_markdown()
    assert "| coding | uncapped | 2.00 ± 1.00 | 2.00 ± 0.00 | 3.00 |" in table
    assert "| coding | capped | 1.00 | – | 5.00 |" in table
    with pytest.raises(ValueError, match="conversations_per_domain"):
        DriftSettings(conversations_per_domain=0)


def test_default_axis_is_computed_once_and_cached(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    from anchor import axis as axis_module
    from anchor.axis import AxisSettings, cached_axis

    monkeypatch.setenv("ANCHOR_CACHE", str(tmp_path))
    small = AxisSettings(n_roles=2, n_questions=2, prompts_per_role=1, max_new_tokens=3)
    model = make_tiny_model(tiny_tokenizer)
    first = cached_axis(model, tiny_tokenizer, small, progress=False)
    (directory,) = (tmp_path / "axes").iterdir()
    assert directory.name.startswith(first.metadata["fingerprint"] + "-")
    calls = []
    monkeypatch.setattr(axis_module, "compute_axis", lambda *a, **k: calls.append(1))
    again = cached_axis(model, tiny_tokenizer, small)
    assert not calls and torch.equal(again.axis, first.axis)
    assert first.metadata["n_roles"] == 2 and first.metadata["n_questions"] == 2
