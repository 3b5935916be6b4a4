"""``replay``: the model's own sampled default answers keep the frozen reference's projections.

Anchors on fixed text do not constrain what the model generates, so the answers must be its own: every
``replay_refresh_steps`` optimizer steps the current model answers ``replay_batch_size`` default-persona
conversations (a default system prompt and a question), and every step a forward over them keeps their answer
tokens' projections, over a band reaching the late layers, equal to the reference's on the same text (two-sided,
in default-to-role gaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from anchor.loss import match_penalty
from anchor.methods.base import OnPolicyMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


@dataclass
class ReplayBatch:
    """Right-padded ``[N, T]`` conversations answered by the model, the answer tokens, and the reference's
    projections on them per replay layer; ``step`` is when they were sampled."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    ref: dict[int, torch.Tensor]
    step: int


@register_method
class Replay(OnPolicyMethod):
    name = "replay"
    fields = (*OnPolicyMethod.fields, "replay_layers")
    needs_reference = True
    system_prompts = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.batch: ReplayBatch | None = None

    def layers(self, engine: Anchor) -> Sequence[int]:
        given = self.config.replay_layers
        return given if given is not None else range(engine.layers[0], engine.axis.n_layers)

    def set_batch(self, engine: Anchor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  answer_mask: torch.Tensor, step: int) -> None:
        """Use this batch from now on; the reference's projections on it are read once here."""
        device = engine.device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        store = engine.forward(inputs, reference=True, layers=engine.method_layers[self.name])[1]
        ref = {i: v.float().cpu() for i, v in store.items()}
        self.batch = ReplayBatch(input_ids.cpu(), attention_mask.cpu(), answer_mask.bool().cpu(), ref, step)
        self.sampled_at = step

    def step_loss(self, engine: Anchor) -> torch.Tensor | None:
        batch = self.batch
        if batch is None:
            return None
        device, layers = engine.device, engine.method_layers[self.name]
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        proj = engine.forward(inputs, layers=layers)[1]
        mask = batch.answer_mask.to(device)
        terms = []
        for i in layers:
            finite = torch.isfinite(proj[i])
            safe = torch.where(finite, proj[i], torch.zeros_like(proj[i]))
            terms.append(match_penalty(safe, batch.ref[i].to(device), engine.gap[i], mask & finite))
            engine.add_metric("nonfinite", (~finite).float().sum(), float(finite.numel()))
        penalty = torch.stack(terms).mean()
        engine.add_metric("replay_penalty", penalty.detach(), 1.0)
        return penalty

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        b = self.batch
        if b is None:
            return {}, {}
        tensors = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "answer_mask": b.answer_mask}
        return {**tensors, **{f"ref.{i}": v for i, v in b.ref.items()}}, {"step": b.step}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "step" not in meta:
            return
        ref = {int(k[4:]): v for k, v in tensors.items() if k.startswith("ref.")}
        self.batch = ReplayBatch(tensors["input_ids"], tensors["attention_mask"], tensors["answer_mask"].bool(), ref,
                                 meta["step"])
        self.sampled_at = meta["step"]
