"""The frozen model an anchor compares with: the base model, run under ``no_grad`` at the policy's precision.

With PEFT it is the trained model itself with its adapters disabled (no extra memory); for full fine-tuning a frozen
deep copy taken before training (one more copy of the weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from anchor.models import unwrap

logger = logging.getLogger(__name__)


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


def is_fsdp(model: nn.Module) -> bool:
    """PyTorch FSDP (1 or 2) holds each parameter as a shard spread over the ranks; such a model refuses a deep copy.
    Torch marks the modules it manages with ``_is_fsdp_managed_module`` (transformers' generate reads the same)."""
    return any(getattr(m, "_is_fsdp_managed_module", False) for m in model.modules())


def check_copyable(model: nn.Module, methods: list[str] | None = None) -> None:
    """Refuse, with the fix, a full fine-tune whose frozen reference would be a copy of a sharded model.

    Called before the axis is computed, so a run that cannot start fails in seconds, not after minutes of set-up.
    """
    if find_peft(model) is not None or not (is_zero3(model) or is_fsdp(model)):
        return
    who = f"method(s) {methods} compare(s)" if methods else "This anchor compares"
    raise ValueError(
        f"{who} with the frozen base model. For full fine-tuning that is a copy of the model, which cannot be made "
        "of a sharded model (DeepSpeed ZeRO-3, FSDP). Train a PEFT adapter (the reference is then the "
        f"adapter-disabled model) or use methods that need no frozen copy ({', '.join(copy_free_methods())}), e.g. "
        "AnchorConfig(method=[\"preventative\", \"lm_replay\"]) (recipes/sft-full.yaml)."
    )


def copy_free_methods() -> list[str]:
    """The registered methods that never read the frozen base model, so need no copy of a fully fine-tuned one.
    Read from the registry, so a method registered later is named in the messages that offer them."""
    from anchor.methods import available_methods, get_method

    return [name for name in available_methods() if not get_method(name).needs_reference]


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
        if frozen is None:
            check_copyable(model)
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
        size = sum(p.numel() * p.element_size() for p in self.module.parameters()) / 2**30
        logger.info("anchor: the frozen reference is a copy of the model (%.2f GiB more on its device); a PEFT "
                    "adapter needs none, nor do these methods: %s.", size, ", ".join(copy_free_methods()))

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


def needs_reference(config: Any) -> bool:
    """Whether one of ``config.method`` compares with the frozen base model."""
    from anchor.methods import get_method

    return any(get_method(name).needs_reference for name in config.method)


def training_reference(model: nn.Module, config: Any, resumed: bool, autocast: Callable | None = None,
                       fingerprint: str | None = None) -> Reference | None:
    """The reference a training run needs: for methods that compare with the base model, and for the role-likeness
    probe only when PEFT makes it free. On resume of a full fine-tune the model has moved, so the base weights are
    reloaded from ``config._name_or_path`` and checked against the axis bundle's ``fingerprint``."""
    needed = needs_reference(config)
    peft = find_peft(model) is not None
    if not needed and not (config.probe_every and config.probe_far_roles and peft):
        return None
    frozen = _reload_base(model, fingerprint) if resumed and not peft else None
    return Reference(model, frozen=frozen, autocast=autocast)


def _reload_base(model: nn.Module, expected: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from anchor.models import fingerprint

    base = unwrap(model)
    source = getattr(base.config, "_name_or_path", "")
    hint = ("Resuming full fine-tuning with a method that compares with the base model needs it as the frozen "
            "reference; train a PEFT adapter, or start from a model saved with save_pretrained whose "
            "config._name_or_path points at it.")
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


__all__ = ["Reference", "check_copyable", "find_peft", "is_fsdp", "is_zero3", "needs_reference", "training_reference"]
