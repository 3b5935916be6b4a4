"""The training-time anchor: penalties on the Assistant-Axis projection, injected into any trainer's backward.

A ``TrainerCallback`` sees no batch and no loss, so the penalty cannot be added to the trainer's loss. Instead a
forward hook on each anchored decoder layer computes the penalty from that layer's output and returns
``AddAux.apply(hidden, penalty)``: an identity whose backward also sends a gradient of 1 into ``penalty``. The
trainer's ordinary ``loss.backward()`` then carries the penalty's gradient as if it had been added to the loss,
exactly, with or without (reentrant or not) gradient checkpointing, under DDP and ZeRO, for any trainer.

Methods (``METHODS``):

* ``floor`` — squared hinge on each training sequence's mean projection (over its trained tokens) falling below τ,
  a percentile of the default Assistant's per-answer mean projections: the penalty reads the same statistic τ was
  calibrated on. (A per-token hinge against a per-answer τ is active on most tokens of the base model itself, since
  single tokens scatter far more widely than answer means.)
* ``match`` — two-sided: each token's projection stays equal to the frozen reference model's on the same tokens.
* ``replay`` — every step also runs a few default-persona conversations, answered by the current model itself
  (re-sampled every few steps), and keeps their projections over a band reaching the late layers equal to the
  frozen reference's on the same text. Anchors on fixed text do not constrain what the model generates, so the
  answers must be the model's own.
* ``preventative`` — no penalty: a steering vector pointing away from the Assistant (``weight`` ×
  ``steer_coefficient`` × the layer's mean residual norm) is added during training only, so fine-tuning need not
  move the weights that way itself (persona-vector "preventative steering").

With any method, ``lm_replay_weight`` > 0 also adds, once per optimizer step, the ordinary LM loss of a few
default-persona answers written by the base model (:meth:`Anchor.set_lm_replay`): an axis-free term that keeps
the default persona's text likely. Its forward is never steered. In ``scripts/bench_drift.py`` preventative
steering plus this term kept the most persona.

``weight`` (λ) scales whatever the method adds, so ``weight=0`` leaves training bit-identical to no anchor while
the metrics are still read.

Distances are measured in units of the layer's default-to-role gap ``‖axis[l]‖`` (the projection of the raw axis
on its unit), so one unit is "as far as the average role is from the Assistant" and ``weight`` means the same on
every model. Tokens are averaged within each sequence, then over the sequences of the micro-batch, then divided
by the gradient-accumulation steps: every example weighs the same and the term is exactly invariant to how a
batch is split into accumulation steps.

Everything here works with a plain torch loop: build an :class:`Anchor` and train; ``callback.py`` is a thin
``transformers`` adapter around it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anchor.axis import AssistantAxis
from anchor.hooks import LayerHooks, check_layers
from anchor.models import decoder_layers, unwrap

logger = logging.getLogger(__name__)

METHODS = ("floor", "match", "replay", "preventative")
IGNORE_INDEX = -100  # the label that marks a token as not trained on (transformers, TRL)
# Inputs a reference or replay forward needs; everything else (labels, loss options) is left out.
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")

GradScale = Callable[[], "torch.Tensor | float"]


class AddAux(torch.autograd.Function):
    """Identity on ``hidden`` whose backward also sends ``grad_scale`` into ``penalty`` (a scalar).

    The MoE auxiliary-loss pattern: the penalty's graph is reached through the layer output, so it takes part in
    whatever backward the trainer runs. ``grad_scale`` is the factor the trainer applied to its own loss before
    ``backward`` (the fp16 loss scale; 1 otherwise), so the penalty's gradient is scaled like the loss's.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, penalty: torch.Tensor, grad_scale: torch.Tensor | float) -> Any:
        ctx.penalty_like = (penalty.shape, penalty.dtype, penalty.device)
        ctx.grad_scale = grad_scale
        return hidden

    @staticmethod
    def backward(ctx: Any, grad_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.penalty_like
        grad_penalty = torch.ones(shape, dtype=dtype, device=device)
        if isinstance(ctx.grad_scale, torch.Tensor) or ctx.grad_scale != 1:
            grad_penalty = grad_penalty * ctx.grad_scale
        return grad_hidden, grad_penalty, None


# ---------------------------------------------------------------------------------------------------------------
# Pure penalty functions
# ---------------------------------------------------------------------------------------------------------------


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of each row, then over rows (a row with no masked token counts as 0).

    Dividing by the number of rows, not of tokens, keeps the term exactly additive over micro-batches of equal size,
    which is what makes it invariant to gradient accumulation.
    """
    return row_means(values, mask).mean()


def row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, T]`` over the masked tokens of each row: ``[B]`` (0 for a row with none)."""
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)


