"""Calibration of the capping setting on the tiny model: the selection rule, the stored setting, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import anchor.calibrate
from anchor.axis import AssistantAxis
from anchor.calibrate import (
    Calibration,
    CalibrationSettings,
    Candidate,
    calibrate_bundle,
    candidate_bands,
    drift_prompts,
    ordinary_prompts,
    select,
)
from anchor.capping import cap
from anchor.cli import main
from anchor.commands.calibrate import _band
from tests.conftest import make_tiny_model

BUDGET = 0.5
FAST = dict(bands=((1, 1), (2, 3)), percentiles=(10.0, 90.0), n_prompts=4, max_new_tokens=6, batch_size=4)


def _candidate(label_layer: int, percentile: float, lift: float, kl: float) -> Candidate:
    return Candidate([label_layer], percentile, {label_layer: 0.0}, lift=lift, kl=kl)


def test_select_takes_largest_lift_within_budget():
    cands = [_candidate(1, 10, 0.2, 0.01), _candidate(1, 50, 0.5, 0.04), _candidate(1, 90, 0.9, 0.2),
             _candidate(2, 50, 0.5, 0.02)]
    assert select(cands, 0.05) is cands[3]  # same lift as cands[1], lower KL
    assert select(cands, 0.015) is cands[0]
    assert select(cands, 1.0) is cands[2]
    assert select(cands, 0.001) is None


def test_prompt_sets_are_seeded_and_sized():
    drift = drift_prompts(6, seed=0)
    assert drift == drift_prompts(6, seed=0) and drift != drift_prompts(6, seed=1)
    assert len(drift) == 6 and sum(m[0]["role"] == "system" for m in drift) == 3
    ordinary = ordinary_prompts(5, seed=0)
    assert len(ordinary) == 5 and all(len(m) == 1 and m[0]["role"] == "user" for m in ordinary)


def test_settings_and_bands_validated(tiny_axis):
    with pytest.raises(ValueError, match="percentiles"):
        CalibrationSettings(percentiles=(150.0,))
    with pytest.raises(ValueError, match="kl_budget"):
        CalibrationSettings(kl_budget=0)
    with pytest.raises(ValueError, match="first <= last"):
        CalibrationSettings(bands=((3, 1),))
    with pytest.raises(ValueError, match="out of range"):
        candidate_bands(tiny_axis, CalibrationSettings(bands=((2, 7),)))
    assert candidate_bands(tiny_axis, CalibrationSettings()) == [[2], [2, 3], [3]]
    assert _band("21-25") == (21, 25) and _band("7") == (7, 7)


@pytest.fixture(scope="module")
def calibrated(tiny_tokenizer, tiny_axis, tmp_path_factory):
    """One calibration of a saved copy of the tiny axis, shared by the tests below (generation is the slow part)."""
    axis_dir = tmp_path_factory.mktemp("calibrated") / "axis"
    tiny_axis.save_pretrained(axis_dir)
    model = make_tiny_model(tiny_tokenizer)
    result = calibrate_bundle(axis_dir, model, tiny_tokenizer, CalibrationSettings(kl_budget=BUDGET, **FAST),
                              progress=False)
    return axis_dir, result


def test_calibration_respects_budget(calibrated):
    _, result = calibrated
    assert len(result.candidates) == 4 and result.n_drift > 0 and result.n_ordinary > 0
    assert all(math.isfinite(c.lift) and c.kl >= 0 for c in result.candidates)
    by_label = {c.label: c for c in result.candidates}
    assert by_label["L2-3 p90"].lift > by_label["L2-3 p10"].lift > 0  # a higher floor lifts more
    assert by_label["L2-3 p90"].touched_ordinary >= by_label["L2-3 p10"].touched_ordinary
    within = [c for c in result.candidates if c.kl <= BUDGET]
    assert result.chosen.kl <= BUDGET and result.chosen.lift == max(c.lift for c in within)


def test_calibration_is_stored_and_becomes_the_default(calibrated, tiny_model, tiny_axis):
    axis_dir, result = calibrated
    reloaded = AssistantAxis.from_pretrained(axis_dir)
    setting = reloaded.metadata["cap"]
    assert setting["layers"] == result.chosen.layers and setting["percentile"] == result.chosen.percentile
    assert setting["measured"]["kl"] <= BUDGET and setting["measured"]["kl_budget"] == BUDGET
    with cap(tiny_model, reloaded) as c:
        assert c.layers == result.chosen.layers and c.percentile == result.chosen.percentile
        assert c.tau == {int(k): pytest.approx(v) for k, v in setting["tau"].items()}
    assert torch.equal(reloaded.axis, tiny_axis.axis)  # the re-save keeps the tensors

    report = axis_dir / "calibration"
    table = json.loads((report / "sweep.json").read_text())
    assert table["chosen"] == result.chosen.label and len(table["candidates"]) == 4
    assert "**chosen**" in (report / "sweep.md").read_text()
    assert (report / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_no_candidate_within_budget_leaves_bundle_unchanged(calibrated, tiny_model, tiny_tokenizer, tiny_axis,
                                                            tmp_path, monkeypatch):
    _, result = calibrated
    strict = dataclasses.replace(result, chosen=None, settings=CalibrationSettings(kl_budget=1e-12, **FAST))
    monkeypatch.setattr(anchor.calibrate, "calibrate", lambda *args, **kwargs: strict)
    axis_dir = tmp_path / "axis"
    tiny_axis.save_pretrained(axis_dir)
    report = tmp_path / "report"  # the report behind a setting stored earlier: a failed sweep must not replace it
    report.mkdir()
    (report / "sweep.md").write_text("earlier sweep")
    with pytest.raises(RuntimeError, match=r"kl_budget.*report-no-fit; the bundle and its report in .*report were not"):
        calibrate_bundle(axis_dir, tiny_model, tiny_tokenizer, out_dir=report, progress=False)
    assert "cap" not in AssistantAxis.from_pretrained(axis_dir).metadata
    assert (report / "sweep.md").read_text() == "earlier sweep"
    assert "No candidate" in (tmp_path / "report-no-fit" / "sweep.md").read_text()


def test_cli_end_to_end(tiny_model, tiny_tokenizer, tiny_axis, tmp_path, capsys):
    model_dir, axis_dir = tmp_path / "model", tmp_path / "axis"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    tiny_axis.save_pretrained(axis_dir)
    argv = ["calibrate", "--axis", str(axis_dir), "--model", str(model_dir), "--layers-bands", "1", "2-3",
            "--percentiles", "10", "--n-prompts", "2", "--max-new-tokens", "4", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "report")]
    assert main(argv) == 0
    assert "Stored layers" in capsys.readouterr().out
    assert AssistantAxis.from_pretrained(axis_dir).metadata["cap"]["percentile"] == 10.0
    assert (tmp_path / "report" / "sweep.md").is_file()
    assert main([*argv[:-2], "--kl-budget", "-1"]) == 1  # a bad budget is a clear error, not a traceback
    assert "kl_budget" in capsys.readouterr().err


def test_markdown_states_when_nothing_fits():
    cands = [_candidate(1, 50, 0.5, 0.3)]
    result = Calibration(cands, None, CalibrationSettings(kl_budget=0.1), 2, 2, 0, {"model_id": "m"})
    assert "No candidate" in result.to_markdown() and "L1 p50" in result.to_markdown()
    with pytest.raises(RuntimeError, match="Raise the budget"):
        result.setting()
