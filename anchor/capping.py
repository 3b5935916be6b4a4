"""Run-time persona control: a floor on the Assistant-Axis projection (capping) and a constant push (steering).

**Capping** (Lu et al. 2026) keeps a model in its Assistant persona without changing its weights: at every token
position of a band of decoder layers, a hidden state whose projection on the unit axis ``v̂`` falls below a
threshold ``τ`` is lifted back to it along ``v̂``::

    h ← h + v̂ · max(τ − ⟨h, v̂⟩, 0)

Tokens already above the floor pass through bit-identical, so ordinary Assistant text is barely touched while
role-drifted states are pulled back into the Assistant's normal range. The paper capped layers 46–53 of 64
(Qwen3-32B) and 56–71 of 80 (Llama-3.3-70B): roughly 70%–85% of depth, which is the default band here.

**Steering** adds ``coeff · residual_norm[l] · v̂`` at every position. ``coeff`` is in units of the layer's
mean residual norm (measured on default answers when the axis was computed), so a setting carries over between
models of different width and depth; positive moves toward the Assistant, negative away from it.

Both are forward hooks installed through :class:`anchor.hooks.LayerHooks`, so they work with ``generate`` and
its KV cache (each new token is capped as it is computed, and the cached keys and values downstream were
computed from capped states), with left-padded batches, with PEFT-wrapped models and in fp32, bf16 and fp16.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from anchor.axis import AssistantAxis
from anchor.hooks import LayerHooks, check_layers

DEFAULT_BAND = (0.70, 0.85)
"""Default capped band as fractions of depth: the paper's two published settings both sit at about 70%–85%."""

DEFAULT_PERCENTILE = 25.0
"""Default floor: the 25th percentile of per-answer mean projections of the model's own default answers.

Three quarters of ordinary Assistant answers sit above it on average, so capping at it leaves typical
Assistant behaviour nearly alone, while role-played or drifted states (whose projections sit far below, near
the role distribution) are lifted to the low end of the Assistant's own range. It plays the part of the paper's
threshold ("a percentile near the mean Assistant response over a pool that is mostly role-play"), expressed on
the default distribution because the role pool's make-up differs between bundles. Individual tokens vary more
than answer means, so more than a quarter of Assistant tokens can fall below it; ``anchor calibrate`` measures
that cost and stores a setting per model, which then replaces this default.
"""


def band_layers(n_layers: int, start: float, stop: float) -> list[int]:
    """Decoder layers from ``start`` to ``stop`` as fractions of depth (at least one layer, never past the end)."""
    if not 0 <= start < stop <= 1:
        raise ValueError(f"band fractions ({start}, {stop}) must satisfy 0 <= start < stop <= 1.")
    first = min(int(start * n_layers), n_layers - 1)
    end = min(max(first + 1, math.ceil(stop * n_layers)), n_layers)
    return list(range(first, end))


def calibrated_setting(axis: AssistantAxis) -> dict | None:
    """The capping setting ``anchor calibrate`` stored in the bundle, if any."""
    return axis.metadata.get("cap") or None


def default_cap_layers(axis: AssistantAxis) -> list[int]:
    """The calibrated band if the bundle has one, else :data:`DEFAULT_BAND` of the axis's depth."""
    setting = calibrated_setting(axis)
    if setting:
        return [int(i) for i in setting["layers"]]
    return band_layers(axis.n_layers, *DEFAULT_BAND)


def default_cap_percentile(axis: AssistantAxis) -> float:
    """The calibrated percentile if the bundle has one, else :data:`DEFAULT_PERCENTILE`."""
    setting = calibrated_setting(axis)
    return float(setting["percentile"]) if setting else DEFAULT_PERCENTILE


