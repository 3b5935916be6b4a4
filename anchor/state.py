"""The anchor's checkpoint state: the ``anchor/`` folder inside each ``checkpoint-N/``.

It holds the axis bundle the run anchors to, τ, the anchored layers, the settings, each method's state (replay
pools and batches) and the probe baselines, as safetensors plus JSON. It is written during the trainer's own save,
before ``trainer_state.json`` (see :meth:`anchor.callback.AnchorCallback.state`), so a checkpoint the trainer can
resume from always has it. Resuming restores it exactly and never recomputes the axis from a half-trained model.

Format 1 (before methods were registered and composed) is read and converted: ``method`` + ``lm_replay_weight``
become ``method: [method, lm_replay]`` with ``method_weights: [1, lm_replay_weight]`` (the same terms), the LM
replay pool and the replay batch become those methods' state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anchor.axis import AssistantAxis
from anchor.io import atomic_write, atomic_write_text

STATE_DIR = "anchor"
STATE_JSON = "anchor_state.json"
STATE_TENSORS = "anchor_state.safetensors"
STATE_FORMAT = 2


@dataclass
class AnchorState:
    """What a checkpoint's ``anchor/`` folder holds."""

    axis: AssistantAxis
    step: int
    config: dict[str, Any]
    layers: list[int]
    tau: dict[int, float]
    methods: dict[str, Any]
    probes: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]

    def method_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith("method.")}

    def probe_tensors(self) -> dict[str, torch.Tensor]:
        return {k[6:]: v for k, v in self.tensors.items() if k.startswith("probe.")}


def save_state(directory: str | Path, state: AnchorState) -> None:
    """Write ``state`` into ``directory`` (the bundle, then tensors, then the JSON that marks it complete)."""
    directory = Path(directory)
    state.axis.save_pretrained(directory)
    meta = {"format": STATE_FORMAT, "step": state.step, "config": state.config, "layers": state.layers,
            "tau": {str(k): v for k, v in state.tau.items()}, "methods": state.methods, "probes": state.probes}
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    atomic_write(directory / STATE_TENSORS, lambda p: save_file(tensors, p))
    atomic_write_text(directory / STATE_JSON, json.dumps(meta, indent=1))


def has_state(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / STATE_DIR / STATE_JSON).is_file()


def load_state(directory: str | Path) -> AnchorState:
    """Read an ``anchor/`` folder (format 1 or 2)."""
    directory = Path(directory)
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS)) if (directory / STATE_TENSORS).is_file() else {}
    fmt = meta.get("format")
    if fmt == 1:
        meta, tensors = _from_format_1(meta, tensors)
    elif fmt != STATE_FORMAT:
        raise ValueError(f"{directory} holds anchor state format {fmt}; this version of anchor reads formats 1 and "
                         f"{STATE_FORMAT}. Resume with the anchor version that wrote it.")
    return AnchorState(
        axis=AssistantAxis.from_pretrained(directory), step=int(meta["step"]), config=meta["config"],
        layers=list(meta["layers"]), tau={int(k): float(v) for k, v in meta["tau"].items()},
        methods=meta.get("methods", {}), probes=meta.get("probes"), tensors=tensors)


def _from_format_1(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Format 1 → 2: one method plus optional LM replay becomes a composition with the same terms."""
    config = dict(meta["config"])
    lm_weight = float(config.pop("lm_replay_weight", 0.0) or 0.0)
    methods = [config["method"]] + (["lm_replay"] if lm_weight > 0 else [])
    config["method"] = methods
    config["method_weights"] = [1.0, lm_weight] if lm_weight > 0 else None
    converted: dict[str, torch.Tensor] = {}
    states: dict[str, Any] = {}
    for key, value in tensors.items():
        if key.startswith("lm_pool."):
            converted[f"method.lm_replay.pool.{key[8:]}"] = value
        elif key.startswith("replay."):
            converted[f"method.replay.{key[7:]}"] = value
        elif key in ("probe_baseline", "role_baseline"):
            converted[f"probe.{key}"] = value
    if "replay_step" in meta:
        states["replay"] = {"step": meta["replay_step"]}
    return {**meta, "config": config, "methods": states}, converted



def resume_state(args: Any, state: Any, frame_locals: dict[str, Any]) -> AnchorState:
    """The anchor state of the checkpoint a trainer resumes from (it starts at ``state.global_step > 0``): the one
    passed to ``train(resume_from_checkpoint=...)`` (``frame_locals``), the args', or ``checkpoint-<step>``."""
    candidates = [frame_locals.get("resume_from_checkpoint"), getattr(args, "resume_from_checkpoint", None),
                  Path(args.output_dir) / f"checkpoint-{state.global_step}"]
    for candidate in candidates:
        if isinstance(candidate, str | Path) and has_state(candidate):
            return load_state(Path(candidate) / STATE_DIR)
    complete = sorted(str(p.parent) for p in Path(args.output_dir).glob(f"checkpoint-*/{STATE_DIR}"))
    raise RuntimeError(
        f"Resuming at step {state.global_step} from a checkpoint without its {STATE_DIR}/ folder (written without "
        "AnchorCallback, or cut short). Continuing would anchor to another axis and probe baseline than the run "
        "started with (an axis computed now would come from the half-trained model). Resume from a checkpoint "
        "that has it" + (f" ({', '.join(complete)})" if complete else "") + ", or start the run again.")


def check_same_settings(saved: AnchorState, config: Any) -> None:
    """Refuse to resume with other methods, weights, floor or layers than the checkpoint's: a run is never silently
    reinterpreted."""
    for name in ("method", "method_weights", "floor_percentile"):
        if saved.config.get(name) != getattr(config, name):
            raise ValueError(f"The checkpoint was trained with AnchorConfig.{name}={saved.config.get(name)!r}, this "
                             f"run has {getattr(config, name)!r}; resume with the same anchor settings.")
    if config.layers is not None and sorted(config.layers) != saved.layers:
        raise ValueError(f"The checkpoint anchors layers {saved.layers}, this run asks for {sorted(config.layers)}; "
                         "resume with the same layers.")


__all__ = ["STATE_DIR", "AnchorState", "check_same_settings", "has_state", "load_state", "resume_state", "save_state"]
