"""``floor``: a squared hinge on each training sequence's mean projection falling below τ.

τ is a percentile of the default Assistant's per-answer mean projections (``floor_percentile``), so the penalty
reads the same statistic τ was calibrated on; a per-token hinge against a per-answer τ would be active on most
tokens of the base model itself, since single tokens scatter far more widely than answer means. It Goodharts in the
drift benchmark (the anchored layers stay put while behaviour drifts as far as unanchored), which is why it is not
the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anchor.loss import floor_penalty
from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


@register_method
class Floor(AnchorMethod):
    name = "floor"

    def penalty(self, engine: Anchor, layer: int, proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return floor_penalty(proj, engine.tau[layer], engine.gap[layer], mask)