class _Intervention:
    """Hooks on some decoder layers that write along the axis.

    ``vectors[layer]`` (float32) is copied once per device and dtype it is used in, not on every forward.
    """

    def __init__(self, model: nn.Module | None, axis: AssistantAxis, vectors: dict[int, torch.Tensor]):
        """``model=None`` builds the edit without hooks, for a caller that runs it from its own hooks (the training
        engine applies preventative steering on policy training passes only)."""
        self.layers = sorted(vectors)
        self._vectors = vectors
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._hooks = LayerHooks(model, self.layers, self.apply, axis.metadata.get("layers_path")) \
            if model is not None else None

    def _vector(self, layer: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (layer, like.device, dtype)
        if key not in self._cache:
            self._cache[key] = self._vectors[layer].to(device=like.device, dtype=dtype)
        return self._cache[key]

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with the intervention applied."""
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return self._hooks is not None and self._hooks.attached

    def detach(self) -> None:
        """Remove the hooks; the model computes exactly what it did before."""
        if self._hooks is not None:
            self._hooks.detach()

    def __enter__(self) -> _Intervention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class Cap(_Intervention):
    """An attached projection floor. ``tau[layer]`` is the floor at each capped layer; see :func:`attach_cap`."""

    def __init__(self, model: nn.Module, axis: AssistantAxis, tau: dict[int, float], percentile: float | None):
        self.tau = tau
        self.percentile = percentile
        super().__init__(model, axis, {i: axis.unit[i].float() for i in tau})

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # The clamp runs in float32 so bf16/fp16 rounding cannot decide which tokens are below the floor; tokens
        # above it are copied through untouched (torch.where), not re-rounded by adding a zero.
        unit = self._vector(layer, hidden, torch.float32)
        h32 = hidden.float()
        deficit = (self.tau[layer] - h32 @ unit).clamp_(min=0).unsqueeze(-1)
        lifted = torch.addcmul(h32, deficit, unit).to(hidden.dtype)
        return torch.where(deficit > 0, lifted, hidden)

    def __repr__(self) -> str:
        return f"Cap(layers={self.layers}, percentile={self.percentile}, attached={self.attached})"


class Steer(_Intervention):
    """An attached constant push along the axis; ``shift[layer]`` is the added projection at each layer.

    By default the push at each layer is ``coeff · residual_norm[l] · v̂_l``. ``cumulative=True`` adds the raw axis
    layer-incrementally instead: ``coeff · (axis[l] − axis[previous layer])`` at each layer (0 before the first), so the
    total push the residual stream carries at layer ``l`` is ``coeff · axis[l]``, ``coeff`` default-to-role gaps,
    and pushes at consecutive layers do not pile up (persona vectors' multi-layer steering, arXiv 2507.21509 App.
    J.3).
    """

    def __init__(self, model: nn.Module | None, axis: AssistantAxis, coeff: float, layers: list[int],
                 cumulative: bool = False):
        self.coeff = float(coeff)
        self.cumulative = cumulative
        if cumulative:
            raw, order = axis.axis.float(), sorted(layers)
            previous = {i: raw[j] for j, i in itertools.pairwise(order)}
            vectors = {i: self.coeff * (raw[i] - previous.get(i, 0.0)) for i in layers}
            self.shift = {i: float(v @ axis.unit[i].float()) for i, v in vectors.items()}
        else:
            self.shift = {i: self.coeff * float(axis.residual_norm[i]) for i in layers}
            vectors = {i: axis.unit[i].float() * self.shift[i] for i in layers}
        super().__init__(model, axis, vectors)

    def vector(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """The vector added at ``layer``, on ``like``'s device and in its dtype."""
        return self._vector(layer, like, like.dtype)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.vector(layer, hidden)

    def __repr__(self) -> str:
        return f"Steer(coeff={self.coeff}, layers={self.layers}, attached={self.attached})"


def _floor(value: object, name: str) -> float:
    """A floor as a finite float. NaN would cap nothing (every comparison with it is false) and an infinite floor
    would lift every state to infinity, so both are refused, as are strings and bools."""
    number = None if isinstance(value, str | bytes | bool) else _as_float(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}={value!r} must be a finite number (a projection on the axis, e.g. "
                         "axis.tau(layer, 25)); or leave tau out and pass percentile=.")
    return number


def _as_float(value: object) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _resolve_tau(
    axis: AssistantAxis,
    layers: Iterable[int] | None,
    tau: float | Mapping[int, float] | None,
    percentile: float | None,
) -> tuple[dict[int, float], float | None]:
    """Per-layer floors from an explicit ``tau`` or from a percentile of the axis's default projections."""
    if tau is not None and percentile is not None:
        raise ValueError("Pass either tau (explicit floors) or percentile (floors read from the axis), not both.")
    if isinstance(tau, Mapping):
        chosen = check_layers(tau if layers is None else layers, axis.n_layers)
        missing = [i for i in chosen if i not in tau]
        if missing:
            raise ValueError(f"tau has no floor for layers {missing}; give one per capped layer, or a single float.")
        return {i: _floor(tau[i], f"tau[{i}]") for i in chosen}, None
    setting = calibrated_setting(axis)
    if tau is None and percentile is None and layers is None and setting and setting.get("tau"):
        # The stored setting's own floors (``anchor calibrate``, or an imported published setting).
        return {int(i): _floor(v, f"tau[{i}]") for i, v in setting["tau"].items()}, float(setting["percentile"])
    chosen = check_layers(default_cap_layers(axis) if layers is None else layers, axis.n_layers)
    if tau is not None:
        floor = _floor(tau, "tau")
        return {i: floor for i in chosen}, None
    p = default_cap_percentile(axis) if percentile is None else float(percentile)
    if not 0 <= p <= 100:
        raise ValueError(f"percentile={p} must be within 0..100 (a percentile of default-answer projections).")
    return {i: axis.tau(i, p) for i in chosen}, p


def attach_cap(
    model: nn.Module,
    axis: AssistantAxis,
    layers: Iterable[int] | None = None,
    tau: float | Mapping[int, float] | None = None,
    percentile: float | None = None,
    check_weights: bool = True,
) -> Cap:
    """Floor the axis projection at ``layers`` until :meth:`Cap.detach` or the end of a ``with`` block (also
    exported as :func:`cap`: ``with anchor.cap(model, axis): model.generate(...)``).

    ``layers`` defaults to the bundle's calibrated band (``anchor calibrate``), else :data:`DEFAULT_BAND` of
    depth. Floors come from ``tau`` (one float for every layer, or ``{layer: floor}``) or from ``percentile``
    (0–100) of the axis's default-answer projections at each layer: the calibrated percentile, else
    :data:`DEFAULT_PERCENTILE`. ``check_weights=False`` accepts a fine-tune of the model the axis came from.
    """
    axis.check_compatible(model, check_weights=check_weights)
    floors, p = _resolve_tau(axis, layers, tau, percentile)
    return Cap(model, axis, floors, p)


def attach_steer(
    model: nn.Module,
    axis: AssistantAxis,
    coeff: float,
    layers: Iterable[int] | None = None,
    check_weights: bool = True,
) -> Steer:
    """Add ``coeff · residual_norm[l] · v̂`` at every position of ``layers`` until :meth:`Steer.detach` or the end of
    a ``with`` block (also exported as :func:`steer`).

    ``layers`` defaults to the axis's report layer (the middle of the network): one layer is enough to move
    the persona, and the middle is where the axis separates personas best; pushing at many layers compounds.
    """
    axis.check_compatible(model, check_weights=check_weights)
    if not math.isfinite(coeff):
        raise ValueError(f"coeff={coeff} must be a finite number (units of the layer's mean residual norm).")
    chosen = check_layers([axis.report_layer] if layers is None else layers, axis.n_layers)
    return Steer(model, axis, coeff, chosen)


# The handles are context managers that detach on exit, so ``with cap(model, axis): model.generate(...)`` and
# ``handle = cap(model, axis); ...; handle.detach()`` are the same call.
cap = attach_cap
steer = attach_steer