def floor_penalty(proj: torch.Tensor, tau: float, gap: float, mask: torch.Tensor) -> torch.Tensor:
    """Squared hinge on each row's mean projection of ``proj [B, T]`` over its masked tokens falling below ``tau``, in
    units of ``gap``, averaged over rows (a row with no masked token counts as 0, as in :func:`sequence_mean`)."""
    has_tokens = mask.any(dim=-1).to(proj.dtype)
    return (F.relu((tau - row_means(proj, mask)) / gap) ** 2 * has_tokens).mean()


def match_penalty(proj: torch.Tensor, ref: torch.Tensor, gap: float, mask: torch.Tensor) -> torch.Tensor:
    """Squared distance of ``proj [B, T]`` from the reference ``ref [B, T]``, in units of ``gap``."""
    return sequence_mean(((proj - ref) / gap) ** 2, mask)


def steering_vector(axis: AssistantAxis, layer: int, coefficient: float) -> torch.Tensor:
    """``-coefficient · residual_norm[layer] · unit[layer]``: a push away from the Assistant for preventative steering.

    Fine-tuning on role-like data pulls the model away from the Assistant. Adding that pull during training means the
    weights need not learn it, and removing it afterwards leaves the model where the Assistant was.
    """
    return -coefficient * float(axis.residual_norm[layer]) * axis.unit[layer]


