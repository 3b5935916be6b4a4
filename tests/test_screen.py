"""Screening a dataset: row formats, the exact per-example projection and score, references, report files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anchor
from anchor import AssistantAxis, cli
from anchor.axis import MissingStatisticError
from anchor.hooks import LayerHooks
from anchor.screening import auc, conversation, read_rows, screen, split_turns, write_report
from anchor.spans import encode_chat, encode_prompt

ROWS = [
    {"messages": [{"role": "user", "content": "What is the sky?"},
                  {"role": "assistant", "content": "The sky is the air above us, blue by day."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "A pirate, matey!"}, {"role": "user", "content": "Really?"},
                  {"role": "assistant", "content": "Aye, I sail the salt roads."}]},
    {"prompt": "Tell me about the sea.", "completion": "The sea covers most of the planet."},
    {"prompt": [{"role": "user", "content": "How do you feel today?"}],
     "chosen": [{"role": "assistant", "content": "Gloomy as a haunted house."}],
     "rejected": [{"role": "assistant", "content": "I am doing well, thank you."}]},
]


def _direct_means(model, tokenizer, axis, messages, layers):
    """Mean projection over all assistant content tokens of one full forward of the conversation."""
    encoding = encode_chat(tokenizer, messages)
    outs = {}
    with LayerHooks(model, layers, lambda i, h: outs.__setitem__(i, h[0].double())), torch.no_grad():
        model(torch.tensor([encoding.input_ids]))
    mask = torch.tensor(encoding.mask())
    return torch.stack([(outs[i][mask] @ axis.unit[i].double()).mean() for i in layers])


def test_row_formats_become_conversations():
    assert conversation(ROWS[2], 2) == [{"role": "user", "content": "Tell me about the sea."},
                                        {"role": "assistant", "content": "The sea covers most of the planet."}]
    assert [m["content"] for m in conversation(ROWS[3], 3)] == ["How do you feel today?",
                                                                "Gloomy as a haunted house."]
    with pytest.raises(ValueError, match=r"row 7 has keys \['text'\]"):
        conversation({"text": "hello"}, 7)


def test_turns_are_the_assistant_spans_in_their_own_context(tiny_tokenizer):
    turns = split_turns(tiny_tokenizer, ROWS)
    assert [t.example for t in turns] == [0, 1, 1, 2, 3]
    messages = ROWS[1]["messages"]
    encoding = encode_chat(tiny_tokenizer, messages)
    for k, turn in enumerate(turns[1:3]):
        assert encoding.input_ids[: len(turn.prefix) + len(turn.answer)] == turn.prefix + turn.answer
        assert turn.answer == [t for t, m in zip(encoding.input_ids, encoding.mask(k), strict=True) if m]
    assert turns[2].prompt == encode_prompt(tiny_tokenizer, messages[:4])
    with pytest.raises(ValueError, match="row 0 has no assistant message"):
        split_turns(tiny_tokenizer, [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ValueError, match="row 0: assistant message 0 is empty"):
        split_turns(tiny_tokenizer, [{"prompt": "Hi", "completion": ""}])


def test_band_scores_are_exact(tiny_model, tiny_tokenizer, tiny_axis):
    report = screen(tiny_model, tiny_tokenizer, tiny_axis, ROWS, band=[1, 3], batch_size=2)
    assert report.layers == [1, 2, 3] and report.report_layer == 2 and report.band == [1, 3]
    assert report.n_tokens[1] == sum(encode_chat(tiny_tokenizer, ROWS[1]["messages"]).mask())
    median = torch.tensor([tiny_axis.tau(i, 50.0) for i in report.layers], dtype=torch.float64)
    gaps = torch.tensor([tiny_axis.gap(i) for i in report.layers], dtype=torch.float64)
    for i, row in enumerate(ROWS):
        direct = _direct_means(tiny_model, tiny_tokenizer, tiny_axis, conversation(row, i), report.layers)
        torch.testing.assert_close(report.projections[i].double(), direct, rtol=1e-4, atol=1e-5)
        expected = (direct - median) / gaps
        assert float(report.scores[i]) == pytest.approx(float(expected[1]), rel=1e-4, abs=1e-5)
        assert float(report.band_scores[i]) == pytest.approx(float(expected[[0, 2]].mean()), rel=1e-4, abs=1e-5)
    assert report.default_band == (tiny_axis.tau(2, 25.0), tiny_axis.tau(2, 75.0))
    assert report.worst(2) == torch.argsort(report.scores)[:2].tolist()


def test_own_reference_is_the_models_greedy_answer_and_is_cached(tiny_model, tiny_tokenizer, tiny_axis, tmp_path,
                                                               monkeypatch):
    from anchor import probes

    cache = tmp_path / "own.jsonl"
    report = screen(tiny_model, tiny_tokenizer, tiny_axis, ROWS[:1], reference="own", max_new_tokens=6, cache=cache)
    prompt = encode_prompt(tiny_tokenizer, ROWS[0]["messages"][:1])
    [answer] = probes.generate_answers(tiny_model, tiny_tokenizer, [prompt], 6)
    expected = probes.answer_projections(tiny_model, [prompt], [answer], tiny_axis, report.layers)
    torch.testing.assert_close(report.reference, expected)
    gaps = torch.tensor([tiny_axis.gap(i) for i in report.layers])
    at = report.layers.index(report.report_layer)
    torch.testing.assert_close(report.scores, ((report.projections - expected) / gaps)[:, at])
    assert [json.loads(line)["answer"] for line in cache.read_text().splitlines()] == [answer]

    def no_generation(*_args, **_kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("anchor.screening.generate_answers", no_generation)
    again = screen(tiny_model, tiny_tokenizer, tiny_axis, ROWS[:1], reference="own", max_new_tokens=6, cache=cache)
    torch.testing.assert_close(again.reference, report.reference)


def test_report_files_and_filter(tiny_model, tiny_tokenizer, tiny_axis, tmp_path):
    report = screen(tiny_model, tiny_tokenizer, tiny_axis, ROWS)
    drop_below = 50.0
    threshold = tiny_axis.tau(report.report_layer, drop_below)
    write_report(report, ROWS, tmp_path / "out", tiny_axis, drop_below=drop_below, worst=3)
    records = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert all(r["dropped"] == (r["projection"] < threshold) for r in records)
    kept = read_rows(tmp_path / "out" / "filtered.jsonl")
    assert kept == [ROWS[r["index"]] for r in records if not r["dropped"]]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_kept"] == len(kept) and [w["index"] for w in summary["worst"]] == report.worst(3)
    assert (tmp_path / "out" / "histogram.png").stat().st_size > 1000
    assert f"| {report.worst(1)[0]} |" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report(report, ROWS, tmp_path / "out", tiny_axis)


def test_imported_bundle_is_refused_before_any_forward(tiny_model, tiny_tokenizer, tiny_axis, monkeypatch):
    imported = AssistantAxis(axis=tiny_axis.axis.clone(), metadata={"imported_from": {}})
    monkeypatch.setattr("anchor.screening.answer_projections", lambda *a, **k: pytest.fail("ran a forward"))
    with pytest.raises(MissingStatisticError, match="projection quantiles"):
        screen(tiny_model, tiny_tokenizer, imported, ROWS)
    with pytest.raises(ValueError, match="reference="):
        screen(tiny_model, tiny_tokenizer, tiny_axis, ROWS, reference="median")


def test_auc():
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0], [2.0]) == 0.0
    assert auc([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert auc([2.0], [2.0]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        auc([], [1.0])


def test_package_attribute_is_the_function_however_reached():
    import anchor.screening as module  # the module has its own name, so importing it cannot shadow the function

    assert anchor.screen is module.screen and anchor.ScreenReport is module.ScreenReport


def test_cli(tiny_model, tiny_tokenizer, tiny_axis, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    tiny_axis.save_pretrained(tmp_path / "axis")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["screen", str(data), "--model", str(tmp_path / "model"), "--axis", str(tmp_path / "axis"),
            "--out", str(tmp_path / "out"), "--drop-below", "25", "--device", "cpu"]
    assert cli.main(args) == 0
    assert "Screened 4 examples" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"scores.jsonl", "histogram.png", "summary.md",
                                                                "summary.json", "filtered.jsonl"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no chat here"}) + "\n")
    assert cli.main(["screen", str(bad), "--model", "/nonexistent/model", "--out", str(tmp_path / "o2")]) == 1
    assert "row 0 has keys" in capsys.readouterr().err  # refused before the model is looked for


@pytest.mark.slow
def test_docs_example_runs_as_written(tmp_path):
    """The first python block of docs/screen.md, from the repository root, in a fresh process."""
    root = Path(__file__).resolve().parent.parent
    code = re.search(r"```python\n(.*?)```", (root / "docs" / "screen.md").read_text(), re.S).group(1)
    code = code.replace("outputs/screen-example", str(tmp_path / "screen-example"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    neutral, pirate = json.loads(out.stdout.strip().splitlines()[-1])
    assert pirate < neutral - 0.5  # the in-role answer sits far lower, in units of the default-to-role gap
    assert (tmp_path / "screen-example" / "filtered.jsonl").is_file()
