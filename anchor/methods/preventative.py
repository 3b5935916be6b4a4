"""``preventative``: steer away from the Assistant during training only, so fine-tuning need not move the weights.

Fine-tuning on role-like data pulls the model away from the Assistant. Adding that pull to the activations while
training (λ × weight × ``steer_coefficient`` × the layer's mean residual norm, along −û, at every anchored layer)
leaves the gradient no reason to learn it; once the hooks are gone the model sits where the Assistant was
(persona vectors' "preventative steering", arXiv 2507.21509). It is :class:`anchor.capping.Steer` with a negative
coefficient, applied by the engine on policy training passes only: never at evaluation, generation, or in the
reference and replay forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anchor.capping import Steer
from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


@register_method
class Preventative(AnchorMethod):
    name = "preventative"
    fields = ("steer_coefficient",)

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._steer: Steer | None = None

    def edit(self, engine: Anchor, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.config.steer_coefficient:
            return None
        if self._steer is None:
            self._steer = Steer(None, engine.axis, -self.config.steer_coefficient, engine.layers)
        return hidden + self._steer.vector(layer, hidden) * (engine.weight * self.weight)
