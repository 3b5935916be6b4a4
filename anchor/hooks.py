"""One hook mechanism for every reader and writer of the residual stream.

Extraction, the training loss, capping, steering and the drift monitor all do the same thing: run a function
on the output of some decoder layers. They share this module so there is one place that knows how decoder
layers return their output (a tensor in transformers 5, a tuple in older code and some families), how to
remove hooks reliably, and how to address layers by index.

Hooks sit on the decoder layer modules themselves. In transformers 5 the gradient-checkpointing wrapper
checkpoints ``forward`` only, so a module hook fires once per forward, not again on recompute.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from anchor.models import decoder_layers

# fn(layer_index, hidden [batch, seq, hidden]) -> replacement hidden, or None to leave the output unchanged.
LayerFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def check_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """Validate layer indices (0-based, one per decoder layer) and return them sorted and unique.

    Only whole numbers are layer indices. A string, a bool or a float is refused rather than converted: ``"21"``
    would otherwise read as layers 2 and 1, and ``1.7`` as layer 1.
    """
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise ValueError(f"layers={layers!r} must be a list of layer indices (whole numbers), e.g. [20, 21].")
    layers = sorted(set(_layer_index(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise ValueError(
            f"layers {bad or '[]'} are out of range: this model has {n_layers} decoder layers, numbered "
            f"0..{n_layers - 1}; layer i is the output of decoder layer i."
        )
    return layers


def _layer_index(value: object) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # int, and numpy or torch integers; never a float, a string or None
        except TypeError:
            pass
    raise ValueError(f"layer {value!r} ({type(value).__name__}) is not a layer index: give whole numbers, e.g. 21.")


class LayerHooks:
    """Forward hooks on a set of decoder layers, removable with :meth:`detach` or by leaving a ``with`` block."""

    def __init__(self, model: nn.Module, layers: Iterable[int], fn: LayerFn, layers_path: str | None = None):
        modules = decoder_layers(model, layers_path)
        self.layers = check_layers(layers, len(modules))
        self._handles = [modules[i].register_forward_hook(self._wrap(i, fn)) for i in self.layers]

    @staticmethod
    def _wrap(index: int, fn: LayerFn) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(index, hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


class ProjectionRecorder(LayerHooks):
    """Record each hooked layer's output projected on a unit vector per layer: after a forward, ``proj[layer]`` is
    ``[B, T]`` in float32 (on the CPU with ``to_cpu``). Hooks registered after an intervention (a cap) read its
    result, since hooks run in registration order. The one reader of projections outside training."""

    def __init__(self, model: nn.Module, unit: torch.Tensor, layers: Iterable[int], layers_path: str | None = None,
                 to_cpu: bool = False):
        self.proj: dict[int, torch.Tensor] = {}
        self._unit = unit.float()
        # Each layer's unit vector on the device its hidden state is on, copied there once: layers of one model may
        # sit on several devices (device_map), and a copy per layer per forward would be a host-to-device transfer.
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._to_cpu = to_cpu
        super().__init__(model, layers, self._record, layers_path)

    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        key = (layer, hidden.device)
        if key not in self._on_device:
            self._on_device[key] = self._unit[layer].to(hidden.device)
        values = hidden.detach().float() @ self._on_device[key]
        self.proj[layer] = values.cpu() if self._to_cpu else values
