"""The anchoring engine: hooks that run the configured methods on a model's training passes.

:class:`Anchor` owns everything a method should not have to know: which forward is the policy's training pass
(not evaluation, not a DPO reference pass through the same modules with PEFT adapters off, not a no-grad pass),
the token mask of the trained tokens, projections on the unit axis, λ and the methods' weights, gradient
accumulation and the fp16 loss scale, injecting terms into the trainer's backward (:class:`anchor.loss.AddAux`),
the extra forwards methods ask for (with gradients, or through the frozen reference), and the metrics. It never
names a method: :mod:`anchor.methods` holds them, one file each.

Everything here works with a plain torch loop: build an :class:`Anchor` and train; ``callback.py`` is the
``transformers`` adapter around it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from anchor.axis import AssistantAxis
from anchor.config import AnchorConfig
from anchor.hooks import LayerHooks, check_layers
from anchor.loss import IGNORE_INDEX, AddAux, row_means
from anchor.methods import AnchorMethod, RunContext, build_methods
from anchor.models import decoder_layers, unwrap
from anchor.reference import Reference, find_peft, is_zero3

logger = logging.getLogger(__name__)

# Inputs an extra forward needs; everything else (labels, loss options) is left out.
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")

GradScale = Callable[[], "torch.Tensor | float"]


def default_layers(axis: AssistantAxis) -> list[int]:
    """The band the anchor reads when none is given: upper-middle layers where the axis is most persona-like.

    Candidates are the layers from the middle of the network to 85% of its depth (the paper caps at 72-83% of Qwen3
    and 70-89% of Llama 3.3). The band is ``max(2, n_layers // 8)`` contiguous layers among them with the highest
    mean cosine(axis, PC1), i.e. where the axis lines up best with the main direction of persona space.
    """
    n = axis.n_layers
    width = min(n, max(2, n // 8))
    lo = n // 2
    hi = min(max(lo + width, int(0.85 * n)), n)
    lo = min(lo, hi - width)
    cos = axis.pc1_cosine().abs()
    best = max(range(lo, hi - width + 1), key=lambda s: (float(cos[s:s + width].mean()), -s))
    return list(range(best, best + width))


class _Stop(Exception):
    """Raised from a layer hook to end an extra forward once the last layer it needs has run."""


class NonFiniteError(RuntimeError):
    """The anchor met NaN/Inf: a run must stop before it writes a checkpoint of garbage."""


class Anchor:
    """Hooks that anchor ``model``'s persona during training with the configured methods, plus their metrics.

    ``method`` is a method name, a list of names (composed), or a whole :class:`~anchor.config.AnchorConfig`;
    ``settings`` are further ``AnchorConfig`` fields (e.g. ``steer_coefficient``, ``method_weights``). ``layers``
    is the anchored band (default: the config's, else :func:`default_layers`); ``weight`` is λ (settable, e.g. for a
    warm-up); ``floor_percentile`` sets τ, the floor the ``below_floor`` metric (and ``floor``) read.
    ``grad_accumulation`` is the number of micro-batches per optimizer step; ``grad_scale`` returns the loss scale
    the trainer multiplies its loss by before backward (fp16), or None. ``reference`` is the frozen base model,
    needed by the methods that say so. ``run`` tells methods the seed and process index of the run.

    Hooks act only on training passes of the policy: not in eval mode, not while PEFT adapters are disabled or another
    adapter is active (a DPO reference pass); penalties and metrics only where gradients are enabled (a no-grad pass
    of the same batch would count twice). Use as a context manager or call :meth:`detach`.
    """

    def __init__(
        self,
        model: nn.Module,
        axis: AssistantAxis,
        method: str | Sequence[str] | AnchorConfig = "floor",
        layers: Sequence[int] | None = None,
        weight: float | None = None,
        floor_percentile: float | None = None,
        *,
        reference: Reference | None = None,
        grad_accumulation: int = 1,
        grad_scale: GradScale | None = None,
        layers_path: str | None = None,
        run: RunContext | None = None,
        **settings: Any,
    ):
        if isinstance(method, AnchorConfig):
            config = dataclasses.replace(method, **settings) if settings else method
        else:
            config = AnchorConfig(method=method if isinstance(method, str) else list(method), **settings)
        if weight is not None or floor_percentile is not None:
            config = dataclasses.replace(
                config, weight=config.weight if weight is None else weight,
                floor_percentile=config.floor_percentile if floor_percentile is None else floor_percentile)
        if grad_accumulation < 1:
            raise ValueError(f"grad_accumulation={grad_accumulation} must be >= 1.")
        self.config = config
        self.methods: list[AnchorMethod] = build_methods(config)
        needing = [m.name for m in self.methods if m.needs_reference]
        if needing and reference is None:
            raise ValueError(f"method(s) {needing} compare with a frozen reference; pass reference=Reference(model).")
        n_layers = len(decoder_layers(model, layers_path))
        self.model = model
        self.base = unwrap(model)
        self.axis = axis
        self.run = run or RunContext(model=self.base, tokenizer=None)
        self.layers = check_layers(layers if layers is not None else config.layers or default_layers(axis), n_layers)
        self.layers_given = layers is not None or config.layers is not None  # False: the default band, which a
        # method may replace by its own (AnchorMethod.layers)
        self.weight = float(config.weight)
        self.tau = {i: axis.tau(i, config.floor_percentile) for i in self.layers}
        self.gap = {i: axis.gap(i) for i in range(axis.n_layers)}
        self.reference = reference
        self.grad_accumulation = int(grad_accumulation)
        self.grad_scale = grad_scale
        self.method_layers = {m.name: check_layers(m.layers(self), n_layers) for m in self.methods}
        self._penalising = [m for m in self.methods if type(m).penalty is not AnchorMethod.penalty]
        self._zero3 = is_zero3(model)
        self._peft = find_peft(model)
        self._train_adapters = self._active_adapters()
        self._units: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._mode: str | None = None  # per forward: None, "policy", "reference", "extra"
        self._mask: torch.Tensor | None = None
        self._stop_after: int | None = None
        self._capture: tuple[dict[int, torch.Tensor], set[int]] | None = None
        self._pending: torch.Tensor | None = None  # once-per-step terms waiting to ride on a policy layer output
        self._step_due = False
        self._step = 0
        self._warned_mask = False
        self._metrics: dict[str, list[torch.Tensor]] = {}
        self._nonfinite: dict[str, torch.Tensor] = {}
        hooked = sorted(set(self.layers).union(*self.method_layers.values()))
        self._hooks = [LayerHooks(model, hooked, self._on_layer, layers_path)]
        if reference is not None and reference.kind == "copy":
            self._hooks.append(LayerHooks(reference.module, hooked, self._on_layer, layers_path))
        self._pre = self.base.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def method(self, name: str) -> AnchorMethod:
        """The configured method called ``name``."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"This anchor runs {[m.name for m in self.methods]}, not {name!r}.")

    def detach(self) -> None:
        for hooks in self._hooks:
            hooks.detach()
        self._hooks = []
        if self._pre is not None:
            self._pre.remove()
            self._pre = None

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> Anchor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def setup(self, run: RunContext) -> None:
        """Let every method prepare itself (answer pools, prompts) before the first step."""
        self.run = run
        for m in self.methods:
            m.setup(run)

    def start_step(self, step: int = 0) -> None:
        """Mark the start of optimizer step ``step``: once-per-step terms run on its first micro-batch."""
        self._step_due = True
        self._step = step
        for m in self._active():
            m.start_step(self, step)

    @property
    def step_term_due(self) -> bool:
        """Whether this optimizer step adds the once-per-step terms (every ``replay_every``-th step)."""
        return self._step % self.config.replay_every == 0

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _active(self) -> list[AnchorMethod]:
        """The methods whose terms count now (λ × their weight > 0); at 0 training is bit-identical to no anchor."""
        return [m for m in self.methods if self.weight * m.weight > 0]

    # -- which pass is this ----------------------------------------------------------------------------------

    def _active_adapters(self) -> tuple[str, ...]:
        if self._peft is None:
            return ()
        adapters = getattr(self._peft, "active_adapters", ())
        return tuple(adapters) if isinstance(adapters, list | tuple) else (str(adapters),)

    def _is_reference_pass(self) -> bool:
        """A forward of the frozen reference through the trained modules (PEFT adapters off, or the "ref" adapter)."""
        if self._peft is None:
            return False
        return bool(getattr(self._peft, "_adapters_disabled", False)) or self._active_adapters() != self._train_adapters

    def _on_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the causal LM: classify the pass, read its token mask, run per-forward hooks."""
        if self._mode in ("reference", "extra"):
            return None  # a forward the anchor itself runs
        self._mode = None
        self._mask = None
        if not self.base.training or self._is_reference_pass():
            return None
        self._mode = "policy"
        if not torch.is_grad_enabled():
            return None
        self._mask = self._token_mask(args, kwargs)
        active = self._active()
        inputs = self._forward_inputs(args, kwargs)
        trained = self._n_tokens(inputs)
        self.add_metric("extra_tokens_ratio", torch.zeros((), device=trained.device), trained)
        for m in active:
            m.before_forward(self, inputs)
        if self._step_due:
            self._step_due = False
            for m in active if self.step_term_due else ():
                term = m.step_loss(self)
                if term is not None:
                    scale = self.weight * m.weight * self.config.replay_every
                    self._add_pending(self._finite(term, f"{m.name} term") * scale)
        return None

    def _add_pending(self, term: torch.Tensor) -> None:
        """Queue a once-per-step term; it joins the graph at the policy forward's first hooked layer."""
        self._pending = term if self._pending is None else self._pending + term

    @staticmethod
    def _forward_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
        inputs = {k: kwargs[k] for k in _FORWARD_KEYS if kwargs.get(k) is not None}
        if args and "input_ids" not in inputs:
            inputs["input_ids"] = args[0]
        return inputs

    @staticmethod
    def _n_tokens(inputs: dict[str, Any]) -> torch.Tensor:
        """How many tokens a forward runs on: its attention mask's, else every position."""
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.sum().float()
        ids = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
        return torch.tensor(float(ids.shape[0] * ids.shape[1]), device=ids.device)

    @staticmethod
    def _token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The tokens trained on: ``labels != -100`` if labels are given, else the attention mask, else all."""
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return labels != IGNORE_INDEX
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
        return None

    # -- forwards the methods ask for ------------------------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], *, reference: bool = False,
                layers: Sequence[int] = ()) -> tuple[Any, dict[int, torch.Tensor]]:
        """Run an extra forward for a method: ``(model output, {layer: projections [B, T]})``.

        With ``reference`` it runs the frozen reference under ``no_grad``; else the policy with gradients, unedited
        and unpenalised. When only ``layers`` are wanted (the output is then None) it stops after the last of them,
        except under ZeRO-3, whose parameter gathering expects every forward to run to the end.
        """
        store: dict[int, torch.Tensor] = {}
        previous = self._mode
        stop = max(layers) if layers and not self._zero3 else None
        self._mode = "reference" if reference else "extra"
        self._capture, self._stop_after = (store, set(layers)), stop
        output = None
        try:
            if reference:
                with self.reference.active() as module:
                    output = module(**inputs, use_cache=False)
            else:
                if torch.is_grad_enabled():
                    self.add_metric("extra_tokens_ratio", self._n_tokens(inputs), 0.0)
                output = self.base(**inputs, use_cache=False)
        except _Stop:
            output = None
        finally:
            self._mode, self._stop_after, self._capture = previous, None, None
        return output, store

    # -- the layer hook --------------------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Projections ``[B, T]`` of ``hidden`` on the unit axis at ``layer``, in float32."""
        key = (hidden.device, hidden.dtype)
        if key not in self._units:
            self._units[key] = self.axis.unit.to(device=hidden.device, dtype=hidden.dtype)
        unit = self._units[key][layer]
        if hidden.dtype == torch.float16:  # a fp16 dot product can overflow at 65504 even when ``hidden`` is finite
            return hidden.float() @ unit.float()
        return (hidden @ unit).float()

    def _on_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        mode = self._mode
        if mode in ("reference", "extra"):
            store, wanted = self._capture
            if layer in wanted:
                store[layer] = self.project(hidden, layer)
            if self._stop_after is not None and layer >= self._stop_after:
                raise _Stop
            return None
        if mode != "policy":
            return None
        out = self._penalise(layer, hidden) if torch.is_grad_enabled() else hidden
        for m in self._active():
            if layer in self.method_layers[m.name]:
                edited = m.edit(self, layer, out)
                out = out if edited is None else edited
        return out if out is not hidden else None

    def _penalise(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Metrics at an anchor layer, plus the methods' penalties riding on its output."""
        out = hidden
        if self._pending is not None:
            out = AddAux.apply(out, self._pending, self._scale())
            self._pending = None
        penalising = [m for m in self._penalising if layer in self.method_layers[m.name]]
        if layer not in self.layers and not penalising:
            return out
        raw = self.project(hidden, layer)
        mask = self._mask
        if mask is None or mask.shape != raw.shape:
            if mask is not None and not self._warned_mask:
                logger.warning(
                    "The anchor got a token mask of shape %s for activations of shape %s (virtual tokens?); it "
                    "averages over all tokens instead.", tuple(mask.shape), tuple(raw.shape))
                self._warned_mask = True
            mask = torch.ones_like(raw, dtype=torch.bool)
        finite = torch.isfinite(raw)
        proj = torch.where(finite, raw, torch.zeros_like(raw))  # gradient-safe: no NaN reaches the backward
        mask = mask & finite
        if layer in self.layers:
            with torch.no_grad():
                m = mask.float()
                self.add_metric(f"proj/layer_{layer}", (proj * m).sum(), m.sum())
                rows = mask.any(dim=-1).float()
                below = (row_means(proj, mask) < self.tau[layer]).float() * rows
                self.add_metric("below_floor", below.sum(), rows.sum())
                self.add_metric("nonfinite", (~finite).float().sum(), float(finite.numel()))
                self._count_nonfinite(f"the projection at layer {layer}", (~finite).any())
        n_penalties = max(1, len(penalising))
        for m in penalising:
            term = m.penalty(self, layer, proj, mask)
            if term is None:
                continue
            share = 1.0 / len(self.method_layers[m.name])
            self.add_metric("penalty", term.detach() * share, share / n_penalties)
            if self.weight * m.weight <= 0:
                continue
            # A micro-batch with a non-finite projection contributes no penalty; checked on device, without a sync.
            term = torch.where(finite.all(), term, torch.zeros_like(term))
            scale = self.weight * m.weight * share / self.grad_accumulation
            out = AddAux.apply(out, term * scale, self._scale())
        return out

    def _scale(self) -> torch.Tensor | float:
        return 1.0 if self.grad_scale is None else self.grad_scale()

    # -- non-finite numbers ----------------------------------------------------------------------------------

    def _finite(self, term: torch.Tensor, what: str) -> torch.Tensor:
        """``term`` where finite, else 0 (no NaN reaches the backward); a non-finite term is counted for
        :meth:`check_finite`."""
        ok = torch.isfinite(term)
        self._count_nonfinite(what, ~ok)
        return torch.where(ok, term, torch.zeros_like(term))

    def _count_nonfinite(self, what: str, flag: torch.Tensor) -> None:
        flag = flag.detach().float().sum()
        self._nonfinite[what] = self._nonfinite[what] + flag if what in self._nonfinite else flag

    def check_finite(self, step: int) -> None:
        """Raise :class:`NonFiniteError` naming what turned NaN/Inf since the last call (one host sync)."""
        counts, self._nonfinite = self._nonfinite, {}
        total = torch.stack([c.to(self.device) for c in counts.values()]).sum() if counts else \
            torch.zeros((), device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)  # every rank stops together, or none does (no hang)
        if float(total) == 0:  # the one sync of the common case
            return
        bad = [what for what, count in counts.items() if float(count) > 0] or ["another process's anchor term"]
        raise NonFiniteError(
            f"anchor: {', '.join(bad)} turned NaN/Inf at step {step}; the run is stopped before a checkpoint of "
            "garbage is written. Lower the learning rate or the anchor's strengths (weight, method_weights, "
            "steer_coefficient), or use bf16 instead of fp16; resume from the last checkpoint.")

    # -- metrics ---------------------------------------------------------------------------------------------

    def add_metric(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        """Accumulate on device (no host sync per step); :meth:`pop_metrics` hands the sums over."""
        total = total.detach().float()
        count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
        if name in self._metrics:
            self._metrics[name][0] += total
            self._metrics[name][1] += count
        else:
            self._metrics[name] = [total.clone(), count.clone()]

    def pop_metrics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (sum, count)}`` since the last call; the mean is ``sum / count`` (sum both across ranks first).

        Names: ``penalty`` (the per-layer methods' penalties, each averaged over its layers, λ not applied),
        ``proj/layer_{i}`` (mean projection of the training tokens), ``below_floor`` (fraction of training sequences
        whose mean projection is below τ), ``nonfinite`` (fraction of tokens whose projection was NaN/Inf),
        ``extra_tokens_ratio`` (tokens of the methods' own forwards with gradients per token of the trainer's: the
        anchor's step costs about 1 + this many plain steps, plus any sampling), and whatever the methods add
        (``lm_replay_loss``, ``replay_penalty``, ``kl``).
        """
        out = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics = {}
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every method's state, tensors prefixed ``method.<name>.``."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for m in self.methods:
            t, j = m.state_dict()
            tensors.update({f"method.{m.name}.{k}": v for k, v in t.items()})
            meta[m.name] = j
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for m in self.methods:
            prefix = f"method.{m.name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                              meta.get(m.name, {}))


__all__ = ["Anchor", "NonFiniteError", "default_layers"]
