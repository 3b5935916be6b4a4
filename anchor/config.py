"""``AnchorConfig``: every setting of the training-time anchor, one flat dataclass that ``trl.TrlParser`` parses
next to ``SFTConfig``/``DPOConfig`` (no field shares a name with ``TrainingArguments`` or the TRL configs).

``method`` names one or more registered anchoring methods (:mod:`anchor.methods`), composed in one run, each with
its own weight in ``method_weights``. A method declares which fields it reads; a field set away from its default
that no chosen method reads gets a warning naming it (recipes switch methods on the command line, so it is not an
error). Every default is written here, once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from anchor.axis import AxisSettings

logger = logging.getLogger(__name__)

PROBE_MODES = ("teacher_forced", "generated")

# Fields every run reads, whatever its methods (the axis, the anchored band, λ, probes, logging).
COMMON_FIELDS = frozenset({
    "axis", "layers", "method", "method_weights", "weight", "weight_warmup_steps", "floor_percentile",
    "axis_check_weights", "axis_n_roles", "axis_n_questions", "axis_prompts_per_role", "axis_max_new_tokens",
    "axis_batch_size", "probe_every", "probe_file", "probes_per_domain", "probe_mode", "probe_max_new_tokens",
    "probe_batch_size", "probe_far_roles", "log_prefix",
})


@dataclass
class AnchorConfig:
    """Settings of the training-time anchor; parse it with ``trl.TrlParser`` next to ``SFTConfig``/``DPOConfig``."""

    axis: str | None = field(default=None, metadata={
        "help": "Directory of an Assistant-Axis bundle (`anchor axis --out DIR`). None: compute it on the fly at the "
                "start of training (cached by model fingerprint)."})
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers to anchor (0-based). None: a band in the upper middle of the network where "
                "cosine(axis, PC1) is highest (anchor.engine.default_layers)."})
    method: list[str] = field(default_factory=lambda: ["preventative", "kl"], metadata={
        "help": "One or more registered methods, composed: floor, match, replay, preventative, lm_replay, kl, "
                "incremental, ablate (see anchor.methods.available_methods()). YAML `method: [preventative, kl]`, "
                "CLI `--method preventative kl`. The default, steering + KL, kept as much persona as steering + LM "
                "replay in the drift benchmark's two realistic scenarios at a quarter of the task cost where the "
                "drift spread beyond the trained questions, with less overshoot at the worst layer "
                "(docs/drift-benchmark.md). "
                "KL reads the frozen base model: free with PEFT, a copy of the weights under full fine-tuning, "
                "impossible under ZeRO-3/FSDP; there use [preventative, lm_replay] (recipes/sft-full.yaml). It taxes "
                "a preference that is not a role more (DPO: recipes/dpo-lora.yaml keeps LM replay)."})
    method_weights: list[float] | None = field(default=None, metadata={
        "help": "Per-method weight, one per entry of `method` (None: 1 each). Each method's term is scaled by "
                "weight x its method weight."})
    weight: float = field(default=1.0, metadata={
        "help": "λ, scaling every method's term; distances are in default-to-role gaps. 0 leaves training untouched "
                "(metrics still logged)."})
    floor_percentile: float = field(default=10.0, metadata={
        "help": "τ is this percentile (0-100) of the default Assistant's per-answer projections at each layer "
                "(floor's hinge, and the logged share of sequences below it)."})
    probe_every: int = field(default=0, metadata={
        "help": "Measure probe drift every N optimizer steps (0 = off)."})
    weight_warmup_steps: int = field(default=0, metadata={
        "help": "λ rises linearly from 0 to `weight` over this many optimizer steps."})
    axis_check_weights: bool = field(default=True, metadata={
        "help": "Refuse a bundle whose model fingerprint differs; set False when the model is a fine-tune of the "
                "bundle's model."})
    axis_n_roles: int | None = field(default=AxisSettings.n_roles, metadata={
        "help": "On-the-fly axis: number of shipped roles to sample (None = all)."})
    axis_n_questions: int | None = field(default=AxisSettings.n_questions, metadata={
        "help": "On-the-fly axis: number of shipped questions (None = all)."})
    axis_prompts_per_role: int | None = field(default=AxisSettings.prompts_per_role, metadata={
        "help": "On-the-fly axis: system prompts per role (None = all)."})
    axis_max_new_tokens: int = field(default=AxisSettings.max_new_tokens, metadata={
        "help": "On-the-fly axis: tokens generated per answer."})
    axis_batch_size: int = field(default=128, metadata={"help": "On-the-fly axis: generation batch size."})
    probe_file: str | None = field(default=None, metadata={
        "help": "Your own probes: JSON {'version': 1, 'probes': [{'domain': ..., 'prompt': ...}]} or JSONL of such "
                "objects. None: the 64 shipped probes (coding, writing, emotional, meta)."})
    probes_per_domain: int | None = field(default=None, metadata={
        "help": "Use the first N probes of each domain (None = all); each probe step costs a forward over them."})
    probe_mode: str = field(default="teacher_forced", metadata={
        "help": "teacher_forced: re-read the base model's step-0 answers; generated: answer again each time."})
    probe_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per probe answer."})
    probe_batch_size: int = field(default=16, metadata={
        "help": "Batch size of probe forwards and generation (and, at least, of lm_replay's one-off pool answers)."})
    probe_far_roles: int = field(default=3, metadata={
        "help": "Role-likeness score: number of far roles (bottom of the axis) compared with the default prompt; "
                "0 = off. Needs a frozen reference (PEFT, or a method that keeps one: match, replay, kl)."})
    replay_batch_size: int = field(default=8, metadata={
        "help": "replay, lm_replay, kl: default-persona conversations per optimizer step."})
    replay_refresh_steps: int = field(default=10, metadata={
        "help": "replay, kl: the model re-answers the replay prompts every N optimizer steps (on-policy)."})
    replay_every: int = field(default=1, metadata={
        "help": "replay, lm_replay, kl: add the replayed batch's term on every Nth optimizer step only, counted N "
                "times there, so its mean pull is unchanged while its extra forward runs 1/N as often."})
    replay_max_new_tokens: int = field(default=48, metadata={
        "help": "replay, lm_replay, kl: tokens per replayed answer."})
    replay_layers: list[int] | None = field(default=None, metadata={
        "help": "replay: layers compared with the reference (None = from the first anchor layer to the last)."})
    replay_questions: list[str] | None = field(default=None, metadata={
        "help": "replay, lm_replay, kl: the questions asked; None = the shipped questions. Keep them apart from the "
                "questions you measure drift on."})
    lm_replay_pool: int = field(default=32, metadata={
        "help": "lm_replay: plain questions the base model answers before training (the pool rows are drawn from)."})
    lm_replay_data: str | None = field(default=None, metadata={
        "help": "lm_replay: a JSONL of chat `messages` whose last turn is a default-persona answer (e.g. the base "
                "model's own, or your instruct data) to replay instead of answering lm_replay_pool questions."})
    steer_coefficient: float = field(default=0.01, metadata={
        "help": "preventative: steering strength k, in units of the layer's mean residual norm (added at every anchor "
                "layer, so keep it small: 0.05 over 11 layers already quadruples SmolLM2's NLL of in-role text)."})
    incremental_coefficient: float = field(default=0.5, metadata={
        "help": "incremental: the push away from the Assistant the residual stream carries at every layer, in "
                "default-to-role gaps (added layer-incrementally, so pushes do not pile up)."})
    ablate_components: int = field(default=1, metadata={
        "help": "ablate: directions held at the default Assistant's values during training: 1 = the axis; k > 1 = "
                "the axis and the top k-1 persona PCs."})
    log_prefix: str = field(default="anchor", metadata={"help": "Prefix of the logged metrics."})

    def __post_init__(self) -> None:
        from anchor.methods import get_method

        if isinstance(self.method, str):  # one name, or names joined by "+"/"," (a convenient single string)
            self.method = [m.strip() for m in self.method.replace("+", ",").split(",") if m.strip()]
        self.method = list(self.method)
        if not self.method or len(set(self.method)) != len(self.method):
            raise ValueError(f"AnchorConfig.method={self.method}: name one or more methods, each once.")
        for name in self.method:
            try:
                get_method(name)
            except ValueError as err:
                raise ValueError(f"AnchorConfig.method: {err}") from None
        if self.method_weights is not None:
            self.method_weights = [float(w) for w in self.method_weights]
            if len(self.method_weights) != len(self.method):
                raise ValueError(f"AnchorConfig.method_weights={self.method_weights} must give one weight per method "
                                 f"{self.method}.")
        if self.probe_mode not in PROBE_MODES:
            raise ValueError(f"AnchorConfig.probe_mode={self.probe_mode!r}; choose one of {PROBE_MODES}.")
        self._check_numbers()
        if self.layers is not None and len(self.layers) == 0:
            raise ValueError("AnchorConfig.layers=[] anchors nothing; give layer indices, or None for the default "
                             "band.")
        if self.replay_questions is not None and not all(isinstance(q, str) and q.strip()
                                                         for q in self.replay_questions or [""]):
            raise ValueError("AnchorConfig.replay_questions must be a non-empty list of non-empty strings (or None "
                             "for the shipped questions).")
        if self.lm_replay_data is not None and not Path(self.lm_replay_data).is_file():
            raise FileNotFoundError(f"AnchorConfig.lm_replay_data={self.lm_replay_data!r}: no such file; give a JSONL "
                                    "of chat `messages` ending with the answer to replay.")
        self._warn_unused()

    def _check_numbers(self) -> None:
        """Every number finite and in range: a NaN passes ``< 0`` and would train to garbage."""
        floats = {"weight": self.weight, "floor_percentile": self.floor_percentile,
                  "steer_coefficient": self.steer_coefficient, "incremental_coefficient": self.incremental_coefficient}
        floats.update({f"method_weights[{i}]": w for i, w in enumerate(self.method_weights or [])})
        for name, value in floats.items():
            if not math.isfinite(value):
                raise ValueError(f"AnchorConfig.{name}={value} must be a finite number.")
            if value < 0:
                raise ValueError(f"AnchorConfig.{name}={value} must be >= 0.")
        if self.floor_percentile > 100:
            raise ValueError(f"AnchorConfig.floor_percentile={self.floor_percentile} must be within 0..100.")
        for name in ("probe_every", "weight_warmup_steps", "probe_far_roles"):
            if getattr(self, name) < 0:
                raise ValueError(f"AnchorConfig.{name}={getattr(self, name)} must be >= 0.")
        for name in ("replay_batch_size", "replay_every", "replay_refresh_steps", "replay_max_new_tokens",
                     "lm_replay_pool",
                     "probe_max_new_tokens", "probe_batch_size", "axis_max_new_tokens", "axis_batch_size",
                     "ablate_components"):
            if getattr(self, name) < 1:
                raise ValueError(f"AnchorConfig.{name}={getattr(self, name)} must be >= 1.")
        if self.probes_per_domain is not None and self.probes_per_domain < 1:
            raise ValueError(f"AnchorConfig.probes_per_domain={self.probes_per_domain} must be >= 1 (None: all).")

    def _warn_unused(self) -> None:
        """Warn about each field set away from its default that none of the chosen methods reads."""
        from anchor.methods import get_method

        read = set(COMMON_FIELDS)
        for name in self.method:
            read |= set(get_method(name).fields)
        for f in fields(self):
            if f.name in read:
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            if getattr(self, f.name) != default:
                logger.warning("anchor: AnchorConfig.%s=%r has no effect: no chosen method (%s) reads it.",
                               f.name, getattr(self, f.name), ", ".join(self.method))

    def axis_settings(self) -> AxisSettings:
        """The on-the-fly axis's sampling settings (the key of its cache)."""
        return AxisSettings(n_roles=self.axis_n_roles, n_questions=self.axis_n_questions,
                            prompts_per_role=self.axis_prompts_per_role, max_new_tokens=self.axis_max_new_tokens)

    def weights(self) -> dict[str, float]:
        """``{method: its weight}`` (before λ)."""
        return dict(zip(self.method, self.method_weights or [1.0] * len(self.method), strict=True))


__all__ = ["PROBE_MODES", "AnchorConfig"]
