"""``ablate``: hold the persona directions at the default Assistant's values while training (concept ablation).

At each anchored layer, during training only, the activation's coordinates along the axis (and, with
``ablate_components`` = k > 1, along the top k−1 persona PCs) are replaced by the default Assistant mean's:
``h ← h − s·Bᵀ(B·h − B·d)`` with B an orthonormal basis of those directions, d the default mean at that layer and
s = λ × weight (1 = full ablation). The gradient cannot move the persona along directions the forward never sees;
ablating concept directions during fine-tuning cut emergent misalignment about tenfold with in-distribution
performance kept (CAFT, arXiv 2507.16795). Mean-ablating to the default, rather than to zero, keeps the base model's
own activations unchanged on those directions when it is at its default persona; ablating a few persona PCs blocks
rerouting into neighbouring directions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from anchor.methods.base import AnchorMethod, register_method

if TYPE_CHECKING:
    from anchor.engine import Anchor


def ablation_basis(axis: object, layer: int, k: int) -> torch.Tensor:
    """``[k, hidden]`` orthonormal rows: the unit axis, then the top k−1 persona PCs orthogonalised against it."""
    rows = [axis.unit[layer].float()]
    if k > 1:
        rows += list(axis.pca.components[layer, : k - 1].float())
    q, _ = torch.linalg.qr(torch.stack(rows).T)
    return q.T[: len(rows)] * torch.sign(q.T[0] @ rows[0])  # keep the axis's orientation in the first row


@register_method
class Ablate(AnchorMethod):
    name = "ablate"
    fields = ("ablate_components",)

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _basis(self, engine: Anchor, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, like.device, like.dtype)
        if key not in self._cache:
            basis = ablation_basis(engine.axis, layer, self.config.ablate_components)
            target = basis @ engine.axis.default_mean[layer].float()
            self._cache[key] = (basis.to(like.device, like.dtype), target.to(like.device, like.dtype))
        return self._cache[key]

    def edit(self, engine: Anchor, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        basis, target = self._basis(engine, layer, hidden)
        return hidden - ((hidden @ basis.T - target) @ basis) * (engine.weight * self.weight)
