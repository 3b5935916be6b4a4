"""scripts/bench_anchor_cost.py without training: the step-count check and the written table's verdicts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_anchor_cost", SCRIPTS / "bench_anchor_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bc = _load()


def test_timed_steps_must_hold_whole_replay_cycles():
    assert bc.parse([]).configs == list(bc.CONFIGS)  # the defaults time whole cycles of every configuration
    # KL samples its batch again every replay_refresh_steps (10) steps: a cycle of 10 even when it replays every step
    with pytest.raises(SystemExit, match="use a multiple of 10"):
        bc.parse(["--steps", "6", "--warmup", "1", "--configs", "default (KL on 8 answers every step)"])
    assert bc.cycle({"replay_every": 4}) == 20 and bc.cycle({"replay_refresh_steps": 3}) == 3
    # LM replay samples nothing during training: only replay_every counts
    assert bc.cycle({"method": ["preventative", "lm_replay"], "replay_every": 4}) == 4 and bc.cycle(None) == 1
    assert bc.parse(["--steps", "6", "--warmup", "1", "--configs", "preventative + lm_replay"]).steps == 6


def test_a_result_of_another_batch_shape_is_not_overwritten(tmp_path, capsys):
    """A run with gradient accumulation writes beside the default-shape result only under its own --tag."""
    earlier = {"model": "smollm2", "dtype": "fp32", "batch_size": 4, "seq_len": 128}  # written before grad_accum
    (tmp_path / "bench_anchor_cost_cpu.json").write_text(json.dumps(earlier))
    assert bc.parse(["--out", str(tmp_path)]).grad_accum == 1  # the same shape may be measured again
    with pytest.raises(SystemExit, match=r"other settings \(grad_accum\).*--tag NAME"):
        bc.parse(["--out", str(tmp_path), "--grad-accum", "4"])
    args = bc.parse(["--out", str(tmp_path), "--grad-accum", "4", "--tag", "ga4"])
    assert bc.result_stem(args).name == "bench_anchor_cost_cpu_ga4"
    with pytest.raises(SystemExit):
        bc.parse(["--out", str(tmp_path), "--grad-accum", "0", "--tag", "x"])
    assert "at least 1 micro-batch" in capsys.readouterr().err


def test_the_mean_step_counts_the_replayed_steps_at_their_share():
    run = {"step_times": [9.0, 1.0, 1.0, 1.0, 5.0]}  # warm-up, then one replayed step in four
    assert bc.mean_step(run, 1) == 2.0


def test_the_table_states_each_verdict(tmp_path):
    def row(config, fields, values):
        return {"config": config, "fields": fields, "step_s": 1.0, "setup_s": 0.0, "reps": len(values),
                "time_ratio": bc.spread(values)}

    result = {"command": "python scripts/bench_anchor_cost.py", "uptime_at_start": "up", "uptime_at_end": "up",
              "seconds": 1.0, "model": "smollm2", "dtype": "fp32", "batch_size": 4, "seq_len": 128, "grad_accum": 4,
              "device": "cpu (x86_64)", "threads": 2, "torch": "2", "reps": 2, "steps": 9, "warmup": 1,
              "rows": [row("plain", None, [1.0, 1.0]), row("a", {}, [1.9, 2.1]),
                       row("b", {"replay_every": 4}, [1.1, 1.15]), row("c", {"replay_every": 8}, [1.1, 1.3])]}
    bc.write(result, tmp_path / "bench_anchor_cost_cpu", "cpu")
    table = (tmp_path / "bench_anchor_cost_cpu.md").read_text()
    assert "| a | {} |" in table and "misses ≤ 1.2" in table
    assert "batch 4 × 128 tokens × 4 micro-batches per optimizer step" in table
    assert "meets ≤ 1.2" in table and "noise-bound: 1.10–1.30 straddles 1.2" in table
    assert json.loads((tmp_path / "bench_anchor_cost_cpu.json").read_text())["rows"][1]["config"] == "a"
    assert (tmp_path / "bench_anchor_cost_cpu.png").stat().st_size > 0


def test_repetitions_alternate_the_order_so_drift_falls_on_every_configuration():
    from bench_overhead import interleaved

    assert list(interleaved(["plain", "a", "b"], 3)) == [
        (0, "plain"), (0, "a"), (0, "b"), (1, "b"), (1, "a"), (1, "plain"), (2, "plain"), (2, "a"), (2, "b")]
    assert list(interleaved(("x",), 0)) == []
