"""Extraction exactness, resume after a kill, and the AssistantAxis bundle's maths, round trip and refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from anchor import AssistantAxis, AxisMismatchError, compute_axis
from anchor.axis import QUANTILE_LEVELS
from anchor.extract import ExtractionSettings, Persona, extract, load_shard, run_batch
from anchor.hooks import LayerHooks
from anchor.spans import encode_chat, encode_prompt
from tests.conftest import TINY_QUESTIONS, TINY_ROLES, make_tiny_model

DEFAULTS = ["", "You are a helpful assistant."]
ROOT = Path(__file__).resolve().parent.parent


def _layer_outputs(model, ids):
    outs = {}
    with LayerHooks(model, range(4), lambda i, h: outs.__setitem__(i, h[0])), torch.no_grad():
        model(torch.tensor([ids]))
    return torch.stack([outs[i] for i in range(4)], dim=1)  # [T, L, H]


def test_generation_capture_equals_teacher_forced_response_mean(tiny_model, tiny_tokenizer):
    """Means captured during batched, cached generation equal a plain forward over prompt + answer, averaged over
    the answer tokens before the end of turn (the final sampled token is never fed, so it has no activation)."""
    msgs = [[{"role": "system", "content": "You are a pirate captain."}, {"role": "user", "content": q}]
            for q in TINY_QUESTIONS[:3]]
    prompts = [encode_prompt(tiny_tokenizer, m) for m in msgs]
    means, counts, norms, _ = run_batch(tiny_model, tiny_tokenizer, prompts, ExtractionSettings(max_new_tokens=8))
    assert means.shape == (3, 4, 32) and norms.shape == (3, 4)
    stop = tiny_tokenizer.eos_token_id
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0].tolist()
        answer = out[len(prompt):-1]
        answer = answer[: answer.index(stop)] if stop in answer else answer
        hidden = _layer_outputs(tiny_model, prompt + answer)[len(prompt):]
        assert counts[i] == len(answer)
        torch.testing.assert_close(means[i], hidden.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norms[i], hidden.norm(dim=-1).mean(0), rtol=1e-4, atol=1e-5)


def test_answer_tokens_are_the_span_mask_of_the_rendered_conversation(tiny_tokenizer):
    """The generated tokens sit exactly where encode_chat's span mask says the assistant content is."""
    msgs = [{"role": "user", "content": "Who are you?"}]
    answer = tiny_tokenizer("I am the sea.", add_special_tokens=False)["input_ids"]
    enc = encode_chat(tiny_tokenizer, [*msgs, {"role": "assistant", "content": "I am the sea."}])
    prompt = encode_prompt(tiny_tokenizer, msgs)
    assert enc.input_ids[: len(prompt)] == prompt
    assert [t for t, m in zip(enc.input_ids, enc.mask(), strict=True) if m] == answer


