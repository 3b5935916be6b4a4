"""Two CPU processes over gloo: one axis for both ranks, metrics reduced across ranks and written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("methods", ["floor", "floor,match,replay,preventative,lm_replay,kl,incremental,ablate"],
                         ids=["floor", "every-method-composed"])
def test_two_processes_share_the_axis_and_log_reduced_metrics_once(tmp_path, methods):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probes = [{"domain": d, "prompt": f"Tell me about {d}."} for d in ("coding", "writing", "emotional", "meta")]
    (tmp_path / "probes.json").write_text(json.dumps({"version": 1, "probes": probes}))
    env = {**os.environ, "ANCHOR_CACHE": str(tmp_path / "cache"), "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tb"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
               str(ROOT / "tests" / "_dist_worker.py"), str(tmp_path), methods]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["axis"] == ranks[1]["axis"] and ranks[0]["tau"] == ranks[1]["tau"]

    def anchor_logs(seen: dict) -> list[dict]:
        return [{k: v for k, v in h.items() if k.startswith("anchor/") or k == "step"} for h in seen["log_history"]
                if "anchor/penalty" in h]

    # each rank trains on different rows, so only metrics reduced across ranks can agree exactly
    assert anchor_logs(ranks[0]) == anchor_logs(ranks[1])
    assert [h["step"] for h in anchor_logs(ranks[0])] == [1, 2, 3]
    assert "anchor/probe_drift" in anchor_logs(ranks[0])[1]

    event_files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(event_files) == 1  # the main process alone writes
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/anchor/penalty")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/anchor/penalty")] == pytest.approx(
        [h["anchor/penalty"] for h in anchor_logs(ranks[0])])
