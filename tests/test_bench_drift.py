"""scripts/bench_drift.py on the tiny model: the measurement is exact at the base model, the experimental terms
vanish there, the ratios are the documented ones, and a full (2-step) run writes complete results."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from anchor.data import build_persona_data
from tests.conftest import TINY_QUESTIONS, TINY_ROLES, make_tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_drift.py"
QUESTIONS = [*TINY_QUESTIONS, "Why is grass green?", "What is a fox?", "Name a colour.", "Where is Paris?"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_drift", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_drift"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bd = _load_script()



def _config(tmp_path: Path, methods: list[str], **overrides) -> bd.BenchConfig:
    settings = dict(arms=bd.parse_arms(methods), seeds=1, steps=2, batch_size=2, n_probes=4, measure_max_new_tokens=6,
                    replay_max_new_tokens=6, replay_batch_size=2, replay_refresh_steps=1, gen_batch_size=8,
                    out_dir=tmp_path)
    settings.update(overrides)
    return bd.BenchConfig(**settings)


@pytest.fixture(scope="module")
def tiny_data(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    return build_persona_data(model, tiny_tokenizer, None, role_names=list(TINY_ROLES), roles=TINY_ROLES,
                              questions=QUESTIONS, n_questions=8, max_new_tokens=6, progress=False)


def _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg):
    return bd.Bench(make_tiny_model(tiny_tokenizer), tiny_tokenizer, tiny_axis, tiny_data, cfg, log=lambda _: None)


def test_arms_expand_to_the_default_grid_or_the_given_strength():
    arms = bd.parse_arms(["floor", "replay:3", "kl"])
    assert [a.name for a in arms] == ["unanchored", "floor:1", "floor:10", "replay:3", "kl:0.3", "kl:1", "kl:3"]
    assert [a.kind for a in arms] == ["baseline", "axis", "axis", "axis", *["control (no axis)"] * 3]
    assert bd.Arm("prev+replay", 10).kind == "axis"
    with pytest.raises(ValueError, match="Unknown method 'flor'"):
        bd.parse_arms(["flor"])


def test_ratios_to_unanchored_by_hand():
    ref = {"behaviour_drift": 0.5, "behaviour_sem": 0.05, "proj_drift_gaps": [-1.0, -2.0, 0.5], "task_loss": 2.0}
    arm = {"behaviour_drift": -0.05, "behaviour_sem": 0.02, "proj_drift_gaps": [0.1, -0.2, 0.05], "task_loss": 2.08}
    c = bd.compare(arm, ref)
    assert c["behaviour_pct"] == pytest.approx(-10.0)
    assert c["behaviour_pct_err"] == pytest.approx(100 * math.sqrt(0.02 ** 2 + (0.1 * 0.05) ** 2) / 0.5)
    assert c["proj_mean_pct"] == pytest.approx(100 * (0.35 / 3) / (3.5 / 3))
    assert c["proj_worst_pct"] == pytest.approx(10.0) and c["proj_worst_layer"] in (0, 1, 2)
    assert c["task_loss_change_pct"] == pytest.approx(4.0)
    assert c["meets_target"]
    assert not bd.compare({**arm, "task_loss": 2.2}, ref)["meets_target"]  # +10% task loss
    assert not bd.compare({**arm, "proj_drift_gaps": [0.1, -0.2, 0.2]}, ref)["meets_target"]  # 40% at layer 2
    assert "preference_margin_pct" not in c and bd.frontier_x({"arms": bd.compare_all(
        [{**ref, "method": "unanchored"}, {**arm, "method": "kl"}])})[0] == "task_loss_change_pct"


def test_under_dpo_the_frontier_reads_the_share_of_the_preference_margin_learnt():
    ref = {"behaviour_drift": 0.5, "behaviour_sem": 0.05, "proj_drift_gaps": [-1.0], "task_loss": 2.0,
           "method": "unanchored", "preference_margin": 80.0}
    arm = {**ref, "method": "kl", "behaviour_drift": 0.1, "task_loss": 1.0, "preference_margin": 6.0}
    arms = bd.compare_all([ref, arm])
    assert arms[1]["vs_unanchored"]["preference_margin_pct"] == pytest.approx(7.5)
    assert arms[1]["vs_unanchored"]["task_loss_change_pct"] == pytest.approx(-50.0)  # reads as a gain: misleading
    assert bd.frontier_x({"arms": arms}) == ("preference_margin_pct",
                                             "held-out preference margin learnt (% of unanchored's)")


def test_measuring_the_base_model_again_gives_exactly_zero_drift(tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, _config(tmp_path, []))
    again = bench.measure(copy.deepcopy(bench.base), bench.base_measure.answers)
    record = bd.run_record(bench, bd.Arm("unanchored"), 0, again, 0.0, 0.0, float("nan"))
    assert record["behaviour_drift"] == 0.0
    assert all(v == 0.0 for v in record["proj_drift_gaps"])
    assert again.base_answer_loss == bench.base_measure.base_answer_loss
    # The gap is the default-to-role distance the axis itself defines: its raw norm at every layer.
    assert torch.allclose(bench.gap, tiny_axis.axis.norm(dim=-1), rtol=1e-4)
    assert len(bench.prompts) == len(tiny_data.drift_questions) + 4


def test_every_arm_is_a_line_of_public_configuration(tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    """Each arm builds an AnchorConfig (no private terms); the composed arms carry both methods and their weights."""
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, _config(tmp_path, []))
    for method in bd.ARMS:
        config = bd.arm_config(bench, bd.Arm(method, 0.5))
        if method == "inoculate":  # a data arm: no anchor, the examples carry the inoculation prompt
            assert config is None and bd.INOCULATION_PROMPT in tiny_tokenizer.decode(bench.inoculated_rows[0]["prompt"])
            continue
        if method == "screened":  # a data arm: no anchor, the rows anchor.screen keeps (tested below)
            assert config is None
            continue
        assert isinstance(config, bd.AnchorConfig) and config.probe_every == 0
    e4 = bd.arm_config(bench, bd.Arm("prev+lm-e4", 1.0))
    assert e4.replay_every == 4 and e4.method == ["preventative", "lm_replay"]
    kl_b1 = bd.arm_config(bench, bd.Arm("prev+kl-b1", 1.0))
    assert kl_b1.method == ["preventative", "kl"] and kl_b1.replay_batch_size == 1 and kl_b1.replay_questions
    lib, scaled = (bd.arm_config(bench, bd.Arm(arm, 1.0)) for arm in ("prev+kl-lib", "prev+kl"))
    assert (lib.replay_batch_size, lib.replay_max_new_tokens) == (8, 48)  # AnchorConfig()'s own replay ...
    assert (scaled.replay_batch_size, scaled.replay_max_new_tokens) == (2, 6)  # ... not the bench's scaled one
    assert lib.replay_questions == scaled.replay_questions and lib.method == scaled.method
    k = bd.arm_config(bench, bd.Arm("prevk+lm-b1", 0.005))
    assert k.steer_coefficient == 0.005 and k.replay_batch_size == 1
    prev_lm = bd.arm_config(bench, bd.Arm("prev+lm", 0.5))
    assert prev_lm.method == ["preventative", "lm_replay"] and prev_lm.weights() == {"preventative": 1.0,
                                                                                     "lm_replay": 0.5}
    assert prev_lm.steer_coefficient == bench.cfg.prev_k and prev_lm.lm_replay_data  # the data's default answers


@pytest.mark.slow
def test_a_short_run_of_every_kind_of_arm_writes_complete_results(tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    methods = ["floor:1", "lm-replay:1", "kl:1", "prev+replay:1", "prev+lm:1"]  # a penalty, both controls, and
    # steering composed with projection replay and with LM replay
    cfg = _config(tmp_path, methods)
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
    report = bd.run_bench(bench, tmp_path / "bench_drift_tiny", _meta(cfg, bench), start=0.0,
                          log=lambda _: None)

    saved = json.loads((tmp_path / "bench_drift_tiny.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == ["unanchored", *methods]
    assert saved["arms"][0]["vs_unanchored"]["behaviour_pct"] == pytest.approx(100.0)
    for arm in saved["arms"]:
        assert math.isfinite(arm["behaviour_drift"]) and math.isfinite(arm["task_loss"])
        assert len(arm["proj_drift_gaps"]) == tiny_axis.n_layers
    # Training moved the model: the unanchored run's own answers project differently from the base model's.
    assert any(v != 0.0 for v in saved["arms"][0]["proj_drift_gaps"])
    table = (tmp_path / "bench_drift_tiny.md").read_text()
    assert all(f"| {m} |" in table for m in methods) and "**Verdict.**" in table
    assert (tmp_path / "bench_drift_tiny.png").stat().st_size > 0
    assert report["verdict"]["summary"]
    # --render rebuilds the table and plot from the JSON alone
    (tmp_path / "bench_drift_tiny.md").unlink()
    (tmp_path / "bench_drift_tiny.png").unlink()
    assert bd.main(["--render", str(tmp_path / "bench_drift_tiny.json")]) == 0
    assert (tmp_path / "bench_drift_tiny.md").read_text() == table
    assert (tmp_path / "bench_drift_tiny.png").stat().st_size > 0


def test_a_spent_budget_skips_runs_and_still_writes_results(tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    cfg = _config(tmp_path, ["floor:1"], budget_s=0.0)
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
    meta = {"device": "cpu", "model": "tiny", "config": cfg.to_json(),
            "data": {"roles": [], "n_train": 0, "n_task": 0, "n_heldout_questions": 0, "n_probes": 0, "n_measure": 0}}
    report = bd.run_bench(bench, tmp_path / "spent", meta, start=-1.0, log=lambda _: None)
    assert report["skipped"] == ["unanchored/seed0", "floor:1/seed0"]
    assert "Skipped for the time budget" in (tmp_path / "spent.md").read_text()


def _meta(cfg, bench) -> dict:
    return {"device": "cpu", "model": "tiny", "config": cfg.to_json(), "data": bd.data_summary(bench)}


def test_a_rerun_with_more_arms_resumes_the_finished_runs(tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    """Finished runs are read back (with their per-answer differences), not redone; the pooled results equal an
    uninterrupted run's."""
    def run(methods, stem, log):
        cfg = _config(tmp_path, methods)
        bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
        return bd.run_bench(bench, tmp_path / stem, _meta(cfg, bench), start=0.0, log=log)

    first = run(["floor:1"], "resume", lambda _: None)
    lines: list[str] = []
    resumed = run(["floor:1", "match:1"], "resume", lines.append)
    assert lines[0].startswith("resuming: 2 finished runs")
    assert not any("floor:1 seed 0" in line or "unanchored seed 0" in line for line in lines)
    whole = run(["floor:1", "match:1"], "whole", lambda _: None)
    for name in ("unanchored", "floor:1"):
        old = next(a for a in first["arms"] if a["arm"] == name)
        for report in (resumed, whole):
            new = next(a for a in report["arms"] if a["arm"] == name)
            assert new["behaviour_drift"] == pytest.approx(old["behaviour_drift"], abs=1e-6)
            assert new["proj_drift_gaps"] == pytest.approx(old["proj_drift_gaps"], abs=1e-6)
    # Another configuration (here: more steps) is neither resumed from nor silently written over: the check runs
    # before the model loads, and again once the data are known; --overwrite replaces the results.
    cfg = _config(tmp_path, ["floor:1"], steps=3)
    before = (tmp_path / "resume.json").read_text()
    with pytest.raises(ValueError, match=r"cannot resume \(differs: config.steps\).*--tag NAME.*--overwrite"):
        bd.check_no_overwrite(tmp_path / "resume", cfg.to_json())
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
    with pytest.raises(ValueError, match=r"config\.steps"):
        bd.run_bench(bench, tmp_path / "resume", _meta(cfg, bench), start=0.0, log=lines.append)
    assert (tmp_path / "resume.json").read_text() == before
    lines.clear()
    bd.run_bench(bench, tmp_path / "resume", _meta(cfg, bench), start=0.0, log=lines.append,
                 overwrite=True)
    assert not any(line.startswith("resuming") for line in lines)
    assert json.loads((tmp_path / "resume.json").read_text())["config"]["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["conditional", "narrow", "dpo", "dpo-neutral"])
def test_each_scenario_trains_what_it_says_and_writes_results(tiny_tokenizer, tiny_axis, tiny_data, tmp_path,
                                                              scenario):
    arms = ["prev+lm:1"] if scenario == "conditional" else ["prev+lm:1", "inoculate"]
    cfg = _config(tmp_path, arms, scenario=scenario, n_other_questions=6)
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
    first = bench.train_rows[0]["prompt"]
    system = tiny_data.sft_train[0]["system"]
    assert (tiny_tokenizer.decode(first).count(system) == 1) == (scenario == "conditional")
    if scenario == "narrow":
        kinds = {q.text: q.kind for q in bd.load_question_records()}
        measured = [t for t, src in zip(bench.texts, bench.sources, strict=True) if src == "other_kind"]
        assert len(measured) == 6 and all(kinds[t] != "factual" for t in measured)
    report = bd.run_bench(bench, tmp_path / f"bench_{scenario}", _meta(cfg, bench), start=0.0,
                          log=lambda _: None)
    assert [a["arm"] for a in report["arms"]] == ["unanchored", *(a if ":" in a else f"{a}:1" for a in arms)]
    assert all(math.isfinite(a["behaviour_drift"]) for a in report["arms"])
    assert math.isfinite(report["arms"][1]["vs_unanchored"]["train_time_ratio"])
    table = (tmp_path / f"bench_{scenario}.md").read_text()
    assert f"Drift benchmark: {scenario}" in table
    if scenario != "conditional":  # inoculation is read with its prompt given too
        assert math.isfinite(report["arms"][2]["trigger_leak_drift"]) and "Trigger leak" in table
    # Only the preference scenarios read the held-out preference; its accuracy is a share of the pairs.
    assert all(("preference_margin" in a) == (scenario in bd.PREFERENCE_SCENARIOS) for a in report["arms"])
    if scenario == "dpo-neutral":  # one pair per question, and the task is the held-out chosen (default) answers
        assert len(bench.dpo_rows) == len({r["prompt"][-1]["content"] for r in tiny_data.dpo_train})
        assert bench.task_answers == bench.pref_chosen and report["data"]["n_task"] == len(bench.pref_chosen)
    if scenario in bd.PREFERENCE_SCENARIOS:
        assert all(0.0 <= a["preference_accuracy"] <= 1.0 and math.isfinite(a["preference_margin"])
                   for a in report["arms"])
        assert "Held-out preference" in table


def test_neutral_pairs_prefer_the_default_answer_to_the_question_over_another_questions():
    def row(question: str, role: str) -> dict:
        return {"prompt": [{"role": "user", "content": question}], "role": role,
                "chosen": [{"role": "assistant", "content": f"{role} on {question}"}],
                "rejected": [{"role": "assistant", "content": f"plain on {question}"}]}

    rows = [row(q, r) for r in ("pirate", "ghost") for q in ("a?", "b?", "c?")]
    pairs = bd.neutral_pairs(rows)
    assert [(p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("a?", "plain on a?", "plain on b?"), ("b?", "plain on b?", "plain on c?"),
        ("c?", "plain on c?", "plain on a?")]
    with pytest.raises(ValueError, match="build the persona data with more questions"):
        bd.neutral_pairs(rows[:1])


def test_the_preference_margin_is_exactly_zero_at_the_base_and_sums_the_answer_log_probs(
        tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, _config(tmp_path, [], scenario="dpo"))
    assert len(bench.pref_prompts) == len(tiny_data.dpo_heldout) > 0
    again = bench.measure(copy.deepcopy(bench.base), bench.base_measure.answers)
    record = bd.run_record(bench, bd.Arm("unanchored"), 0, again, 0.0, 0.0, float("nan"))
    assert record["preference_margin"] == 0.0 and record["preference_accuracy"] == 0.0
    # By hand for the first pair: summed log-probabilities of each answer's tokens after the shared prompt.
    prompt, chosen, rejected = bench.pref_prompts[0], bench.pref_chosen[0], bench.pref_rejected[0]

    def logp(answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        logits = bench.base(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return float(sum(logits[len(prompt) - 1 + i, t] for i, t in enumerate(answer)))

    assert float(bench.base_measure.preference[0]) == pytest.approx(logp(chosen) - logp(rejected), abs=1e-3)


def test_the_mixed_scenario_adds_plain_answers_and_the_screened_arm_trains_on_what_screen_keeps(
        tiny_tokenizer, tiny_axis, tiny_data, tmp_path):
    from anchor.screening import screen

    cfg = _config(tmp_path, ["screened:10"], scenario="mixed")
    bench = _bench(tiny_tokenizer, tiny_axis, tiny_data, cfg)
    n_in_role = len(tiny_data.sft_train)
    assert bench.train_labels == ["in_role"] * n_in_role + ["neutral"] * (len(bench.train_rows) - n_in_role)
    plain = {r["prompt"][-1]["content"]: r["rejected"][-1]["content"] for r in tiny_data.dpo_train}
    assert [m[-1]["content"] for m in bench.train_messages[n_in_role:]] == list(plain.values())
    report = screen(bench.base, tiny_tokenizer, tiny_axis, [{"messages": m} for m in bench.train_messages],
                    reference="band")
    keep = report.keep(tiny_axis, 10.0)
    assert 0 < len(keep) < len(bench.train_rows)  # the 10th percentile drops some rows on the tiny model
    assert bench.rows(bd.Arm("screened", 10.0)) == [bench.train_rows[i] for i in keep]
    assert bench.rows(bd.Arm("unanchored")) == bench.train_rows
    summary = bench.screened[10.0]["summary"]
    assert summary["kept"] == len(keep) and summary["kept_in_role"] + summary["kept_neutral"] == len(keep)
    assert bd.Arm("screened", 10.0).kind == "axis" and bd.arm_config(bench, bd.Arm("screened", 10.0)) is None
    with pytest.raises(ValueError, match="screened arm filters SFT rows"):
        _bench(tiny_tokenizer, tiny_axis, tiny_data, _config(tmp_path, ["screened:5"], scenario="dpo"))
    report = bd.build_report(bench, [], [], {"config": cfg.to_json()})
    assert report["screen"] == [summary]
