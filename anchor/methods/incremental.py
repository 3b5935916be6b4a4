"""``incremental``: preventative steering at every layer, layer-incrementally.

At each layer ℓ it adds −k·(axis[ℓ] − axis[ℓ−1]) during training only, so the push the residual stream carries at
layer ℓ is −k·axis[ℓ]: k default-to-role gaps away from the Assistant at every depth, with no pile-up of the pushes
(``preventative`` adds a full vector at each anchored layer, so its pushes add up along the band). Persona-vector
work found this multi-layer form kept traits near baseline with smaller coefficients than single-layer steering
(arXiv 2507.21509, App. J.3). It is :class:`anchor.capping.Steer` with ``cumulative=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from anchor.capping import Steer
from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


@register_method
class Incremental(AnchorMethod):
    name = "incremental"
    fields = ("incremental_coefficient",)

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._steer: Steer | None = None

    def layers(self, engine: Anchor) -> Sequence[int]:
        return range(engine.axis.n_layers)

    def edit(self, engine: Anchor, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if not self.config.incremental_coefficient:
            return None
        if self._steer is None:
            self._steer = Steer(None, engine.axis, -self.config.incremental_coefficient, list(self.layers(engine)),
                                cumulative=True)
        return hidden + self._steer.vector(layer, hidden) * (engine.weight * self.weight)
