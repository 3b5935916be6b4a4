"""The Assistant Axis bundle: what extraction learned about a model's persona space, per layer.

The axis at layer ``l`` is ``mean(default answers) − mean over roles(mean(role answers))``, each role weighted
equally (Lu et al. 2026). The bundle also keeps what the consumers downstream need so they never re-extract:
projection quantiles (capping thresholds and training floors are chosen from them), the persona-space PCA (for
plots and for choosing layers), mean residual norms (steering strengths are given relative to them) and a
fingerprint of the model it was computed on. It is saved as safetensors plus JSON, never pickle.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from anchor.extract import DEFAULT_KEY, ExtractionSettings, Persona, extract, load_shard
from anchor.hooks import check_layers
from anchor.io import atomic_write, atomic_write_text
from anchor.models import decoder_layers, fingerprint, model_id, unwrap
from anchor.personas import load_default_prompts, load_questions, load_roles

FORMAT_VERSION = 1
WEIGHTS_NAME = "axis.safetensors"
CONFIG_NAME = "axis_config.json"
QUANTILE_LEVELS = torch.arange(101, dtype=torch.float32) / 100  # percentiles 0..100
PCA_COMPONENTS = 10


class AxisMismatchError(ValueError):
    """The bundle was computed on a different model than the one it is being applied to."""


class MissingStatisticError(ValueError):
    """The bundle lacks a statistic (role vectors, quantiles, PCA, residual norms): it was imported, not computed."""


class Missing:
    """Stands in for a statistic an imported bundle does not have (``anchor import-axis``).

    Any use of it (indexing, an attribute, arithmetic) raises :class:`MissingStatisticError` naming the
    statistic and the fix, so every consumer fails with that message instead of a ``TypeError`` on ``None``.
    """

    def __init__(self, what: str):
        self.what = what

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Missing({self.what!r})"

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # copy/pickle protocol lookups must see an ordinary missing attribute
            raise AttributeError(name)
        self.fail()

    def fail(self, *_args: object) -> None:
        raise MissingStatisticError(
            f"This axis bundle has no {self.what}: it was imported from published vectors (anchor import-axis), "
            "which carry the axis and capping floors only. Compute a full bundle for this model (anchor axis "
            "--model M --out DIR), or give the values explicitly (e.g. cap(model, axis, tau=...))."
        )

    __getitem__ = __iter__ = __len__ = __float__ = __matmul__ = __rmatmul__ = __mul__ = __rmul__ = fail


@dataclass
class PersonaSpace:
    """Mean-centred PCA of the role vectors at every layer (no variance scaling).

    PC1's sign is fixed so the default Assistant has a positive coordinate: plots and cosines with the axis are
    then comparable across layers and runs.
    """

    components: torch.Tensor  # [n_layers, k, hidden], unit rows
    explained: torch.Tensor  # [n_layers, k], explained-variance ratio
    role_coords: torch.Tensor  # [n_roles, n_layers, k]
    default_coords: torch.Tensor  # [n_layers, k]
    center: torch.Tensor  # [n_layers, hidden], the mean role vector

    @classmethod
    def fit(cls, role_vectors: torch.Tensor, default_mean: torch.Tensor, k: int = PCA_COMPONENTS) -> PersonaSpace:
        center = role_vectors.mean(dim=0)
        x = (role_vectors - center).transpose(0, 1)  # [L, R, H]
        _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        k = min(k, vh.shape[1])
        comps = vh[:, :k].float()
        var = s.double() ** 2
        explained = (var[:, :k] / var.sum(dim=1, keepdim=True).clamp(min=1e-30)).float()
        default_coords = torch.einsum("lh,lkh->lk", default_mean - center, comps)
        sign = torch.where(default_coords[:, :1] < 0, -1.0, 1.0)  # [L, 1]
        comps[:, 0] *= sign
        default_coords[:, 0] *= sign[:, 0]
        role_coords = torch.einsum("rlh,lkh->rlk", role_vectors - center, comps)
        return cls(comps.contiguous(), explained, role_coords, default_coords, center)


@dataclass
class AssistantAxis:
    """Per-layer Assistant Axis of one model, with the statistics its consumers need.

    Layers are numbered from 0; the value at layer ``i`` is the output of decoder layer ``i``.
    """

    axis: torch.Tensor  # [n_layers, hidden], raw
    # An imported bundle (AssistantAxis.from_official) has the axis only: the statistics below are then Missing.
    default_mean: torch.Tensor | Missing = field(default_factory=lambda: Missing("default mean"))  # [n_layers, hidden]
    role_vectors: torch.Tensor | Missing = field(default_factory=lambda: Missing("role vectors"))  # [n_roles, L, H]
    role_names: list[str] = field(default_factory=list)
    # {"default", "roles"}: [n_layers, 101], per-answer mean projections
    quantiles: dict[str, torch.Tensor] | Missing = field(default_factory=lambda: Missing("projection quantiles"))
    # [n_layers], mean per-token residual norm of default answers
    residual_norm: torch.Tensor | Missing = field(default_factory=lambda: Missing("mean residual norms"))
    pca: PersonaSpace | Missing = field(default_factory=lambda: Missing("persona-space PCA"))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        norms = self.axis.norm(dim=-1, keepdim=True)
        if not torch.isfinite(self.axis).all() or (norms == 0).any():
            raise ValueError("The axis has a zero or non-finite layer; the extraction produced no usable answers.")
        self.unit = self.axis / norms

    @property
    def n_layers(self) -> int:
        return self.axis.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.axis.shape[1]

    @property
    def imported(self) -> bool:
        """True for a bundle made from published vectors (:meth:`from_official`): it has the axis only."""
        return "imported_from" in self.metadata

    @property
    def report_layer(self) -> int:
        """The layer monitors and reports read by default: the middle of the network."""
        return int(self.metadata.get("report_layer", self.n_layers // 2))

    def project(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Projection of ``hidden[..., hidden_size]`` on the unit axis at ``layer`` (higher = more Assistant)."""
        unit = self.unit[layer].to(device=hidden.device, dtype=hidden.dtype)
        return hidden @ unit

    def tau(self, layer: int, percentile: float, source: str = "default") -> float:
        """The ``percentile`` (0-100) of per-answer projections of ``source`` ("default" or "roles") answers
        (an imported bundle has none, and says so)."""
        layer = check_layers([layer], self.n_layers)[0]
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile={percentile} must be within 0..100.")
        if source not in ("default", "roles"):
            raise ValueError(f"source={source!r} must be 'default' or 'roles'.")
        q = self.quantiles[source][layer]
        pos = percentile  # levels are whole percentiles: interpolate linearly between them
        lo, hi = int(pos), min(int(pos) + 1, 100)
        return float(q[lo] + (q[hi] - q[lo]) * (pos - lo))

    def role_projections(self, layer: int) -> torch.Tensor:
        return self.role_vectors[:, layer] @ self.unit[layer]

    def default_projection(self, layer: int) -> float:
        return float(self.default_mean[layer] @ self.unit[layer])

    def gap(self, layer: int) -> float:
        """The default-to-role gap at ``layer``: ``‖axis[layer]‖``, the projection of the default mean minus that of
        the mean role (the raw axis is their difference). The unit every anchor distance is measured in, so one
        unit means "as far as the average role is from the Assistant" on every model."""
        return float(self.axis[layer].norm())

    def pc1_cosine(self) -> torch.Tensor:
        """cosine(axis, PC1) per layer: how well the axis lines up with the main direction of persona space."""
        return torch.einsum("lh,lh->l", self.unit, self.pca.components[:, 0])

    def check_compatible(self, model: nn.Module, check_weights: bool = True) -> None:
        """Refuse a model whose layer count, hidden size or fingerprint differs from the one the axis came from.

        ``check_weights=False`` skips the fingerprint, for a model that is the bundle's model being fine-tuned.
        """
        base = unwrap(model)
        n_layers = len(decoder_layers(model, self.metadata.get("layers_path")))
        hidden = getattr(base.config, "hidden_size", None) or getattr(base.config, "n_embd", None)
        source = self.metadata.get("model_id", "?")
        if n_layers != self.n_layers:
            raise AxisMismatchError(
                f"The axis has {self.n_layers} layers but the model has {n_layers} decoder layers: it was computed "
                f"on {source!r}, another architecture. Compute an axis for this model (anchor axis --model ...)."
            )
        if hidden != self.hidden_size:
            raise AxisMismatchError(
                f"The axis has hidden size {self.hidden_size} but the model has {hidden}: it was computed on "
                f"{source!r}. Compute an axis for this model (anchor axis --model ...)."
            )
        expected = self.metadata.get("fingerprint")
        if check_weights and expected and (actual := fingerprint(model)) != expected:
            if actual.startswith("cfg-") or expected.startswith("cfg-"):
                return  # weights are sharded away (ZeRO-3): only the shape checks above can run
            raise AxisMismatchError(
                f"Model fingerprint {actual} differs from the axis's {expected} (computed on {source!r}): same "
                "shape, different config or weights, so its directions do not apply. Compute an axis for this "
                "model, or pass check_weights=False if this model is a fine-tune of the bundle's model."
            )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``axis.safetensors`` and ``axis_config.json`` into ``directory`` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"axis": self.axis} if self.imported else {
            "axis": self.axis, "default_mean": self.default_mean, "role_vectors": self.role_vectors,
            "quantiles.default": self.quantiles["default"], "quantiles.roles": self.quantiles["roles"],
            "residual_norm": self.residual_norm, **{f"pca.{k}": v for k, v in asdict_tensors(self.pca).items()},
        }
        config = {"format_version": FORMAT_VERSION, "role_names": self.role_names, "metadata": self.metadata}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))

    @classmethod
    def from_official(
        cls,
        axis_file: str | os.PathLike,
        capping_file: str | os.PathLike | None = None,
        experiment: str | None = None,
        model: nn.Module | str | os.PathLike | None = None,
    ) -> AssistantAxis:
        """The axis (and capping setting) published with Lu et al. 2026, converted; see :mod:`anchor.official`.

        ``model`` (loaded, or a name/path whose config is read) checks the shapes before anything is built.
        """
        from anchor.official import import_official

        return import_official(axis_file, capping_file, experiment, model)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AssistantAxis:
        directory = Path(directory)
        weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        if not weights.is_file() or not config_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not an axis bundle: it needs {WEIGHTS_NAME} and {CONFIG_NAME}. Create one with "
                "`anchor axis --model M --out DIR` or AssistantAxis.save_pretrained."
            )
        config = _read_json_object(config_path)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {config.get('format_version')}; this anchor reads "
                f"{FORMAT_VERSION}. Recompute the axis with this version."
            )
        imported = "imported_from" in _require(config_path, config, "metadata")
        t = _read_tensors(weights, ("axis",) if imported else _BUNDLE_TENSORS)
        if imported:
            return cls(axis=t["axis"], metadata=config["metadata"])
        _check_consistent(directory, _require(config_path, config, "role_names"), t)
        pca = PersonaSpace(**{k[4:]: v for k, v in t.items() if k.startswith("pca.")})
        return cls(
            axis=t["axis"], default_mean=t["default_mean"], role_vectors=t["role_vectors"],
            role_names=config["role_names"],
            quantiles={"default": t["quantiles.default"], "roles": t["quantiles.roles"]},
            residual_norm=t["residual_norm"], pca=pca, metadata=config["metadata"],
        )