def test_prompt_mode_averages_the_generation_prompt_tokens(tiny_model, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Who are you?"}]
    ids = encode_prompt(tiny_tokenizer, msgs)
    means, counts, _, _ = run_batch(tiny_model, tiny_tokenizer, [ids], ExtractionSettings(mode="prompt"), prompt_end=3)
    torch.testing.assert_close(means[0], _layer_outputs(tiny_model, ids)[-3:].mean(0))
    assert counts.tolist() == [3]


def test_left_padding_does_not_change_a_sample(tiny_model, tiny_tokenizer):
    short = encode_prompt(tiny_tokenizer, [{"role": "user", "content": "Hi?"}])
    long = encode_prompt(tiny_tokenizer, [{"role": "user", "content": "Tell me a long story about the sea please."}])
    settings = ExtractionSettings(max_new_tokens=6)
    alone, _, _, text_alone = run_batch(tiny_model, tiny_tokenizer, [short], settings)
    batched, _, _, texts = run_batch(tiny_model, tiny_tokenizer, [long, short], settings)
    assert texts[1] == text_alone[0]
    torch.testing.assert_close(batched[1], alone[0], rtol=1e-4, atol=1e-5)


def test_axis_is_default_minus_equal_weighted_roles(tiny_axis):
    torch.testing.assert_close(tiny_axis.axis, tiny_axis.default_mean - tiny_axis.role_vectors.mean(0))
    torch.testing.assert_close(tiny_axis.unit.norm(dim=-1), torch.ones(4))
    assert tiny_axis.role_names == list(TINY_ROLES)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(tiny_axis.project(h, 2), h @ tiny_axis.unit[2])
    assert tiny_axis.metadata["n_answers"] == (len(DEFAULTS) + 5) * len(TINY_QUESTIONS)


def test_quantiles_and_tau(tiny_axis):
    for q in tiny_axis.quantiles.values():
        assert q.shape == (4, len(QUANTILE_LEVELS)) and (q.diff(dim=1) >= 0).all()
    q = tiny_axis.quantiles["default"][1]
    assert tiny_axis.tau(1, 25) == pytest.approx(float(q[25]))
    assert tiny_axis.tau(1, 25.5) == pytest.approx(float((q[25] + q[26]) / 2))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        tiny_axis.tau(1, 120)


def test_pca_is_mean_centred_orthonormal_and_oriented(tiny_axis):
    pca = tiny_axis.pca
    comps = pca.components  # [L, k, H]
    eye = torch.eye(comps.shape[1]).expand(4, -1, -1)
    torch.testing.assert_close(comps @ comps.transpose(1, 2), eye, atol=1e-5, rtol=0)
    assert (pca.explained.sum(dim=1) <= 1 + 1e-5).all() and (pca.explained.diff(dim=1) <= 1e-6).all()
    assert (pca.default_coords[:, 0] > 0).all()
    centred = tiny_axis.role_vectors - tiny_axis.role_vectors.mean(0)
    torch.testing.assert_close(pca.role_coords[:, :, 0], torch.einsum("rlh,lh->rl", centred, comps[:, 0]),
                               atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_is_bit_exact(tiny_axis, tmp_path):
    tiny_axis.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["axis.safetensors", "axis_config.json"]
    loaded = AssistantAxis.from_pretrained(tmp_path)
    for name in ("axis", "unit", "default_mean", "role_vectors", "residual_norm"):
        assert torch.equal(getattr(loaded, name), getattr(tiny_axis, name)), name
    for name in ("components", "explained", "role_coords", "default_coords", "center"):
        assert torch.equal(getattr(loaded.pca, name), getattr(tiny_axis.pca, name)), name
    for key in ("default", "roles"):
        assert torch.equal(loaded.quantiles[key], tiny_axis.quantiles[key])
    assert loaded.metadata == tiny_axis.metadata and loaded.role_names == tiny_axis.role_names


def test_load_refuses_non_bundle_and_future_format(tiny_axis, tmp_path):
    with pytest.raises(FileNotFoundError, match="anchor axis"):
        AssistantAxis.from_pretrained(tmp_path)
    tiny_axis.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "axis_config.json").read_text())
    (tmp_path / "axis_config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        AssistantAxis.from_pretrained(tmp_path)


def test_check_compatible_refusals(tiny_axis, tiny_tokenizer):
    tiny_axis.check_compatible(make_tiny_model(tiny_tokenizer))  # same seed: same weights
    with pytest.raises(AxisMismatchError, match="6 decoder layers"):
        tiny_axis.check_compatible(make_tiny_model(tiny_tokenizer, n_layers=6))
    with pytest.raises(AxisMismatchError, match="hidden size 32 but the model has 64"):
        tiny_axis.check_compatible(make_tiny_model(tiny_tokenizer, hidden=64))
    other = make_tiny_model(tiny_tokenizer, seed=1)
    with pytest.raises(AxisMismatchError, match="fingerprint"):
        tiny_axis.check_compatible(other)
    tiny_axis.check_compatible(other, check_weights=False)


def test_zero_axis_is_refused(tiny_axis):
    with pytest.raises(ValueError, match="zero or non-finite"):
        AssistantAxis(torch.zeros(4, 32), tiny_axis.default_mean, tiny_axis.role_vectors, tiny_axis.role_names,
                      tiny_axis.quantiles, tiny_axis.residual_norm, tiny_axis.pca)


def test_compute_axis_input_errors(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="reserved"):
        compute_axis(tiny_model, tiny_tokenizer, roles={"default": ["x"]}, questions=TINY_QUESTIONS, progress=False)
    with pytest.raises(ValueError, match="mode="):
        compute_axis(tiny_model, tiny_tokenizer, roles=TINY_ROLES, questions=TINY_QUESTIONS, mode="sample")
    with pytest.raises(ValueError, match="n_roles=0"):
        compute_axis(tiny_model, tiny_tokenizer, roles=TINY_ROLES, questions=TINY_QUESTIONS, n_roles=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_roles": 1}, r"Only 1 role was chosen: an axis needs at least 2 .* --roles 2"),
    ({"roles": {"pirate": ["You are a pirate."]}}, "Only 1 role was chosen"),
    ({"prompts_per_role": 0}, r"prompts_per_role=0 must be >= 1"),
    ({"prompts_per_role": -1}, r"prompts_per_role=-1 must be >= 1"),  # was: silently dropped each role's last prompt
    ({"n_questions": 0}, "n_questions=0 must be >= 1"),
    ({"max_new_tokens": 1}, "max_new_tokens must be >= 2"),
])
def test_bad_extraction_settings_are_refused_before_any_work(tiny_model, tiny_tokenizer, tmp_path, kwargs, message):
    """Refused before the work directory is touched, so the corrected call is not refused as a different run."""
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=message):
        compute_axis(tiny_model, tiny_tokenizer, **{"roles": TINY_ROLES, "questions": TINY_QUESTIONS, **kwargs},
                     out_dir=work, progress=False)
    assert not work.exists()
    compute_axis(tiny_model, tiny_tokenizer, roles=TINY_ROLES, questions=TINY_QUESTIONS, n_questions=2,
                 max_new_tokens=3, prompts_per_role=1, out_dir=work, progress=False)


