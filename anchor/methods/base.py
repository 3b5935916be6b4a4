"""The interface of an anchoring method, and the registry that names them.

A method is one idea about keeping the persona, in one small file: what it reads, what it adds at a layer's
output, and what it keeps in a checkpoint. The engine (:class:`anchor.engine.Anchor`) runs the hooks, tells the
policy's training passes from reference and evaluation passes, scales every term by λ × the method's weight,
injects it into the trainer's backward and collects metrics; it never names a method. A new method is a subclass
of :class:`AnchorMethod` with a ``name``, decorated with :func:`register_method`, from anywhere (your own module
included); ``AnchorConfig(method=[...])`` then composes it with the others.

Hooks, all optional (the engine calls each on every method, in the configured order):

* :meth:`~AnchorMethod.setup` — once before training on a fresh run (e.g. the base model answers a replay pool);
* :meth:`~AnchorMethod.start_step` — at the start of each optimizer step;
* :meth:`~AnchorMethod.before_forward` — before each policy training forward that has gradients (e.g. read the
  reference's projections on the same batch);
* :meth:`~AnchorMethod.edit` — change a layer's output on policy training passes (steering, ablation);
* :meth:`~AnchorMethod.penalty` — a term from a layer's projections of the trained tokens (per micro-batch);
* :meth:`~AnchorMethod.step_loss` — a term from an extra forward, once per optimizer step (replay, KL), or once
  every ``replay_every`` steps, counted that many times, when the extra forward's cost matters;
* :meth:`~AnchorMethod.state_dict` / :meth:`~AnchorMethod.load_state_dict` — what a resume needs, as tensors plus
  JSON, so a resumed run is bit-exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from anchor.config import AnchorConfig
    from anchor.engine import Anchor

_REGISTRY: dict[str, type[AnchorMethod]] = {}


@dataclass
class RunContext:
    """What a method may use to prepare itself before training: the model as it is before any update (the base),
    the tokenizer, and the run's seed and process index (so per-rank draws differ and a resume repeats them)."""

    model: nn.Module
    tokenizer: Any
    seed: int = 0
    process_index: int = 0
    progress: bool = False
    resumed: bool = False


class AnchorMethod:
    """Base class of anchoring methods; see the module docstring for the hooks.

    Class attributes: ``name`` (the registry key), ``fields`` (the :class:`~anchor.config.AnchorConfig` fields it
    reads besides the common ones), ``needs_reference`` (it compares with the frozen base model),
    ``needs_template`` (it writes chat prompts, so the tokenizer needs a chat template).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    needs_reference: ClassVar[bool] = False
    needs_template: ClassVar[bool] = False

    def __init__(self, config: AnchorConfig, weight: float = 1.0):
        self.config = config
        self.weight = float(weight)

    def layers(self, engine: Anchor) -> Sequence[int]:
        """The decoder layers whose outputs this method reads or edits (default: the anchored band)."""
        return engine.layers

    def setup(self, run: RunContext) -> None:
        """Prepare before the first step of a fresh run (not on resume: :meth:`load_state_dict` restores)."""

    def start_step(self, engine: Anchor, step: int) -> None:
        """Called at the start of each optimizer step ``step``."""

    def before_forward(self, engine: Anchor, inputs: dict[str, torch.Tensor]) -> None:
        """Called before each policy training forward with gradients, with its model inputs."""

    def edit(self, engine: Anchor, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """A replacement for ``layer``'s output on policy training passes, or None to leave it."""
        return None

    def penalty(self, engine: Anchor, layer: int, proj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """A scalar term from ``proj [B, T]`` (projections of ``layer``'s output on the unit axis, finite) over
        the trained tokens ``mask``; the engine averages it over this method's layers."""
        return None

    def step_loss(self, engine: Anchor) -> torch.Tensor | None:
        """A scalar term added once per optimizer step (every ``replay_every``-th step, scaled by it), from forwards
        the method runs through the engine."""
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json-able metadata)`` a resume needs."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"