_BUNDLE_TENSORS = ("axis", "default_mean", "role_vectors", "quantiles.default", "quantiles.roles", "residual_norm",
                   "pca.components", "pca.explained", "pca.role_coords", "pca.default_coords", "pca.center")
_DAMAGED = "the bundle is damaged: copy it again, or recompute it (anchor axis --model M --out DIR)"


def _read_json_object(path: Path) -> dict:
    """A bundle's JSON file as a dict; anything else is refused with the file's name."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {_DAMAGED}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; {_DAMAGED}.")
    return value


def _require(path: Path, config: dict, key: str) -> object:
    if key not in config:
        raise ValueError(f"{path} has no {key!r} entry; {_DAMAGED}.")
    return config[key]


def _read_tensors(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The bundle's tensors; a truncated or damaged file, or one missing a tensor, is refused with its name."""
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} cannot be read ({err}): it is truncated or damaged; {_DAMAGED}.") from None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensors {missing}; {_DAMAGED}.")
    return tensors


def _check_consistent(directory: Path, role_names: object, t: dict[str, torch.Tensor]) -> None:
    """Refuse a bundle whose names and tensors disagree (files edited, or mixed from two bundles)."""
    if t["axis"].dim() != 2 or t["role_vectors"].dim() != 3:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds an axis of shape {list(t['axis'].shape)} (expected "
                         f"[layers, hidden]); {_DAMAGED}.")
    (n_layers, hidden), n_roles, levels = t["axis"].shape, t["role_vectors"].shape[0], len(QUANTILE_LEVELS)
    problems = []
    if not isinstance(role_names, list) or not all(isinstance(n, str) for n in role_names):
        problems.append("role_names is not a list of names")
    elif len(role_names) != n_roles or len(set(role_names)) != len(role_names):
        problems.append(f"{len(role_names)} role_names ({len(set(role_names))} distinct) for {n_roles} role vectors")
    shapes = {"default_mean": (n_layers, hidden), "role_vectors": (n_roles, n_layers, hidden),
              "quantiles.default": (n_layers, levels), "quantiles.roles": (n_layers, levels),
              "residual_norm": (n_layers,)}
    problems += [f"{name} has shape {list(t[name].shape)}, expected {list(shape)}"
                 for name, shape in shapes.items() if tuple(t[name].shape) != shape]
    if problems:
        raise ValueError(f"{directory} is not a consistent axis bundle: {'; '.join(problems)}. Its {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME} do not belong together; {_DAMAGED}.")