def test_subsets_are_seeded_and_nested(tiny_model, tiny_tokenizer):
    roles = {f"role_{i}": [f"You are character number {i}."] for i in range(6)}
    a = compute_axis(tiny_model, tiny_tokenizer, roles=roles, questions=TINY_QUESTIONS, n_roles=3, n_questions=2,
                     max_new_tokens=3, progress=False)
    b = compute_axis(tiny_model, tiny_tokenizer, roles=roles, questions=TINY_QUESTIONS, n_roles=3, n_questions=2,
                     max_new_tokens=3, progress=False)
    assert a.role_names == b.role_names and torch.equal(a.axis, b.axis)
    assert a.metadata["n_roles"] == 3 and a.metadata["n_questions"] == 2


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import anchor.extract as ex
    from tests.conftest import make_tiny_model, TINY_ROLES, TINY_QUESTIONS
    from tests import tokenizers_util
    from anchor import compute_axis

    torch.set_num_threads(int(sys.argv[2]))  # float reductions depend on the thread count; match the parent's
    tok = tokenizers_util.chatml(); tok.pad_token = tok.eos_token
    real_save, saved = ex.save_shard, []

    def save_then_die(shard, path):
        real_save(shard, path)
        saved.append(path)
        if len(saved) == 3:  # die hard inside the last unit, after its first shard, beside a half-written file
            (path.parent / ".tmp-partial.safetensors").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)

    ex.save_shard = save_then_die
    compute_axis(make_tiny_model(tok), tok, roles=TINY_ROLES, questions=TINY_QUESTIONS, batch_size=8,
                 defaults=["", "You are a helpful assistant."], max_new_tokens=6, progress=False, out_dir=sys.argv[1])
