"""``lm_replay`` (axis-free): keep the base model's own default answers likely.

Before training the base model answers ``lm_replay_pool`` plain questions (no system prompt) greedily; each
optimizer step then adds the ordinary LM loss of ``replay_batch_size`` of those answers, drawn by (seed, step,
rank) alone so a resume repeats them. Plain, because that is the form in which fine-tuning data without a system
prompt overwrites the Assistant. Its forward is never steered or penalised. With ``preventative`` it kept the most
persona in the drift benchmark; alone it is the control an axis method must beat.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

import torch

from anchor.loss import answer_lm_loss, answer_window
from anchor.methods.base import AnchorMethod, RunContext, default_prompts, register_method, replay_questions

if TYPE_CHECKING:
    from anchor.engine import Anchor

logger = logging.getLogger(__name__)
_KEYS = ("input_ids", "attention_mask", "answer_mask")


@register_method
class LMReplay(AnchorMethod):
    name = "lm_replay"
    fields = ("replay_batch_size", "replay_every", "replay_max_new_tokens", "replay_questions", "lm_replay_pool",
              "lm_replay_data")
    needs_template = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.pool: dict[str, torch.Tensor] | None = None
        self.batch: dict[str, torch.Tensor] | None = None

    def setup(self, run: RunContext) -> None:
        from anchor.models import unwrap
        from anchor.probes import generate_answers

        if self.pool is not None:  # restored from a checkpoint
            return
        if run.resumed:
            raise ValueError(
                "method lm_replay is on, but the checkpoint was trained without LM replay: its pool of base-model "
                "answers cannot be written by the half-trained model. Resume without lm_replay, or start the run "
                "again.")
        cfg, tok = self.config, run.tokenizer
        if cfg.lm_replay_data is not None:
            self.pool = _pack(*_read_pool(tok, cfg.lm_replay_data), tok.pad_token_id)
            return
        prompts = default_prompts(tok, replay_questions(cfg), cfg.lm_replay_pool, f"anchor-lm-replay-{run.seed}")
        start = time.perf_counter()
        if run.progress:
            logger.info("anchor: lm_replay: the base model answers %d plain questions (%d tokens each) for the replay "
                        "pool...", len(prompts), cfg.replay_max_new_tokens)
        # Generated at the probes' batch size at least: a small replay batch (cheaper steps) must not make the
        # one-off pool slow (replay_batch_size=2 took 98 s here against 29 s at 8).
        answers = generate_answers(unwrap(run.model), tok, prompts, cfg.replay_max_new_tokens,
                                   max(cfg.replay_batch_size, cfg.probe_batch_size))
        self.pool = _pack(prompts, [a or [tok.eos_token_id] for a in answers], tok.pad_token_id)
        if run.progress:
            logger.info("anchor: lm_replay pool ready in %.0f s.", time.perf_counter() - start)

    def set_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor) -> None:
        """Use this batch ``[N, T]`` (right-padded prompt + answer; ``answer_mask`` marks the answer tokens) for
        the coming steps instead of drawing from a pool."""
        self.batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask.bool()}

    def start_step(self, engine: Anchor, step: int) -> None:
        if self.pool is None or not engine.step_term_due:  # off a replay_every cycle the batch would go unused
            return
        n = self.pool["input_ids"].shape[0]
        rng = random.Random(f"anchor-lm-replay-{engine.run.seed}-{step}-{engine.run.process_index}")
        rows = torch.tensor(sorted(rng.sample(range(n), min(self.config.replay_batch_size, n))))
        width = int(self.pool["attention_mask"][rows].sum(dim=1).max())  # right-padded: drop all-padding columns
        self.set_batch(*(self.pool[k][rows, :width] for k in _KEYS))

    def step_loss(self, engine: Anchor) -> torch.Tensor | None:
        if self.batch is None:
            return None
        b = {k: v.to(engine.device) for k, v in self.batch.items()}
        keep = answer_window(b["answer_mask"])  # logits only where an answer token is predicted
        output, _ = engine.forward({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                    "logits_to_keep": keep})
        loss = answer_lm_loss(output.logits, b["input_ids"][:, -keep:], b["answer_mask"][:, -keep:])
        engine.add_metric("lm_replay_loss", loss.detach(), 1.0)
        return loss

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({f"pool.{k}": v for k, v in self.pool.items()} if self.pool is not None else {}), {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pool = {k[5:]: v for k, v in tensors.items() if k.startswith("pool.")}
        self.pool = {**pool, "answer_mask": pool["answer_mask"].bool()} if pool else None


def _read_pool(tokenizer: Any, path: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of a JSONL of chat ``messages`` ending with an assistant answer."""
    from anchor.data import read_jsonl
    from anchor.spans import encode_prompt

    prompts, answers = [], []
    for i, record in enumerate(read_jsonl(path)):
        messages = record.get("messages")
        if not messages or messages[-1].get("role") != "assistant" or not messages[-1].get("content"):
            raise ValueError(f"{path}, record {i}: lm_replay_data needs chat `messages` ending with a non-empty "
                             "assistant answer.")
        prompts.append(encode_prompt(tokenizer, messages[:-1]))
        answers.append(list(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]))
    if not prompts:
        raise ValueError(f"{path} holds no records to replay.")
    return prompts, answers


def _pack(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    from anchor.probes import pack_answers

    ids, attention, answer = pack_answers(prompts, answers, pad_id)
    return {"input_ids": ids, "attention_mask": attention, "answer_mask": answer.bool()}