def register_method(cls: type[AnchorMethod]) -> type[AnchorMethod]:
    """Class decorator: make ``cls`` available as ``AnchorConfig(method=[cls.name])``."""
    if not (isinstance(cls, type) and issubclass(cls, AnchorMethod)) or not cls.name:
        raise TypeError(f"{cls!r} must subclass anchor.methods.AnchorMethod and set a non-empty `name`.")
    known = _REGISTRY.get(cls.name)
    reloaded = known is not None and (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__)
    if known is not None and known is not cls and not reloaded:
        raise ValueError(f"An anchoring method named {cls.name!r} is already registered ({known.__module__}."
                         f"{known.__qualname__}); choose another name.")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[AnchorMethod]:
    """The registered method class called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown anchoring method {name!r}; choose one of {available_methods()}, or register your "
                         "own with @anchor.methods.register_method.")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """The names of every registered method."""
    return sorted(_REGISTRY)


def build_methods(config: AnchorConfig) -> list[AnchorMethod]:
    """One instance per ``config.method`` entry, with its weight."""
    return [get_method(name)(config, weight) for name, weight in config.weights().items()]


def default_prompts(tokenizer: Any, questions: Sequence[str], n: int, salt: str,
                    system_prompts: Sequence[str] = ("",)) -> list[list[int]]:
    """``n`` seeded (system prompt, question) conversations as generation-prompt token ids; an empty system prompt
    means none (the template's own default applies)."""
    from anchor.spans import encode_prompt

    rng = random.Random(salt)
    pairs = [(rng.choice(list(system_prompts)), rng.choice(list(questions))) for _ in range(n)]
    return [encode_prompt(tokenizer, ([{"role": "system", "content": s}] if s else [])
                          + [{"role": "user", "content": q}]) for s, q in pairs]


def on_policy_batch(engine: Anchor, tokenizer: Any, prompts: Sequence[Sequence[int]], step: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The current model's sampled answers to ``prompts``, packed right-padded ``(ids, attention, answer_mask)``.

    Seeded by (seed, step, rank), so a resumed run samples the same answers; sampling runs in eval mode under
    preserved RNG, so it changes neither the model's mode nor the training randomness.
    """
    from anchor.models import unwrap
    from anchor.probes import generate_answers, pack_answers

    cfg, run = engine.config, engine.run
    seed = (run.seed * 1_000_003 + step) * 101 + run.process_index
    answers = generate_answers(unwrap(engine.model), tokenizer, prompts, cfg.replay_max_new_tokens,
                               cfg.replay_batch_size, sample=True, seed=seed)
    return pack_answers(prompts, answers, tokenizer.pad_token_id)


def refresh_due(batch_step: int | None, step: int, every: int) -> bool:
    """Whether an on-policy batch sampled at ``batch_step`` (None: none yet) is re-sampled at ``step``."""
    return batch_step is None or (step % every == 0 and batch_step != step)


class OnPolicyMethod(AnchorMethod):
    """A method that reads the current model's own sampled answers to default-persona prompts, re-sampled every
    ``replay_refresh_steps`` optimizer steps (seeded by seed, step and rank, so a resume samples the same ones).

    Subclasses say whether the prompts carry default system prompts, and take each new sample in
    :meth:`set_batch`; :attr:`sampled_at` is the step of the current sample (None before the first).
    """

    fields: ClassVar[tuple[str, ...]] = ("replay_batch_size", "replay_every", "replay_refresh_steps",
                                         "replay_max_new_tokens", "replay_questions")
    needs_template = True
    system_prompts: ClassVar[bool] = False
    sampled_at: int | None = None

    def setup(self, run: RunContext) -> None:
        from anchor.personas import load_default_prompts

        self._tokenizer = run.tokenizer
        systems = load_default_prompts() if self.system_prompts else ("",)
        self._prompts = default_prompts(run.tokenizer, replay_questions(self.config), self.config.replay_batch_size,
                                        f"anchor-{self.name}-{run.seed}", systems)

    def start_step(self, engine: Anchor, step: int) -> None:
        if refresh_due(self.sampled_at, step, self.config.replay_refresh_steps):
            self.set_batch(engine, *on_policy_batch(engine, self._tokenizer, self._prompts, step), step=step)

    def set_batch(self, engine: Anchor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  answer_mask: torch.Tensor, step: int) -> None:
        """Use these right-padded answers ``[N, T]`` (``answer_mask``: the answer tokens) from now on."""
        raise NotImplementedError


def replay_questions(config: AnchorConfig) -> list[str]:
    """The questions replay-style methods ask: the configured ones, else the shipped questions."""
    from anchor.personas import load_questions

    return list(config.replay_questions or load_questions())


__all__ = ["AnchorMethod", "OnPolicyMethod", "RunContext", "available_methods", "build_methods", "default_prompts",
           "get_method", "on_policy_batch", "refresh_due", "register_method", "replay_questions"]