""")


def test_resume_after_killed_extraction_matches_uninterrupted_run(tiny_tokenizer, tmp_path, monkeypatch):
    """Units of work here: [default], [pirate], [ghost, poet, robot]. The run is killed after ghost's shard; the
    resumed run redoes only the unfinished unit, batched as before, and the axis is bit-identical."""
    import anchor.extract as ex

    kwargs = dict(roles=TINY_ROLES, questions=TINY_QUESTIONS, defaults=DEFAULTS, max_new_tokens=6, batch_size=8,
                  progress=False)
    proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "killed"), str(torch.get_num_threads())],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(list((tmp_path / "killed" / "shards").glob("0*.safetensors"))) == 3
    calls = []
    real = ex._extract_unit
    monkeypatch.setattr(ex, "_extract_unit", lambda *a, **k: calls.append([p.name for p in a[2]]) or real(*a, **k))
    resumed = compute_axis(make_tiny_model(tiny_tokenizer), tiny_tokenizer, out_dir=tmp_path / "killed", **kwargs)
    assert calls == [["ghost", "poet", "robot"]]  # the default's and the pirate's units were not redone
    whole = compute_axis(make_tiny_model(tiny_tokenizer), tiny_tokenizer, out_dir=tmp_path / "whole", **kwargs)
    assert torch.equal(resumed.axis, whole.axis)
    assert torch.equal(resumed.quantiles["roles"], whole.quantiles["roles"])


def test_resume_into_directory_with_other_settings_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    personas = [Persona("default", ("",)), Persona("pirate", ("You are a pirate.",))]
    extract(tiny_model, tiny_tokenizer, personas, TINY_QUESTIONS[:2], tmp_path, ExtractionSettings(max_new_tokens=3),
            progress=False)
    with pytest.raises(ValueError, match="different settings"):
        extract(tiny_model, tiny_tokenizer, personas, TINY_QUESTIONS[:2], tmp_path,
                ExtractionSettings(max_new_tokens=4), progress=False)
    shard = load_shard(tmp_path / "shards" / "0001-pirate.safetensors")
    assert shard.items == [(0, 0), (0, 1)] and len(shard.texts) == 2


@pytest.fixture
def cli_inputs(tmp_path, tiny_model, tiny_tokenizer):
    """A saved tiny model, the tiny roles and questions as files, and the `anchor axis` options naming them."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({"version": 1, "roles": [{"name": n, "system_prompts": p}
                                                         for n, p in TINY_ROLES.items()]}))
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(TINY_QUESTIONS))
    return ["axis", "--model", str(model_dir), "--roles-file", str(roles), "--questions-file", str(questions),
            "--device", "cpu", "--quiet"]


