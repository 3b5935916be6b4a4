"""``match``: every trained token's projection stays where the frozen reference puts it on the same tokens.

Two-sided, so an overshoot toward the Assistant costs as much as drift away. The reference reads each training
batch once more under ``no_grad`` (the adapter-disabled model with PEFT, a frozen copy otherwise), stopping after
the last anchored layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anchor.loss import match_penalty
from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


@register_method
class Match(AnchorMethod):
    name = "match"
    needs_reference = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._ref: dict[int, torch.Tensor] = {}

    def before_forward(self, engine: Anchor, inputs: dict[str, torch.Tensor]) -> None:
        self._ref = engine.forward(inputs, reference=True, layers=engine.layers)[1]

    def penalty(self, engine: Anchor, layer: int, proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        ref = self._ref.get(layer)
        if ref is None or ref.shape != proj.shape:
            return None
        return match_penalty(proj, ref, engine.gap[layer], mask)
