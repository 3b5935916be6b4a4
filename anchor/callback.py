"""``AnchorCallback``: the training-time anchor as a drop-in ``transformers``/TRL callback.

The callback is a thin adapter around :class:`anchor.loss.Anchor` (the hooks and penalties) and
:mod:`anchor.probes` (drift measurement). It does what only a trainer integration can do:

* **Set-up** (``on_train_begin``): load the axis bundle, or compute it on the fly on every rank in lockstep (rank
  0's result is broadcast, and cached under ``anchor.models.cache_dir()/axes/`` by model fingerprint); check it
  fits the model; install the hooks; answer the probes once with the base model (step 0 baseline).
* **Scaling**: the penalty is divided by ``gradient_accumulation_steps`` and, under fp16 loss scaling, its
  gradient is multiplied by the current loss scale, read from the ``AcceleratedOptimizer``'s ``scaler``.
* **Metrics**: summed over the steps since the last log, reduced over ranks and written into the trainer's
  ``logs`` so every reporter (wandb, TensorBoard, console) gets them at the same ``global_step``. Reporters run
  in callback order and user callbacks come last, so the callback moves itself to the front of the trainer's
  callback list. The callback API passes no trainer; it finds the one calling it by walking up the call stack to
  the ``Trainer`` method that fired the event (``Trainer.__init__`` or ``_inner_training_loop``), or is given it
  with :meth:`AnchorCallback.set_trainer`.
* **Checkpoints**: every ``checkpoint-N/`` gets an ``anchor/`` folder holding the bundle, τ, the probe answers
  and their step-0 baseline, and the replay batch. Resuming restores them exactly and never recomputes the axis
  from a half-trained model.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from anchor.axis import AssistantAxis, compute_axis
from anchor.hooks import check_layers
from anchor.loss import METHODS, Anchor, Reference, ReplayBatch, default_layers, find_peft
from anchor.models import cache_dir, decoder_layers, fingerprint, unwrap
from anchor.personas import load_default_prompts, load_questions
from anchor.probes import (
    PROBE_MODES,
    ProbeSet,
    answer_projections,
    build_probe_set,
    domain_means,
    drift_scores,
    far_role_prompts,
    generate_answers,
    pack_answers,
    preserved_rng,
    role_likeness,
)
from anchor.spans import encode_prompt

logger = logging.getLogger(__name__)

STATE_DIR = "anchor"
STATE_JSON = "anchor_state.json"
STATE_TENSORS = "anchor_state.safetensors"
STATE_FORMAT = 1


@dataclass
class AnchorConfig:
    """Settings of the training-time anchor; parse it with ``trl.TrlParser`` next to ``SFTConfig``/``DPOConfig``.

    No field shares a name with ``TrainingArguments`` or the TRL configs, so all of them fit in one parser.
    """

    axis: str | None = field(default=None, metadata={
        "help": "Directory of an Assistant-Axis bundle (`anchor axis --out DIR`). None: compute it on the fly at the "
                "start of training (cached by model fingerprint)."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers to anchor (0-based). None: a band in the upper middle of the network where "
                "cosine(axis, PC1) is highest (anchor.loss.default_layers)."})
    method: str = field(default="floor", metadata={
        "help": "floor (hinge below τ), match (stay at the frozen reference's projections), replay (the model's own "
                "default-persona answers keep the reference's projections) or preventative (steer away from the "
                "Assistant during training only)."})
    weight: float = field(default=1.0, metadata={
        "help": "λ, the penalty's weight; distances are in default-to-role gaps. 0 leaves training untouched "
                "(metrics still logged)."})
    floor_percentile: float = field(default=10.0, metadata={
        "help": "τ is this percentile (0-100) of the default Assistant's per-answer projections at each layer."})
    probe_every: int = field(default=0, metadata={
        "help": "Measure probe drift every N optimizer steps (0 = off)."})
    weight_warmup_steps: int = field(default=0, metadata={
        "help": "λ rises linearly from 0 to `weight` over this many optimizer steps."})
    axis_check_weights: bool = field(default=True, metadata={
        "help": "Refuse a bundle whose model fingerprint differs; set False when the model is a fine-tune of the "
                "bundle's model."})
    axis_n_roles: int | None = field(default=50, metadata={
        "help": "On-the-fly axis: number of shipped roles to sample (None = all)."})
    axis_n_questions: int | None = field(default=20, metadata={
        "help": "On-the-fly axis: number of shipped questions (None = all)."})
    axis_prompts_per_role: int | None = field(default=1, metadata={
        "help": "On-the-fly axis: system prompts per role (None = all)."})
    axis_max_new_tokens: int = field(default=32, metadata={"help": "On-the-fly axis: tokens generated per answer."})
    axis_batch_size: int = field(default=32, metadata={"help": "On-the-fly axis: generation batch size."})
    probe_file: str | None = field(default=None, metadata={
        "help": "Your own probes: JSON {'version': 1, 'probes': [{'domain': ..., 'prompt': ...}]} or JSONL of such "
                "objects. None: the 64 shipped probes (coding, writing, emotional, meta)."})
    probes_per_domain: int | None = field(default=None, metadata={
        "help": "Use the first N probes of each domain (None = all); each probe step costs a forward over them."})
    probe_mode: str = field(default="teacher_forced", metadata={
        "help": "teacher_forced: re-read the base model's step-0 answers; generated: answer again each time."})
    probe_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per probe answer."})
    probe_batch_size: int = field(default=16, metadata={"help": "Batch size of probe forwards and generation."})
    probe_far_roles: int = field(default=3, metadata={
        "help": "Role-likeness score: number of far roles (bottom of the axis) compared with the default prompt; "
                "0 = off. Needs a frozen reference (PEFT, or method match/replay)."})
    replay_batch_size: int = field(default=8, metadata={"help": "Replay: default-persona conversations per step."})
    replay_refresh_steps: int = field(default=10, metadata={
        "help": "Replay: the model re-answers the replay prompts every N optimizer steps."})
    replay_max_new_tokens: int = field(default=48, metadata={"help": "Replay: tokens sampled per answer."})
    replay_layers: list[int] | None = field(default=None, metadata={
        "help": "Replay: layers compared with the reference (None = from the first anchor layer to the last layer)."})
    lm_replay_weight: float = field(default=0.0, metadata={
        "help": "Any method: each optimizer step also adds weight x lm_replay_weight x the LM loss of the base "
                "model's own answers to replay_batch_size default-persona questions (from a pool of lm_replay_pool "
                "answered before training). Axis-free; with preventative steering it kept the most persona in "
                "scripts/bench_drift.py. 0 = off."})
    replay_questions: list[str] | None = field(default=None, metadata={
        "help": "Replay (method='replay' and LM replay): the questions asked, with a default system prompt; None = "
                "the shipped questions. Keep them apart from the questions you measure drift on."})
    lm_replay_pool: int = field(default=32, metadata={
        "help": "LM replay: default-persona questions the base model answers before training."})
    steer_coefficient: float = field(default=0.01, metadata={
        "help": "Preventative: steering strength k, in units of the layer's mean residual norm (added at every anchor "
                "layer, so keep it small: 0.05 over 11 layers already quadruples SmolLM2's NLL of in-role text)."})
    log_prefix: str = field(default="anchor", metadata={"help": "Prefix of the logged metrics."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"AnchorConfig.method={self.method!r}; choose one of {METHODS}.")
        if self.probe_mode not in PROBE_MODES:
            raise ValueError(f"AnchorConfig.probe_mode={self.probe_mode!r}; choose one of {PROBE_MODES}.")
        if not 0 <= self.floor_percentile <= 100:
            raise ValueError(f"AnchorConfig.floor_percentile={self.floor_percentile} must be within 0..100.")
        for name in ("weight", "probe_every", "weight_warmup_steps", "probe_far_roles", "steer_coefficient",
                     "lm_replay_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"AnchorConfig.{name}={getattr(self, name)} must be >= 0.")
        if self.replay_questions is not None and not all(isinstance(q, str) and q.strip()
                                                         for q in self.replay_questions or [""]):
            raise ValueError("AnchorConfig.replay_questions must be a non-empty list of non-empty strings (or None "
                             "for the shipped questions).")
        if self.probes_per_domain is not None and self.probes_per_domain < 1:
            raise ValueError(f"AnchorConfig.probes_per_domain={self.probes_per_domain} must be >= 1 (None: all).")
        for name in ("replay_batch_size", "replay_refresh_steps", "replay_max_new_tokens", "lm_replay_pool",
                     "probe_max_new_tokens",
                     "probe_batch_size", "axis_max_new_tokens", "axis_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"AnchorConfig.{name}={getattr(self, name)} must be >= 1.")


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


def _dist() -> Any:
    """``torch.distributed`` when a process group is running, else None."""
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def _tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


class AnchorCallback(TrainerCallback):
    """Keep the model in its Assistant persona while a ``transformers``/TRL trainer fine-tunes it.

    ``axis`` (an :class:`AssistantAxis`) overrides ``config.axis``. After ``on_train_begin`` the bundle is
    ``self.axis`` and the hooks are ``self.anchor``; both go away at the end of training (hooks never act at
    inference or evaluation, since they only act in training mode).
    """

    def __init__(self, config: AnchorConfig | None = None, axis: AssistantAxis | None = None):
        self.config = config if config is not None else AnchorConfig()
        self._given_axis = axis
        self.axis: AssistantAxis | None = None
        self.anchor: Anchor | None = None
        self.trainer: Any = None
        self.tau: dict[int, float] = {}
        self.probes: ProbeSet | None = None
        self.probe_answers: list[list[int]] | None = None
        self.probe_baseline: torch.Tensor | None = None
        self.role_baseline: torch.Tensor | None = None
        self._reference: Reference | None = None
        self._role_prompts: list[str] = []
        self._replay_prompts: list[list[int]] = []
        self._tokenizer: Any = None
        self._restored_replay: ReplayBatch | None = None
        self.lm_pool: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, list[float]] = {}

    # -- finding the trainer ---------------------------------------------------------------------------------

    def set_trainer(self, trainer: Any) -> None:
        """Bind the trainer explicitly and move this callback ahead of the reporters in its callback list."""
        self.trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks and callbacks[0] is not self:
            # Safe while the handler iterates: removing at i and inserting at 0 leaves every later index in place.
            callbacks.remove(self)
            callbacks.insert(0, self)

    def _bind(self) -> dict[str, Any]:
        trainer, frame_locals = _trainer_on_stack()
        if trainer is not None:
            self.set_trainer(trainer)
        elif self.trainer is None:
            logger.warning(
                "AnchorCallback could not find its Trainer on the call stack; call callback.set_trainer(trainer) so "
                "its metrics reach the reporters (wandb, TensorBoard) that run before it.")
        return frame_locals

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind()

    # -- set-up -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       processing_class: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        frame_locals = self._bind()
        if model is None:
            raise ValueError("AnchorCallback needs the model: the trainer passed none to on_train_begin.")
        self._check_trainer(args)
        if self.anchor is not None:
            self.anchor.detach()
        cfg = self.config
        self._tokenizer = _tokenizer(processing_class)
        decoder_layers(model)  # a clear error for an architecture whose layers cannot be hooked
        self.tau, self.probes, self.role_baseline, self._restored_replay, self.lm_pool = {}, None, None, None, None
        checkpoint = self._find_checkpoint_state(args, state, frame_locals) if state.global_step > 0 else None
        if checkpoint is not None:
            self._load_state(checkpoint, model)
        else:
            self.axis = self._given_axis if self._given_axis is not None else self._load_axis(model, args)
            self.axis.check_compatible(model, check_weights=cfg.axis_check_weights)
        try:
            wanted = sorted(self.tau) or cfg.layers or default_layers(self.axis)
            layers = check_layers(wanted, self.axis.n_layers)
        except ValueError as err:
            raise ValueError(f"AnchorConfig.layers: {err}") from None
        self._reference = self._make_reference(model, resumed=checkpoint is not None)
        self.anchor = Anchor(
            model, self.axis, cfg.method, layers, self._weight_at(state.global_step), cfg.floor_percentile,
            cfg.steer_coefficient, self._reference, cfg.replay_layers, args.gradient_accumulation_steps,
            _grad_scale(optimizer), lm_replay_weight=cfg.lm_replay_weight,
        )
        if self.tau:  # restored: τ exactly as the run started with it
            self.anchor.tau = dict(self.tau)
        self.tau = dict(self.anchor.tau)
        self.anchor.replay = self._restored_replay
        self._log_layers(layers, chosen=not (checkpoint or cfg.layers))
        self._role_prompts = []
        if cfg.probe_every and self._reference is not None and cfg.probe_far_roles:
            self._role_prompts = far_role_prompts(self.axis, cfg.probe_far_roles)
            if not self._role_prompts:
                logger.warning("anchor: none of the axis's roles has a known system prompt; role-likeness is off.")
        if cfg.probe_every and checkpoint is None:
            self._probe_baseline(model)
        if cfg.method == "replay":
            self._replay_prompts = self._default_prompts(cfg.replay_batch_size, f"anchor-replay-{args.seed}")
        if cfg.lm_replay_weight > 0 and self.lm_pool is None:
            if state.global_step > 0:
                raise ValueError(
                    "AnchorConfig.lm_replay_weight > 0, but the checkpoint was trained without LM replay: its pool of "
                    "base-model answers cannot be written by the half-trained model. Resume with lm_replay_weight=0, "
                    "or start the run again with it.")
            self.lm_pool = self._make_lm_pool(model, args.seed)

    def _log_layers(self, layers: list[int], chosen: bool) -> None:
        """Say which layers the anchor reads, and why when it chose them itself."""
        cos = self.axis.pc1_cosine().abs()
        why = (f"chosen from the bundle: the {len(layers)} contiguous layers between the middle and 85% of the depth "
               f"with the highest mean |cosine(axis, PC1)|, {float(cos[layers].mean()):.2f}" if chosen else "as given")
        tau = ", ".join(f"{i}: {t:.2f}" for i, t in sorted(self.tau.items()))
        logger.info("anchor: method=%s at layers %s (%s); floor tau (p%g) {%s}", self.config.method, layers, why,
                    self.config.floor_percentile, tau)

    def _make_reference(self, model: nn.Module, resumed: bool) -> Reference | None:
        """The frozen reference: always for match/replay; for the role-likeness probe only when PEFT makes it free."""
        cfg = self.config
        peft = find_peft(model) is not None
        if cfg.method not in ("match", "replay") and not (cfg.probe_every and cfg.probe_far_roles and peft):
            return None
        # The policy's forward runs under the trainer's autocast (TRL configs default to bf16); so must the reference.
        autocast = getattr(getattr(self.trainer, "accelerator", None), "autocast", None)
        frozen = self._reload_base(model) if resumed and not peft else None
        return Reference(model, frozen=frozen, autocast=autocast)

    def _reload_base(self, model: nn.Module) -> nn.Module:
        """On resume of a full fine-tune the model has moved: reload the base weights and check their fingerprint."""
        from transformers import AutoModelForCausalLM

        base = unwrap(model)
        source = getattr(base.config, "_name_or_path", "")
        expected = self.axis.metadata.get("fingerprint")
        hint = ("Resuming full fine-tuning with method='match'/'replay' needs the base model as the frozen reference; "
                "train a PEFT adapter, or start from a model saved with save_pretrained whose config._name_or_path "
                "points at it.")
        if not source:
            raise RuntimeError(f"anchor: the model has no config._name_or_path to reload its base weights from. {hint}")
        try:
            frozen = AutoModelForCausalLM.from_pretrained(source, dtype=next(base.parameters()).dtype)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"anchor: cannot reload the base model from config._name_or_path={source!r} ({err}). "
                               f"{hint}") from None
        frozen.to(next(base.parameters()).device)
        if expected and fingerprint(frozen) != expected:
            raise RuntimeError(f"anchor: {source!r} is not the model the axis was computed on. {hint}")
        return frozen

    def _check_trainer(self, args: Any) -> None:
        if getattr(args, "torch_compile", False):
            raise ValueError(
                "AnchorCallback cannot anchor a torch.compile'd model (compiled graphs ignore hooks added after the "
                "first compile). Set torch_compile=False.")
        if getattr(args, "fp16", False) and getattr(args, "deepspeed", None):
            raise ValueError(
                "AnchorCallback cannot read DeepSpeed's fp16 loss scale, so its penalty would be scaled wrong. Use "
                "bf16=True with DeepSpeed, or fp16 without DeepSpeed.")

    def _needs_template(self, what: str) -> Any:
        tok = self._tokenizer
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

    # -- the axis -----------------------------------------------------------------------------------------------

    def _load_axis(self, model: nn.Module, args: Any) -> AssistantAxis:
        if self.config.axis is not None:
            return AssistantAxis.from_pretrained(self.config.axis)
        return self._axis_on_the_fly(model, args)

    def _axis_on_the_fly(self, model: nn.Module, args: Any) -> AssistantAxis:
        """Compute the axis of the model as it is before training, on every rank in lockstep; rank 0's result wins.

        Every rank runs the extraction (under ZeRO-3 a forward needs all ranks), then rank 0's axis is broadcast so
        all ranks anchor to identical numbers, and rank 0 caches it by model fingerprint and settings.
        """
        cfg = self.config
        tok = self._needs_template("computing the axis on the fly")
        settings = {"n_roles": cfg.axis_n_roles, "n_questions": cfg.axis_n_questions,
                    "prompts_per_role": cfg.axis_prompts_per_role, "max_new_tokens": cfg.axis_max_new_tokens}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        path = cache_dir() / "axes" / f"{fingerprint(model)}-{digest}"
        dist = _dist()
        found = torch.tensor([float((path / "axis_config.json").is_file())])
        if dist is not None:
            found = found.to(args.device)
            dist.all_reduce(found, op=dist.ReduceOp.MIN)
        if found.item() == 1.0:
            logger.info("anchor: using the cached axis %s", path)
            return AssistantAxis.from_pretrained(path)
        logger.info("anchor: computing the Assistant Axis on the fly (%s); it is cached in %s", settings, path)
        peft = find_peft(model)
        with preserved_rng(), (peft.disable_adapter() if peft is not None else contextlib.nullcontext()):
            axis = compute_axis(
                unwrap(model), tok, n_roles=cfg.axis_n_roles, n_questions=cfg.axis_n_questions,
                prompts_per_role=cfg.axis_prompts_per_role, max_new_tokens=cfg.axis_max_new_tokens,
                batch_size=cfg.axis_batch_size, progress=args.process_index == 0,
            )
        if dist is not None:
            box = [axis]
            dist.broadcast_object_list(box, src=0)
            axis = box[0]
        if args.process_index == 0:
            axis.save_pretrained(path)
        return axis

    # -- probes ---------------------------------------------------------------------------------------------

    def _probe_baseline(self, model: nn.Module) -> None:
        cfg = self.config
        tok = self._needs_template("probe drift (probe_every > 0)")
        self.probes = build_probe_set(tok, cfg.probe_file, cfg.probes_per_domain)
        base = unwrap(model)
        self.probe_answers = generate_answers(base, tok, self.probes.prompts, cfg.probe_max_new_tokens,
                                              cfg.probe_batch_size)
        self.probe_baseline = answer_projections(base, self.probes.prompts, self.probe_answers, self.axis,
                                                 batch_size=cfg.probe_batch_size, pad_id=tok.pad_token_id)
        if self._role_prompts:
            with self._reference.active() as ref:
                self.role_baseline = role_likeness(ref, tok, self.probes.texts, self.probe_answers, self._role_prompts,
                                                   cfg.probe_batch_size)

    def measure_probes(self, model: nn.Module) -> dict[str, float]:
        """Probe drift (and role-likeness where a reference exists) of the model now, as ``{metric: value}``."""
        cfg, tok, probes = self.config, self._tokenizer, self.probes
        base = unwrap(model)
        answers = self.probe_answers
        if cfg.probe_mode == "generated" or self._role_prompts:
            fresh = generate_answers(base, tok, probes.prompts, cfg.probe_max_new_tokens, cfg.probe_batch_size)
            if cfg.probe_mode == "generated":
                answers = fresh
        current = answer_projections(base, probes.prompts, answers, self.axis, batch_size=cfg.probe_batch_size,
                                     pad_id=tok.pad_token_id)
        out = {}
        for name, z in drift_scores(current, self.probe_baseline, probes.domains).items():
            out["probe_drift" + (f"/{name}" if name else "")] = z
        if self._role_prompts:
            with self._reference.active() as ref:
                score = role_likeness(ref, tok, probes.texts, fresh, self._role_prompts, cfg.probe_batch_size)
            for name, value in domain_means(score, probes.domains).items():
                out["role_likeness" + (f"/{name}" if name else "")] = value
        return out

    # -- replay -------------------------------------------------------------------------------------------------

    def _default_prompts(self, n: int, salt: str, system_prompts: bool = True) -> list[list[int]]:
        """``n`` default-persona conversations for replay: seeded (default system prompt, question) pairs, or the
        question alone when ``system_prompts`` is False."""
        tok = self._needs_template("replay (method='replay' or lm_replay_weight > 0)")
        systems = load_default_prompts() if system_prompts else [""]
        questions = self.config.replay_questions or load_questions()
        rng = random.Random(salt)
        pairs = [(rng.choice(systems), rng.choice(questions)) for _ in range(n)]
        return [encode_prompt(tok, ([{"role": "system", "content": s}] if s else [])
                              + [{"role": "user", "content": q}]) for s, q in pairs]

    def _make_lm_pool(self, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
        """The base model's greedy answers to ``lm_replay_pool`` plain questions (no system prompt), packed ``[P, T]``.

        Plain, because that is the form in which fine-tuning data without a system prompt overwrites the Assistant:
        in ``scripts/bench_drift.py`` a replay with default system prompts on most rows kept far less persona than
        one with none.
        """
        cfg, tok = self.config, self._tokenizer
        prompts = self._default_prompts(cfg.lm_replay_pool, f"anchor-lm-replay-{seed}", system_prompts=False)
        answers = generate_answers(unwrap(model), tok, prompts, cfg.replay_max_new_tokens, cfg.replay_batch_size)
        answers = [a or [tok.eos_token_id] for a in answers]
        ids, attention, answer = pack_answers(prompts, answers, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": attention, "answer_mask": answer.bool()}

    def _set_lm_replay(self, step: int, args: Any) -> None:
        """This step's LM replay rows: drawn from the pool by (seed, step, rank) alone, so a resume repeats them."""
        pool = self.lm_pool
        n = pool["input_ids"].shape[0]
        rng = random.Random(f"anchor-lm-replay-{args.seed}-{step}-{args.process_index}")
        rows = torch.tensor(sorted(rng.sample(range(n), min(self.config.replay_batch_size, n))))
        width = int(pool["attention_mask"][rows].sum(dim=1).max())  # right-padded: drop all-padding columns
        self.anchor.set_lm_replay(*(pool[k][rows, :width] for k in ("input_ids", "attention_mask", "answer_mask")))

    def _refresh_replay(self, step: int, args: Any) -> None:
        cfg, tok = self.config, self._tokenizer
        seed = (args.seed * 1_000_003 + step) * 101 + args.process_index
        answers = generate_answers(unwrap(self.anchor.model), tok, self._replay_prompts, cfg.replay_max_new_tokens,
                                   cfg.replay_batch_size, sample=True, seed=seed)
        ids, attention, answer = pack_answers(self._replay_prompts, answers, tok.pad_token_id)
        self.anchor.set_replay(ids, attention, answer, step)

    # -- the training loop ------------------------------------------------------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is None:
            return
        self.anchor.weight = self._weight_at(state.global_step)
        self.anchor.start_step()
        replay = self.anchor.replay
        due = state.global_step % self.config.replay_refresh_steps == 0
        if self.config.method == "replay" and self.anchor.weight > 0 and (replay is None or (
                due and replay.step != state.global_step)):
            self._refresh_replay(state.global_step, args)
        if self.lm_pool is not None and self.anchor.weight > 0:
            self._set_lm_replay(state.global_step, args)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        every = self.config.probe_every
        if self.anchor is None or not every or state.global_step % every or self.probes is None:
            return
        for name, value in self.measure_probes(self.anchor.model).items():
            self._pending[name] = [value, 1.0]
        control.should_log = True  # probes are logged at the step they were taken

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.anchor is None or logs is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return
        for name, (total, count) in self.anchor.pop_metrics().items():
            acc = self._pending.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
        merged = self._reduce(self._pending)
        self._pending = {}
        prefix = self.config.log_prefix
        for name, (total, count) in sorted(merged.items()):
            if count <= 0:
                continue
            value = total / count
            if name == "nonfinite":
                if value > 0:
                    logger.warning(
                        "anchor: %.2g%% of token projections were NaN/Inf since the last log (step %d); those "
                        "micro-batches carried no anchor penalty. Lower the learning rate or check for fp16 overflow.",
                        100 * value, state.global_step)
                    logs[f"{prefix}/nonfinite"] = value
                continue
            logs[f"{prefix}/{name}"] = value
        if merged:
            logs[f"{prefix}/weight"] = self.anchor.weight
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:  # the Trainer copied logs there before on_log
            history[-1].update({k: v for k, v in logs.items() if k.startswith(f"{prefix}/")})

    @staticmethod
    def _reduce(local: dict[str, list[float]]) -> dict[str, list[float]]:
        """Sum ``{name: [sum, count]}`` over ranks (names may differ between ranks); every rank gets the result."""
        dist = _dist()
        if dist is None:
            return local
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged: dict[str, list[float]] = {}
        for part in gathered:
            for name, (total, count) in part.items():
                acc = merged.setdefault(name, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        return merged

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is not None:
            self.anchor.detach()

    # -- checkpoints --------------------------------------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.anchor is None or not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            logger.warning("anchor: %s does not exist; the anchor state was not saved with this checkpoint.",
                           checkpoint)
            return
        self.save_state(checkpoint / STATE_DIR, state.global_step)

    def save_state(self, directory: str | os.PathLike, step: int) -> None:
        """Write the bundle, τ, the probe set and baseline, the replay batch and the LM replay pool into
        ``directory``."""
        directory = Path(directory)
        self.axis.save_pretrained(directory)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {
            "format": STATE_FORMAT, "step": step, "config": asdict(self.config),
            "layers": self.anchor.layers, "tau": {str(k): v for k, v in self.tau.items()},
        }
        if self.probes is not None:
            meta["probes"] = {"domains": self.probes.domains, "texts": self.probes.texts,
                              "prompts": self.probes.prompts, "answers": self.probe_answers}
            tensors["probe_baseline"] = self.probe_baseline
            if self.role_baseline is not None:
                tensors["role_baseline"] = self.role_baseline
        if self.lm_pool is not None:
            tensors.update({f"lm_pool.{k}": v for k, v in self.lm_pool.items()})
        if self.anchor.replay is not None:
            meta["replay_step"] = self.anchor.replay.step
            tensors.update({f"replay.{k}": v for k, v in self.anchor.replay.tensors().items()})
        tmp = directory / f".tmp-{STATE_TENSORS}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, directory / STATE_TENSORS)
        tmp = directory / f".tmp-{STATE_JSON}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, directory / STATE_JSON)

    def _find_checkpoint_state(self, args: Any, state: Any, frame_locals: dict[str, Any]) -> Path | None:
        """The ``anchor/`` folder of the checkpoint being resumed (training starts at ``global_step > 0``)."""
        candidates = [frame_locals.get("resume_from_checkpoint"), getattr(args, "resume_from_checkpoint", None),
                      Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        for candidate in candidates:
            if isinstance(candidate, str | os.PathLike) and (Path(candidate) / STATE_DIR / STATE_JSON).is_file():
                return Path(candidate) / STATE_DIR
        if self.config.axis is not None or self._given_axis is not None:
            logger.warning(
                "anchor: resuming at step %d from a checkpoint without anchor state; using the given axis bundle and "
                "starting a new probe baseline.", state.global_step)
            return None
        raise RuntimeError(
            f"Resuming at step {state.global_step}, but the checkpoint has no {STATE_DIR}/ folder, and the axis "
            "would be computed on the fly from the half-trained model. Pass the bundle the run started with "
            "(AnchorConfig.axis) or resume from a checkpoint saved with AnchorCallback.")

    def _load_state(self, directory: Path, model: nn.Module) -> None:
        meta = json.loads((directory / STATE_JSON).read_text())
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{directory} holds anchor state format {meta.get('format')}; this anchor reads "
                             f"{STATE_FORMAT}.")
        saved = meta["config"]
        for name in ("method", "floor_percentile"):
            if saved.get(name) != getattr(self.config, name):
                raise ValueError(
                    f"The checkpoint was trained with AnchorConfig.{name}={saved.get(name)!r}, this run has "
                    f"{getattr(self.config, name)!r}; resume with the same anchor settings.")
        if self.config.layers is not None and sorted(self.config.layers) != meta["layers"]:
            raise ValueError(f"The checkpoint anchors layers {meta['layers']}, this run asks for "
                             f"{sorted(self.config.layers)}; resume with the same layers.")
        self.axis = AssistantAxis.from_pretrained(directory)
        self.axis.check_compatible(model, check_weights=False)  # the model is mid-training: shapes only
        self.tau = {int(k): float(v) for k, v in meta["tau"].items()}
        tensors = load_file(str(directory / STATE_TENSORS)) if (directory / STATE_TENSORS).is_file() else {}
        probes = meta.get("probes")
        if probes is not None:
            self.probes = ProbeSet(probes["domains"], probes["texts"], probes["prompts"])
            self.probe_answers = probes["answers"]
            self.probe_baseline = tensors["probe_baseline"]
            self.role_baseline = tensors.get("role_baseline")
        pool = {k[8:]: v for k, v in tensors.items() if k.startswith("lm_pool.")}
        self.lm_pool = {**pool, "answer_mask": pool["answer_mask"].bool()} if pool else None
        self._restored_replay = (
            ReplayBatch.from_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("replay.")},
                                     meta["replay_step"]) if "replay_step" in meta else None)


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
