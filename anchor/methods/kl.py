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

from anchor.loss import sequence_mean
from anchor.methods.base import (
    AnchorMethod,
    RunContext,
    default_prompts,
    on_policy_batch,
    refresh_due,
    register_method,
    replay_questions,
)

if TYPE_CHECKING:
    from anchor.engine import Anchor

_KEYS = ("input_ids", "attention_mask", "answer_mask")


@register_method
class KL(AnchorMethod):
    name = "kl"
    fields = ("replay_batch_size", "replay_refresh_steps", "replay_max_new_tokens", "replay_questions")
    needs_reference = True
    needs_template = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.batch: dict[str, torch.Tensor] | None = None
        self.step: int | None = None
        self._ref_logp: torch.Tensor | None = None
        self._prompts: list[list[int]] = []
        self._tokenizer: Any = None

    def setup(self, run: RunContext) -> None:
        self._tokenizer = run.tokenizer
        self._prompts = default_prompts(run.tokenizer, replay_questions(self.config), self.config.replay_batch_size,
                                        f"anchor-kl-{run.seed}")

    def start_step(self, engine: Anchor, step: int) -> None:
        if refresh_due(self.step, step, self.config.replay_refresh_steps):
            self.set_batch(*on_policy_batch(engine, self._tokenizer, self._prompts, step), step=step)

    def set_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor,
                  step: int) -> None:
        """Use these answers ``[N, T]`` from now on (the reference reads them at the next step)."""
        self.batch = dict(zip(_KEYS, (input_ids.cpu(), attention_mask.cpu(), answer_mask.bool().cpu()), strict=True))
        self.step = step
        self._ref_logp = None

    def step_loss(self, engine: Anchor) -> torch.Tensor | None:
        if self.batch is None:
            return None
        b = {k: v.to(engine.device) for k, v in self.batch.items()}
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        if self._ref_logp is None:
            self._ref_logp = F.log_softmax(engine.forward(inputs, reference=True)[0].logits[:, :-1].float(), dim=-1)
        logp = F.log_softmax(engine.forward(inputs)[0].logits[:, :-1].float(), dim=-1)
        ref = self._ref_logp
        kl = (ref.exp() * (ref - logp)).sum(dim=-1)  # [N, T-1]: position t predicts token t+1
        loss = sequence_mean(kl, b["answer_mask"][:, 1:])
        engine.add_metric("kl", loss.detach(), 1.0)
        return loss

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return (dict(self.batch), {"step": self.step}) if self.batch is not None else ({}, {})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "step" in meta:
            self.set_batch(*(tensors[k] for k in _KEYS), step=meta["step"])