def default_layers(axis: AssistantAxis) -> list[int]:
    """The band the anchor reads when none is given: upper-middle layers where the axis is most persona-like.

    Candidates are the layers from the middle of the network to 85% of its depth (the paper caps at 72-83% of Qwen3
    and 70-89% of Llama 3.3). The band is ``max(2, n_layers // 8)`` contiguous layers among them with the highest
    mean cosine(axis, PC1), i.e. where the axis lines up best with the main direction of persona space.
    """
    n = axis.n_layers
    width = min(n, max(2, n // 8))
    lo = n // 2
    hi = max(lo + width, int(0.85 * n))
    hi = min(hi, n)
    lo = min(lo, hi - width)
    cos = axis.pc1_cosine().abs()
    starts = range(lo, hi - width + 1)
    best = max(starts, key=lambda s: (float(cos[s:s + width].mean()), -s))
    return list(range(best, best + width))


# ---------------------------------------------------------------------------------------------------------------
# The frozen reference and the replay set
# ---------------------------------------------------------------------------------------------------------------


def find_peft(model: nn.Module) -> nn.Module | None:
    """The PEFT model inside DDP/accelerate wrappers, or None."""
    while model is not None:
        if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
            return model
        inner = getattr(model, "module", None)
        model = inner if isinstance(inner, nn.Module) else None
    return None


def is_zero3(model: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 partitions parameters (they carry ``ds_id``): weights are empty outside forward."""
    return any(hasattr(p, "ds_id") for p in unwrap(model).parameters())


class Reference:
    """The frozen model the anchor compares with.

    With PEFT it is the trained model itself with its adapters disabled (no extra memory). For full fine-tuning it is
    a frozen deep copy of the model taken before training, kept on the same device (one more copy of the weights).
    Either way it runs in eval mode under ``no_grad``.
    """

    def __init__(self, model: nn.Module, frozen: nn.Module | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        """``frozen`` is the base model for full fine-tuning when ``model`` has already moved (e.g. on resume).
        ``autocast`` returns the mixed-precision context the policy's forward runs in (a trainer's
        ``accelerator.autocast``), so the reference computes at the same precision."""
        self._peft = find_peft(model)
        self._autocast = autocast
        if self._peft is not None:
            self.module = unwrap(model)
            self.kind = "peft"
            return
        if frozen is None and is_zero3(model):
            raise ValueError(
                "A frozen reference for full fine-tuning is a copy of the model, which cannot be made under "
                "DeepSpeed ZeRO-3. Train a PEFT adapter (the reference is then the adapter-disabled model) or "
                "use method='floor' or 'preventative'."
            )
        source = unwrap(frozen) if frozen is not None else copy.deepcopy(unwrap(model))
        for module in source.modules():
            # Trainers patch instance-level forwards with closures over the original model (TRL's fused LM head,
            # accelerate's autocast); a deep copy keeps those closures and would silently run the trained model.
            # Hooks copied along (another anchor's, input-grad hooks) do not belong on a frozen model either.
            module.__dict__.pop("forward", None)
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        self.module = source.eval().requires_grad_(False)
        self.kind = "copy"

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Run the reference: yields the module to call."""
        adapters = self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext()
        autocast = self._autocast() if self._autocast is not None else contextlib.nullcontext()
        was_training = self.module.training
        with torch.no_grad(), adapters, autocast:
            self.module.eval()
            try:
                yield self.module
            finally:
                self.module.train(was_training)


@dataclass
class ReplayBatch:
    """Default-persona conversations answered by the model, and the reference's projections on them.

    ``input_ids``/``attention_mask`` are right-padded ``[N, T]``; ``answer_mask`` marks the answer tokens; ``ref``
    holds the reference's projections ``[N, T]`` per replay layer.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    ref: dict[int, torch.Tensor]
    step: int

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "answer_mask": self.answer_mask}
        return {**out, **{f"ref.{layer}": v for layer, v in self.ref.items()}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], step: int) -> ReplayBatch:
        ref = {int(k[4:]): v for k, v in t.items() if k.startswith("ref.")}
        return cls(t["input_ids"], t["attention_mask"], t["answer_mask"].bool(), ref, step)


class _Stop(Exception):
    """Raised from a layer hook to end a forward once the last layer it needs has run."""


# ---------------------------------------------------------------------------------------------------------------
# The anchor
# ---------------------------------------------------------------------------------------------------------------


class Anchor:
    """Hooks that anchor ``model``'s persona during training, plus the metrics they read.

    ``weight`` is λ (settable, e.g. for a warm-up); ``grad_accumulation`` the number of micro-batches per optimizer
    step; ``grad_scale`` returns the loss scale the trainer multiplies its loss by before backward (fp16), or None.
    ``reference`` is needed by ``match`` and ``replay``. ``replay_layers`` defaults to the band from the first
    anchor layer to the last layer. ``steer_coefficient`` is the preventative strength k, in units of the layer's
    mean residual norm (the vector added is ``weight`` × :func:`steering_vector`).

    Hooks act only on training passes of the policy: not in eval mode, not while PEFT adapters are disabled or another
    adapter is active (a DPO reference pass), and penalties/metrics only where gradients are enabled (a no-grad pass
    of the same batch would count twice). Use as a context manager or call :meth:`detach`.
    """

    def __init__(
        self,
        model: nn.Module,
        axis: AssistantAxis,
        method: str = "floor",
        layers: Sequence[int] | None = None,
        weight: float = 1.0,
        floor_percentile: float = 10.0,
        steer_coefficient: float = 0.0,
        reference: Reference | None = None,
        replay_layers: Sequence[int] | None = None,
        grad_accumulation: int = 1,
        grad_scale: GradScale | None = None,
        layers_path: str | None = None,
        lm_replay_weight: float = 0.0,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {METHODS}.")
        if method in ("match", "replay") and reference is None:
            raise ValueError(f"method={method!r} compares with a frozen reference; pass reference=Reference(model).")
        if grad_accumulation < 1:
            raise ValueError(f"grad_accumulation={grad_accumulation} must be >= 1.")
        n_layers = len(decoder_layers(model, layers_path))
        self.model = model
        self.base = unwrap(model)
        self.axis = axis
        self.method = method
        self.layers = check_layers(default_layers(axis) if layers is None else layers, n_layers)
        self.weight = float(weight)
        self.floor_percentile = float(floor_percentile)
        self.tau = {i: axis.tau(i, floor_percentile) for i in self.layers}
        self.gap = {i: float(axis.axis[i].norm()) for i in range(axis.n_layers)}
        self.steer_coefficient = float(steer_coefficient)
        if lm_replay_weight < 0:
            raise ValueError(f"lm_replay_weight={lm_replay_weight} must be >= 0.")
        self.lm_replay_weight = float(lm_replay_weight)
        self.lm_replay: dict[str, torch.Tensor] | None = None  # this step's LM replay batch (set_lm_replay)
        self.replay_layers = (
            check_layers(replay_layers if replay_layers is not None else range(self.layers[0], n_layers), n_layers)
            if method == "replay" else []
        )
        self.reference = reference
        self.grad_accumulation = int(grad_accumulation)
        self.grad_scale = grad_scale
        self.replay: ReplayBatch | None = None
        self._zero3 = is_zero3(model)
        self._peft = find_peft(model)
        self._train_adapters = self._active_adapters()
        self._units: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._steer: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._mode: str | None = None  # per forward: None, "policy", "reference", "replay"
        self._mask: torch.Tensor | None = None
        self._ref_proj: dict[int, torch.Tensor] = {}
        self._stop_after: int | None = None
        self._capture: tuple[dict[int, torch.Tensor], set[int]] | None = None
        self._pending: torch.Tensor | None = None  # replay penalty waiting to ride on the next policy layer output
        self._replay_due = False
        self._lm_due = False
        self._warned_mask = False
        self._metrics: dict[str, list[torch.Tensor]] = {}
        hooked = set(self.layers) | set(self.replay_layers)
        self._hooks = [LayerHooks(model, sorted(hooked), self._on_layer, layers_path)]
        if reference is not None and reference.kind == "copy":
            self._hooks.append(LayerHooks(reference.module, sorted(hooked), self._on_layer, layers_path))
        self._pre = self.base.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    # -- lifecycle -------------------------------------------------------------------------------------------

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

    def start_step(self) -> None:
        """Mark the start of an optimizer step: the replay batch runs once per step, on its first micro-batch."""
        self._replay_due = self.method == "replay"
        self._lm_due = self.lm_replay_weight > 0

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
        """Forward pre-hook on the causal LM: classify the pass and read its token mask."""
        if self._mode in ("reference", "replay"):
            return None  # a forward the anchor itself runs
        self._mode = None
        self._mask = None
        if not self.base.training or self._is_reference_pass():
            return None
        self._mode = "policy"
        if not torch.is_grad_enabled():
            return None
        self._mask = self._token_mask(args, kwargs)
        if self.weight > 0 and self.method == "match":
            self._ref_proj = self._run_capture("reference", self.layers, self._forward_inputs(args, kwargs))
        if self.weight > 0 and self._replay_due and self.replay is not None:
            self._replay_due = False
            self._add_pending(self._replay_penalty())
        if self.weight > 0 and self._lm_due and self.lm_replay is not None:
            self._lm_due = False
            self._add_pending(self._lm_replay_loss())
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
    def _token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The tokens trained on: ``labels != -100`` if labels are given, else the attention mask, else all."""
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return labels != IGNORE_INDEX
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
        return None

    # -- forwards the anchor runs itself ---------------------------------------------------------------------

    def _run_capture(self, mode: str, layers: Sequence[int], inputs: dict[str, Any]) -> dict[int, torch.Tensor]:
        """Run a reference (no grad) or replay (with grad) forward and return projections ``[B, T]`` per layer.

        The forward stops after the last layer it needs, except under ZeRO-3 whose parameter gathering expects every
        forward to run to the end.
        """
        store: dict[int, torch.Tensor] = {}
        previous = self._mode
        self._mode, self._capture, self._stop_after = mode, (store, set(layers)), None if self._zero3 else max(layers)
        try:
            if mode == "reference":
                with self.reference.active() as module:
                    module(**inputs, use_cache=False)
            else:
                self.base(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            self._mode, self._stop_after = previous, None
            self._capture = None
        return store

    def _replay_penalty(self) -> torch.Tensor:
        """λ · the replay batch's two-sided distance from the reference, averaged over the replay layers."""
        batch = self.replay
        device = next(self.base.parameters()).device
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        proj = self._run_capture("replay", self.replay_layers, inputs)
        mask = batch.answer_mask.to(device)
        terms = []
        for i in self.replay_layers:
            finite = torch.isfinite(proj[i])
            safe = torch.where(finite, proj[i], torch.zeros_like(proj[i]))
            terms.append(match_penalty(safe, batch.ref[i].to(device), self.gap[i], mask & finite))
            self._add_metric("nonfinite", (~finite).float().sum(), float(finite.numel()))
        penalty = torch.stack(terms).mean()
        self._add_metric("replay_penalty", penalty.detach(), 1.0)
        return torch.where(torch.isfinite(penalty), penalty, torch.zeros_like(penalty)) * self.weight

    def _lm_replay_loss(self) -> torch.Tensor:
        """λ · ``lm_replay_weight`` · the LM loss of this step's replay answers (tokens averaged per row, then rows).

        The forward runs in "replay" mode: no steering, no penalties, no metrics of the training batch.
        """
        batch = self.lm_replay
        device = next(self.base.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["answer_mask"].to(device)
        previous = self._mode
        self._mode, self._capture = "replay", ({}, set())
        try:
            logits = self.base(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        finally:
            self._mode, self._capture = previous, None
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        loss = sequence_mean(nll.view(ids.shape[0], -1), mask[:, 1:])
        self._add_metric("lm_replay_loss", loss.detach(), 1.0)
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)) * (self.weight * self.lm_replay_weight)

    def set_lm_replay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor) -> None:
        """Use this batch ``[N, T]`` (right-padded prompt + the base model's answer) for the LM replay term of the
        coming optimizer steps; ``answer_mask`` marks the answer tokens the loss is taken on."""
        self.lm_replay = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask.bool()}

    def set_replay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor,
                   step: int) -> ReplayBatch:
        """Use this batch ``[N, T]`` (right-padded prompt + answer) as the replay batch from now on.

        The answers should be the current model's own answers to default-persona prompts, re-sampled every few
        steps; the reference's projections on the same tokens are read once here.
        """
        device = next(self.base.parameters()).device
        store = self._run_capture("reference", self.replay_layers,
                                  {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)})
        ref = {i: v.float().cpu() for i, v in store.items()}
        self.replay = ReplayBatch(input_ids.cpu(), attention_mask.cpu(), answer_mask.bool().cpu(), ref, step)
        return self.replay

    # -- the layer hook --------------------------------------------------------------------------------------

    def _device_tensors(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (hidden.device, hidden.dtype)
        if key not in self._units:
            n = self.axis.n_layers
            self._units[key] = self.axis.unit.to(device=hidden.device, dtype=hidden.dtype)
            steer = torch.stack([steering_vector(self.axis, i, self.steer_coefficient) for i in range(n)])
            self._steer[key] = steer.to(device=hidden.device, dtype=hidden.dtype)
        return self._units[key], self._steer[key]

    def _project(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        units, _ = self._device_tensors(hidden)
        if hidden.dtype == torch.float16:  # a fp16 dot product can overflow at 65504 even when ``hidden`` is finite
            return hidden.float() @ units[layer].float()
        return (hidden @ units[layer]).float()

    def _on_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        mode = self._mode
        if mode in ("reference", "replay"):
            store, wanted = self._capture
            if layer in wanted:
                store[layer] = self._project(hidden, layer)
            if self._stop_after is not None and layer >= self._stop_after:
                raise _Stop
            return None
        if mode != "policy":
            return None
        out = hidden
        if torch.is_grad_enabled():
            out = self._penalise(layer, hidden)
        if self.method == "preventative" and layer in self.layers and self.steer_coefficient and self.weight > 0:
            _, steer = self._device_tensors(hidden)
            out = out + steer[layer] * self.weight
        return out if out is not hidden else None

    def _penalise(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Metrics at an anchor layer, plus the penalty riding on its output when the method has one."""
        out = hidden
        if self._pending is not None:  # the replay penalty joins the graph at the first hooked layer
            out = AddAux.apply(out, self._pending, self._scale())
            self._pending = None
        if layer not in self.layers:
            return out
        raw = self._project(hidden, layer)
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
        with torch.no_grad():
            m = mask.float()
            n = m.sum()
            self._add_metric(f"proj/layer_{layer}", (proj * m).sum(), n)
            rows = mask.any(dim=-1).float()
            below = (row_means(proj, mask) < self.tau[layer]).float() * rows
            self._add_metric("below_floor", below.sum(), rows.sum())
            self._add_metric("nonfinite", (~finite).float().sum(), float(finite.numel()))
        penalty = self._layer_penalty(layer, proj, mask)
        if penalty is None:
            return out
        share = 1.0 / len(self.layers)
        self._add_metric("penalty", penalty.detach() * share, share)
        if self.weight <= 0:
            return out
        # A micro-batch with a non-finite projection contributes no penalty (its loss is then non-finite anyway and
        # the step is the trainer's to skip); checked on device, without a host sync.
        penalty = torch.where(finite.all(), penalty, torch.zeros_like(penalty))
        return AddAux.apply(out, penalty * (self.weight * share / self.grad_accumulation), self._scale())

    def _layer_penalty(self, layer: int, proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if self.method == "floor":
            return floor_penalty(proj, self.tau[layer], self.gap[layer], mask)
        ref = self._ref_proj.get(layer) if self.method == "match" else None
        if ref is not None and ref.shape == proj.shape:
            return match_penalty(proj, ref, self.gap[layer], mask)
        return None

    def _scale(self) -> torch.Tensor | float:
        return 1.0 if self.grad_scale is None else self.grad_scale()

    # -- metrics -----------------------------------------------------------------------------------------------

    def _add_metric(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
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

        Names: ``penalty`` (mean over anchor layers, λ not applied), ``replay_penalty``, ``lm_replay_loss``,
        ``proj/layer_{i}`` (mean projection of the training tokens), ``below_floor`` (fraction of training sequences
        whose mean projection is below τ), ``nonfinite`` (fraction of tokens whose projection was NaN/Inf).
        """
        out = {k: (v[0], v[1]) for k, v in self._metrics.items()}
        self._metrics = {}
        return out
