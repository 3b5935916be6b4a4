"""Anchoring methods: one file each, registered by name, composed by ``AnchorConfig(method=[...])``.

Built in:

* ``floor`` — squared hinge on each training sequence's mean projection falling below τ (Goodharts: the anchored
  layers stay put while behaviour drifts; kept as the measured cautionary baseline);
* ``match`` — each trained token's projection stays at the frozen reference's on the same tokens;
* ``replay`` — the model's own sampled default answers keep the reference's projections over a band of layers;
* ``preventative`` — steer away from the Assistant during training only, so the weights need not move that way;
* ``lm_replay`` — axis-free: the LM loss of the base model's own answers to plain questions;
* ``kl`` — axis-free: KL(base ‖ model) on the model's own sampled default answers (on-policy);
* ``incremental`` — preventative steering at every layer, layer-incrementally (no pile-up of pushes);
* ``ablate`` — hold the axis (and optionally the top persona PCs) at the default's values while training.

Add your own with :func:`register_method` (see :mod:`anchor.methods.base`).
"""

from anchor.methods import ablate, floor, incremental, kl, lm_replay, match, preventative, replay  # noqa: F401
from anchor.methods.base import (
    AnchorMethod,
    RunContext,
    available_methods,
    build_methods,
    default_prompts,
    get_method,
    register_method,
    replay_questions,
)

__all__ = ["AnchorMethod", "RunContext", "available_methods", "build_methods", "default_prompts", "get_method",
           "register_method", "replay_questions"]
