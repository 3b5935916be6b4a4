"""``kl`` (axis-free): keep the model's next-token distributions on its own default answers at the base model's.

Every ``replay_refresh_steps`` optimizer steps the current model samples answers to ``replay_batch_size`` plain
questions (on-policy: training on a model's own samples forgets less than on fixed text, arXiv 2510.18874); every
step adds KL(base ‖ model) over their answer positions, averaged per answer, then over answers. The reference's
distributions are computed once per sample. It is the on-policy control an axis method must beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from anchor.loss import answer_window, sequence_mean
from anchor.methods.base import OnPolicyMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor

_KEYS = ("input_ids", "attention_mask", "answer_mask")


@register_method
class KL(OnPolicyMethod):
    name = "kl"
    needs_reference = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.batch: dict[str, torch.Tensor] | None = None
        self._ref_logp: torch.Tensor | None = None

    def set_batch(self, engine: Anchor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  answer_mask: torch.Tensor, step: int) -> None:
        self.batch = dict(zip(_KEYS, (input_ids.cpu(), attention_mask.cpu(), answer_mask.bool().cpu()), strict=True))
        self.sampled_at = step
        self._ref_logp = None  # the reference reads the new answers at the next step

    def step_loss(self, engine: Anchor) -> torch.Tensor | None:
        if self.batch is None:
            return None
        b = {k: v.to(engine.device) for k, v in self.batch.items()}
        keep = answer_window(b["answer_mask"])  # logits only where an answer token is predicted
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "logits_to_keep": keep}
        if self._ref_logp is None:
            self._ref_logp = F.log_softmax(engine.forward(inputs, reference=True)[0].logits[:, :-1].float(), dim=-1)
        logp = F.log_softmax(engine.forward(inputs)[0].logits[:, :-1].float(), dim=-1)
        ref = self._ref_logp
        kl = (ref.exp() * (ref - logp)).sum(dim=-1)  # [N, keep-1]: each position predicts the next token
        loss = sequence_mean(kl, b["answer_mask"][:, -keep:][:, 1:])
        engine.add_metric("kl", loss.detach(), 1.0)
        return loss

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return (dict(self.batch), {"step": self.sampled_at}) if self.batch is not None else ({}, {})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "step" in meta:
            self.set_batch(None, *(tensors[k] for k in _KEYS), step=meta["step"])