def asdict_tensors(space: PersonaSpace) -> dict[str, torch.Tensor]:
    return {k: getattr(space, k) for k in ("components", "explained", "role_coords", "default_coords", "center")}


def _sample(items: Sequence, n: int | None, seed: int, what: str) -> list:
    """A seeded subset that keeps the original order (so subsets of the same seed are nested)."""
    if n is None or n >= len(items):
        return list(items)
    if n < 1:
        raise ValueError(f"n_{what}={n} must be >= 1.")
    keep = sorted(random.Random(f"{seed}-{what}").sample(range(len(items)), n))
    return [items[i] for i in keep]


def build_axis(shard_paths: Sequence[Path], metadata: dict) -> AssistantAxis:
    """Aggregate extraction shards (the default persona plus roles) into an :class:`AssistantAxis`.

    Answers with no response tokens are dropped. Each role counts equally, whatever its number of answers.
    """
    persona_means: dict[str, torch.Tensor] = {}
    default_norm = None
    n_answers = 0
    for path in shard_paths:
        shard = load_shard(path)
        n_answers += int((shard.counts > 0).sum())
        keep = shard.counts > 0
        if not keep.any():
            raise ValueError(f"Persona {shard.persona!r} produced no response tokens at all; check its prompts.")
        persona_means[shard.persona] = shard.means[keep].double().mean(dim=0)
        if shard.persona == DEFAULT_KEY:
            default_norm = shard.norms[keep].double().mean(dim=0).float()
    if DEFAULT_KEY not in persona_means or len(persona_means) < 2:
        raise ValueError("An axis needs the default persona and at least one role.")
    default_mean = persona_means.pop(DEFAULT_KEY)
    role_names = list(persona_means)
    role_vectors = torch.stack([persona_means[n] for n in role_names])
    axis = (default_mean - role_vectors.mean(dim=0)).float()
    unit = axis / axis.norm(dim=-1, keepdim=True)
    projections: dict[str, list[torch.Tensor]] = {"default": [], "roles": []}
    for path in shard_paths:  # second pass: per-answer projections onto the finished axis
        shard = load_shard(path)
        proj = torch.einsum("nlh,lh->nl", shard.means[shard.counts > 0], unit)
        projections["default" if shard.persona == DEFAULT_KEY else "roles"].append(proj)
    quantiles = {k: torch.quantile(torch.cat(v).T, QUANTILE_LEVELS, dim=1).T.contiguous()
                 for k, v in projections.items()}
    pca = PersonaSpace.fit(role_vectors.float(), default_mean.float())
    return AssistantAxis(
        axis=axis, default_mean=default_mean.float(), role_vectors=role_vectors.float(), role_names=role_names,
        quantiles=quantiles, residual_norm=default_norm, pca=pca, metadata={**metadata, "n_answers": n_answers},
    )


