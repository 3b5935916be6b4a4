"""Importing the Assistant Axis and capping settings published with Lu et al. 2026 (arXiv 2601.10387).

The paper's release ships, per model, ``assistant_axis.pt`` (a ``torch.save`` of a tensor ``[n_layers, hidden]``,
the default mean minus the role mean, bare or under the key ``axis`` of a dict that may carry metadata) and, for
Qwen 3 32B and Llama 3.3 70B, ``capping_config.pt``: a dict with ``vectors`` (name → ``{vector, layer}``) and
``experiments`` (a list of ``{id, interventions: [{vector, cap}]}``, ids like ``layers_46:54-p0.25``: layers 46 to
53, Python slice bounds, thresholds at the 25th percentile).

**Sign convention.** The release's code caps *from above* on the stored unit vector ``v̂``::

    h ← h − v̂ · max(0, ⟨h, v̂⟩ − τ)

so its capping vectors point away from the Assistant. This project floors the projection on a unit vector ``û``
that points toward the Assistant (:mod:`anchor.capping`): ``h ← h + û · max(0, τ' − ⟨h, û⟩)``. With ``û = −v̂``
and ``τ' = −τ`` the two are the same map. The import checks the sign on the data rather than trusting it: the
cosine of each capping vector with the published axis at its layer must be clearly negative (at most
``-SIGN_MARGIN``). A clearly positive cosine means the official code would put a *ceiling* on Assistant-likeness,
which no floor reproduces, and a cosine near zero leaves the sign undecided; both are refused.

At the capped layers the bundle's direction is the flipped capping vector, rescaled to the published axis's norm at
that layer, so :func:`anchor.cap` applies exactly the published operation; every other layer keeps the published
axis. An imported bundle carries no role vectors, projection quantiles, PCA or residual norms: what needs them
raises :class:`anchor.axis.MissingStatisticError`, naming the fix.

Files are read with ``torch.load(weights_only=True)`` only: tensors and plain containers, never arbitrary pickles.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PAPER = "Lu et al. 2026, The Assistant Axis (arXiv 2601.10387)"
SIGN_MARGIN = 0.5
"""|cos(capping vector, axis)| below which the capping vector's sign is called undecided."""
RECOMMENDED_EXPERIMENTS = ("layers_46:54-p0.25", "layers_56:72-p0.25")
"""The settings the release recommends: Qwen 3 32B and Llama 3.3 70B."""
_EXPERIMENT_ID = re.compile(r"^(?:layers_(?P<start>\d+):(?P<stop>\d+))?.*?-p(?P<fraction>\d*\.?\d+)$")


class OfficialFormatError(ValueError):
    """A file is not in the published release's format, or does not fit the model or the axis."""


@dataclass(frozen=True)
class OfficialCap:
    """One experiment of ``capping_config.pt`` converted to this project's floor convention.

    ``directions[layer]`` is the unit vector ``û = −v̂`` toward the Assistant and ``floors[layer]`` is ``τ' = −τ``;
    ``published`` keeps the release's ``τ`` and ``cosines`` the cosine of each capping vector with the axis.
    """

    experiment: str
    percentile: float
    directions: dict[int, torch.Tensor]
    floors: dict[int, float]
    published: dict[int, float]
    cosines: dict[int, float]

    @property
    def layers(self) -> list[int]:
        return sorted(self.floors)


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: a file needing arbitrary unpickling is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the release's assistant_axis.pt / capping_config.pt.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise OfficialFormatError(
            f"{path} is not a torch.save file of tensors and plain containers (read with weights_only=True, which "
            f"never runs pickled code): {str(err).splitlines()[0]}"
        ) from None


