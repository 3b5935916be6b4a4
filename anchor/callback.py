"""``AnchorCallback``: the training-time anchor in a ``transformers``/TRL trainer's lifecycle.

It does only what a trainer integration must; the rest lives beside what it serves (the engine and its methods in
:mod:`anchor.engine` and :mod:`anchor.methods`, probe drift in :mod:`anchor.probes`, the checkpoint state in
:mod:`anchor.state`, the axis cache in :mod:`anchor.axis`):

* **Set-up** (``on_train_begin``): the axis bundle, loaded, or computed on the fly on every rank in lockstep with
  rank 0's result broadcast (and cached); the engine's hooks; the methods' pools; the probes' step-0 baseline.
* **Scaling**: terms are divided by ``gradient_accumulation_steps`` and, under fp16 loss scaling, their gradients
  multiplied by the current loss scale (the ``AcceleratedOptimizer``'s ``scaler``).
* **Metrics**: summed since the last log, reduced over ranks and written into the trainer's ``logs``, so every
  reporter (wandb, TensorBoard, console) gets them at the same ``global_step``. Reporters run in callback order, so
  :meth:`AnchorCallback.attach` puts the callback first; without it the callback finds its trainer on the call
  stack when the trainer fires an event.
* **Non-finite numbers stop the run** at the end of the step they appear in, before a checkpoint is written.
* **Checkpoints**: the anchor state is written during the trainer's own save, before ``trainer_state.json``
  (:meth:`AnchorCallback.state`), so the two cannot separate; resuming restores it exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from anchor import dashboards
from anchor.axis import AssistantAxis, cached_axis
from anchor.config import AnchorConfig
from anchor.engine import Anchor
from anchor.hooks import check_layers
from anchor.methods import RunContext
from anchor.models import decoder_layers, unwrap
from anchor.probes import ProbeMonitor, far_role_prompts, preserved_rng
from anchor.reference import Reference, check_copyable, find_peft, needs_reference, training_reference
from anchor.report import probe_drift_series
from anchor.state import STATE_DIR, AnchorState, check_same_settings, resume_state, save_state

logger = logging.getLogger(__name__)

# Trainers whose training step the anchor cannot tell apart from their own generation or scoring passes.
UNSUPPORTED_TRAINERS = {
    "GRPOTrainer": "it samples completions with the policy inside the training step, so steering and penalties "
                   "would act on its rollouts and the token mask would not mark the trained tokens",
    "RLOOTrainer": "it samples completions with the policy inside the training step",
    "OnlineDPOTrainer": "it samples completions with the policy inside the training step",
    "PPOTrainer": "it runs policy, value and reward models through one training step",
}


def _trainer_on_stack(max_depth: int = 8) -> tuple[Any, dict[str, Any]]:
    """The ``transformers.Trainer`` whose method fired the current callback event, and that frame's locals."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner, dict(frame.f_locals)
    finally:
        del frame
    return None, {}