def compute_axis(
    model: nn.Module,
    tokenizer: object,
    roles: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    questions: Sequence[str] | str | os.PathLike | None = None,
    mode: str = "generate",
    n_roles: int | None = None,
    n_questions: int | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    defaults: Sequence[str] | str | os.PathLike | None = None,
    prompts_per_role: int | None = None,
    batch_size: int = 128,
    temperature: float = 0.0,
    progress: bool = True,
) -> AssistantAxis:
    """Compute the Assistant Axis of ``model`` from the shipped persona data, or your own.

    ``roles`` maps role names to system prompts (or is a path in the shipped schema); ``questions`` is a list
    or a path; ``defaults`` are the default-Assistant system prompts ("" = no system message). ``n_roles``,
    ``n_questions`` and ``prompts_per_role`` take seeded subsets. With ``out_dir`` the per-answer shards are
    kept there and an interrupted call resumes; otherwise they go to a temporary directory.
    """
    settings = ExtractionSettings(mode, max_new_tokens, temperature, batch_size, seed)
    if prompts_per_role is not None and prompts_per_role < 1:
        raise ValueError(f"prompts_per_role={prompts_per_role} must be >= 1 (1 uses each role's first system "
                         "prompt), or None for all of them.")
    role_map = load_roles(roles)
    chosen = _sample(list(role_map), n_roles, seed, "roles")
    qs = _sample(load_questions(questions), n_questions, seed, "questions")
    default_prompts = load_default_prompts(defaults)
    if DEFAULT_KEY in chosen:
        raise ValueError(f"'{DEFAULT_KEY}' is reserved for the default Assistant; rename that role.")
    if len(chosen) < 2:
        raise ValueError("Only 1 role was chosen: an axis needs at least 2 (its persona-space PCA and role ordering "
                         "compare roles). Use n_roles >= 2 (anchor axis --roles 2), or give more roles.")
    personas = [Persona(DEFAULT_KEY, tuple(default_prompts[:prompts_per_role]))]
    personas += [Persona(name, tuple(role_map[name][:prompts_per_role])) for name in chosen]
    n_layers = len(decoder_layers(model))
    metadata = {
        "model_id": model_id(model),
        "model_type": unwrap(model).config.model_type,
        "n_layers": n_layers,
        "hidden_size": int(unwrap(model).config.hidden_size),
        "fingerprint": fingerprint(model),
        "extraction": asdict(settings),
        "n_roles": len(chosen),
        "n_questions": len(qs),
        "n_default_prompts": len(personas[0].system_prompts),
        "prompts_per_role": prompts_per_role,
        "report_layer": n_layers // 2,
        "anchor_version": _version(),
    }
    with tempfile.TemporaryDirectory(prefix="anchor-extract-") as tmp:
        work = Path(out_dir) if out_dir is not None else Path(tmp)
        paths = extract(model, tokenizer, personas, qs, work, settings, progress=progress)
        return build_axis(paths, metadata)