def read_axis(obj: Any, source: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``[n_layers, hidden]`` axis and the file's JSON-safe metadata, from a bare tensor or ``{"axis": ...}``."""
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        if "axis" not in obj:
            raise OfficialFormatError(f"{source} holds a dict with keys {sorted(map(str, obj))} but no 'axis'.")
        meta = {str(k): v for k, v in obj.items() if k != "axis" and _json_scalar(v)}
        obj = obj["axis"]
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or min(obj.shape) == 0:
        shape = list(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise OfficialFormatError(f"{source}: the axis must be a tensor [n_layers, hidden], got {shape}.")
    axis = obj.detach().float().contiguous()
    if not torch.isfinite(axis).all() or (axis.norm(dim=-1) == 0).any():
        raise OfficialFormatError(f"{source}: the axis has a zero or non-finite layer.")
    return axis, meta


def _json_scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def parse_experiment(experiment: str) -> tuple[range | None, float]:
    """The layer range (``None`` when the id names none) and the percentile (0–100) an experiment id states."""
    match = _EXPERIMENT_ID.match(experiment)
    if not match:
        raise OfficialFormatError(
            f"experiment id {experiment!r} does not state its percentile; the release's ids look like "
            "'layers_46:54-p0.25' (layers 46-53, threshold at the 25th percentile)."
        )
    percentile = round(100 * float(match["fraction"]), 6)  # 0.1 → 10.0, not 10.000000000000002
    if not 0 <= percentile <= 100:
        raise OfficialFormatError(f"experiment id {experiment!r} states a percentile outside 0..100.")
    if match["start"] is None:
        return None, percentile
    return range(int(match["start"]), int(match["stop"])), percentile


def choose_experiment(experiments: list[dict], experiment: str | None, source: str) -> dict:
    """The named experiment; by default the only one, else the release's recommended one if present."""
    ids = [e.get("id") for e in experiments]
    if experiment is None:
        recommended = [i for i in ids if i in RECOMMENDED_EXPERIMENTS]
        if len(ids) == 1 or len(recommended) == 1:
            experiment = ids[0] if len(ids) == 1 else recommended[0]
        else:
            raise OfficialFormatError(f"{source} has {len(ids)} experiments; choose one with experiment=: {ids}")
    if ids.count(experiment) != 1:
        raise OfficialFormatError(f"{source} has no single experiment {experiment!r}; its ids are {ids}.")
    return experiments[ids.index(experiment)]


def read_capping(obj: Any, axis: torch.Tensor, experiment: str | None, source: str) -> OfficialCap:
    """Convert one experiment of ``capping_config.pt`` to floors on ``û = −v̂``, checking the sign on ``axis``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("vectors"), dict) or not isinstance(
            obj.get("experiments"), list) or not obj["experiments"]:
        raise OfficialFormatError(
            f"{source} must be a dict with 'vectors' ({{name: {{vector, layer}}}}) and a non-empty 'experiments' "
            "list ([{id, interventions: [{vector, cap}]}])."
        )
    chosen = choose_experiment(obj["experiments"], experiment, source)
    name = chosen["id"]
    band, percentile = parse_experiment(name)
    interventions = chosen.get("interventions")
    if not isinstance(interventions, list) or not interventions:
        raise OfficialFormatError(f"{source}: experiment {name!r} has no 'interventions' list.")
    directions: dict[int, torch.Tensor] = {}
    floors: dict[int, float] = {}
    published: dict[int, float] = {}
    cosines: dict[int, float] = {}
    for item in interventions:
        layer, vector, tau = _intervention(obj["vectors"], item, axis.shape, f"{source}, experiment {name!r}")
        if layer in floors:
            raise OfficialFormatError(f"{source}: experiment {name!r} caps layer {layer} twice; one floor per layer.")
        unit = vector / vector.norm()
        cos = float(unit @ axis[layer] / axis[layer].norm())
        if cos > -SIGN_MARGIN:
            raise OfficialFormatError(_sign_message(source, name, layer, cos))
        directions[layer], floors[layer], published[layer], cosines[layer] = -unit, -tau, tau, cos
    if band is not None and sorted(floors) != list(band):
        raise OfficialFormatError(
            f"{source}: experiment {name!r} names layers {band.start}-{band.stop - 1} but its interventions cap "
            f"layers {sorted(floors)}; the file is inconsistent."
        )
    return OfficialCap(name, percentile, directions, floors, published, cosines)


def _intervention(vectors: dict, item: Any, shape: torch.Size, where: str) -> tuple[int, torch.Tensor, float]:
    """``(layer, vector, cap)`` of one intervention, validated against the axis's shape."""
    if not isinstance(item, dict) or "vector" not in item or "cap" not in item:
        raise OfficialFormatError(f"{where}: an intervention must be {{'vector': name, 'cap': float}}, got {item!r}.")
    entry = vectors.get(item["vector"])
    if not isinstance(entry, dict) or "vector" not in entry or "layer" not in entry:
        raise OfficialFormatError(f"{where}: vector {item['vector']!r} is not in 'vectors' as {{vector, layer}}.")
    layer, vector, tau = entry["layer"], entry["vector"], item["cap"]
    if isinstance(layer, torch.Tensor) and layer.numel() == 1:
        layer = layer.item()
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()
    if not isinstance(layer, int) or not 0 <= layer < shape[0]:
        raise OfficialFormatError(f"{where}: vector {item['vector']!r} has layer {layer!r}; the axis has {shape[0]}.")
    if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (shape[1],):
        got = list(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise OfficialFormatError(f"{where}: vector {item['vector']!r} must be [{shape[1]}] like the axis, got {got}.")
    vector = vector.detach().float()
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or not torch.isfinite(vector).all() or not (
            vector.norm() > 0):
        raise OfficialFormatError(f"{where}: vector {item['vector']!r} or its cap {tau!r} is zero or not finite.")
    return layer, vector, float(tau)


def _sign_message(source: str, experiment: str, layer: int, cos: float) -> str:
    if cos >= SIGN_MARGIN:
        return (
            f"{source}, experiment {experiment!r}: the capping vector at layer {layer} points toward the Assistant "
            f"(cosine with the axis {cos:+.3f}). The official code caps from above, so this would be a ceiling on "
            "Assistant-likeness, which a floor cannot reproduce. Check that the axis and capping files belong "
            "together and were not re-signed."
        )
    return (
        f"{source}, experiment {experiment!r}: the capping vector at layer {layer} has cosine {cos:+.3f} with the "
        f"axis, within ±{SIGN_MARGIN}, so whether it points away from the Assistant cannot be decided. Check that "
        "the axis and capping files come from the same model's release."
    )


def model_shape(model: nn.Module | str | os.PathLike) -> tuple[int, int, dict[str, Any]]:
    """``(n_layers, hidden, metadata)`` of a loaded model, or of a model name/path read from its config only."""
    from anchor.models import decoder_layers, fingerprint, load_config, model_id, unwrap

    if isinstance(model, nn.Module):
        config = unwrap(model).config
        n_layers = len(decoder_layers(model))
        meta = {"model_id": model_id(model), "fingerprint": fingerprint(model)}
    else:
        config = load_config(model)
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        meta = {"model_id": str(model)}
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not n_layers or not hidden:
        raise OfficialFormatError(f"Cannot read the layer count and width from {type(config).__name__}.")
    return int(n_layers), int(hidden), {**meta, "model_type": config.model_type}


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_official(
    axis_file: str | os.PathLike,
    capping_file: str | os.PathLike | None = None,
    experiment: str | None = None,
    model: nn.Module | str | os.PathLike | None = None,
) -> Any:
    """Build an :class:`~anchor.axis.AssistantAxis` from the release's files; see the module docstring.

    ``model`` (a loaded model, or a name/path whose config is read) checks the shapes and fills the bundle's
    model fields; without it the bundle records only what the files say.
    """
    from anchor.axis import AssistantAxis, _version

    if experiment is not None and capping_file is None:
        raise ValueError("experiment= selects a setting inside capping_file; pass capping_file too.")
    axis, file_meta = read_axis(load_file(axis_file), str(axis_file))
    n_layers, hidden = axis.shape
    model_meta: dict[str, Any] = {}
    if model is not None:
        want_layers, want_hidden, model_meta = model_shape(model)
        if (want_layers, want_hidden) != (n_layers, hidden):
            raise OfficialFormatError(
                f"{axis_file} is [{n_layers}, {hidden}] but {model_meta['model_id']!r} has {want_layers} decoder "
                f"layers of width {want_hidden}: the file was released for another model."
            )
    provenance: dict[str, Any] = {
        "paper": PAPER, "axis_file": str(Path(axis_file).resolve()), "axis_sha256": sha256(axis_file),
        "axis_file_metadata": file_meta,
    }
    metadata: dict[str, Any] = {
        "model_id": "", "model_type": None, **model_meta, "n_layers": n_layers, "hidden_size": hidden,
        "report_layer": n_layers // 2, "anchor_version": _version(), "imported_from": provenance,
    }
    if capping_file is not None:
        official = read_capping(load_file(capping_file), axis, experiment, str(capping_file))
        for layer, direction in official.directions.items():
            axis[layer] = direction * axis[layer].norm()
        provenance.update(
            capping_file=str(Path(capping_file).resolve()), capping_sha256=sha256(capping_file),
            experiment=official.experiment, capping_cosines={str(k): v for k, v in official.cosines.items()},
            convention="official h ← h − v̂·max(0, v̂·h − τ) stored as a floor on û = −v̂ at τ' = −τ; at the "
                       "capped layers the axis direction is û",
        )
        metadata["cap"] = {
            "layers": official.layers, "percentile": official.percentile,
            "tau": {str(k): v for k, v in official.floors.items()},
            "published_tau": {str(k): v for k, v in official.published.items()},
            "source": f"{PAPER}, experiment {official.experiment}",
        }
    return AssistantAxis(axis=axis, metadata=metadata)
