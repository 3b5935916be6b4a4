"""The anchor's exact maths: the penalties and the identity that injects a term into any trainer's backward.

A ``TrainerCallback`` sees no batch and no loss, so a term cannot be added to the trainer's loss. Instead a forward
hook on a decoder layer returns ``AddAux.apply(hidden, term)``: an identity whose backward also sends a gradient
of 1 into ``term``. The trainer's ordinary ``loss.backward()`` then carries the term's gradient as if it had been
added to the loss, exactly, with or without (reentrant or not) gradient checkpointing, under DDP and ZeRO, for any
trainer (the MoE auxiliary-loss pattern).

Distances are measured in units of the layer's default-to-role gap (:meth:`anchor.axis.AssistantAxis.gap`), so
one unit is "as far as the average role is from the Assistant" and a weight means the same on every model. Tokens
are averaged within each sequence, then over sequences: every example weighs the same and a term is exactly
additive over micro-batches of equal size, hence invariant to gradient accumulation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label that marks a token as not trained on (transformers, TRL)


class AddAux(torch.autograd.Function):
    """Identity on ``hidden`` whose backward also sends ``grad_scale`` into ``penalty`` (a scalar).

    The MoE auxiliary-loss pattern: the penalty's graph is reached through the layer output, so it takes part in
    whatever backward the trainer runs. ``grad_scale`` is the factor the trainer applied to its own loss before
    ``backward`` (the fp16 loss scale; 1 otherwise), so the penalty's gradient is scaled like the loss's.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, penalty: torch.Tensor, grad_scale: torch.Tensor | float) -> Any:
        ctx.penalty_like = (penalty.shape, penalty.dtype, penalty.device)
        ctx.grad_scale = grad_scale
        return hidden

    @staticmethod
    def backward(ctx: Any, grad_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.penalty_like
        grad_penalty = torch.ones(shape, dtype=dtype, device=device)
        if isinstance(ctx.grad_scale, torch.Tensor) or ctx.grad_scale != 1:
            grad_penalty = grad_penalty * ctx.grad_scale
        return grad_hidden, grad_penalty, None


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of each row, then over rows (a row with no masked token counts as 0).

    Dividing by the number of rows, not of tokens, keeps the term exactly additive over micro-batches of equal size,
    which is what makes it invariant to gradient accumulation.
    """
    return row_means(values, mask).mean()


def row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, T]`` over the masked tokens of each row: ``[B]`` (0 for a row with none)."""
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)


def floor_penalty(proj: torch.Tensor, tau: float, gap: float, mask: torch.Tensor) -> torch.Tensor:
    """Squared hinge on each row's mean projection of ``proj [B, T]`` over its masked tokens falling below ``tau``, in
    units of ``gap``, averaged over rows (a row with no masked token counts as 0, as in :func:`sequence_mean`)."""
    has_tokens = mask.any(dim=-1).to(proj.dtype)
    return (F.relu((tau - row_means(proj, mask)) / gap) ** 2 * has_tokens).mean()


def match_penalty(proj: torch.Tensor, ref: torch.Tensor, gap: float, mask: torch.Tensor) -> torch.Tensor:
    """Squared distance of ``proj [B, T]`` from the reference ``ref [B, T]``, in units of ``gap``."""
    return sequence_mean(((proj - ref) / gap) ** 2, mask)


def answer_window(answer_mask: torch.Tensor) -> int:
    """How many final positions of the right-padded ``[N, T]`` batch an answer-token loss needs logits at: from the
    one that predicts the earliest answer token of any row to the end (``logits_to_keep`` in transformers).

    The LM head and the log-softmax over the vocabulary cost per position, and on a replayed default answer about
    half the positions are its prompt, whose logits no loss reads; slicing ``ids`` and ``answer_mask`` to the same
    last columns leaves every loss below exactly as over the whole batch.
    """
    width = answer_mask.shape[1]
    has_answer = answer_mask.any(dim=1)
    if not bool(has_answer.any()):
        return width
    first = int(answer_mask[has_answer].float().argmax(dim=1).min())
    return min(width, width - first + 1)


def answer_lm_loss(logits: torch.Tensor, ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """The ordinary LM loss of ``ids [N, T]`` on its ``answer_mask`` tokens: per-token NLL averaged over every answer
    token of the batch (what a causal LM returns with ``labels``), so longer answers weigh more. Added once per
    optimizer step, it needs no per-row averaging to be invariant to gradient accumulation."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    mask = answer_mask[:, 1:].flatten().to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


__all__ = ["IGNORE_INDEX", "AddAux", "answer_lm_loss", "answer_window", "floor_penalty", "match_penalty", "row_means",
           "sequence_mean"]
