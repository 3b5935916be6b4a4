"""anchor.monitor on tiny random models: turn boundaries under four chat-template families, exact per-token values
against the model's own hidden states, capped reading, batching, file reading, tables, plots and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anchor.axis import AssistantAxis, AxisMismatchError, PersonaSpace
from anchor.capping import cap
from anchor.models import fingerprint
from anchor.monitor import (
    DriftTrace,
    default_band,
    monitor,
    monitor_many,
    plot_trajectories,
    read_conversations,
    summary_table,
    turn_means,
)
from anchor.spans import encode_chat
from tests import tokenizers_util
from tests.conftest import make_tiny_model

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Is Paris the capital of France?"},
    {"role": "assistant", "content": "Yes, Paris is the capital of France."},
    {"role": "user", "content": "Name three primary colours."},
    {"role": "assistant", "content": "Red, yellow and blue."},
    {"role": "user", "content": "Thanks, that is all."},
    {"role": "assistant", "content": "You are welcome, have a nice day!"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
FAMILIES = {f.name: f for f in tokenizers_util.FAMILIES}


def random_axis(model: torch.nn.Module, seed: int = 0) -> AssistantAxis:
    """A valid bundle for ``model`` made of random tensors: enough to test reading, not meaning."""
    config = model.config
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    g = torch.Generator().manual_seed(seed)
    default_mean = torch.randn(n_layers, hidden, generator=g)
    roles = torch.randn(3, n_layers, hidden, generator=g)
    levels = torch.sort(torch.randn(n_layers, 101, generator=g), dim=1).values
    return AssistantAxis(
        axis=default_mean - roles.mean(dim=0), default_mean=default_mean, role_vectors=roles,
        role_names=["a", "b", "c"], quantiles={"default": levels + 1, "roles": levels - 1},
        residual_norm=torch.ones(n_layers), pca=PersonaSpace.fit(roles, default_mean),
        metadata={"n_layers": n_layers, "hidden_size": hidden, "fingerprint": fingerprint(model),
                  "report_layer": n_layers // 2},
    )


def manual_projections(model, axis, ids: list[int], layer: int) -> torch.Tensor:
    """Projections at ``layer`` read by hand: ``output_hidden_states`` entry ``layer + 1`` below the last layer, and
    a plain forward hook on the last one (whose ``hidden_states`` entry has passed the final norm)."""
    n_layers = model.config.num_hidden_layers
    seen = {}
    handle = model.model.layers[layer].register_forward_hook(lambda _m, _i, out: seen.setdefault("h", out))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    hidden = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    if layer < n_layers - 1:
        torch.testing.assert_close(hidden[0], out.hidden_states[layer + 1][0])
    return hidden[0] @ axis.unit[layer]


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral"])
def test_turn_boundaries_and_values_match_hidden_states(name: str) -> None:
    tokenizer = FAMILIES[name].make()
    model = make_tiny_model(tokenizer)
    axis = random_axis(model)
    encoding = encode_chat(tokenizer, CONVERSATION)
    for layer in (0, 2, 3):
        trace = monitor(model, tokenizer, axis, CONVERSATION, layer=layer)
        expected_all = manual_projections(model, axis, encoding.input_ids, layer)
        assert trace.layer == layer and trace.n_turns == 3
        for turn, answer in enumerate(ANSWERS):
            mask = torch.tensor(encoding.mask(turn))
            assert len(trace.per_token[turn]) == int(mask.sum()) > 0
            assert "".join(trace.tokens[turn]).strip() == answer  # exactly the reply's tokens, nothing around it
            torch.testing.assert_close(trace.per_token[turn], expected_all[mask], atol=1e-5, rtol=1e-5)
            assert trace.per_turn[turn] == pytest.approx(float(expected_all[mask].mean()), abs=1e-5)
            assert trace.std_per_turn[turn] == pytest.approx(float(expected_all[mask].std(correction=0)), abs=1e-5)


def test_default_layer_is_the_report_layer_and_to_dict_round_trips(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    trace = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION)
    assert trace.layer == tiny_axis.report_layer
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["per_turn"] == pytest.approx(trace.per_turn)
    assert data["n_tokens"] == [len(t) for t in trace.per_token]
    assert data["per_token"][1] == pytest.approx(trace.per_token[1].tolist())


def test_batched_reading_equals_one_at_a_time(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    conversations = [CONVERSATION, CONVERSATION[:3], CONVERSATION[1:5], [*CONVERSATION[:5], CONVERSATION[2]]]
    batched = monitor_many(tiny_model, tiny_tokenizer, tiny_axis, conversations, layer=1, batch_size=3)
    for messages, trace in zip(conversations, batched, strict=True):
        single = monitor(tiny_model, tiny_tokenizer, tiny_axis, messages, layer=1)
        assert trace.n_turns == single.n_turns
        for a, b in zip(trace.per_token, single.per_token, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_capped_reading_is_floored_at_the_capped_layer_only(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    plain = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=2)
    tau = max(plain.per_turn)  # above some tokens' projections, so the floor has work to do
    with cap(tiny_model, tiny_axis, layers=[2], tau=tau):
        capped = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=2)
        before = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=1)
    tokens = torch.cat(capped.per_token)
    assert (torch.cat(plain.per_token) < tau - 1e-3).any()
    assert (tokens >= tau - 1e-4).all()
    above = torch.cat(plain.per_token) >= tau
    torch.testing.assert_close(tokens[above], torch.cat(plain.per_token)[above])  # untouched above the floor
    uncapped_before = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=1)
    assert before.per_turn == pytest.approx(uncapped_before.per_turn, abs=1e-6)  # layers below the cap unchanged
    assert monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=2).per_turn == pytest.approx(
        plain.per_turn, abs=1e-6)  # the cap is gone after the block


def test_empty_reply_reads_as_nan(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    messages = [*CONVERSATION[:3], {"role": "user", "content": "And?"}, {"role": "assistant", "content": ""}]
    trace = monitor(tiny_model, tiny_tokenizer, tiny_axis, messages)
    assert trace.n_turns == 2 and len(trace.per_token[1]) == 0
    assert math.isnan(trace.per_turn[1]) and math.isnan(trace.std_per_turn[1]) and not math.isnan(trace.per_turn[0])


def test_errors_say_what_to_fix(tiny_model, tiny_tokenizer, tiny_axis) -> None:
    with pytest.raises(ValueError, match="no assistant turns"):
        monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION[:2])
    with pytest.raises(ValueError, match="out of range"):
        monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=4)
    with pytest.raises(ValueError, match="role"):
        monitor(tiny_model, tiny_tokenizer, tiny_axis, [{"role": "bot", "content": "hi"}])
    other = make_tiny_model(tiny_tokenizer, n_layers=6)
    with pytest.raises(AxisMismatchError, match="6 decoder layers"):
        monitor(other, tiny_tokenizer, tiny_axis, CONVERSATION)
    reseeded = make_tiny_model(tiny_tokenizer, seed=1)
    with pytest.raises(AxisMismatchError, match="fingerprint"):
        monitor(reseeded, tiny_tokenizer, tiny_axis, CONVERSATION)
    assert monitor(reseeded, tiny_tokenizer, tiny_axis, CONVERSATION, check_weights=False).n_turns == 3


def test_read_conversations_accepts_each_shape_and_rejects_junk(tmp_path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(CONVERSATION))
    (tmp_path / "obj.json").write_text(json.dumps({"messages": CONVERSATION, "id": "x"}))
    (tmp_path / "many.jsonl").write_text(
        json.dumps(CONVERSATION) + "\n\n" + json.dumps({"messages": CONVERSATION[:3], "id": "b"}) + "\n")
    assert read_conversations(tmp_path / "list.json") == [{"messages": CONVERSATION}]
    assert read_conversations(tmp_path / "obj.json")[0]["id"] == "x"
    many = read_conversations(tmp_path / "many.jsonl")
    assert [len(r["messages"]) for r in many] == [7, 3] and many[1]["id"] == "b"
    (tmp_path / "bad.jsonl").write_text(json.dumps(CONVERSATION) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_conversations(tmp_path / "bad.jsonl")
    (tmp_path / "wrong.json").write_text(json.dumps({"turns": []}))
    with pytest.raises(ValueError, match="messages"):
        read_conversations(tmp_path / "wrong.json")
    with pytest.raises(FileNotFoundError):
        read_conversations(tmp_path / "missing.json")


def _trace(values: list[float]) -> DriftTrace:
    return DriftTrace([*values], [torch.tensor([v]) for v in values], 0, [["x"] for _ in values])


def test_turn_means_and_summary_table() -> None:
    traces = [_trace([1.0, 2.0, 3.0]), _trace([3.0, 4.0]), _trace([2.0, math.nan])]
    means = turn_means(traces)
    assert means[0][0] == pytest.approx(2.0) and means[0][1] == pytest.approx(1 / math.sqrt(3))
    assert means[1][0] == pytest.approx(3.0)  # the empty reply of the third conversation is left out
    assert means[2][0] == pytest.approx(3.0) and math.isnan(means[2][1])  # one conversation reached turn 3
    table = summary_table(traces, ["a", "b", "c"])
    lines = table.splitlines()
    assert lines[0] == "| conversation | turn 1 | turn 2 | turn 3 | mean | last − first |"
    assert lines[2] == "| a | 1.00 | 2.00 | 3.00 | 2.00 | 2.00 |"
    assert lines[4] == "| c | 2.00 | – |  | 2.00 | – |"
    assert lines[-1].startswith("| **mean** | 2.00 | 3.00 | 3.00 |")


def test_default_band_and_plot(tmp_path, tiny_axis) -> None:
    lo, hi = default_band(tiny_axis, 2)
    q = tiny_axis.quantiles["default"][2]
    assert (lo, hi) == (pytest.approx(float(q[25])), pytest.approx(float(q[75])))
    path = tmp_path / "plot.png"
    plot_trajectories({"uncapped": ([1.0, 0.5], [0.1, math.nan]), "capped": ([1.0, 0.9], [0.1, 0.2])}, (lo, hi), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def saved_tiny(tmp_path, tiny_model, tiny_tokenizer, tiny_axis):
    """The tiny model, its tokenizer and its axis on disk, as the CLI loads them."""
    model_dir, axis_dir = tmp_path / "model", tmp_path / "axis"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    tiny_axis.save_pretrained(axis_dir)
    return model_dir, axis_dir


def test_cli_monitor_one_and_many(tmp_path, saved_tiny, capsys, tiny_model, tiny_tokenizer, tiny_axis) -> None:
    from anchor.cli import main

    model_dir, axis_dir = saved_tiny
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": CONVERSATION}))
    plot, out = tmp_path / "one.png", tmp_path / "one.json"
    args = ["--model", str(model_dir), "--axis", str(axis_dir), "--device", "cpu", "--quiet"]
    assert main(["monitor", str(conv), *args, "--cap", "--layer", "3", "--plot", str(plot), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "turn 3:" in text and "capped:" in text
    data = json.loads(out.read_text())
    expected = monitor(tiny_model, tiny_tokenizer, tiny_axis, CONVERSATION, layer=3)
    assert data["conversations"][0]["uncapped"]["per_turn"] == pytest.approx(expected.per_turn, abs=1e-5)
    assert data["layer"] == 3 and plot.read_bytes()[:4] == b"\x89PNG"

    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"id": "first", "messages": CONVERSATION}) + "\n" + json.dumps(CONVERSATION[:3]) + "\n")
    assert main(["monitor", str(many), *args, "--plot", str(tmp_path / "many.png")]) == 0
    text = capsys.readouterr().out
    assert "| first |" in text and "| #2 |" in text and "| **mean** |" in text
    assert (tmp_path / "many.png").is_file()


def test_cli_monitor_reports_bad_input(tmp_path, saved_tiny, capsys) -> None:
    from anchor.cli import main

    model_dir, axis_dir = saved_tiny
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(CONVERSATION[:2]))
    assert main(["monitor", str(conv), "--model", str(model_dir), "--axis", str(axis_dir), "--quiet"]) == 1
    assert "no assistant turns" in capsys.readouterr().err
