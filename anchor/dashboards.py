"""What a person looks at in wandb while a model fine-tunes: the probe answers as text, the axis bundle, and the
probe drift per domain as one chart.

The callback logs numbers (``anchor/…``) through the trainer's reporters; this module adds what only wandb shows:

* at every probe step, a ``wandb.Table`` of the probe prompts and the model's current answers, with each answer's
  projection change since step 0 (mean over layers, axis units; negative = away from the Assistant) and, where the
  frozen base model is at hand, its role-likeness, so the drifting text can be read;
* once, the axis bundle the run anchors to (and its report, when the bundle directory has one) as an artifact of
  type ``axis``;
* at the end, a line chart of probe drift per domain against the step.

Each is logged only when a wandb run is active in this process (the main process), and never imports wandb
otherwise. Rows are logged with the ``train/global_step`` key, the x-axis of the trainer's own charts.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ["step", "domain", "prompt", "answer", "projection_change", "role_likeness"]


def active_run() -> Any | None:
    """The active wandb run of this process, or None (wandb is not imported just to ask)."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def log_probe_table(run: Any, step: int, rows: Sequence[Mapping[str, Any]], prefix: str = "anchor") -> None:
    """The probe answers at ``step`` as a table (``rows``: dicts with :data:`TABLE_COLUMNS` but ``step``)."""
    import wandb

    table = wandb.Table(columns=TABLE_COLUMNS, data=[[step, *(r.get(c) for c in TABLE_COLUMNS[1:])] for r in rows])
    run.log({f"{prefix}/probe_answers": table, "train/global_step": step})


def log_axis_artifact(run: Any, axis: Any, source: str | Path | None = None) -> None:
    """The bundle (and ``source/report`` when present) as a wandb artifact named by the model's fingerprint."""
    import wandb

    fingerprint = str(axis.metadata.get("fingerprint") or "unknown")[:16]
    artifact = wandb.Artifact(f"assistant-axis-{fingerprint}", type="axis",
                              metadata={"n_layers": axis.n_layers, "hidden_size": axis.hidden_size,
                                        "model_id": axis.metadata.get("model_id"), "source": str(source or "")})
    with tempfile.TemporaryDirectory(prefix="anchor-axis-") as staging:
        axis.save_pretrained(staging)
        report = Path(source) / "report" if source else None
        if report is not None and report.is_dir():
            shutil.copytree(report, Path(staging) / "report")
        artifact.add_dir(staging)  # copies the files into wandb's staging area
        run.log_artifact(artifact)


def log_drift_chart(run: Any, series: Mapping[str, Sequence[tuple[int, float]]], step: int,
                    prefix: str = "anchor") -> None:
    """One line per domain: probe drift (z against step 0) over the steps it was measured at."""
    import wandb

    domains = [d for d in series if series[d]]
    if not domains:
        return
    chart = wandb.plot.line_series(
        xs=[[s for s, _ in series[d]] for d in domains], ys=[[z for _, z in series[d]] for d in domains],
        keys=domains, title="Probe drift by domain (z against step 0; negative = away from the Assistant)",
        xname="step")
    run.log({f"{prefix}/probe_drift_chart": chart, "train/global_step": step})


__all__ = ["TABLE_COLUMNS", "active_run", "log_axis_artifact", "log_drift_chart", "log_probe_table"]