@dataclass(frozen=True)
class AxisSettings:
    """How an axis is sampled when anchor computes one for you: on the fly at the start of training, or for a
    command given no bundle. The one cache of such axes is keyed by the model's fingerprint and these settings.

    The defaults are ``anchor.extract.settings_for_budget(60)``: about 50 s on 2 CPU cores for SmolLM2-135M, at a
    median cosine of 0.91 to the full 225-role × 246-question axis over the middle third of the layers. Questions
    and answer length buy more accuracy than roles do (``scripts/results/bench_axis_frontier.md``)."""

    n_roles: int | None = 4
    n_questions: int | None = 48
    prompts_per_role: int | None = 1
    max_new_tokens: int = 32
    mode: str = "generate"
    seed: int = 0

    def key(self) -> str:
        """A short digest of the settings and the bundle format."""
        import hashlib

        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def axis_cache_dir(model: nn.Module, settings: AxisSettings) -> Path:
    """Where the axis of ``model`` computed with ``settings`` is cached (``cache_dir()/axes/<fingerprint>-<key>``)."""
    from anchor.models import cache_dir

    return cache_dir() / "axes" / f"{fingerprint(model)}-{settings.key()}"


def cached_axis(model: nn.Module, tokenizer: object, settings: AxisSettings | None = None, batch_size: int = 128,
                progress: bool = True, write: bool = True) -> AssistantAxis:
    """The axis of ``model`` as it is now, computed with ``settings`` once and cached by model fingerprint.

    The extraction shards sit beside the cached bundle, so an interrupted computation resumes. ``write=False``
    computes without touching the cache (the other ranks of a distributed run, which compute in lockstep while
    rank 0 writes); a cached bundle is still read.
    """
    settings = settings or AxisSettings()
    directory = axis_cache_dir(model, settings)
    if (directory / CONFIG_NAME).is_file():
        return AssistantAxis.from_pretrained(directory)
    if progress:
        print(f"anchor: computing the Assistant Axis of this model once ({settings}); it is cached in {directory}",
              flush=True)
    axis = compute_axis(model, tokenizer, mode=settings.mode, n_roles=settings.n_roles,
                        n_questions=settings.n_questions, prompts_per_role=settings.prompts_per_role,
                        max_new_tokens=settings.max_new_tokens, seed=settings.seed, batch_size=batch_size,
                        out_dir=directory / "extraction" if write else None, progress=progress)
    if write:
        axis.save_pretrained(directory)
    return axis


def _version() -> str:
    from anchor import __version__

    return __version__