class AnchorCallback(TrainerCallback, ExportableState):
    """Keep the model in its Assistant persona while a ``transformers``/TRL trainer fine-tunes it.

    ``config`` is an :class:`AnchorConfig` (or its dict); ``axis`` (an :class:`AssistantAxis`) overrides
    ``config.axis``. Use ``AnchorCallback(config).attach(trainer)``, or pass it in ``callbacks=[...]``. After
    ``on_train_begin`` the bundle is ``self.axis`` and the engine ``self.anchor``; the hooks go away at the end of
    training (they never act at inference or evaluation, since they only act in training mode).
    """

    def __init__(self, config: AnchorConfig | dict | None = None, axis: AssistantAxis | None = None):
        self.config = AnchorConfig(**config) if isinstance(config, dict) else (config or AnchorConfig())
        self._given_axis = axis
        self.axis: AssistantAxis | None = None
        self.anchor: Anchor | None = None
        self.probes: ProbeMonitor | None = None
        self.trainer: Any = None
        self._pending: dict[str, list[float]] = {}
        self._axis_logged = False

    # -- the trainer -----------------------------------------------------------------------------------------

    def attach(self, trainer: Any) -> AnchorCallback:
        """Add this callback to ``trainer`` (if needed), ahead of the reporters so its metrics reach them."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.set_trainer(trainer)
        return self

    def set_trainer(self, trainer: Any) -> None:
        """Bind the trainer and move this callback to the front of its callback list."""
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks and callbacks[0] is not self:
            callbacks.remove(self)  # safe while the handler iterates: every later index stays in place
            callbacks.insert(0, self)

    def _bind(self) -> dict[str, Any]:
        trainer, frame_locals = _trainer_on_stack()
        if trainer is not None:
            self.set_trainer(trainer)
        elif self.trainer is None:
            logger.warning("AnchorCallback could not find its Trainer; use AnchorCallback(config).attach(trainer) so "
                           "its metrics reach the reporters (wandb, TensorBoard) that run before it.")
        return frame_locals

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind()

    # -- set-up ----------------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       processing_class: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        frame_locals = self._bind()
        if model is None:
            raise ValueError("AnchorCallback needs the model: the trainer passed none to on_train_begin.")
        self._check_trainer(args)
        if self.anchor is not None:
            self.anchor.detach()
        cfg = self.config
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        decoder_layers(model)  # a clear error for an architecture whose layers cannot be hooked
        saved = resume_state(args, state, frame_locals) if state.global_step > 0 else None
        if saved is None and needs_reference(cfg):
            check_copyable(model, cfg.method)  # before the axis: a sharded full fine-tune fails in seconds
        if saved is not None:
            check_same_settings(saved, cfg)
            self.axis = saved.axis
            self.axis.check_compatible(model, check_weights=False)  # the model is mid-training: shapes only
        else:
            self.axis = self._given_axis or self._load_axis(model, tokenizer, args)
            self.axis.check_compatible(model, check_weights=cfg.axis_check_weights)
        given = saved.config.get("layers") if saved else cfg.layers  # None: the engine chooses the default band
        if given is not None:  # checked before the reference copy, with the field's name
            try:
                given = check_layers(saved.layers if saved else given, self.axis.n_layers)
            except ValueError as err:
                raise ValueError(f"AnchorConfig.layers: {err}") from None
        # The policy's forward runs under the trainer's autocast (TRL configs default to bf16); so does the reference.
        autocast = getattr(getattr(self.trainer, "accelerator", None), "autocast", None)
        reference = training_reference(model, cfg, resumed=saved is not None, autocast=autocast,
                                       fingerprint=self.axis.metadata.get("fingerprint"))
        run = RunContext(model=unwrap(model), tokenizer=tokenizer, seed=args.seed, process_index=args.process_index,
                         progress=args.process_index == 0, resumed=saved is not None)
        self.anchor = Anchor(model, self.axis, cfg, given,
                             self._weight_at(state.global_step), reference=reference,
                             grad_accumulation=args.gradient_accumulation_steps, grad_scale=_grad_scale(optimizer),
                             run=run)
        if any(m.needs_template for m in self.anchor.methods):
            self._needs_template(tokenizer, f"method(s) {cfg.method}")
        if saved is not None:
            self.anchor.tau = dict(saved.tau)  # τ exactly as the run started with it
            self.anchor.load_state_dict(saved.method_tensors(), saved.methods)
        self._log_layers(self.anchor.layers, chosen=not self.anchor.layers_given)
        self.anchor.setup(run)
        self.probes = self._probe_monitor(model, tokenizer, reference, saved) if cfg.probe_every else None

    def _check_trainer(self, args: Any) -> None:
        name = type(self.trainer).__name__ if self.trainer is not None else ""
        if name in UNSUPPORTED_TRAINERS:
            raise ValueError(f"AnchorCallback cannot anchor {name}: {UNSUPPORTED_TRAINERS[name]}. Anchor the SFT, DPO "
                             "or KTO stage instead, or cap at run time (anchor.cap).")
        if getattr(args, "torch_compile", False):
            raise ValueError("AnchorCallback cannot anchor a torch.compile'd model (compiled graphs ignore hooks added "
                             "after the first compile). Set torch_compile=False.")
        if getattr(args, "fp16", False) and getattr(args, "deepspeed", None):
            raise ValueError("AnchorCallback cannot read DeepSpeed's fp16 loss scale, so its penalty would be scaled "
                             "wrong. Use bf16=True with DeepSpeed, or fp16 without DeepSpeed.")

    @staticmethod
    def _needs_template(tok: Any, what: str) -> Any:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(
                f"AnchorCallback needs a tokenizer with a chat template for {what}: pass processing_class=tokenizer to "
                "the trainer and make sure tokenizer.chat_template is set (an instruct/chat model's tokenizer).")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _weight_at(self, step: int) -> float:
        warm = self.config.weight_warmup_steps
        return self.config.weight * (min(1.0, step / warm) if warm else 1.0)

    def _log_layers(self, layers: list[int], chosen: bool) -> None:
        """Say which layers the anchor reads, and why when it chose them itself."""
        cos = self.axis.pc1_cosine().abs()
        why = (f"chosen from the bundle: the {len(layers)} contiguous layers between the middle and 85% of the depth "
               f"with the highest mean |cosine(axis, PC1)|, {float(cos[layers].mean()):.2f}" if chosen else "as given")
        tau = ", ".join(f"{i}: {t:.2f}" for i, t in sorted(self.anchor.tau.items()))
        own = "".join(f"; {name} at its own layers {list(own_layers)}"
                      for name, own_layers in self.anchor.method_layers.items() if list(own_layers) != list(layers))
        logger.info("anchor: method=%s at layers %s (%s)%s; weights %s; floor tau (p%g) {%s}",
                    "+".join(self.config.method), layers, why, own, self.config.weights(), self.config.floor_percentile,
                    tau)

    def _load_axis(self, model: nn.Module, tokenizer: Any, args: Any) -> AssistantAxis:
        """``config.axis``, or the model's axis computed on every rank in lockstep; rank 0's result wins and is cached.

        Every rank runs the extraction (under ZeRO-3 a forward needs all ranks); rank 0's axis is then broadcast so
        all ranks anchor to identical numbers.
        """
        if self.config.axis is not None:
            return AssistantAxis.from_pretrained(self.config.axis)
        from accelerate.utils import broadcast_object_list

        self._needs_template(tokenizer, "computing the axis on the fly")
        peft = find_peft(model)
        with preserved_rng(), (peft.disable_adapter() if peft is not None else contextlib.nullcontext()):
            axis = cached_axis(unwrap(model), tokenizer, self.config.axis_settings(), self.config.axis_batch_size,
                               progress=args.process_index == 0, write=args.process_index == 0)
        if args.world_size > 1:
            axis = broadcast_object_list([axis], from_process=0)[0]
        return axis

    def _probe_monitor(self, model: nn.Module, tokenizer: Any, reference: Reference | None,
                       saved: AnchorState | None) -> ProbeMonitor:
        cfg = self.config
        tok = self._needs_template(tokenizer, "probe drift (probe_every > 0)")
        roles = far_role_prompts(self.axis, cfg.probe_far_roles) if reference is not None and cfg.probe_far_roles \
            else []
        monitor = ProbeMonitor(self.axis, tok, cfg.probe_mode, cfg.probe_max_new_tokens, cfg.probe_batch_size,
                               reference, roles)
        if saved is not None and saved.probes is not None:
            monitor.load_state_dict(saved.probe_tensors(), saved.probes)
        else:
            monitor.start(unwrap(model), cfg.probe_file, cfg.probes_per_domain)
        return monitor

    # -- the training loop -----------------------------------------------------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is None:
            return
        self.anchor.weight = self._weight_at(state.global_step)
        self.anchor.start_step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is None:
            return
        self.anchor.check_finite(state.global_step)
        every = self.config.probe_every
        if self.probes is None or not every or state.global_step % every:
            return
        run = dashboards.active_run()
        measured = self.probes.measure(unwrap(self.anchor.model), answers_table=run is not None)
        for name, value in measured.items():
            self._pending[name] = [value, 1.0]
        if run is not None:
            dashboards.log_probe_table(run, state.global_step, self.probes.rows, self.config.log_prefix)
        control.should_log = True  # probes are logged at the step they were taken

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.anchor is None or logs is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return
        run = dashboards.active_run()
        if run is not None and not self._axis_logged:  # the trainer's WandbCallback starts the run after set-up
            dashboards.log_axis_artifact(run, self.axis, self.config.axis)
            self._axis_logged = True
        loss = logs.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise RuntimeError(f"anchor: the training loss is {loss} at step {state.global_step}; the run is stopped. "
                               "Lower the learning rate, or use bf16 instead of fp16; resume from the last checkpoint.")
        for name, (total, count) in self.anchor.pop_metrics().items():
            acc = self._pending.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
        merged = _reduce(self._pending)
        self._pending = {}
        prefix = self.config.log_prefix
        for name, (total, count) in sorted(merged.items()):
            if count > 0 and (name != "nonfinite" or total > 0):
                logs[f"{prefix}/{name}"] = total / count
        if merged:
            logs[f"{prefix}/weight"] = self.anchor.weight
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:  # the Trainer copied logs there before on_log
            history[-1].update({k: v for k, v in logs.items() if k.startswith(f"{prefix}/")})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is not None:
            self.anchor.detach()
        run = dashboards.active_run()
        if run is not None and self.probes is not None:
            series = probe_drift_series(state.log_history, self.config.log_prefix)
            dashboards.log_drift_chart(run, series, state.global_step, self.config.log_prefix)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Called by the trainer while it saves a checkpoint, before it writes ``trainer_state.json``: write the
        anchor state into that checkpoint now, so a checkpoint the trainer can resume always carries it."""
        trainer = self.trainer
        if self.anchor is not None and trainer is not None and trainer.control.should_save and trainer.args.should_save:
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            if checkpoint.is_dir():
                self.save_state(checkpoint / STATE_DIR, trainer.state.global_step)
        return {"args": {"config": asdict(self.config)}, "attributes": {}}

    def save_state(self, directory: str | Path, step: int) -> None:
        """Write the bundle, τ, the methods' state and the probe baselines into ``directory``."""
        tensors, methods = self.anchor.state_dict()
        probes = None
        if self.probes is not None:
            probe_tensors, probes = self.probes.state_dict()
            tensors.update({f"probe.{k}": v for k, v in probe_tensors.items()})
        save_state(directory, AnchorState(self.axis, step, asdict(self.config), self.anchor.layers, self.anchor.tau,
                                          methods, probes, tensors))



def _reduce(local: dict[str, list[float]]) -> dict[str, list[float]]:
    """Sum ``{name: [sum, count]}`` over processes (names may differ between them); every process gets the result."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    if PartialState().num_processes <= 1:
        return local
    merged: dict[str, list[float]] = {}
    for part in gather_object([local]):
        for name, (total, count) in part.items():
            acc = merged.setdefault(name, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    return merged


def _grad_scale(optimizer: Any) -> Any:
    """The fp16 loss scale accelerate multiplies the loss by (``AcceleratedOptimizer.scaler``), or None."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None

    def scale() -> torch.Tensor | float:
        current = getattr(scaler, "_scale", None)
        return current if isinstance(current, torch.Tensor) else scaler.get_scale()

    return scale


__all__ = ["AnchorCallback", "AnchorConfig"]