def test_axis_cli_writes_bundle_and_report(tmp_path, tiny_model, cli_inputs, capsys):
    from anchor.cli import main

    out = tmp_path / "axis"
    assert main([*cli_inputs, "--out", str(out), "--max-new-tokens", "4"]) == 0
    AssistantAxis.from_pretrained(out).check_compatible(tiny_model)
    for name in ("index.html", "report.md", "report.json", "persona_space.png", "layers.png", "roles.png"):
        assert (out / "report" / name).stat().st_size > 0, name
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["pc1_cosine"]) == 4 and report["n_roles"] == 4
    assert main([*cli_inputs, "--out", str(out), "--max-new-tokens", "4"]) == 1  # a finished bundle is kept
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--roles", "1", "1 is below 2: an axis compares at least 2 roles"),  # was: bundle saved, then an IndexError
    ("--prompts-per-role", "-1", "-1 is below 1"),  # was: silently dropped each role's last prompt
    ("--prompts-per-role", "0", "0 is below 1"),  # was: a cryptic failure and a manifest refusing the re-run
    ("--questions", "0", "0 is below 1"),
    ("--max-new-tokens", "1", "the last generated token is never fed back"),
    ("--budget-s", "nan", "finite number of seconds"),
])
def test_axis_cli_refuses_bad_settings_before_any_work(tmp_path, cli_inputs, capsys, option, value, message):
    from anchor.cli import main

    out = tmp_path / "axis"
    with pytest.raises(SystemExit) as exit_:
        main([*cli_inputs, "--out", str(out), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err
    assert not out.exists()  # nothing written: the corrected command starts clean
    assert main([*cli_inputs, "--out", str(out), "--max-new-tokens", "3", "--prompts-per-role", "1"]) == 0


def test_axis_cli_budget_picks_the_settings_and_refuses_a_clash(tmp_path, cli_inputs, capsys):
    from anchor.cli import main
    from anchor.extract import settings_for_budget

    assert main([*cli_inputs, "--out", str(tmp_path / "a"), "--budget-s", "60", "--roles", "4"]) == 1
    assert "give either --budget-s or those options" in capsys.readouterr().err
    assert main([*cli_inputs, "--out", str(tmp_path / "b"), "--budget-s", "60"]) == 0
    chosen = settings_for_budget(60, speed=1e6)  # the tiny model is far faster than the benchmark's
    meta = AssistantAxis.from_pretrained(tmp_path / "b").metadata
    assert meta["extraction"]["max_new_tokens"] == chosen.max_new_tokens
    assert meta["extraction"]["mode"] == chosen.mode


def test_on_the_fly_default_is_the_frontiers_choice_for_a_minute():
    from anchor.axis import AxisSettings
    from anchor.config import AnchorConfig
    from anchor.extract import BUDGET_FRONTIER, settings_for_budget

    assert AxisSettings() == settings_for_budget(60) == AnchorConfig().axis_settings()
    costs = [cost for cost, _ in BUDGET_FRONTIER]
    assert costs == sorted(costs) and all(s["max_new_tokens"] >= 16 for _, s in BUDGET_FRONTIER)
    assert settings_for_budget(60, speed=0.5) == AxisSettings(**{"prompts_per_role": 1, **BUDGET_FRONTIER[3][1]})


SIGINT_SCRIPT = textwrap.dedent("""
    import sys
    import anchor.extract as ex
    from anchor.cli import main

    real_save = ex.save_shard

    def save_then_interrupt(shard, path):
        real_save(shard, path)
        # Ctrl-C right after the first unit's shard. Raised here rather than signalled: a signal is handled at the
        # interpreter's next check, which on a loaded machine can come after the last unit has finished.
        raise KeyboardInterrupt

    ex.save_shard = save_then_interrupt
    sys.exit(main(sys.argv[1:]))
""")


def test_axis_cli_ctrl_c_says_in_one_line_that_a_rerun_resumes(tmp_path, cli_inputs, monkeypatch):
    import anchor.extract as ex
    from anchor.cli import main

    out = tmp_path / "axis"
    args = [*cli_inputs, "--out", str(out), "--max-new-tokens", "3", "--batch-size", "4"]
    proc = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, *args], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr  # was: 50 lines of traceback
    assert f"kept in {out / 'extraction'}; run the same command again to resume from them" in lines[0]
    done = sorted(p.name for p in (out / "extraction" / "shards").glob("0*.safetensors"))
    assert done == ["0000-default.safetensors"]
    calls = []
    real = ex._extract_unit
    monkeypatch.setattr(ex, "_extract_unit", lambda *a, **k: calls.append(a[2][0].name) or real(*a, **k))
    assert main(args) == 0
    assert "default" not in calls and calls  # resumed: the default's unit was not redone


@pytest.mark.slow
def test_embedded_model_axis_has_assistant_structure(smollm2, tmp_path):
    """A small real run: the default sits above the roles, and the axis lines up with PC1 in the middle layers."""
    model, tok = smollm2
    roles = {name: prompts for name, prompts in __import__("anchor").personas.load_roles().items()
             if name in {"assistant", "analyst", "bard", "ghost", "demon", "leviathan", "pirate_captain", "jester"}}
    axis = compute_axis(model, tok, roles=roles, n_questions=8, max_new_tokens=16, prompts_per_role=1,
                        progress=False, out_dir=tmp_path)
    layer = axis.report_layer
    assert layer == 15
    assert float((axis.role_projections(layer) < axis.default_projection(layer)).float().mean()) >= 0.85
    top = axis.role_names[int(axis.role_projections(layer).argmax())]
    assert top in {"assistant", "analyst"}
    assert float(axis.pc1_cosine()[10:20].mean()) > 0.5


@pytest.mark.slow
def test_docs_example_runs_as_written(tmp_path):
    """The first python block of docs/axis.md (the on-the-fly settings on the embedded model), in a fresh process."""
    from anchor.extract import settings_for_budget

    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "axis.md").read_text(), re.S).group(1)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.splitlines()[-1].startswith("cos(axis, PC1)")
    meta = AssistantAxis.from_pretrained(tmp_path / "outputs" / "axis").metadata
    chosen = settings_for_budget(60)
    assert (meta["n_roles"], meta["n_questions"], meta["extraction"]["max_new_tokens"]) == (
        chosen.n_roles, chosen.n_questions, chosen.max_new_tokens)
