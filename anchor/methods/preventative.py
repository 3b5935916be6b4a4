"""``preventative``: steer away from the Assistant during training only, so fine-tuning need not move the weights.

Fine-tuning on role-like data pulls the model away from the Assistant. Adding that pull to the activations while
training (λ × weight × ``steer_coefficient`` × the layer's mean residual norm, along −û, at every anchored layer)
leaves the gradient no reason to learn it; once the hooks are gone the model sits where the Assistant was
(persona vectors' "preventative steering", arXiv 2507.21509). It is :class:`anchor.capping.Steer` with a negative
coefficient, applied by the engine on policy training passes only: never at evaluation, generation, or in the
reference and replay forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from anchor.capping import Steer
from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


def middle_third(n_layers: int) -> list[int]:
    """The middle third of a network of ``n_layers`` decoder layers, both ends included (10-20 of 30)."""
    return list(range(n_layers // 3, 2 * n_layers // 3 + 1))


@register_method
class Preventative(AnchorMethod):
    name = "preventative"
    fields = ("steer_coefficient",)

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._steer: Steer | None = None

    def layers(self, engine: Anchor) -> Sequence[int]:
        """The given ``layers``; by default the middle third of the network, where the drift benchmark measured
        it (SmolLM2's layers 10-20), not the narrow reading band the other methods default to."""
        return engine.layers if engine.layers_given else middle_third(engine.axis.n_layers)

    def edit(self, engine: Anchor, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.config.steer_coefficient:
            return None
        if self._steer is None:
            self._steer = Steer(None, engine.axis, -self.config.steer_coefficient, list(self.layers(engine)))
        return hidden + self._steer.vector(layer, hidden) * (engine.weight * self.weight)
