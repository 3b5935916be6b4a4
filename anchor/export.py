"""Exporting the axis as a llama.cpp control vector (``llama-cli --control-vector FILE``).

A control vector is a GGUF file with architecture ``controlvector`` and one F32 tensor ``direction.N`` of the
model's width per steered layer. llama.cpp adds ``direction.N`` (times the strength given with
``--control-vector-scaled``, 1 by default) to the output of decoder layer ``N``, at every token position. Layers
are numbered from 0 as here, and layer 0 cannot be steered. In llama.cpp's source (ggml-org/llama.cpp):

* ``common/common.cpp``, ``common_control_vector_load_one``: tensors must be named ``direction.<N>`` with N > 0
  ("invalid (zero) direction tensor layer index"), be F32 and 1-D; direction N is stored at offset
  ``n_embd * (N - 1)``. Metadata keys are not read.
* ``src/llama-adapter.cpp``, ``llama_adapter_cvec``: "there's never a tensor for layer 0"; the slot at offset
  ``n_embd * (il - 1)`` becomes the tensor of layer ``il``, and ``apply_to(cur, il)`` adds it.
* ``src/models/*.cpp``: every architecture ends layer ``il`` with ``cur = build_cvec(cur, il)`` right before the
  ``l_out`` callback, i.e. on the decoder layer's output, which is what :mod:`anchor.hooks` hooks as layer ``il``.

So the file holds exactly what :func:`anchor.steer` adds: ``coeff · residual_norm[l] · v̂[l]`` at each layer ``l``.
It cannot hold a cap: llama.cpp only adds a constant, whatever the state, so a push strong enough to hold a
drifting conversation also shifts ordinary answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from anchor.axis import AssistantAxis
from anchor.capping import Steer
from anchor.hooks import check_layers
from anchor.io import atomic_write, check_output_file

ARCHITECTURE = "controlvector"


def control_vector(axis: AssistantAxis, coeff: float, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: vector}`` that :func:`anchor.steer` would add with ``coeff`` (default layer: the report layer)."""
    chosen = check_layers([axis.report_layer] if layers is None else layers, axis.n_layers)
    if 0 in chosen:
        raise ValueError("llama.cpp cannot steer layer 0 (it has no direction.0); choose layers from 1 on.")
    if not np.isfinite(coeff) or coeff == 0:
        raise ValueError(f"coeff={coeff} must be a finite, non-zero number (units of the layer's mean residual norm).")
    push = Steer(None, axis, coeff, chosen)
    return {i: push.vector(i, axis.unit[i].float()).clone() for i in chosen}


def export_control_vector(
    axis: AssistantAxis,
    path: str | os.PathLike,
    coeff: float,
    layers: list[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the axis as a llama.cpp control vector that steers toward the Assistant by ``coeff``; see the module.

    ``coeff`` is in units of each layer's mean residual norm, as for :func:`anchor.steer`. The file records the
    model type (``controlvector.model_hint``), the layer count, and the settings and model it came from.
    """
    import gguf

    path = check_output_file(path, "--out", overwrite)
    vectors = control_vector(axis, coeff, layers)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(axis.metadata.get("model_type") or ""))
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vectors))
        writer.add_string("anchor.model_id", str(axis.metadata.get("model_id") or ""))
        writer.add_string("anchor.fingerprint", str(axis.metadata.get("fingerprint") or ""))
        writer.add_float32("anchor.coeff", float(coeff))
        for layer, vector in vectors.items():
            writer.add_tensor(f"direction.{layer}", vector.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)
